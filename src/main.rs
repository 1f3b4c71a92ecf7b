//! The `sombrero` command: the controller and one-shot runs of the same engine.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Print the CustomResourceDefinitions as YAML (pipe into `kubectl apply -f -`).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { out_dir } => match print_crds(out_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("sombrero {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn print_crds(out_dir: Option<&std::path::Path>) -> Result<(), Box<dyn std::error::Error>> {
    match out_dir {
        None => print!("{}", sombrero::api::crd::all_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            for (file, crd) in sombrero::api::crd::all() {
                let path = dir.join(file);
                std::fs::write(&path, sombrero::api::crd::to_yaml(&crd)?)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
