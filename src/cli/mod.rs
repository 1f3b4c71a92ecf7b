//! Subcommands of the `sombrero` binary, one module each. `main.rs` only parses and dispatches.

pub mod build_command;
pub mod check_command;
pub mod controller_command;
pub mod crd_command;
pub mod manifest;
pub mod prune_command;

use std::path::Path;
use std::process::ExitCode;

/// The input file's text, or the error printed and the invalid-input exit code.
fn read_input(path: &Path) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read {}: {e}", path.display());
        ExitCode::from(exit::INVALID_INPUT)
    })
}

/// Prints why a file is not a valid TemplateRetention; the invalid-input exit code.
fn refuse_retention(path: &Path, problems: &[String]) -> ExitCode {
    eprintln!(
        "error: {} is not a valid TemplateRetention:",
        path.display()
    );
    for p in problems {
        eprintln!("  {p}");
    }
    ExitCode::from(exit::INVALID_INPUT)
}

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
