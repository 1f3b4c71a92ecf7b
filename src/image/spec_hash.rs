//! A stable short hash of a spec: canonical JSON (object keys sorted at every level, no
//! whitespace) -> SHA-256 -> first 16 hex characters. Field order in the Rust type or in the
//! user's YAML does not change it, so "did the spec change?" is a string comparison.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Length of the hash in hex characters (64 bits).
pub const SPEC_HASH_LEN: usize = 16;

#[derive(Debug, Error)]
#[error("cannot hash the spec: it does not serialize to JSON: {0}")]
pub struct SpecHashError(#[from] serde_json::Error);

/// The spec hash of any serializable value.
pub fn spec_hash<T: Serialize + ?Sized>(value: &T) -> Result<String, SpecHashError> {
    let value = serde_json::to_value(value)?;
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    let digest = hex::encode(Sha256::digest(canonical.as_bytes()));
    Ok(digest[..SPEC_HASH_LEN].to_string())
}

/// Sorts keys explicitly: serde_json's map keeps insertion order when another crate in the
/// build enables its `preserve_order` feature.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Scalars: serde_json's own rendering is already canonical.
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[derive(Serialize)]
    struct A {
        os: String,
        cores: u32,
    }
    #[derive(Serialize)]
    struct B {
        cores: u32,
        os: String,
    }

    #[test]
    fn stable_across_field_order() {
        let a = spec_hash(&A {
            os: "ubuntu".into(),
            cores: 2,
        })
        .unwrap();
        let b = spec_hash(&B {
            cores: 2,
            os: "ubuntu".into(),
        })
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), SPEC_HASH_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, spec_hash(&json!({"os": "ubuntu", "cores": 2})).unwrap());
    }

    #[test]
    fn nested_maps_are_sorted_and_values_matter() {
        let mut m1 = HashMap::new();
        let mut m2 = HashMap::new();
        for i in 0..50 {
            m1.insert(format!("k{i}"), json!({"b": i, "a": [i, {"z": 1, "y": 2}]}));
        }
        for i in (0..50).rev() {
            m2.insert(format!("k{i}"), json!({"a": [i, {"y": 2, "z": 1}], "b": i}));
        }
        assert_eq!(spec_hash(&m1).unwrap(), spec_hash(&m2).unwrap());
        assert_ne!(
            spec_hash(&json!({"a": [1, 2]})).unwrap(),
            spec_hash(&json!({"a": [2, 1]})).unwrap()
        );
        assert_ne!(
            spec_hash(&json!({"a": "1"})).unwrap(),
            spec_hash(&json!({"a": 1})).unwrap()
        );
    }

    #[test]
    fn known_value() {
        // sha256 of `{"a":1}`; pins the canonical form so it never changes silently.
        assert_eq!(spec_hash(&json!({"a": 1})).unwrap(), "015abd7f5cc57a2d");
    }

    #[test]
    fn non_string_map_keys_are_an_error_not_a_panic() {
        let mut m = HashMap::new();
        m.insert(vec![1u8], 1);
        assert!(spec_hash(&m).is_err());
    }
}
