//! Durations as written in the CRDs: `90d`, `12h`, `30m`, `45s`, or combined (`1d12h`).
//!
//! Every duration field of a spec is a [`SpecDuration`]: parsed once, when the spec is read, and
//! kept with its text (the wire format stays that string, so the spec hash does not change).
//! A value the parser refuses still deserializes: one bad object must not break the list and
//! watch of all the others; it is reported, naming its field, where the value is used.

use std::fmt;

use chrono::Duration;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// What [`parse_duration`] accepts, as a pattern the CRD schema can reuse. Units: d, h, m, s.
pub const DURATION_PATTERN: &str = "^([0-9]+(d|h|m|s))+$";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error(
        "invalid duration {input:?}: write numbers each followed by a unit d, h, m or s, e.g. 90d, 12h or 1d12h"
    )]
    Syntax { input: String },
    #[error("duration {input:?} is too large: write a smaller one, e.g. 90d")]
    TooLarge { input: String },
}

/// A duration field's value is not a duration; names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {error}")]
pub struct SpecDurationError {
    pub field: String,
    pub error: DurationError,
}

/// A spec's duration: its text as written and what it parsed to.
#[derive(Clone)]
pub struct SpecDuration {
    text: String,
    parsed: Result<Duration, DurationError>,
}

impl SpecDuration {
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let parsed = parse_duration(&text);
        SpecDuration { text, parsed }
    }

    /// The text as written in the spec.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed value, or why it is not a duration (without a field name).
    pub fn parsed(&self) -> Result<Duration, &DurationError> {
        self.parsed.as_ref().copied()
    }

    /// The value, or an error naming `field` (e.g. `validation.timeout`) and the fix.
    pub fn get(&self, field: &str) -> Result<Duration, SpecDurationError> {
        self.parsed.clone().map_err(|error| SpecDurationError {
            field: field.to_string(),
            error,
        })
    }

    /// [`Self::get`] as a `std::time::Duration` (the parser never yields a negative one).
    pub fn get_std(&self, field: &str) -> Result<std::time::Duration, SpecDurationError> {
        self.get(field)
            .map(|d| d.to_std().unwrap_or(std::time::Duration::ZERO))
    }
}

impl From<&str> for SpecDuration {
    fn from(text: &str) -> Self {
        SpecDuration::new(text)
    }
}

impl From<String> for SpecDuration {
    fn from(text: String) -> Self {
        SpecDuration::new(text)
    }
}

/// Two durations are the same field value when they are written the same (`60m` is not `1h`:
/// the spec hash sees the text).
impl PartialEq for SpecDuration {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for SpecDuration {}

/// Like the string it was (status and logs show the spec as written).
impl fmt::Debug for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for SpecDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for SpecDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SpecDuration::new)
    }
}

/// A plain string in the schema; each field adds its pattern or CEL rule and message.
impl schemars::JsonSchema for SpecDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "String".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
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

    #[test]
    fn spec_duration_keeps_its_text_and_names_the_field() {
        let d: SpecDuration = serde_json::from_str("\"90m\"").unwrap();
        assert_eq!(d.get("validation.timeout"), Ok(Duration::minutes(90)));
        assert_eq!(d.get_std("x"), Ok(std::time::Duration::from_secs(5400)));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"90m\"");
        assert_eq!(format!("{d:?}"), "\"90m\"");
        assert_ne!(d, SpecDuration::from("1h30m"), "compared as written");

        // A refused value still deserializes; its use names the field and the fix.
        let bad: SpecDuration = serde_json::from_str("\"99999999999999999999d\"").unwrap();
        assert_eq!(bad.as_str(), "99999999999999999999d");
        let err = bad.get("provisioning.timeout").unwrap_err().to_string();
        assert!(err.starts_with("provisioning.timeout: "), "{err}");
        assert!(
            err.contains("too large") && err.contains("e.g. 90d"),
            "{err}"
        );
        let err = SpecDuration::from("soon").get("rebuild.sourceCheckInterval");
        let err = err.unwrap_err().to_string();
        assert!(
            err.starts_with("rebuild.sourceCheckInterval: invalid duration \"soon\"")
                && err.contains("unit d, h, m or s"),
            "{err}"
        );
        assert!(
            serde_json::from_str::<SpecDuration>("30").is_err(),
            "not a string"
        );
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
            // Keeps the parser and the CRD's pattern in step.
            let matches_pattern = regex::Regex::new(DURATION_PATTERN).unwrap().is_match(&s);
            // Too large still matches the pattern (the parser's own refusal).
            let parses = !matches!(parse_duration(&s), Err(DurationError::Syntax { .. }));
            prop_assert_eq!(parses, matches_pattern, "{}", s);
        }
    }
}
