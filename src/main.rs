//! The `sombrero` command: the controller and one-shot runs of the same engine.
//! Each subcommand lives in `sombrero::cli::<name>`; this file only parses and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sombrero::cli;

#[derive(Parser)]
#[command(
    name = "sombrero",
    version,
    about = "Keeps Proxmox VE VM templates (golden images) as declared"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build one golden image from a GoldenImage file against the Proxmox VE in the environment
    /// (with --validate / --promote: the controller's production run).
    Build(cli::build_command::BuildArgs),
    /// Check that the API token in the environment holds every privilege a run of a GoldenImage
    /// or TemplateRetention file needs; changes nothing.
    Check(cli::check_command::CheckArgs),
    /// Run the Kubernetes controller.
    Controller(Box<cli::controller_command::ControllerArgs>),
    /// Print the CustomResourceDefinitions as YAML (pipe into `kubectl apply -f -`).
    Crd(cli::crd_command::CrdArgs),
    /// Apply a TemplateRetention policy once: print the plan, then execute it unless --dry-run.
    Prune(cli::prune_command::PruneArgs),
    /// Print the version.
    Version,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(args) => cli::build_command::run(&args).await,
        Command::Check(args) => cli::check_command::run(&args).await,
        Command::Controller(args) => cli::controller_command::run(&args).await,
        Command::Crd(args) => cli::crd_command::run(&args),
        Command::Prune(args) => cli::prune_command::run(&args).await,
        Command::Version => {
            println!("sombrero {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
