//! The CRD documents, as `sombrero crd` prints them and `crds/` holds them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{GoldenImage, TemplateRetention};

/// Both CRDs with the file each is checked in as.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("goldenimage.yaml", GoldenImage::crd()),
        ("templateretention.yaml", TemplateRetention::crd()),
    ]
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

    #[test]
    fn both_crds_have_status_and_list_map_conditions() {
        let yaml = all_yaml().unwrap();
        assert_eq!(yaml.matches("x-kubernetes-list-type: map").count(), 2);
        assert_eq!(yaml.matches("status: {}").count(), 2);
    }
}
