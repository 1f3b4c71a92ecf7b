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
