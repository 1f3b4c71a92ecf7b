//! Pure image logic: names and build numbers, tags, the description marker, the spec hash,
//! checksum lists, the version view, the Terraform hand-off and dpkg's package list. No I/O
//! here.

pub mod checksum;
pub mod dpkg;
pub mod marker;
pub mod naming;
pub mod output;
pub mod spec_hash;
pub mod tags;
pub mod version;

pub use marker::{Marker, Ownership, Role, ownership, parse_description, render_description};
pub use naming::{NAME_PLACEHOLDERS, NameTemplate, next_build_number};
pub use output::TerraformOutput;
pub use spec_hash::spec_hash;
pub use tags::TagSet;
pub use version::{TemplateVersion, ValidationStatus, VmFacts};
