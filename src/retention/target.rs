//! Which templates a retention policy governs: one GoldenImage's, or all with given tags
//! ([`Target`], which selects by tags); and whose templates it may change ([`Scope`], which
//! decides by the marker's owner, exactly).
//!
//! Tags only select: anyone can copy them (a consumer's clone keeps them; a second cluster's
//! controller writes the same `sombrero.<namespace>.<name>` tag for a same-named image). The
//! marker's owner decides: a GoldenImage policy acts on its image's templates only (namespace,
//! name and uid equal), a `tagSelector` policy on the templates of images in its own namespace.

use std::fmt;

use super::policy::SpecProblem;
use crate::api::template_retention::RetentionTarget;
use crate::image::marker::Owner;
use crate::image::tags::{TagSet, image_tag, is_valid_tag};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The templates of a GoldenImage: its per-image tag, and a marker naming it as the owner.
    Image { namespace: String, name: String },
    /// Templates carrying all these tags, owned by images of the policy's `namespace`.
    Tags {
        namespace: String,
        tags: Vec<String>,
    },
}

impl Target {
    /// From a TemplateRetention's `spec.target` in `namespace`. Errors name the field.
    pub fn from_spec(namespace: &str, spec: &RetentionTarget) -> Result<Self, SpecProblem> {
        match (&spec.golden_image_ref, &spec.tag_selector) {
            (Some(r), None) if !r.name.is_empty() => Ok(Self::Image {
                namespace: namespace.to_string(),
                name: r.name.clone(),
            }),
            (Some(_), None) => Err(SpecProblem::new(
                "target.goldenImageRef.name",
                "must not be empty",
            )),
            (None, Some(tags)) => {
                if tags.is_empty() {
                    return Err(SpecProblem::new(
                        "target.tagSelector",
                        "list at least one tag (e.g. [ubuntu, minimal])",
                    ));
                }
                if let Some(bad) = tags.iter().find(|t| !is_valid_tag(t)) {
                    return Err(SpecProblem::new(
                        "target.tagSelector",
                        format!(
                            "{bad:?} is not a Proxmox tag; tagSelector entries must be Proxmox tags: lowercase letters, digits and _ + . -"
                        ),
                    ));
                }
                Ok(Self::Tags {
                    namespace: namespace.to_string(),
                    tags: tags.clone(),
                })
            }
            _ => Err(SpecProblem::new(
                "target",
                "set exactly one of target.goldenImageRef or target.tagSelector",
            )),
        }
    }

    /// The tags a template must carry to be considered.
    pub fn selector(&self) -> Vec<String> {
        match self {
            Self::Image { namespace, name } => vec![image_tag(namespace, name)],
            Self::Tags { tags, .. } => tags.clone(),
        }
    }

    pub fn matches_tags(&self, tags: &TagSet) -> bool {
        tags.contains_all(self.selector().iter().map(String::as_str))
    }

    /// Whose templates a policy with this target may change; `image_uid` is the GoldenImage's
    /// `metadata.uid` (unused for a tag selector, which spans the images of its namespace).
    pub fn scope(&self, image_uid: &str) -> Scope {
        match self {
            Self::Image { namespace, name } => Scope::Image(Owner {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: image_uid.to_string(),
            }),
            Self::Tags { namespace, .. } => Scope::Namespace(namespace.clone()),
        }
    }
}

/// Whose templates a policy may change: the marker's owner must match exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One GoldenImage: namespace, name and uid equal. The uid tells a re-created object, or a
    /// same-named image of another cluster's controller, from this one.
    Image(Owner),
    /// Any image of one namespace (a `tagSelector` policy).
    Namespace(String),
}

impl Scope {
    /// `Ok` when a marker naming `owner` is in scope; else why not.
    pub fn check(&self, owner: &Owner) -> Result<(), NotOurs> {
        let ns = match self {
            Self::Image(o) => &o.namespace,
            Self::Namespace(ns) => ns,
        };
        if owner.namespace != *ns {
            return Err(NotOurs::OtherNamespace {
                owner: owner.clone(),
            });
        }
        match self {
            Self::Image(o) if owner.name != o.name => Err(NotOurs::OtherImage {
                owner: owner.clone(),
            }),
            Self::Image(o) if owner.uid != o.uid => Err(NotOurs::OtherUid {
                owner: owner.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(o) => write!(f, "GoldenImage {}/{} (uid {})", o.namespace, o.name, o.uid),
            Self::Namespace(ns) => write!(f, "the images of namespace {ns}"),
        }
    }
}

/// Why a template that carries the target's tags is not the policy's to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotOurs {
    /// No marker, or one that cannot be read: someone's own template with copied tags.
    NoMarker,
    /// The marker was written for another VMID or is not a template's (a clone's copy, or a
    /// build that has not finished).
    NotThisVm,
    /// Owned by an image of another namespace.
    OtherNamespace { owner: Owner },
    /// Owned by another GoldenImage of the namespace.
    OtherImage { owner: Owner },
    /// Owned by a GoldenImage of the same namespace and name but another uid: a deleted and
    /// re-created object, or another cluster's controller.
    OtherUid { owner: Owner },
}

impl fmt::Display for NotOurs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMarker => f.write_str("it has no sombrero marker"),
            Self::NotThisVm => f.write_str(
                "its marker was not written for this template (a copy in a clone, or an unfinished build)",
            ),
            Self::OtherNamespace { owner } => write!(
                f,
                "owned by {}/{} in another namespace",
                owner.namespace, owner.name
            ),
            Self::OtherImage { owner } => {
                write!(f, "owned by GoldenImage {}/{}", owner.namespace, owner.name)
            }
            Self::OtherUid { owner } => write!(
                f,
                "owned by another GoldenImage {}/{} (uid {})",
                owner.namespace, owner.name, owner.uid
            ),
        }
    }
}

impl fmt::Display for Target {
    /// `goldenimage/ubuntu` or `tags: ubuntu,minimal` (the status' `targetDescription`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image { name, .. } => write!(f, "goldenimage/{name}"),
            Self::Tags { tags, .. } => write!(f, "tags: {}", tags.join(",")),
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
        assert_eq!(
            image.scope("u-1").to_string(),
            "GoldenImage platform/ubuntu (uid u-1)"
        );

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
        assert_eq!(err.field, "target");
        assert!(err.message.contains("exactly one"), "{err}");
        let err = Target::from_spec(
            "x",
            &RetentionTarget {
                golden_image_ref: None,
                tag_selector: Some(vec!["Ubuntu!".into()]),
            },
        )
        .unwrap_err();
        assert_eq!(err.field, "target.tagSelector");
        assert!(
            err.to_string().starts_with("spec.target.tagSelector: "),
            "{err}"
        );
    }

    #[test]
    fn scopes_accept_exact_owners_only() {
        let owner = |ns: &str, name: &str, uid: &str| Owner {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        };
        let ours = owner("platform", "ubuntu", "u-1");
        let image = Target::Image {
            namespace: "platform".into(),
            name: "ubuntu".into(),
        }
        .scope("u-1");
        let tags = Target::Tags {
            namespace: "platform".into(),
            tags: vec!["ubuntu".into()],
        }
        .scope("ignored");
        assert_eq!(tags, Scope::Namespace("platform".into()));
        let cases = [
            (&image, ours.clone(), Ok(())),
            (
                &image,
                owner("platform", "ubuntu", "u-2"),
                Err("owned by another GoldenImage platform/ubuntu (uid u-2)"),
            ),
            (
                &image,
                owner("platform", "debian", "u-1"),
                Err("owned by GoldenImage platform/debian"),
            ),
            (
                &image,
                owner("team-b", "ubuntu", "u-1"),
                Err("owned by team-b/ubuntu in another namespace"),
            ),
            (&tags, ours.clone(), Ok(())),
            (&tags, owner("platform", "debian", "u-9"), Ok(())),
            (
                &tags,
                owner("team-b", "ubuntu", "u-1"),
                Err("owned by team-b/ubuntu in another namespace"),
            ),
            // Case matters: Kubernetes names are lowercase, a marker saying otherwise is not ours.
            (
                &tags,
                owner("Platform", "ubuntu", "u-1"),
                Err("owned by Platform/ubuntu in another namespace"),
            ),
        ];
        for (scope, o, want) in cases {
            let got = scope.check(&o).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(String::from), "{scope} vs {o:?}");
        }
    }
}
