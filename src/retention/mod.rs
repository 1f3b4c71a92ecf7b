//! Retention: which templates of an image to keep, archive or delete, and why.
//!
//! - `plan` (pure): the decisions and their reasons; `policy` (pure): a TemplateRetention spec
//!   checked and turned into target, rules and mode; `target` (pure): which templates;
//!   `usage` (pure): linked-clone relations from configs and storage content.
//! - `inventory` (I/O): the target's templates as `TemplateVersion`s, with what protects them,
//!   and the re-check before a destructive call; `execute` (I/O): archive and delete, the one
//!   delete path (also of a GoldenImage's `deletionPolicy: Delete`).

pub mod execute;
pub mod inventory;
pub mod plan;
#[cfg(test)]
mod plan_props;
pub mod policy;
pub mod target;
pub mod usage;

pub use execute::{Executed, execute, execute_detailed};
pub use inventory::{Inventory, gather, gather_from};
pub use plan::{
    Action, ArchiveMode, Decision, Plan, Purpose, Reason, RetentionRules, plan, plan_image_deletion,
};
pub use policy::Policy;
pub use target::{NotOurs, Scope, Target};
