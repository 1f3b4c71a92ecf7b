//! Which templates a retention policy governs: one GoldenImage's, or all with given tags.

use std::fmt;

use crate::api::template_retention::RetentionTarget;
use crate::image::marker::Marker;
use crate::image::tags::{TagSet, image_tag, is_valid_tag};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The templates of a GoldenImage: its per-image tag, and a marker naming it as the owner.
    Image { namespace: String, name: String },
    /// Templates carrying all these tags (and our marker).
    Tags(Vec<String>),
}

impl Target {
    /// From a TemplateRetention's `spec.target` in `namespace`. Errors name the field.
    pub fn from_spec(namespace: &str, spec: &RetentionTarget) -> Result<Self, String> {
        match (&spec.golden_image_ref, &spec.tag_selector) {
            (Some(r), None) if !r.name.is_empty() => Ok(Self::Image {
                namespace: namespace.to_string(),
                name: r.name.clone(),
            }),
            (Some(_), None) => Err("target.goldenImageRef.name: must not be empty".into()),
            (None, Some(tags)) => {
                if tags.is_empty() {
                    return Err(
                        "target.tagSelector: list at least one tag (e.g. [ubuntu, minimal])".into(),
                    );
                }
                if let Some(bad) = tags.iter().find(|t| !is_valid_tag(t)) {
                    return Err(format!(
                        "target.tagSelector: {bad:?} is not a Proxmox tag; tagSelector entries must be Proxmox tags: lowercase letters, digits and _ + . -"
                    ));
                }
                Ok(Self::Tags(tags.clone()))
            }
            _ => {
                Err("target: set exactly one of target.goldenImageRef or target.tagSelector".into())
            }
        }
    }

    /// The tags a template must carry to be considered.
    pub fn selector(&self) -> Vec<String> {
        match self {
            Self::Image { namespace, name } => vec![image_tag(namespace, name)],
            Self::Tags(tags) => tags.clone(),
        }
    }

    pub fn matches_tags(&self, tags: &TagSet) -> bool {
        tags.contains_all(self.selector().iter().map(String::as_str))
    }

    /// Whether a marker names an owner this target accepts: for an image target the marker must
    /// name that GoldenImage (a copied image tag on another image's template is not enough).
    pub fn accepts_owner(&self, marker: &Marker) -> bool {
        match self {
            Self::Image { namespace, name } => {
                marker.owner.namespace == *namespace && marker.owner.name == *name
            }
            Self::Tags(_) => true,
        }
    }
}

impl fmt::Display for Target {
    /// `goldenimage/ubuntu` or `tags: ubuntu,minimal` (the status' `targetDescription`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image { name, .. } => write!(f, "goldenimage/{name}"),
            Self::Tags(tags) => write!(f, "tags: {}", tags.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::template_retention::GoldenImageReference;

    #[test]
    fn from_spec_and_describe() {
        let image = Target::from_spec(
            "platform",
            &RetentionTarget {
                golden_image_ref: Some(GoldenImageReference {
                    name: "ubuntu".into(),
                }),
                tag_selector: None,
            },
        )
        .unwrap();
        assert_eq!(image.to_string(), "goldenimage/ubuntu");
        assert_eq!(image.selector(), ["sombrero.platform.ubuntu"]);
        assert!(image.matches_tags(&TagSet::parse("sombrero;sombrero.platform.ubuntu")));
        assert!(!image.matches_tags(&TagSet::parse("sombrero;sombrero.platform.debian")));

        let tags = Target::from_spec(
            "x",
            &RetentionTarget {
                golden_image_ref: None,
                tag_selector: Some(vec!["ubuntu".into(), "minimal".into()]),
            },
        )
        .unwrap();
        assert_eq!(tags.to_string(), "tags: ubuntu,minimal");
        assert!(tags.matches_tags(&TagSet::parse("minimal;ubuntu;x")));
        assert!(!tags.matches_tags(&TagSet::parse("ubuntu")));

        let err = Target::from_spec("x", &RetentionTarget::default()).unwrap_err();
        assert!(err.contains("exactly one"), "{err}");
        let err = Target::from_spec(
            "x",
            &RetentionTarget {
                golden_image_ref: None,
                tag_selector: Some(vec!["Ubuntu!".into()]),
            },
        )
        .unwrap_err();
        assert!(err.contains("tagSelector"), "{err}");
    }

    #[test]
    fn image_target_checks_the_marker_owner() {
        let marker = crate::image::marker::tests::sample_marker();
        let own = Target::Image {
            namespace: marker.owner.namespace.clone(),
            name: marker.owner.name.clone(),
        };
        assert!(own.accepts_owner(&marker));
        let other = Target::Image {
            namespace: marker.owner.namespace.clone(),
            name: "other".into(),
        };
        assert!(!other.accepts_owner(&marker));
        assert!(Target::Tags(vec!["a".into()]).accepts_owner(&marker));
    }
}
