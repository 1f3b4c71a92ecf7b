//! `sombrero build -f image.yaml [--dry-run]`: one build to completion against the Proxmox VE
//! given by the environment (`PROXMOX_URL`, `PROXMOX_TOKEN_ID`, `PROXMOX_TOKEN_SECRET`, optional
//! `PROXMOX_CA_CERT` / `PROXMOX_FINGERPRINT` / `PROXMOX_INSECURE`).
//!
//! The file is checked first the way the API server would (CRD schema + CEL rules); nothing
//! touches Proxmox before it passes. Progress goes to stderr (an updating line on a terminal,
//! plain lines otherwise); the seed's JSON `{"template_id", "template_name", "node"}` goes to
//! stdout. The owner written into the markers is the file's `metadata.namespace` (default
//! `default`) and `metadata.name`, with a uid derived from both
//! ([`crate::build::cli_owner_uid`]): running the same file again resumes an interrupted build
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
use crate::build::{BuildRequest, ErrorCategory, Progress, Stage, cli_owner_uid, run_build};
use crate::image::marker::Owner;
use crate::proxmox::{Client, Config};

/// Arguments of `sombrero build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The GoldenImage YAML file.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Check the file and print what would be built; touch nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: &BuildArgs) -> ExitCode {
    if let Err(e) = crate::telemetry::init_cli() {
        eprintln!("error: {e}");
        return ExitCode::from(exit::INVALID_INPUT);
    }
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let admitted = match admit::<GoldenImage>(&text) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            return ExitCode::from(exit::INVALID_INPUT);
        }
    };
    let namespace = admitted.namespace.unwrap_or_else(|| "default".into());
    let owner = Owner {
        uid: cli_owner_uid(&namespace, &admitted.name),
        namespace,
        name: admitted.name,
    };
    let today = Utc::now().date_naive();
    let spec = admitted.object.spec;
    if args.dry_run {
        let source = match (&spec.source.cloud_image, &spec.source.template) {
            (Some(ci), _) => format!("cloud image {}", ci.url),
            (_, Some(t)) => format!(
                "full clone of template {:?}",
                t.vmid.map(|v| v.to_string()).or(t.name.clone())
            ),
            _ => "nothing".into(),
        };
        eprintln!(
            "would build {}/{} ({}-{}) on node {} from {source}, provisioned over {:?}, as an unvalidated template dated {today}; the file is valid",
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
    let req = BuildRequest {
        spec,
        owner,
        build_id: format!("cli-{}", Utc::now().format("%Y%m%dT%H%M%SZ")),
        today,
        adopt_unvalidated: false,
    };
    let progress = TermProgress::new();
    let result = run_build(&client, &req, &progress).await;
    progress.finish();
    match result {
        Ok(out) => {
            // The typed output keeps the seed's key order (template_id, template_name, node).
            let hand_off = crate::image::output::TerraformOutput::new(
                out.vmid,
                out.name.clone(),
                Some(out.node.clone()),
            );
            match serde_json::to_string(&hand_off) {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("error: cannot encode the result: {e}");
                    return ExitCode::from(exit::FAILURE);
                }
            }
            let times: Vec<String> = out
                .stages
                .iter()
                .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
                .collect();
            eprintln!(
                "built {} (VMID {}) in {}",
                out.name,
                out.vmid,
                times.join(", ")
            );
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e.category {
                ErrorCategory::InvalidSpec => exit::INVALID_INPUT,
                ErrorCategory::ProxmoxAuth
                | ErrorCategory::ProxmoxTransient
                | ErrorCategory::Proxmox => exit::PROXMOX,
                ErrorCategory::Guest
                | ErrorCategory::Checksum
                | ErrorCategory::SourceUnavailable
                | ErrorCategory::Timeout => exit::WORK_FAILED,
            })
        }
    }
}

/// Progress on stderr: one updating line on a terminal, plain lines otherwise.
struct TermProgress {
    tty: bool,
    started: Instant,
    state: Mutex<(Option<Stage>, String, Option<f32>)>,
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
        let stage = s.0.map_or("-", |st| st.as_str());
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
            *s = (Some(stage), "started".into(), None);
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
