//! `sombrero crd`: print or write the CustomResourceDefinitions.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::api::crd;

/// Arguments of `sombrero crd`.
#[derive(clap::Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

pub fn run(args: &CrdArgs) -> ExitCode {
    match write(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(super::exit::FAILURE)
        }
    }
}

fn write(args: &CrdArgs) -> Result<(), Box<dyn std::error::Error>> {
    match &args.out_dir {
        None => print!("{}", crd::all_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            for (file, c) in crd::all() {
                let path = dir.join(file);
                std::fs::write(&path, crd::to_yaml(&c)?)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
