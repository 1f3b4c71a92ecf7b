//! Checks a GoldenImage file the way the API server would, before anything touches Proxmox:
//! the generated CRD's openAPIV3Schema (types, required fields, unknown fields, min/max, lengths,
//! patterns, enums) and its CEL rules (`x-kubernetes-validations`, evaluated with kube's `cel`
//! feature, defaults applied first as the API server does). Both come from
//! [`crate::api::crd::all`], the very CRD that is installed, so the CLI cannot drift from the
//! cluster's rules.

use std::fmt;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::api::{GROUP, GoldenImage, GoldenImageSpec, VERSION};

/// One refused field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `spec.hardware.cores`, `spec.provisioning.packages[2]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the GoldenImage is invalid:")?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AdmissionError {}

fn refuse(field: &str, message: impl Into<String>) -> AdmissionError {
    AdmissionError {
        errors: vec![FieldError {
            field: field.into(),
            message: message.into(),
        }],
    }
}

/// A checked GoldenImage document.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub namespace: Option<String>,
    pub name: String,
    pub spec: GoldenImageSpec,
}

/// Parses and checks one YAML document holding a GoldenImage.
pub fn admit_golden_image(yaml: &str) -> Result<Admitted, AdmissionError> {
    let object: Value =
        serde_yaml::from_str(yaml).map_err(|e| refuse("(file)", format!("not valid YAML: {e}")))?;
    let Some(map) = object.as_object() else {
        return Err(refuse(
            "(file)",
            "expected a YAML mapping (a GoldenImage object)",
        ));
    };
    let api_version = format!("{GROUP}/{VERSION}");
    if map.get("apiVersion").and_then(Value::as_str) != Some(api_version.as_str()) {
        return Err(refuse("apiVersion", format!("must be {api_version}")));
    }
    if map.get("kind").and_then(Value::as_str) != Some("GoldenImage") {
        return Err(refuse("kind", "must be GoldenImage"));
    }
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !is_dns_subdomain(&name) {
        return Err(refuse(
            "metadata.name",
            "required: a lowercase DNS name (letters, digits, '-', '.'; at most 253)",
        ));
    }
    let namespace = map
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(ns) = &namespace
        && !is_dns_label(ns)
    {
        return Err(refuse(
            "metadata.namespace",
            "must be a DNS label (lowercase, at most 63)",
        ));
    }

    let schema = crd_schema();
    let mut errors = Vec::new();
    for (key, value) in map {
        match key.as_str() {
            "apiVersion" | "kind" | "metadata" => {}
            "spec" | "status" => match schema.get("properties").and_then(|p| p.get(key)) {
                Some(s) => check(s, value, key, &mut errors),
                None => errors.push(unknown(key)),
            },
            other => errors.push(unknown(other)),
        }
    }
    if !map.contains_key("spec") {
        errors.push(FieldError {
            field: "spec".into(),
            message: "Required value".into(),
        });
    }
    if !errors.is_empty() {
        return Err(AdmissionError { errors });
    }
    // CEL rules run on the object without metadata (the rules never look at it).
    let mut for_cel = object.clone();
    if let Some(o) = for_cel.as_object_mut() {
        o.remove("metadata");
    }
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, &for_cel, None) {
        return Err(AdmissionError {
            errors: cel
                .into_vec()
                .into_iter()
                .map(|e| FieldError {
                    field: if e.field_path.is_empty() {
                        "spec".into()
                    } else {
                        e.field_path.clone()
                    },
                    message: e.message.clone(),
                })
                .collect(),
        });
    }
    let gi: GoldenImage = serde_json::from_value(object)
        .map_err(|e| refuse("spec", format!("does not match the GoldenImage type: {e}")))?;
    Ok(Admitted {
        namespace,
        name,
        spec: gi.spec,
    })
}

/// The openAPIV3Schema of the GoldenImage CRD.
fn crd_schema() -> Value {
    let crd = GoldenImage::crd();
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

fn unknown(path: &str) -> FieldError {
    FieldError {
        field: format!(".{path}"),
        message: "field not declared in schema (unknown field; check the spelling)".into(),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The structural part of OpenAPI v3 validation as the API server applies it to CRDs.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let mut err = |message: String| {
        errors.push(FieldError {
            field: path.to_string(),
            message,
        })
    };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            err("Invalid value: null: must not be null".into());
        }
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
        err(format!(
            "Unsupported value: {value}: supported values: {}",
            list.join(", ")
        ));
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        None => true,
        Some("string") => value.is_string() || (int_or_string && value.is_i64()),
        Some("integer") => value.is_i64() || value.is_u64() || (int_or_string && value.is_string()),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some(_) => true,
    };
    if !type_ok {
        err(format!(
            "Invalid value: {value}: must be of type {}",
            ty.unwrap_or("?")
        ));
        return;
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            err(format!(
                "Invalid value: {value}: should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            err(format!(
                "Invalid value: {value}: should be less than or equal to {max}"
            ));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            err(format!("Too long: may not be longer than {max}"));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            err(format!(
                "Invalid value: should be at least {min} chars long"
            ));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(p) {
                Ok(re) if !re.is_match(s) => {
                    err(format!("Invalid value: {s:?}: should match '{p}'"))
                }
                Ok(_) => {}
                Err(e) => err(format!("the schema's pattern {p:?} does not compile: {e}")),
            }
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && n > max
        {
            err(format!("Too many: {n}: must have at most {max} items"));
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && n < min
        {
            err(format!(
                "Invalid value: {n}: should have at least {min} items"
            ));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        let preserve = schema
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true);
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(FieldError {
                        field: format!("{path}.{r}"),
                        message: "Required value".into(),
                    });
                }
            }
        }
        for (k, v) in obj {
            let child = format!("{path}.{k}");
            match (props.and_then(|p| p.get(k)), additional) {
                (Some(s), _) => check(s, v, &child, errors),
                (None, Some(a)) if a.is_object() => check(a, v, &child, errors),
                (None, Some(Value::Bool(true))) => {}
                _ if preserve => {}
                _ => errors.push(unknown(&child)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
apiVersion: images.sombrero.dev/v1alpha1
kind: GoldenImage
metadata: {name: u, namespace: platform}
spec:
  os: ubuntu-24.04
  type: minimal
  source:
    cloudImage:
      url: https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img
      checksumUrl: https://cloud-images.ubuntu.com/noble/current/SHA256SUMS
  placement: {node: pve1}
"#;

    #[test]
    fn a_good_file_passes_with_defaults() {
        let a = admit_golden_image(OK).unwrap();
        assert_eq!(a.name, "u");
        assert_eq!(a.namespace.as_deref(), Some("platform"));
        assert_eq!(a.spec.placement.storage, "local-lvm");
    }

    #[test]
    fn schema_and_cel_errors_name_the_field() {
        let bad = OK.replace(
            "placement: {node: pve1}",
            "placement: {node: pve1}\n  hardware: {cores: 0}",
        );
        let e = admit_golden_image(&bad).unwrap_err();
        assert_eq!(e.errors[0].field, "spec.hardware.cores", "{e}");
        let bad = OK.replace("type: minimal", "type: Minimal");
        let e = admit_golden_image(&bad).unwrap_err();
        assert!(e.to_string().contains("spec.type"), "{e}");
        let bad = OK.replace("type: minimal", "type: minimal\n  typo: 1");
        let e = admit_golden_image(&bad).unwrap_err();
        assert!(e.to_string().contains(".spec.typo"), "{e}");
        assert!(admit_golden_image("kind: Pod").is_err());
        assert!(admit_golden_image(": : :").is_err());
    }
}
