//! When and how long to wait before repeating a failed call.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter for repeated calls.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included; `1` disables retries.
    pub max_attempts: u32,
    /// Delay before the second try.
    pub initial_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay ceiling before try number `retry + 2` (`retry` counts from 0): doubling from
    /// `initial_delay`, capped at `max_delay`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(20));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }

    /// The actual delay: "equal jitter", half the ceiling plus a random part of the other half,
    /// so that many controllers retrying at once spread out but never retry immediately.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }
}

/// Whether a repeated call can do harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads, and writes whose repetition changes nothing (absolute config values, tags,
    /// description, an absolute resize, agent ping): retry any transient failure, a lost
    /// answer included.
    Safe,
    /// Creates and other state changes: retry only failures known to have happened before
    /// the call ran (no connection, pveproxy could not reach the node, a lock that could not be taken).
    Unsafe,
}

/// What one failed try says about the server, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Provably not run: no connection, pveproxy could not reach the node (595), a config lock
    /// that could not be taken.
    NotExecuted,
    /// The answer was lost: a reset or timeout after the request was sent, a proxy's 502-504.
    /// The server may have done it.
    AnswerLost,
    /// "VM is locked (clone)": lasts as long as the other operation; the caller decides.
    Locked,
    /// A definite answer (refused, not found, bad parameter): repeating gives the same.
    Refused,
}

/// Whether the client repeats a call after this try: anything not run; a lost answer only when
/// repeating the call has the same effect as running it once.
pub fn may_repeat(idem: Idempotency, attempt: Attempt) -> bool {
    match attempt {
        Attempt::NotExecuted => true,
        Attempt::AnswerLost => idem == Idempotency::Safe,
        Attempt::Locked | Attempt::Refused => false,
    }
}

/// A config write (`PUT/POST .../config`) is repeatable when it only sets absolute values and
/// deletes options: written twice it leaves the same config. Not repeatable: a `digest` (the
/// first write changes it, so the repeat is refused), a value that allocates a disk
/// (`storage:N`, `storage:cloudinit`, `import-from=`: each write makes another volume) and the
/// deletion of a drive (it turns into `unusedN`, whose deletion frees the volume).
pub fn config_write<'a>(
    set: impl IntoIterator<Item = (&'a str, &'a str)>,
    delete: impl IntoIterator<Item = &'a str>,
    digest: bool,
) -> Idempotency {
    let allocates = |key: &str, value: &str| {
        is_drive_key(key) && {
            let volume = value.split(',').next().unwrap_or("");
            let new_disk = volume.split_once(':').is_some_and(|(_, v)| {
                v == "cloudinit" || (!v.is_empty() && v.parse::<f64>().is_ok())
            });
            new_disk || value.split(',').any(|p| p.starts_with("import-from="))
        }
    };
    let unsafe_write = digest
        || set.into_iter().any(|(k, v)| allocates(k, v))
        || delete.into_iter().any(is_drive_key);
    if unsafe_write {
        Idempotency::Unsafe
    } else {
        Idempotency::Safe
    }
}

/// `PUT .../resize`: an absolute size (`20G`) is repeatable (PVE leaves a disk of that size
/// alone), a relative one (`+2G`) grows the disk again each time.
pub fn resize(size: &str) -> Idempotency {
    if size.trim_start().starts_with('+') {
        Idempotency::Unsafe
    } else {
        Idempotency::Safe
    }
}

fn is_drive_key(key: &str) -> bool {
    [
        "ide", "sata", "scsi", "virtio", "efidisk", "tpmstate", "unused",
    ]
    .iter()
    .any(|p| {
        key.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_repeated_after_a_failed_try() {
        use Attempt::*;
        use Idempotency::*;
        let table = [
            (Safe, NotExecuted, true),
            (Safe, AnswerLost, true),
            (Safe, Locked, false),
            (Safe, Refused, false),
            (Unsafe, NotExecuted, true),
            (Unsafe, AnswerLost, false),
            (Unsafe, Locked, false),
            (Unsafe, Refused, false),
        ];
        for (idem, attempt, want) in table {
            assert_eq!(may_repeat(idem, attempt), want, "{idem:?} {attempt:?}");
        }
    }

    /// (settings, deletes, digest given, expected)
    type ConfigWriteCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], bool, Idempotency);

    #[test]
    fn config_writes_that_may_be_repeated() {
        use Idempotency::*;
        let table: &[ConfigWriteCase] = &[
            (
                &[("description", "x"), ("tags", "a;b"), ("name", "n")],
                &[],
                false,
                Safe,
            ),
            (&[("sshkeys", "ssh-ed25519%20AAAA")], &[], false, Safe),
            (
                &[],
                &["sshkeys", "ipconfig0", "ciuser", "cipassword"],
                false,
                Safe,
            ),
            (
                &[("cores", "2"), ("net0", "virtio,bridge=vmbr0")],
                &[],
                false,
                Safe,
            ),
            // An existing volume, by name: setting it again changes nothing.
            (
                &[("scsi0", "local-lvm:vm-100-disk-0,discard=on")],
                &[],
                false,
                Safe,
            ),
            (&[("ide2", "none,media=cdrom")], &[], false, Safe),
            (&[("description", "x")], &[], true, Unsafe),
            (&[("ide2", "local-lvm:cloudinit")], &[], false, Unsafe),
            (&[("scsi1", "local-lvm:4")], &[], false, Unsafe),
            (
                &[("efidisk0", "local-lvm:1,efitype=4m")],
                &[],
                false,
                Unsafe,
            ),
            (
                &[("scsi0", "local-lvm:0,import-from=local:import/x.qcow2")],
                &[],
                false,
                Unsafe,
            ),
            (&[], &["scsi1"], false, Unsafe),
            (&[], &["unused0"], false, Unsafe),
        ];
        for (set, delete, digest, want) in table {
            assert_eq!(
                config_write(set.iter().copied(), delete.iter().copied(), *digest),
                *want,
                "{set:?} -{delete:?} digest={digest}"
            );
        }
    }

    #[test]
    fn absolute_resizes_may_be_repeated() {
        assert_eq!(resize("20G"), Idempotency::Safe);
        assert_eq!(resize("3584M"), Idempotency::Safe);
        assert_eq!(resize("+2G"), Idempotency::Unsafe);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let ceilings: Vec<u128> = (0..6).map(|r| p.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        for r in 0..8 {
            for _ in 0..50 {
                let d = p.delay(r);
                assert!(d >= p.ceiling(r) / 2 && d <= p.ceiling(r), "{r}: {d:?}");
            }
        }
        // No overflow for absurd retry counts.
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(1));
    }
}
