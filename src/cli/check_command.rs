//! `sombrero check -f FILE`: does the API token in the environment hold every privilege a run
//! of FILE needs? A GoldenImage is checked for what the controller runs (the build, the
//! validation when `spec.validation.enabled`, the promotion; a superset of a plain
//! `sombrero build`); a TemplateRetention for what its archive mode needs on every template.
//! Only reads (`GET /version`, `GET /access/permissions?path=...`); nothing is changed.
//!
//! Exit codes ([`super::exit`]): `OK` when every privilege is held, `INSUFFICIENT_PRIVILEGES`
//! with each missing privilege, its path and the `pveum` fix on stderr, `INVALID_INPUT` for a
//! bad file or environment, `PROXMOX` when Proxmox cannot be asked.

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit;
use crate::api::GoldenImage;
use crate::api::admission::admit;
use crate::privileges::{self, ImageRun, Need, PrivilegeError};
use crate::proxmox::{Client, Config};

/// Arguments of `sombrero check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// A GoldenImage or TemplateRetention YAML file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

pub async fn run(args: &CheckArgs) -> ExitCode {
    if let Err(e) = crate::telemetry::init_cli() {
        eprintln!("error: {e}");
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let text = match super::read_input(&args.file) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let kind = serde_yaml::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string));
    let subject = match kind.as_deref() {
        Some("TemplateRetention") => match super::prune_command::parse(&text) {
            Ok(policy) => Subject::Retention(policy),
            Err(problems) => return super::refuse_retention(&args.file, &problems),
        },
        _ => match admit::<GoldenImage>(&text) {
            Ok(a) => Subject::Image(Box::new(a.object.spec)),
            Err(e) => {
                eprintln!(
                    "error: {}: {e} (check takes a GoldenImage or a TemplateRetention)",
                    args.file.display()
                );
                return ExitCode::from(exit::INVALID_INPUT);
            }
        },
    };
    let client = match Config::from_env().and_then(Client::new) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: Proxmox connection from the environment: {e}");
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let version = match client.pve_version().await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: asking Proxmox for its version: {e}");
            return ExitCode::from(exit::PROXMOX);
        }
    };
    let needs: Vec<Need> = match &subject {
        Subject::Image(spec) => privileges::image_needs(&ImageRun {
            spec,
            validate: spec.validation.enabled,
            promote: true,
            version,
        }),
        Subject::Retention(p) => {
            privileges::retention_needs(p.mode, p.backup_storage.as_deref(), None)
        }
    };
    match privileges::check(&client, &needs).await {
        Ok(()) => {
            let paths: std::collections::BTreeSet<&str> = needs
                .iter()
                .flat_map(|n| n.options.iter().map(|g| g.path.as_str()))
                .collect();
            eprintln!(
                "the API token {} holds every privilege a run of {} needs on Proxmox VE {version} ({} paths checked: {})",
                client.token_id(),
                args.file.display(),
                paths.len(),
                paths.into_iter().collect::<Vec<_>>().join(", ")
            );
            ExitCode::from(exit::OK)
        }
        Err(PrivilegeError::Insufficient(r)) => {
            eprintln!("error: {r}");
            ExitCode::from(exit::INSUFFICIENT_PRIVILEGES)
        }
        Err(e @ PrivilegeError::Proxmox(_)) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::PROXMOX)
        }
    }
}

enum Subject {
    Image(Box<crate::api::GoldenImageSpec>),
    Retention(crate::retention::Policy),
}
