//! Subcommands of the `sombrero` binary, one module each. `main.rs` only parses and dispatches.

pub mod build;
pub mod controller;
pub mod crd;
pub mod prune;

/// Process exit codes shared by the one-shot commands, so CI pipelines can tell failures apart.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Unexpected internal failure.
    pub const FAILURE: u8 = 1;
    /// The input (file, flags, environment) is invalid; nothing was touched.
    pub const INVALID_INPUT: u8 = 2;
    /// Proxmox refused or could not be reached.
    pub const PROXMOX: u8 = 3;
    /// The work itself failed (a build step, a validation check, an archive).
    pub const WORK_FAILED: u8 = 4;
}
