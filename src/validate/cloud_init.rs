//! Reading `cloud-init status --wait`: the status among the dots it prints while it waits, and
//! the verdict of the `cloudInit` check. Pure.

/// The command, run through the agent without a shell.
pub const COMMAND: [&str; 3] = ["cloud-init", "status", "--wait"];

/// The value of the `status:` line of `cloud-init status` text output. While `--wait` waits,
/// cloud-init prints a dot every quarter second and then the status, after a newline (seen on a
/// real Debian 12 guest: `....\nstatus: done`); a status glued to the dots is read too.
/// `extended_status:` (cloud-init >= 23.4 with `--long`) is not the status.
pub fn parse_status(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('.').trim_start();
        line.strip_prefix("status:")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

/// The check's verdict from the exit code and output; `detail` (`: <stderr or stdout tail>`)
/// ends a failure message. cloud-init exits 0 with `done`; 1 on a critical error; 2 (since
/// 23.4) when it finished with recoverable errors ("degraded"), still printing `status: done`.
pub fn verdict(exitcode: Option<i64>, stdout: &str, detail: &str) -> Result<String, String> {
    let code = exitcode.unwrap_or(-1);
    match (code, parse_status(stdout).as_deref()) {
        (0, Some("done")) => Ok("cloud-init status: done".into()),
        (2, Some(st)) => Err(format!(
            "cloud-init status: {st}, with recoverable errors (exit 2: degraded){detail}"
        )),
        (code, Some(st)) => Err(format!("cloud-init status: {st} (exit {code}){detail}")),
        (code, None) => Err(format!(
            "`cloud-init status --wait` exited {code} without a status{detail}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_among_the_dots() {
        for (out, want) in [
            ("status: done\n", Some("done")),
            ("\nstatus: done\n", Some("done")),
            // Debian 12, cloud-init still running when the command started.
            ("..........\nstatus: done\n", Some("done")),
            ("...status: error\n", Some("error")),
            ("status: running\n", Some("running")),
            (
                "\nstatus: done\nextended_status: degraded done\nboot_status_code: enabled-by-generator\n",
                Some("done"),
            ),
            ("extended_status: done\n", None),
            ("....\n", None),
            ("", None),
            ("status:\n", None),
        ] {
            assert_eq!(parse_status(out).as_deref(), want, "{out:?}");
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(Some(0), ".....\nstatus: done\n", ""),
            Ok("cloud-init status: done".into())
        );
        assert_eq!(
            verdict(Some(1), "..\nstatus: error\n", ": boom"),
            Err("cloud-init status: error (exit 1): boom".into())
        );
        let degraded = verdict(Some(2), "\nstatus: done\n", "").unwrap_err();
        assert!(
            degraded.contains("degraded") && degraded.contains("status: done"),
            "{degraded}"
        );
        assert_eq!(
            verdict(Some(0), "status: disabled\n", ""),
            Err("cloud-init status: disabled (exit 0)".into())
        );
        assert_eq!(
            verdict(None, "...", ": killed"),
            Err("`cloud-init status --wait` exited -1 without a status: killed".into())
        );
    }
}
