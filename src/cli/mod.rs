//! Subcommands of the `sombrero` binary, one module each. `main.rs` only parses and dispatches.

pub mod build;
pub mod check;
pub mod controller;
pub mod crd;
pub mod manifest;
pub mod prune;

/// Process exit codes shared by the one-shot commands (`build`, `check`, `prune`), so CI
/// pipelines can tell failures apart. Documented in docs/build.md.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Unexpected internal failure.
    pub const FAILURE: u8 = 1;
    /// The input (file, flags, environment) is invalid; nothing was touched.
    pub const INVALID_INPUT: u8 = 2;
    /// Proxmox refused or could not be reached.
    pub const PROXMOX: u8 = 3;
    /// The work itself failed (a build step in the guest, a checksum, a timeout, an archive).
    pub const WORK_FAILED: u8 = 4;
    /// The template was built but failed a validation check: tagged `failed-validation`, not
    /// promoted; the previous latest keeps the channel tag.
    pub const VALIDATION_FAILED: u8 = 5;
    /// The API token lacks privileges the run needs; nothing was changed.
    pub const INSUFFICIENT_PRIVILEGES: u8 = 6;
}
