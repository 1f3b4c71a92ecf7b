//! Durations as written in the CRDs: `90d`, `12h`, `30m`, `45s`, or combined (`1d12h`).

use chrono::Duration;
use thiserror::Error;

/// What [`parse_duration`] accepts, as a pattern the CRD schema can reuse. Units: d, h, m, s.
pub const DURATION_PATTERN: &str = "^([0-9]+[dhms])+$";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error(
        "invalid duration {input:?}: write numbers each followed by a unit d, h, m or s, e.g. 90d, 12h or 1d12h"
    )]
    Syntax { input: String },
    #[error("duration {input:?} is too large")]
    TooLarge { input: String },
}

/// Parses a CRD duration. Repeated units add up (`1d1d` = 2 days), as the pattern allows them.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax {
        input: input.to_string(),
    };
    let too_large = || DurationError::TooLarge {
        input: input.to_string(),
    };
    if input.is_empty() {
        return Err(syntax());
    }
    let mut total: i64 = 0;
    let mut number: Option<i64> = None;
    for c in input.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(i64::from(digit)))
                    .ok_or_else(too_large)?,
            );
            continue;
        }
        let unit_seconds = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(syntax()),
        };
        let n = number.take().ok_or_else(syntax)?;
        total = n
            .checked_mul(unit_seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(too_large)?;
    }
    if number.is_some() {
        // Digits without a unit at the end, e.g. "90".
        return Err(syntax());
    }
    Duration::try_seconds(total).ok_or_else(too_large)
}

/// Formats a duration the way the CRD writes it (`90d`, `1d12h`, `0s`); negative as `-…`.
pub fn format_duration(duration: Duration) -> String {
    let total = duration.num_seconds();
    let sign = if total < 0 { "-" } else { "" };
    let mut rest = total.unsigned_abs();
    let mut out = String::from(sign);
    for (unit, seconds) in [('d', 86_400u64), ('h', 3_600), ('m', 60), ('s', 1)] {
        let n = rest / seconds;
        rest %= seconds;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.len() == sign.len() {
        out.push_str("0s");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(parse_duration("90d"), Ok(Duration::days(90)));
        assert_eq!(parse_duration("12h"), Ok(Duration::hours(12)));
        assert_eq!(parse_duration("30m"), Ok(Duration::minutes(30)));
        assert_eq!(parse_duration("45s"), Ok(Duration::seconds(45)));
        assert_eq!(
            parse_duration("1d12h"),
            Ok(Duration::days(1) + Duration::hours(12))
        );
        assert_eq!(parse_duration("0d"), Ok(Duration::zero()));
        assert_eq!(parse_duration("1d1d"), Ok(Duration::days(2)));
    }

    #[test]
    fn errors_name_the_input() {
        for bad in [
            "", "90", "d", "90x", "9 0d", " 90d", "90d ", "-1d", "1.5d", "90D", "1w", "٣d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_duration("9999999999999999d"),
            Err(DurationError::TooLarge { .. })
        ));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::days(90)), "90d");
        assert_eq!(
            format_duration(Duration::days(1) + Duration::hours(12)),
            "1d12h"
        );
        assert_eq!(format_duration(Duration::zero()), "0s");
        assert_eq!(format_duration(Duration::seconds(-61)), "-1m1s");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,30}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn format_then_parse_round_trips(secs in 0i64..10_000_000_000) {
            let d = Duration::seconds(secs);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn pattern_matches_exactly_what_parses(s in "[0-9dhmsx]{0,8}") {
            // Hand-written check of DURATION_PATTERN, to keep parser and CRD pattern in step.
            let matches_pattern = !s.is_empty()
                && s.chars().all(|c| c.is_ascii_digit() || "dhms".contains(c))
                && s.chars().next().is_some_and(|c| c.is_ascii_digit())
                && s.chars().last().is_some_and(|c| "dhms".contains(c))
                && !s.as_bytes().windows(2).any(|w| !w[0].is_ascii_digit() && !w[1].is_ascii_digit());
            prop_assert_eq!(parse_duration(&s).is_ok(), matches_pattern, "{}", s);
        }
    }
}
