//! Checks a custom resource file the way the API server would, before anything touches Proxmox
//! (`sombrero build -f`, `sombrero prune -f`): the generated CRD's openAPIV3Schema (types,
//! required fields, unknown fields, min/max, lengths, patterns, enums), its defaults, and its CEL
//! rules (`x-kubernetes-validations`, evaluated with kube's `cel` feature on the defaulted
//! object, as the API server does). Both come from [`CustomResourceExt::crd`], the very CRD that
//! is installed, so the CLI cannot drift from the cluster's rules.
//!
//! ```
//! use sombrero::api::{GoldenImage, admission::admit};
//! let yaml = "apiVersion: images.sombrero.dev/v1alpha1\nkind: GoldenImage\nmetadata: {name: demo}\n\
//!             spec: {os: debian-12, type: minimal, placement: {node: pve1},\n\
//!                    source: {template: {vmid: 9000}}, hardware: {cores: 0}}\n";
//! let refused = admit::<GoldenImage>(yaml).unwrap_err();   // names each refused field
//! assert!(refused.errors.iter().any(|e| e.field == "spec.hardware.cores"));
//! let fixed = yaml.replace("cores: 0", "cores: 4");
//! let admitted = admit::<GoldenImage>(&fixed).unwrap();
//! assert_eq!(admitted.object.spec.hardware.memory_mib, 2048);   // defaults filled in
//! ```

use std::fmt;

use kube::{CustomResourceExt, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One refused field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `spec.hardware.cores`, `spec.provisioning.packages[2]`; unknown fields as the API server
    /// names them (`.spec.typo`).
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
    /// `GoldenImage`, `TemplateRetention`.
    pub kind: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} is invalid:", self.kind)?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AdmissionError {}

/// A checked object, defaults applied.
#[derive(Debug, Clone)]
pub struct Admitted<K> {
    pub namespace: Option<String>,
    pub name: String,
    pub object: K,
}

/// Parses one YAML document holding a `K` and checks it as the API server would on create.
pub fn admit<K>(yaml: &str) -> Result<Admitted<K>, AdmissionError>
where
    K: CustomResourceExt + Resource<DynamicType = ()> + DeserializeOwned,
{
    let kind = K::kind(&()).to_string();
    let refuse = |field: &str, message: String| AdmissionError {
        kind: kind.clone(),
        errors: vec![FieldError {
            field: field.into(),
            message,
        }],
    };
    let object: Value =
        serde_yaml::from_str(yaml).map_err(|e| refuse("(file)", format!("not valid YAML: {e}")))?;
    let Some(map) = object.as_object() else {
        return Err(refuse(
            "(file)",
            format!("expected a YAML mapping (a {kind} object)"),
        ));
    };
    let api_version = K::api_version(&());
    if map.get("apiVersion").and_then(Value::as_str) != Some(&*api_version) {
        return Err(refuse("apiVersion", format!("must be {api_version}")));
    }
    if map.get("kind").and_then(Value::as_str) != Some(kind.as_str()) {
        return Err(refuse("kind", format!("must be {kind}")));
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
            "required: a lowercase DNS name (letters, digits, '-', '.'; at most 253)".into(),
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
            "must be a DNS label (lowercase, at most 63)".into(),
        ));
    }

    let schema = crd_schema::<K>();
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
        return Err(AdmissionError { kind, errors });
    }
    // CEL rules run on the object without metadata (the rules never look at it); the
    // validator applies the schema's defaults first, as the API server does.
    let mut for_cel = object.clone();
    if let Some(o) = for_cel.as_object_mut() {
        o.remove("metadata");
    }
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, &for_cel, None) {
        return Err(AdmissionError {
            kind,
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
    let defaulted = kube::core::cel::apply_defaults(&schema, &object);
    let object: K = serde_json::from_value(defaulted)
        .map_err(|e| refuse("spec", format!("does not match the {kind} type: {e}")))?;
    Ok(Admitted {
        namespace,
        name,
        object,
    })
}

/// The openAPIV3Schema of `K`'s CRD.
fn crd_schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
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
    use crate::api::{GoldenImage, TemplateRetention};

    const GI: &str = r#"
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

    const TR: &str = "apiVersion: images.sombrero.dev/v1alpha1\nkind: TemplateRetention\nmetadata: {name: r}\nspec:\n  target: {goldenImageRef: {name: ubuntu}}\n  archive: {mode: delete}\n";

    #[test]
    fn a_good_file_passes_with_defaults() {
        let a = admit::<GoldenImage>(GI).unwrap();
        assert_eq!(a.name, "u");
        assert_eq!(a.namespace.as_deref(), Some("platform"));
        assert_eq!(a.object.spec.placement.storage, "local-lvm");
        let a = admit::<TemplateRetention>(TR).unwrap();
        assert_eq!((a.name.as_str(), a.namespace), ("r", None));
        assert_eq!(a.object.spec.keep_last, 3);
    }

    #[test]
    fn schema_and_cel_errors_name_the_field() {
        let bad = GI.replace(
            "placement: {node: pve1}",
            "placement: {node: pve1}\n  hardware: {cores: 0}",
        );
        let e = admit::<GoldenImage>(&bad).unwrap_err();
        assert_eq!(e.errors[0].field, "spec.hardware.cores", "{e}");
        let bad = GI.replace("type: minimal", "type: Minimal");
        let e = admit::<GoldenImage>(&bad).unwrap_err();
        assert!(e.to_string().contains("spec.type"), "{e}");
        let bad = GI.replace("type: minimal", "type: minimal\n  typo: 1");
        let e = admit::<GoldenImage>(&bad).unwrap_err();
        assert!(
            e.to_string().starts_with("the GoldenImage is invalid:"),
            "{e}"
        );
        assert!(e.to_string().contains(".spec.typo"), "{e}");
        assert!(admit::<GoldenImage>("kind: Pod").is_err());
        assert!(admit::<GoldenImage>(": : :").is_err());
        // The kind is the type's own: a GoldenImage is not a TemplateRetention.
        let e = admit::<TemplateRetention>(GI).unwrap_err();
        assert_eq!(e.errors[0].field, "kind", "{e}");
        // A rule only CEL expresses (defaults applied first: keepLast defaults to 3).
        let e = admit::<TemplateRetention>(&TR.replace("archive:", "retainAtLeast: 9\n  archive:"))
            .unwrap_err();
        assert!(
            e.errors
                .iter()
                .any(|f| f.message.contains("retainAtLeast must not exceed keepLast")),
            "{e}"
        );
    }
}
