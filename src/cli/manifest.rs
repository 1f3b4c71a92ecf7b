//! `--manifest FILE`: the Packer manifest written the way Packer's manifest post-processor
//! writes it: under `FILE.lock` (created exclusively, three tries 0/200/400 ms apart, then
//! written anyway, as Packer does), the existing builds kept and this run's appended, mode 0664.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::promote::output::PackerManifest;

/// Appends `run` to the manifest at `path` (created when missing).
pub fn write(path: &Path, run: &PackerManifest) -> Result<(), String> {
    let lock = lock_path(path);
    let mut locked = false;
    for attempt in 0..3u64 {
        std::thread::sleep(Duration::from_millis(200 * attempt));
        if OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
            .is_ok()
        {
            locked = true;
            break;
        }
    }
    let result = write_unlocked(path, run);
    if locked {
        let _ = std::fs::remove_file(&lock);
    }
    result
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn write_unlocked(path: &Path, run: &PackerManifest) -> Result<(), String> {
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let merged = run
        .appended_to(existing.as_deref())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    write_file(path, merged.to_packer_json().as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(unix)]
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o664)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
