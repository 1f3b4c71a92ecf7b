//! The custom resources of group `images.sombrero.dev`, version `v1alpha1`.
//!
//! Everything the API server can judge is declared here, in the schema or as CEL rules with
//! messages a person understands; what only the controller can judge is reported in status.

pub mod admission;
pub mod common;
pub mod crd;
pub mod duration;
pub mod golden_image;
pub mod template_retention;
pub mod time;

pub use common::{ConditionStatus, ProxmoxConnection, SecretReference};
pub use duration::{DURATION_PATTERN, SpecDuration, SpecDurationError};
pub use golden_image::{GoldenImage, GoldenImageSpec, GoldenImageStatus};
pub use template_retention::{TemplateRetention, TemplateRetentionSpec, TemplateRetentionStatus};

/// API group of both resources.
pub const GROUP: &str = "images.sombrero.dev";
/// API version of both resources.
pub const VERSION: &str = "v1alpha1";
