//! `sombrero build -f image.yaml [--validate] [--promote] [--manifest FILE] [--dry-run]`: one
//! run to completion against the Proxmox VE given by the environment (`PROXMOX_URL`,
//! `PROXMOX_TOKEN_ID`, `PROXMOX_TOKEN_SECRET`, optional `PROXMOX_CA_CERT` /
//! `PROXMOX_FINGERPRINT` / `PROXMOX_INSECURE`).
//!
//! The same engine as the controller ([`crate::engine::run`]): the token's privileges are
//! checked before anything is written, then the build; `--validate` boot-tests the template
//! with the file's `spec.validation`; `--promote` (implies `--validate`) moves the channel tag
//! `sombrero-latest` to it when validation passed, which is what Terraform's tag lookup finds.
//!
//! The file is checked first the way the API server would (CRD schema + CEL rules); nothing
//! touches Proxmox before it passes. Progress goes to stderr (an updating line on a terminal,
//! plain lines otherwise); the seed's JSON `{"template_id", "template_name", "node"}` goes to
//! stdout. `--manifest FILE` appends the run to a Packer manifest ([`super::manifest`]). Exit
//! codes: [`super::exit`]. The owner written into the markers is the file's
//! `metadata.namespace` (default `default`) and `metadata.name`, with a uid derived from both
//! ([`crate::builder::cli_owner_uid`]): running the same file again resumes an interrupted build
//! and continues its build-number sequence.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use chrono::Utc;

use super::exit;
use crate::api::GoldenImage;
use crate::api::admission::admit;
use crate::builder::{BuildOutcome, Progress, Stage, cli_owner_uid};
use crate::engine::{self, FailureKind, Outcome};
use crate::image::marker::{Marker, Owner, parse_description};
use crate::promote::output::{PackerManifest, packer_manifest};
use crate::proxmox::{Client, Config};

/// Arguments of `sombrero build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The GoldenImage YAML file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// After the build, boot-test the template as `spec.validation` says (exit code 5 when a
    /// check fails; the template is then tagged failed-validation).
    #[arg(long)]
    pub validate: bool,
    /// Validate, then make the template the image's latest (the `sombrero-latest` tag
    /// Terraform and Packer select by). Implies --validate; nothing is promoted unless
    /// validation passed.
    #[arg(long)]
    pub promote: bool,
    /// Append this run to a Packer manifest file (`packer-manifest.json` layout), as Packer's
    /// manifest post-processor does. Written only when the run succeeds.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Check the file and print what would be built; touch nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: &BuildArgs) -> ExitCode {
    if let Err(e) = crate::telemetry::init_cli() {
        eprintln!("error: {e}");
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let text = match super::read_input(&args.file) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let admitted = match admit::<GoldenImage>(&text) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let validate = args.validate || args.promote;
    let spec = admitted.object.spec;
    if validate && !spec.validation.enabled {
        eprintln!(
            "error: {}: spec.validation.enabled is false, but --{} asks for a validation: set spec.validation.enabled: true (or run without --validate/--promote for an unvalidated template)",
            args.file.display(),
            if args.promote { "promote" } else { "validate" }
        );
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let namespace = admitted.namespace.unwrap_or_else(|| "default".into());
    let owner = Owner {
        uid: cli_owner_uid(&namespace, &admitted.name),
        namespace,
        name: admitted.name,
    };
    let today = Utc::now().date_naive();
    if args.dry_run {
        let source = match (&spec.source.cloud_image, &spec.source.template) {
            (Some(ci), _) => format!("cloud image {}", ci.url),
            (_, Some(t)) => format!(
                "full clone of template {:?}",
                t.vmid.map(|v| v.to_string()).or(t.name.clone())
            ),
            _ => "nothing".into(),
        };
        let then = match (validate, args.promote) {
            (_, true) => format!(
                "validated ({}) and promoted to latest if every check passes",
                spec.validation.checks.join(", ")
            ),
            (true, false) => format!(
                "validated ({}), not promoted",
                spec.validation.checks.join(", ")
            ),
            _ => "left unvalidated".into(),
        };
        eprintln!(
            "would build {}/{} ({}-{}) on node {} from {source}, provisioned over {:?}, dated {today}, then {then}; the file is valid",
            owner.namespace,
            owner.name,
            spec.os,
            spec.type_,
            spec.placement.node,
            spec.provisioning.via
        );
        return ExitCode::from(exit::OK);
    }
    let client = match Config::from_env().and_then(Client::new) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: Proxmox connection from the environment: {e}");
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let req = engine::Request {
        client: client.clone(),
        spec,
        owner,
        build_id: format!("cli-{}", Utc::now().format("%Y%m%dT%H%M%SZ")),
        today,
        // Each plain `sombrero build` asks for a new template; a run that validates first
        // answers with an unvalidated template of this spec (its own interrupted run's).
        adopt_unvalidated: validate,
        // Made just now (a resumed build VM keeps its marker's id).
        fresh_id: true,
        validate,
        promote: args.promote,
    };
    let progress = TermProgress::new();
    let outcome = engine::run(&req, &progress).await;
    progress.finish();
    let (built, marker) = match outcome {
        Outcome::Built { built } => {
            eprintln!(
                "built {} (VMID {}) in {}",
                built.name,
                built.vmid,
                times(&built)
            );
            (built, None)
        }
        Outcome::Validated { built, report } => {
            eprintln!(
                "built {} (VMID {}) in {}; validation passed ({}); not promoted (--promote moves the channel tag)",
                built.name,
                built.vmid,
                times(&built),
                report.summary()
            );
            (built, None)
        }
        Outcome::Promoted {
            built,
            promotion,
            report,
        } => {
            let validation = report.map_or("passed in an earlier run".into(), |r| r.summary());
            let previous = if promotion.previous.is_empty() {
                String::new()
            } else {
                format!(" (taken from {:?})", promotion.previous)
            };
            eprintln!(
                "built {} (VMID {}) in {}; validation {validation}; promoted: it holds the channel tag sombrero-latest{previous}",
                built.name,
                built.vmid,
                times(&built),
            );
            (built, Some(promotion.marker))
        }
        Outcome::ValidationFailed {
            built,
            failed_check,
            message,
            ..
        } => {
            eprintln!(
                "error: template {} (VMID {}) failed validation check {failed_check}: {message}; it is tagged failed-validation and not promoted, the previous latest stays",
                built.name, built.vmid
            );
            return ExitCode::from(exit::VALIDATION_FAILED);
        }
        Outcome::Failed(f) => {
            match &f.stage {
                Some(stage) => eprintln!("error: {stage} failed: {}", f.message),
                None => eprintln!("error: {}", f.message),
            }
            return ExitCode::from(match f.kind {
                FailureKind::InvalidSpec => exit::INVALID_INPUT,
                FailureKind::Privileges => exit::INSUFFICIENT_PRIVILEGES,
                FailureKind::Proxmox => exit::PROXMOX,
                FailureKind::Work => exit::WORK_FAILED,
            });
        }
    };
    // The typed output keeps the seed's key order (template_id, template_name, node).
    let hand_off = crate::image::output::TerraformOutput::new(
        built.vmid,
        built.name.clone(),
        Some(built.node.clone()),
    );
    match serde_json::to_string(&hand_off) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("error: cannot encode the result: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    }
    if let Some(path) = &args.manifest {
        let marker = match marker {
            Some(m) => m,
            None => match template_marker(&client, &built).await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: --manifest: {e}");
                    return ExitCode::from(exit::PROXMOX);
                }
            },
        };
        let run: PackerManifest = packer_manifest(built.vmid, &built.node, &marker);
        if let Err(e) = super::manifest::write(path, &run) {
            eprintln!("error: --manifest: {e}");
            return ExitCode::from(exit::FAILURE);
        }
        eprintln!("manifest written to {}", path.display());
    }
    ExitCode::from(exit::OK)
}

fn times(built: &BuildOutcome) -> String {
    if built.stages.is_empty() {
        return "an earlier run".into();
    }
    built
        .stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The template's marker, read back for the manifest's metadata.
async fn template_marker(client: &Client, built: &BuildOutcome) -> Result<Marker, String> {
    let config = client
        .vm_config(&built.node, built.vmid)
        .await
        .map_err(|e| format!("reading template {}: {e}", built.vmid))?;
    parse_description(config.description.as_deref().unwrap_or(""))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("template {} has no sombrero marker", built.vmid))
}

/// Progress on stderr: one updating line on a terminal, plain lines otherwise.
struct TermProgress {
    tty: bool,
    started: Instant,
    state: Mutex<(Option<&'static str>, String, Option<f32>)>,
}

impl TermProgress {
    fn new() -> Self {
        TermProgress {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            state: Mutex::new((None, String::new(), None)),
        }
    }

    fn show(&self) {
        let Ok(s) = self.state.lock() else { return };
        let stage = s.0.unwrap_or("-");
        let pct = s.2.map(|p| format!(" {p:.0}%")).unwrap_or_default();
        let line = format!(
            "[{:>6.1}s] {stage}{pct}: {}",
            self.started.elapsed().as_secs_f64(),
            s.1
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(
                err,
                "\r\x1b[2K{}",
                line.chars().take(150).collect::<String>()
            );
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

impl Progress for TermProgress {
    fn stage(&self, stage: Stage) {
        if let Ok(mut s) = self.state.lock() {
            *s = (Some(stage.as_str()), "started".into(), None);
        }
        self.show();
    }
    fn message(&self, text: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = text.to_string();
        }
        self.show();
    }
    fn percent(&self, p: f32) {
        if let Ok(mut s) = self.state.lock() {
            s.2 = Some(p);
        }
        self.show();
    }
}

impl engine::Progress for TermProgress {
    fn step(&self, step: crate::api::golden_image::BuildStage) {
        if let Ok(mut s) = self.state.lock() {
            *s = (Some(step.as_str()), "started".into(), None);
        }
        self.show();
    }
}
