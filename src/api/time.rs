//! The one place where the Kubernetes types' times meet ours.
//!
//! sombrero computes with chrono: croner (the cron schedules) takes and returns chrono times, and
//! so does every pure module. k8s-openapi's `Time` and `MicroTime` wrap jiff's `Timestamp`; jiff is
//! only reached through k8s-openapi's re-export, here. `Time` is written to the API server with
//! whole seconds, so it is built with whole seconds: a status computed here compares equal to the
//! one read back (no needless status write); `MicroTime` keeps microseconds, as it is written.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

/// A status `Time` (whole seconds, as Kubernetes stores it).
pub fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A `Time` read from the API server.
pub fn from_time(t: &Time) -> DateTime<Utc> {
    from_timestamp(t.0)
}

/// An Event's `MicroTime` (microseconds, as Kubernetes stores it).
pub fn to_micro_time(t: DateTime<Utc>) -> MicroTime {
    let micros = i128::from(t.timestamp_micros()) * 1_000;
    MicroTime(Timestamp::from_nanosecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A `MicroTime` read from the API server.
pub fn from_micro_time(t: &MicroTime) -> DateTime<Utc> {
    from_timestamp(t.0)
}

fn from_timestamp(t: Timestamp) -> DateTime<Utc> {
    // jiff's sub-second part has the sign of the time, chrono's is always positive.
    let nanos = t.as_nanosecond();
    let (secs, sub) = (
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000),
    );
    DateTime::from_timestamp(secs as i64, sub as u32).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_at_the_precision_kubernetes_stores() {
        let t = DateTime::from_timestamp(1_780_000_000, 123_456_789).unwrap();
        let whole = DateTime::from_timestamp(1_780_000_000, 0).unwrap();
        assert_eq!(from_time(&to_time(t)), whole);
        let json = serde_json::to_string(&to_time(t)).unwrap();
        assert_eq!(json, "\"2026-05-28T20:26:40Z\"");
        assert_eq!(serde_json::from_str::<Time>(&json).unwrap(), to_time(t));

        let micro = DateTime::from_timestamp(1_780_000_000, 123_456_000).unwrap();
        assert_eq!(from_micro_time(&to_micro_time(t)), micro);
        let json = serde_json::to_string(&to_micro_time(t)).unwrap();
        assert_eq!(json, "\"2026-05-28T20:26:40.123456Z\"");
    }

    #[test]
    fn before_the_epoch() {
        let t = DateTime::from_timestamp(-1, 500_000_000).unwrap();
        assert_eq!(from_micro_time(&to_micro_time(t)), t);
        assert_eq!(from_time(&to_time(t)).timestamp(), -1);
    }
}
