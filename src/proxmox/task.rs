//! Worker tasks: UPID parsing, status and log, and waiting for a task to finish.
//!
//! Every async PVE call answers with a UPID at once and does its work in a forked worker; the
//! HTTP 200 says nothing about success. A finished task has `exitstatus` `OK` or `WARNINGS: n`
//! (both success) or the error text.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::lenient;

/// A parsed task id: `UPID:node:pid:pstart:starttime:type:id:user:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upid {
    raw: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: i64,
    /// The task type: `qmcreate`, `qmclone`, `qmstart`, `download`, `vzdump`, ...
    pub task_type: String,
    /// The object the task works on: for `qmclone` the *source* VMID, for `download` the file.
    pub id: String,
    /// `user@realm` or, for API tokens, `user@realm!tokenid`.
    pub user: String,
}

impl Upid {
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for Upid {
    type Err = Error;

    /// Follows pve-common `PVE::UPID::decode`, including the trailing colon.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Decode {
            request: "UPID".into(),
            message: format!("{s:?} is not a task id: {why}"),
        };
        let s = s.trim();
        let body = s
            .strip_prefix("UPID:")
            .ok_or_else(|| bad("missing UPID: prefix"))?;
        let body = body
            .strip_suffix(':')
            .ok_or_else(|| bad("missing trailing ':'"))?;
        let parts: Vec<&str> = body.split(':').collect();
        let [node, pid, pstart, starttime, task_type, id, user] = parts[..] else {
            return Err(bad("expected 7 fields"));
        };
        let node_ok = !node.is_empty()
            && node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !node.starts_with('-')
            && !node.ends_with('-');
        if !node_ok {
            return Err(bad("invalid node name"));
        }
        let hex = |v: &str, min: usize, max: usize, what: &str| -> Result<u64> {
            if v.len() < min || v.len() > max {
                return Err(bad(&format!("{what} must be {min}-{max} hex digits")));
            }
            u64::from_str_radix(v, 16).map_err(|_| bad(&format!("{what} is not hexadecimal")))
        };
        let pid = u32::try_from(hex(pid, 8, 8, "pid")?).map_err(|_| bad("pid out of range"))?;
        let pstart = hex(pstart, 8, 9, "pstart")?;
        let starttime = hex(starttime, 8, 8, "starttime")? as i64;
        let field_ok = |v: &str| !v.chars().any(|c| c.is_whitespace() || c == '/');
        if task_type.is_empty()
            || !field_ok(task_type)
            || !field_ok(id)
            || user.is_empty()
            || !field_ok(user)
        {
            return Err(bad("invalid type, id or user"));
        }
        Ok(Upid {
            raw: s.to_owned(),
            node: node.to_owned(),
            pid,
            pstart,
            starttime,
            task_type: task_type.to_owned(),
            id: id.to_owned(),
            user: user.to_owned(),
        })
    }
}

/// `GET /nodes/{node}/tasks/{upid}/status`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskStatus {
    /// `running` or `stopped`.
    pub status: String,
    /// Only when stopped: `OK`, `WARNINGS: n` or the error text.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub exitstatus: Option<String>,
    #[serde(default, rename = "type")]
    pub task_type: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
}

impl TaskStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// One line of a task log.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskLogLine {
    #[serde(deserialize_with = "lenient::int")]
    pub n: i64,
    #[serde(default)]
    pub t: String,
}

/// How a successful task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    pub upid: Upid,
    pub exitstatus: String,
    /// `n` of `WARNINGS: n`; 0 for `OK`.
    pub warnings: u32,
}

/// Decide from an exit status: `Some(warnings)` for `OK` / `WARNINGS: n` (success), `None`
/// for anything else (a failure).
pub fn exitstatus_warnings(exitstatus: &str) -> Option<u32> {
    let s = exitstatus.trim();
    if s == "OK" {
        return Some(0);
    }
    s.strip_prefix("WARNINGS:")
        .map(|n| n.trim().parse().unwrap_or(1))
}

/// Polling cadence of a task wait: fast at first so short tasks are noticed quickly, then
/// backing off so long ones cost the API little.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollSchedule {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Default for PollSchedule {
    fn default() -> Self {
        PollSchedule {
            initial: Duration::from_millis(50),
            factor: 1.5,
            max: Duration::from_secs(2),
        }
    }
}

impl PollSchedule {
    /// How a task's status is polled after the first look (made right after the task-starting
    /// call, which catches tasks PVE ends at once): every second, on the second counted from
    /// that first look (the wait keeps the phase; a slow answer does not push later polls
    /// back). At most one poll per second. A task that ends at a random moment is noticed half
    /// a second late on average; one of whole seconds (the task started before its UPID was
    /// answered, so it ends just before the wait's whole second) at once.
    pub const TASK: PollSchedule = PollSchedule {
        initial: Duration::from_secs(1),
        factor: 1.0,
        max: Duration::from_secs(1),
    };

    /// The delay after `previous` (or the first delay).
    pub fn next(&self, previous: Option<Duration>) -> Duration {
        match previous {
            None => self.initial.min(self.max),
            Some(p) => p.mul_f64(self.factor.max(1.0)).min(self.max),
        }
    }
}

/// Whether a wait that follows a task's log reads it at this poll: only while the task runs
/// (a stopped task's outcome is its exit status; a failure reads the log's tail anyway), not at
/// the first look (the task has just started), and at most every [`LOG_EVERY`]. Progress from
/// the log (a download's percent) needs no more; a read per poll doubled a download's requests.
fn log_read_due(running: bool, since_start: Duration, last_read: Option<Duration>) -> bool {
    running
        && since_start >= LOG_FIRST
        && last_read.is_none_or(|at| since_start.saturating_sub(at) >= LOG_EVERY)
}

/// The first log read of a running task, after the wait began.
const LOG_FIRST: Duration = Duration::from_secs(1);
/// The least time between two log reads of one task.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What [`Client::wait_task_observing`] hands new log lines to.
type LogObserver<'a> = dyn FnMut(&[String]) + Send + 'a;

/// Lines of the log kept in [`Error::TaskFailed`].
const LOG_TAIL: usize = 20;

impl Client {
    /// Status of a task, asked of the node the UPID names.
    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus> {
        self.get(
            &["nodes", &upid.node, "tasks", upid.as_str(), "status"],
            &Params::new(),
        )
        .await
    }

    /// `limit` lines of a task's log from line `start` (0-based).
    pub async fn task_log(&self, upid: &Upid, start: u64, limit: u64) -> Result<Vec<TaskLogLine>> {
        let q = Params::new().set("start", start).set("limit", limit);
        self.get(&["nodes", &upid.node, "tasks", upid.as_str(), "log"], &q)
            .await
    }

    /// The last `lines` lines of a task's log.
    pub async fn task_log_tail(&self, upid: &Upid, lines: u64) -> Result<Vec<String>> {
        // Logs are usually short; one read of the first 1000 lines gives the total cheaply.
        let mut all = self.task_log(upid, 0, 1000).await?;
        if all.len() as u64 >= 1000 {
            let mut start = 1000;
            loop {
                let more = self.task_log(upid, start, 1000).await?;
                let n = more.len() as u64;
                all.extend(more);
                if n < 1000 {
                    break;
                }
                start += n;
                all.drain(..all.len().saturating_sub(lines as usize));
            }
        }
        let skip = all.len().saturating_sub(lines as usize);
        Ok(all.into_iter().skip(skip).map(|l| l.t).collect())
    }

    /// Wait until the task stops, at most `timeout`. `OK` and `WARNINGS: n` are success; any
    /// other exit status is [`Error::TaskFailed`] with PVE's text and the log's last lines.
    pub async fn wait_task(&self, upid: &Upid, timeout: Duration) -> Result<TaskOutcome> {
        self.wait_task_with(upid, timeout, PollSchedule::TASK).await
    }

    pub async fn wait_task_with(
        &self,
        upid: &Upid,
        timeout: Duration,
        schedule: PollSchedule,
    ) -> Result<TaskOutcome> {
        self.wait_task_inner(upid, timeout, schedule, None).await
    }

    /// [`Client::wait_task`] that also reads the task's log as it grows: while the task runs,
    /// from a second after the wait began and then every few seconds ([`log_read_due`]),
    /// `observe` gets the lines added since the last call, in order. A failed log read is skipped (the next poll catches up); it never fails
    /// the wait. For progress from a task's log, e.g. wget's percentages in `download-url`.
    pub async fn wait_task_observing(
        &self,
        upid: &Upid,
        timeout: Duration,
        mut observe: impl FnMut(&[String]) + Send,
    ) -> Result<TaskOutcome> {
        self.wait_task_inner(upid, timeout, PollSchedule::TASK, Some(&mut observe))
            .await
    }

    /// New log lines from line `next` (0-based), advancing `next`; `None` when the read failed.
    async fn new_log_lines(
        &self,
        upid: &Upid,
        next: &mut u64,
        until: Instant,
    ) -> Option<Vec<String>> {
        const PAGE: u64 = 500;
        let mut out = Vec::new();
        loop {
            let remaining = until.saturating_duration_since(Instant::now());
            let page = match tokio::time::timeout(remaining, self.task_log(upid, *next, PAGE)).await
            {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::debug!(upid = %upid, error = %e, "task log read failed");
                    return (!out.is_empty()).then_some(out);
                }
                Err(_) => return (!out.is_empty()).then_some(out),
            };
            let n = page.len() as u64;
            *next += n;
            out.extend(page.into_iter().map(|l| l.t));
            if n < PAGE {
                return Some(out);
            }
        }
    }

    async fn wait_task_inner(
        &self,
        upid: &Upid,
        timeout: Duration,
        schedule: PollSchedule,
        mut observe: Option<&mut LogObserver<'_>>,
    ) -> Result<TaskOutcome> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut delay = None;
        let mut next_line = 0;
        let mut last_log_read = None;
        // When the next poll is due: counted from the first look, so the polls keep their phase.
        let mut due = started;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(remaining, self.task_status(upid)).await {
                Ok(Ok(status)) => status,
                // The task runs on the node whatever happens to our connection: a reset, a 5xx
                // or the node briefly unreachable ends the wait only at its own deadline.
                Ok(Err(e)) if e.is_retryable() => {
                    tracing::warn!(upid = %upid, error = %e, "task status unavailable; still waiting");
                    let d = schedule.next(delay);
                    delay = Some(d);
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return Err(Error::Timeout {
                            request: format!("wait for task {upid}"),
                            message: format!(
                                "no status for {:.1}s: {e}",
                                started.elapsed().as_secs_f64()
                            ),
                        });
                    }
                    due = next_due(due, d);
                    tokio::time::sleep_until(due.min(deadline).into()).await;
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(wait_timeout(upid, started)),
            };
            if let Some(observe) = observe.as_mut() {
                let since_start = started.elapsed();
                if log_read_due(status.is_running(), since_start, last_log_read) {
                    last_log_read = Some(since_start);
                    if let Some(lines) = self.new_log_lines(upid, &mut next_line, deadline).await
                        && !lines.is_empty()
                    {
                        observe(&lines);
                    }
                }
            }
            if !status.is_running() {
                let exitstatus = status
                    .exitstatus
                    .unwrap_or_else(|| "unexpected status".to_owned());
                return match exitstatus_warnings(&exitstatus) {
                    Some(warnings) => {
                        if warnings > 0 {
                            tracing::warn!(upid = %upid, %exitstatus, "task finished with warnings");
                        }
                        tracing::debug!(upid = %upid, elapsed_ms = started.elapsed().as_millis() as u64, "task finished");
                        Ok(TaskOutcome {
                            upid: upid.clone(),
                            exitstatus,
                            warnings,
                        })
                    }
                    None => {
                        // The log explains the failure; losing it must not hide the failure itself.
                        let log_tail = self
                            .task_log_tail(upid, LOG_TAIL as u64)
                            .await
                            .unwrap_or_default();
                        Err(Error::TaskFailed {
                            upid: upid.to_string(),
                            exitstatus,
                            log_tail,
                        })
                    }
                };
            }
            let d = schedule.next(delay);
            delay = Some(d);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(wait_timeout(upid, started));
            }
            due = next_due(due, d);
            tokio::time::sleep_until(due.min(deadline).into()).await;
        }
    }
}

/// The poll after one due at `due`, `delay` later; when answers were so slow that it has
/// passed already, now (never two polls at once to catch up).
fn next_due(due: Instant, delay: Duration) -> Instant {
    (due + delay).max(Instant::now())
}

/// One entry of `GET /nodes/{node}/tasks`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskListEntry {
    pub upid: String,
    #[serde(default, rename = "type")]
    pub task_type: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    #[serde(default)]
    pub user: String,
    #[serde(default, deserialize_with = "lenient::int")]
    pub starttime: i64,
}

/// The task a lost answer would have named: of `task_type` on `id`, started by `user` at
/// `since` (Unix seconds) or later, the newest. Pure; the list is what the node reports.
pub fn find_started_task<'a>(
    tasks: &'a [TaskListEntry],
    task_type: &str,
    id: &str,
    user: &str,
    since: i64,
) -> Option<&'a TaskListEntry> {
    // The UPID always names `user@realm!tokenid`; the list's `user` may be split from the
    // token id (`user` + `tokenid`), depending on the version.
    let started_by = |t: &TaskListEntry| {
        t.upid
            .parse::<Upid>()
            .map(|u| u.user == user)
            .unwrap_or(t.user == user)
    };
    tasks
        .iter()
        .filter(|t| {
            t.task_type == task_type
                && t.id.as_deref() == Some(id)
                && t.starttime >= since
                && started_by(t)
        })
        .max_by_key(|t| t.starttime)
}

impl Client {
    /// The node's recent tasks touching `vmid` (running and finished).
    pub async fn node_tasks(&self, node: &str, vmid: Option<u32>) -> Result<Vec<TaskListEntry>> {
        let q = Params::new()
            .opt("vmid", vmid)
            .set("source", "all")
            .set("limit", 100);
        self.get(&["nodes", node, "tasks"], &q).await
    }

    /// After a lost answer to a task-starting call: the task this client started on `node`
    /// (`task_type` on `id`, at `since` Unix seconds or later), if it ran. `since` should allow
    /// for clock skew between this host and the node.
    pub async fn find_my_task(
        &self,
        node: &str,
        vmid: Option<u32>,
        task_type: &str,
        id: &str,
        since: i64,
    ) -> Result<Option<Upid>> {
        let tasks = self.node_tasks(node, vmid).await?;
        find_started_task(&tasks, task_type, id, self.token_id(), since)
            .map(|t| t.upid.parse())
            .transpose()
    }
}

fn wait_timeout(upid: &Upid, started: Instant) -> Error {
    Error::Timeout {
        request: format!("wait for task {upid}"),
        message: format!(
            "still running after {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_token_upid() {
        let u: Upid = "UPID:pve-mp:00000ACD:00006AE8:679A423B:qmclone:112:capmox@pve!capi:"
            .parse()
            .unwrap();
        assert_eq!(u.node, "pve-mp");
        assert_eq!(u.pid, 0xACD);
        assert_eq!(u.pstart, 0x6AE8);
        assert_eq!(u.starttime, 0x679A423B);
        assert_eq!(u.task_type, "qmclone");
        assert_eq!(u.id, "112");
        assert_eq!(u.user, "capmox@pve!capi");
        assert_eq!(
            u.to_string(),
            "UPID:pve-mp:00000ACD:00006AE8:679A423B:qmclone:112:capmox@pve!capi:"
        );
    }

    #[test]
    fn empty_id_and_nine_digit_pstart() {
        let u: Upid = "UPID:pve:00001234:123456789:AABBCCDD:aptupdate::root@pam:"
            .parse()
            .unwrap();
        assert_eq!(u.id, "");
        assert_eq!(u.pstart, 0x123456789);
        let u: Upid = "UPID:pve:00001234:00005678:AABBCCDD:download:noble.qcow2:root@pam:"
            .parse()
            .unwrap();
        assert_eq!(u.id, "noble.qcow2");
    }

    #[test]
    fn malformed_upids_are_refused() {
        for bad in [
            "",
            "UPID:pve:00001234:00005678:AABBCCDD:qmstart:100:root@pam", // no trailing colon
            "PID:pve:00001234:00005678:AABBCCDD:qmstart:100:root@pam:",
            "UPID:pve:1234:00005678:AABBCCDD:qmstart:100:root@pam:",
            "UPID:pve:0000123G:00005678:AABBCCDD:qmstart:100:root@pam:",
            "UPID:-pve:00001234:00005678:AABBCCDD:qmstart:100:root@pam:",
            "UPID:pve:00001234:00005678:AABBCCDD::100:root@pam:",
            "UPID:pve:00001234:00005678:AABBCCDD:qmstart:100::",
            "UPID:pve:00001234:00005678:AABBCCDD:qmstart:1 0:root@pam:",
            "UPID:pve:00001234:00005678:AABBCCDD:qmstart:100:root@pam:extra:",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exitstatus_warnings("OK"), Some(0));
        assert_eq!(exitstatus_warnings("WARNINGS: 3"), Some(3));
        assert_eq!(exitstatus_warnings("VM 100 already running"), None);
        assert_eq!(exitstatus_warnings("unexpected status"), None);
        assert_eq!(exitstatus_warnings("job errors"), None);
    }

    #[test]
    fn poll_schedule_starts_fast_and_caps() {
        let s = PollSchedule::default();
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..15 {
            let n = s.next(d);
            seen.push(n);
            d = Some(n);
        }
        assert_eq!(seen[0], Duration::from_millis(50));
        assert!(seen.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(2));
        // A task that ends at `t` is seen by the next poll, soon after: within 50% late for
        // short tasks, within the 2 s cap for long ones.
        let mut at = Duration::ZERO;
        let times: Vec<Duration> = seen
            .iter()
            .map(|d| {
                at += *d;
                at
            })
            .collect();
        let seen_after = |t: Duration| *times.iter().find(|p| **p >= t).unwrap();
        assert!(seen_after(Duration::from_secs(1)) < Duration::from_millis(1600));
        assert!(seen_after(Duration::from_millis(100)) <= Duration::from_millis(150));
        assert!(seen_after(Duration::from_secs(10)) <= Duration::from_secs(12));
    }

    #[test]
    fn task_polls_come_once_a_second_on_the_second() {
        let s = PollSchedule::TASK;
        let mut d = None;
        let mut at = Duration::ZERO;
        let mut polls = vec![at];
        for _ in 0..10 {
            let n = s.next(d);
            d = Some(n);
            at += n;
            polls.push(at);
        }
        assert!(
            polls
                .windows(2)
                .all(|w| w[1] - w[0] == Duration::from_secs(1))
        );
        // A task of whole seconds started just before the wait began (its UPID came back
        // after it started) ends just before a poll: seen at once, not a second later.
        for secs in 1..9u64 {
            let end = Duration::from_secs(secs) - Duration::from_millis(5);
            let seen = *polls.iter().find(|p| **p >= end).unwrap();
            assert!(seen - end < Duration::from_millis(10), "{secs} s: {seen:?}");
        }
        // Polls of a task of D seconds: the first look, then one per second.
        let count = |d: u64| {
            polls
                .iter()
                .filter(|p| **p < Duration::from_secs(d))
                .count()
                + 1
        };
        assert_eq!(count(8), 9);
    }

    #[test]
    fn the_log_is_read_while_the_task_runs_every_few_seconds() {
        let s = Duration::from_secs;
        // (running, since the wait began, last read, read now?)
        let cases = [
            (true, s(0), None, false),
            (true, s(1), None, true),
            (true, s(2), Some(s(1)), false),
            (true, s(4), Some(s(1)), false),
            (true, s(6), Some(s(1)), true),
            (false, s(1), None, false),
            (false, s(9), Some(s(1)), false),
        ];
        for (i, (running, at, last, want)) in cases.into_iter().enumerate() {
            assert_eq!(log_read_due(running, at, last), want, "case {i}");
        }
    }

    #[test]
    fn a_late_answer_does_not_bunch_the_polls() {
        let start = Instant::now();
        let next = next_due(start - Duration::from_secs(5), Duration::from_secs(1));
        assert!(
            next >= start,
            "a due time passed long ago is now, not in the past"
        );
        let ahead = next_due(start, Duration::from_secs(1));
        assert!(ahead >= start + Duration::from_secs(1));
    }

    #[test]
    fn the_task_of_a_lost_answer() {
        let e = |upid: &str, t: &str, id: &str, user: &str, at: i64| TaskListEntry {
            upid: upid.into(),
            task_type: t.into(),
            id: Some(id.into()),
            user: user.into(),
            starttime: at,
        };
        let me = "root@pam!sombrero";
        let upid = |user: &str| format!("UPID:pve1:00001234:00005678:AABBCCDD:qmstart:100:{user}:");
        let tasks = vec![
            e("a", "qmstart", "100", me, 900),          // before the call
            e("b", "qmstart", "100", "root@pam", 1000), // someone else
            e("c", "qmstop", "100", me, 1000),          // another type
            e("d", "qmstart", "101", me, 1000),         // another VM
            e("f", "qmstart", "100", me, 1001),
            e("g", "qmstart", "100", me, 1003),
            // The list splits the token off `user`; the UPID names it: ours.
            e(&upid(me), "qmstart", "100", "root@pam", 1002),
            // The list says ours, the UPID another token's: not ours.
            e(&upid("root@pam!other"), "qmstart", "100", me, 1004),
        ];
        let found = find_started_task(&tasks, "qmstart", "100", me, 1000);
        assert_eq!(found.map(|t| t.upid.as_str()), Some("g"));
        let found = find_started_task(&tasks[..6], "qmstart", "100", me, 1002);
        assert_eq!(found.map(|t| t.upid.as_str()), Some("g"));
        let split = find_started_task(&tasks[6..], "qmstart", "100", me, 0);
        assert_eq!(split.map(|t| t.upid.clone()), Some(upid(me)));
        assert!(find_started_task(&tasks, "qmstart", "100", me, 1004).is_none());
        assert!(find_started_task(&tasks, "qmcreate", "100", me, 0).is_none());
    }

    #[test]
    fn task_status_decodes_leniently() {
        let s: TaskStatus = serde_json::from_str(
            r#"{"status":"stopped","exitstatus":"OK","type":"qmstart","id":100,"user":"a@pam","tokenid":"t","pid":"12","node":"pve"}"#,
        )
        .unwrap();
        assert_eq!(s.id.as_deref(), Some("100"));
        assert!(!s.is_running());
    }
}
