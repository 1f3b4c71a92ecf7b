//! Serde helpers for PVE's Perl-typed JSON: integers that arrive as strings (`nextid`, storage
//! `size`), booleans as `0`/`1` or `"1"` (`template`, `exited`), numbers where a string is
//! documented. Use with `#[serde(default, deserialize_with = "...")]`.

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::Value;

fn value_to_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().and_then(|u| i64::try_from(u).ok()))
            // Some counters arrive as floats (`1.0`); accept them when they are whole.
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            }),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

fn value_to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|i| i != 0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// An integer from a JSON number or a numeric string.
pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_i64(&v).ok_or_else(|| de::Error::custom(format!("expected an integer, got {v}")))
}

/// Like [`int`], for a `u64` (sizes, byte counters).
pub fn uint<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_i64(&v)
        .and_then(|i| u64::try_from(i).ok())
        .or_else(|| v.as_u64())
        .ok_or_else(|| de::Error::custom(format!("expected a non-negative integer, got {v}")))
}

/// Like [`int`], for a VMID or another `u32`.
pub fn u32_<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_i64(&v)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| de::Error::custom(format!("expected a 32-bit unsigned integer, got {v}")))
}

/// An optional integer: missing, `null` or an empty string give `None`.
pub fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(v) => value_to_i64(&v)
            .map(Some)
            .ok_or_else(|| de::Error::custom(format!("expected an integer, got {v}"))),
    }
}

/// An optional `u64`.
pub fn opt_uint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    opt_int(d)?
        .map(|i| {
            u64::try_from(i)
                .map_err(|_| de::Error::custom(format!("expected a non-negative integer, got {i}")))
        })
        .transpose()
}

/// An optional `u32` (VMIDs, pids).
pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    opt_int(d)?
        .map(|i| {
            u32::try_from(i).map_err(|_| {
                de::Error::custom(format!("expected a 32-bit unsigned integer, got {i}"))
            })
        })
        .transpose()
}

/// A boolean from `true`/`false`, `0`/`1` or `"0"`/`"1"`; missing or `null` is `false`.
pub fn bool01<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(v) => value_to_bool(&v)
            .ok_or_else(|| de::Error::custom(format!("expected a boolean, got {v}"))),
    }
}

/// An optional boolean, lenient like [`bool01`].
pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_to_bool(&v)
            .map(Some)
            .ok_or_else(|| de::Error::custom(format!("expected a boolean, got {v}"))),
    }
}

/// An optional string that may arrive as a number (`"name": 123`).
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(if b { "1" } else { "0" }.to_owned())),
        Some(v) => Err(de::Error::custom(format!("expected a string, got {v}"))),
    }
}

/// Render any scalar config value as PVE would write it in the config file.
pub(crate) fn scalar_to_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "1" } else { "0" }.to_owned(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(deserialize_with = "int")]
        i: i64,
        #[serde(default, deserialize_with = "opt_uint")]
        size: Option<u64>,
        #[serde(default, deserialize_with = "bool01")]
        template: bool,
        #[serde(default, deserialize_with = "opt_bool")]
        agent: Option<bool>,
        #[serde(default, deserialize_with = "opt_string")]
        name: Option<String>,
        #[serde(default, deserialize_with = "opt_u32")]
        vmid: Option<u32>,
    }

    fn parse(s: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn integers_from_strings_and_numbers() {
        let t = parse(r#"{"i":"218","size":"1024","vmid":"100"}"#).unwrap();
        assert_eq!((t.i, t.size, t.vmid), (218, Some(1024), Some(100)));
        let t = parse(r#"{"i":218,"size":1024,"vmid":100}"#).unwrap();
        assert_eq!((t.i, t.size, t.vmid), (218, Some(1024), Some(100)));
        let t = parse(r#"{"i":2.0,"size":null}"#).unwrap();
        assert_eq!((t.i, t.size), (2, None));
        assert!(parse(r#"{"i":"abc"}"#).is_err());
        assert!(parse(r#"{"i":1,"size":-1}"#).is_err());
        assert!(parse(r#"{"i":1,"vmid":99999999999}"#).is_err());
    }

    #[test]
    fn booleans_in_every_perl_shape() {
        for (json, want) in [
            ("1", true),
            ("0", false),
            ("\"1\"", true),
            ("\"0\"", false),
            ("true", true),
            ("false", false),
        ] {
            let t = parse(&format!(r#"{{"i":1,"template":{json},"agent":{json}}}"#)).unwrap();
            assert_eq!(t.template, want, "{json}");
            assert_eq!(t.agent, Some(want), "{json}");
        }
        let t = parse(r#"{"i":1}"#).unwrap();
        assert!(!t.template);
        assert_eq!(t.agent, None);
        assert!(parse(r#"{"i":1,"template":"maybe"}"#).is_err());
    }

    #[test]
    fn missing_optionals_and_numeric_strings() {
        let t = parse(r#"{"i":1,"name":123}"#).unwrap();
        assert_eq!(t.name.as_deref(), Some("123"));
        let t = parse(r#"{"i":1,"name":null}"#).unwrap();
        assert_eq!(t.name, None);
    }
}
