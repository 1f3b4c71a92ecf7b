//! The CRD documents, as `sombrero crd` prints them and `crds/` holds them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{GoldenImage, TemplateRetention};

/// Both CRDs with the file each is checked in as.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("goldenimage.yaml", kube_formats(GoldenImage::crd())),
        (
            "templateretention.yaml",
            kube_formats(TemplateRetention::crd()),
        ),
    ]
}

/// Integer formats schemars writes for Rust types that OpenAPI (and so the API server) does not
/// know, with the OpenAPI format that holds every value and the type's largest value.
const INTEGER_FORMATS: [(&str, &str, f64); 6] = [
    ("uint8", "int32", u8::MAX as f64),
    ("uint16", "int32", u16::MAX as f64),
    ("uint32", "int64", u32::MAX as f64),
    ("uint64", "int64", i64::MAX as f64),
    ("int8", "int32", i8::MAX as f64),
    ("int16", "int32", i16::MAX as f64),
];

/// Rewrites `format: uint32` and its kin as int32/int64: the API server warns about each
/// unrecognized format on every CRD apply (`helm install` prints the warnings). The range the
/// Rust type allows becomes a `maximum` where the field has none, so nothing that would fail
/// to deserialize is admitted.
fn kube_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                let integer = map.get("type").and_then(|t| t.as_str()) == Some("integer");
                let known = map
                    .get("format")
                    .and_then(|f| f.as_str())
                    .and_then(|f| INTEGER_FORMATS.iter().find(|(rust, _, _)| *rust == f));
                if let (true, Some((_, openapi, max))) = (integer, known) {
                    map.insert("format".into(), (*openapi).into());
                    map.entry("maximum").or_insert_with(|| (*max).into());
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("the rewritten CRD is still a CRD")
}

/// Renders one CRD as a YAML document (the exact bytes of its file under `crds/`).
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// All CRDs as one multi-document YAML stream.
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for (_, crd) in all() {
        out.push_str("---\n");
        out.push_str(&to_yaml(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is generated: it must be exactly what `sombrero crd` prints.
    #[test]
    fn checked_in_crds_match_the_generated_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for (file, crd) in all() {
            let path = dir.join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == to_yaml(&crd).unwrap(),
                "{} is stale or missing: regenerate with `cargo run -- crd --out-dir crds`",
                path.display()
            );
        }
    }

    /// Every `format` is one the API server knows (it warns on others at each apply).
    #[test]
    fn only_openapi_formats() {
        let known = ["int32", "int64", "double", "float", "date-time", "byte"];
        let yaml = all_yaml().unwrap();
        let formats: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.trim().strip_prefix("format: "))
            .collect();
        assert!(!formats.is_empty());
        for f in formats {
            assert!(known.contains(&f), "format {f} is not an OpenAPI format");
        }
        // u32 fields keep their range: `status.build.vmid` had only `minimum: 0`.
        assert!(yaml.contains("maximum: 4294967295.0"), "{yaml}");
    }

    #[test]
    fn both_crds_have_status_and_list_map_conditions() {
        let yaml = all_yaml().unwrap();
        assert_eq!(yaml.matches("x-kubernetes-list-type: map").count(), 2);
        assert_eq!(yaml.matches("status: {}").count(), 2);
    }
}
