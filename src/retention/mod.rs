//! Retention: which templates of an image to keep, archive or delete, and why. The plan is pure
//! (see `plan`); executing it against Proxmox lives elsewhere.

pub mod duration;
pub mod plan;
#[cfg(test)]
mod plan_props;

pub use duration::{DURATION_PATTERN, format_duration, parse_duration};
pub use plan::{Action, ArchiveMode, Decision, Plan, Reason, RetentionRules, plan};
