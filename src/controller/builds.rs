//! Background jobs (build -> validate -> promote) per GoldenImage, so a build of many minutes
//! never blocks the reconcile loop. At most one job per image; a global limit and a per-node
//! limit on jobs running at once. The reconciler starts a job, reads its progress into
//! `status.build` while it runs, and takes its outcome once it finished.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::api::golden_image::{BuildStatus, StageTiming, ValidationReport};

/// Progress of a running job, as `status.build` shows it.
#[derive(Debug, Clone)]
pub struct JobProgress {
    pub id: String,
    pub stage: String,
    pub message: Option<String>,
    pub vmid: Option<u32>,
    pub started_at: DateTime<Utc>,
    pub stages: Vec<(String, f64)>,
    stage_started: Instant,
}

impl JobProgress {
    pub fn to_status(&self) -> BuildStatus {
        BuildStatus {
            id: self.id.clone(),
            vmid: self.vmid,
            stage: self.stage.clone(),
            started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                super::status::to_timestamp(self.started_at),
            )),
            stages: self
                .stages
                .iter()
                .map(|(s, secs)| StageTiming {
                    stage: s.clone(),
                    seconds: (*secs * 10.0).round() / 10.0,
                })
                .collect(),
            message: self.message.clone(),
        }
    }
}

/// Shared, cheap handle the job writes its progress into.
#[derive(Clone)]
pub struct ProgressHandle(Arc<Mutex<JobProgress>>);

impl ProgressHandle {
    fn new(id: &str, stage: &str) -> Self {
        ProgressHandle(Arc::new(Mutex::new(JobProgress {
            id: id.to_string(),
            stage: stage.to_string(),
            message: None,
            vmid: None,
            started_at: Utc::now(),
            stages: Vec::new(),
            stage_started: Instant::now(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobProgress> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stage starts: the previous one's duration is recorded.
    pub fn stage(&self, stage: &str) {
        let mut p = self.lock();
        if p.stage == stage {
            return;
        }
        let secs = p.stage_started.elapsed().as_secs_f64();
        let prev = std::mem::replace(&mut p.stage, stage.to_string());
        p.stages.push((prev, secs));
        p.stage_started = Instant::now();
        p.message = None;
    }

    pub fn message(&self, text: &str) {
        self.lock().message = Some(text.chars().take(300).collect());
    }

    /// Percent of the current stage (downloads).
    pub fn percent(&self, p: f32) {
        let mut g = self.lock();
        let text = format!("{}: {p:.0}%", g.stage);
        g.message = Some(text);
    }

    pub fn vmid(&self, vmid: u32) {
        self.lock().vmid = Some(vmid);
    }

    pub fn snapshot(&self) -> JobProgress {
        self.lock().clone()
    }

    /// Finished stages with their durations (the current one closed now).
    pub fn finished_stages(&self) -> Vec<(String, f64)> {
        let p = self.lock();
        let mut v = p.stages.clone();
        v.push((p.stage.clone(), p.stage_started.elapsed().as_secs_f64()));
        v
    }
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    /// A new template passed validation (or validation is off) and is the latest now.
    Promoted {
        vmid: u32,
        name: String,
        report: Option<ValidationReport>,
        touched: Vec<u32>,
    },
    /// The template was built but failed validation: marked failed, not promoted.
    ValidationFailed {
        vmid: u32,
        name: String,
        failed_check: String,
        message: String,
        report: ValidationReport,
    },
    /// The build (or a Proxmox step) failed.
    Failed {
        stage: Option<String>,
        reason: &'static str,
        message: String,
        retryable: bool,
        touched: Vec<u32>,
    },
}

struct Job {
    node: String,
    progress: ProgressHandle,
    /// Finished stages already announced as Events.
    announced: usize,
    outcome: Arc<Mutex<Option<JobOutcome>>>,
    handle: tokio::task::JoinHandle<()>,
}

/// What the reconciler sees of an image's job.
pub enum JobView {
    Running(JobProgress),
    Finished(JobProgress, JobOutcome),
}

/// Limits on concurrent jobs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub global: usize,
    pub per_node: usize,
}

/// What this process wrote into the status when it took a finished job's outcome. For a
/// moment afterwards a reconcile can still be handed the object from the cache as it was
/// while the job ran (a watch event of the output ConfigMap arriving before the one of the
/// status): that status must not be mistaken for a build a previous process left running.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub id: String,
    /// `status.build` written for it: `None` after a promotion or a failed validation, the
    /// `Failed` build after a failure.
    pub build: Option<BuildStatus>,
    pub last_validation: Option<ValidationReport>,
}

/// The builds of one image that finished in this process: their ids (newest last, a few) and
/// what was recorded for the newest.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedHere {
    pub ids: VecDeque<String>,
    pub last: Recorded,
}

/// Finished build ids remembered per image; builds of one image are minutes apart, and a stale
/// cache lags by milliseconds.
const REMEMBERED_IDS: usize = 16;

/// What a reconcile makes of the `status.build` it was handed.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusBuild {
    /// Nothing to do about it: no build, a job of this process is running (its progress
    /// replaces it), a failed build, or exactly what was recorded.
    AsIs,
    /// A build this process did not run and that did not fail: a previous process left it
    /// running; continue it (from its markers).
    Resume(String),
    /// A build this process already finished, seen in an older copy of the status: write
    /// what was recorded instead, and never start it again.
    Stale(Recorded),
}

/// Decides on `status.build`. A resume needs a status at least as new as this process's last
/// finish of that image: a build id this process finished is never resumed.
pub fn judge_status_build(
    build: Option<&BuildStatus>,
    running_here: bool,
    finished: Option<&FinishedHere>,
) -> StatusBuild {
    let Some(b) = build else {
        return StatusBuild::AsIs;
    };
    if running_here {
        return StatusBuild::AsIs;
    }
    if let Some(f) = finished.filter(|f| f.ids.iter().any(|id| *id == b.id)) {
        return if f.last.build.as_ref() == Some(b) {
            StatusBuild::AsIs
        } else {
            StatusBuild::Stale(f.last.clone())
        };
    }
    if b.stage == "Failed" {
        return StatusBuild::AsIs;
    }
    StatusBuild::Resume(b.id.clone())
}

pub struct Tracker {
    jobs: Mutex<HashMap<String, Job>>,
    finished: Mutex<HashMap<String, FinishedHere>>,
    limits: Limits,
    running: prometheus_client::metrics::gauge::Gauge,
}

impl Tracker {
    pub fn new(limits: Limits, running: prometheus_client::metrics::gauge::Gauge) -> Self {
        Tracker {
            jobs: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
            limits,
            running,
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `work` for `key` unless a job of that image exists or a limit is reached; `Err`
    /// says why it has to wait.
    pub fn try_start<F, Fut>(
        &self,
        key: &str,
        node: &str,
        id: &str,
        first_stage: &str,
        work: F,
    ) -> Result<(), String>
    where
        F: FnOnce(ProgressHandle) -> Fut,
        Fut: Future<Output = JobOutcome> + Send + 'static,
    {
        let mut jobs = self.jobs();
        if jobs.contains_key(key) {
            return Err("a build of this image is already running".into());
        }
        let running: Vec<&Job> = jobs
            .values()
            .filter(|j| j.outcome.lock().map(|o| o.is_none()).unwrap_or(true))
            .collect();
        if running.len() >= self.limits.global {
            return Err(format!(
                "waiting for a build slot: {} builds run (--max-concurrent-builds {})",
                running.len(),
                self.limits.global
            ));
        }
        let on_node = running.iter().filter(|j| j.node == node).count();
        if on_node >= self.limits.per_node {
            return Err(format!(
                "waiting for a build slot on node {node}: {on_node} builds run there (--max-builds-per-node {})",
                self.limits.per_node
            ));
        }
        let progress = ProgressHandle::new(id, first_stage);
        let outcome = Arc::new(Mutex::new(None));
        let fut = work(progress.clone());
        let slot = outcome.clone();
        let gauge = self.running.clone();
        gauge.inc();
        let handle = tokio::spawn(async move {
            let result = fut.await;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            gauge.dec();
        });
        jobs.insert(
            key.to_string(),
            Job {
                node: node.to_string(),
                progress,
                announced: 0,
                outcome,
                handle,
            },
        );
        Ok(())
    }

    pub fn view(&self, key: &str) -> Option<JobView> {
        let jobs = self.jobs();
        let job = jobs.get(key)?;
        let progress = job.progress.snapshot();
        let outcome = job
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(match outcome {
            Some(o) => JobView::Finished(progress, o),
            None => JobView::Running(progress),
        })
    }

    /// Forgets a finished job whose outcome was recorded as `recorded`, and remembers its id.
    pub fn remove_finished(&self, key: &str, recorded: Recorded) {
        let mut jobs = self.jobs();
        let finished = jobs
            .get(key)
            .map(|j| j.outcome.lock().map(|o| o.is_some()).unwrap_or(true))
            .unwrap_or(false);
        if finished {
            jobs.remove(key);
            let mut done = self.finished_map();
            let entry = done.entry(key.to_string()).or_insert_with(|| FinishedHere {
                ids: VecDeque::new(),
                last: recorded.clone(),
            });
            if !entry.ids.contains(&recorded.id) {
                entry.ids.push_back(recorded.id.clone());
            }
            while entry.ids.len() > REMEMBERED_IDS {
                entry.ids.pop_front();
            }
            entry.last = recorded;
        }
    }

    fn finished_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, FinishedHere>> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The builds of `key` that finished in this process.
    pub fn finished(&self, key: &str) -> Option<FinishedHere> {
        self.finished_map().get(key).cloned()
    }

    /// Stops the job of `key` (the object is being deleted). The build VM stays with its marker
    /// and is removed by the cleanup that follows.
    pub fn abort(&self, key: &str) {
        self.finished_map().remove(key);
        if let Some(job) = self.jobs().remove(key) {
            let running = job.outcome.lock().map(|o| o.is_none()).unwrap_or(false);
            job.handle.abort();
            if running {
                self.running.dec();
            }
        }
    }

    pub fn is_tracked(&self, key: &str) -> bool {
        self.jobs().contains_key(key)
    }

    /// Stages of `key`'s job that finished since the last call, with their seconds: each
    /// becomes one Event, however many stages passed between two reconciles.
    pub fn take_finished_stages(&self, key: &str) -> Vec<(String, f64)> {
        let mut jobs = self.jobs();
        let Some(job) = jobs.get_mut(key) else {
            return Vec::new();
        };
        let stages = job.progress.snapshot().stages;
        let new = stages.get(job.announced..).unwrap_or_default().to_vec();
        job.announced = stages.len();
        new
    }
}

/// The jobs belong to this controller: when it stops (shutdown, lost leadership, or an
/// embedding that drops it) they stop too, so they never act next to the next leader, which
/// resumes them from `status.build` and the markers.
impl Drop for Tracker {
    fn drop(&mut self) {
        for (_, job) in self.jobs().drain() {
            job.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn failed() -> JobOutcome {
        JobOutcome::Failed {
            stage: None,
            reason: "X",
            message: "x".into(),
            retryable: true,
            touched: vec![],
        }
    }

    #[tokio::test]
    async fn one_job_per_image_and_limits_hold() {
        let t = Tracker::new(
            Limits {
                global: 2,
                per_node: 1,
            },
            Default::default(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.try_start("ns/a", "pve1", "b1", "Source", |p| async move {
            p.stage("CreateVm");
            let _ = rx.await;
            failed()
        })
        .unwrap();
        let again = t.try_start("ns/a", "pve1", "b2", "Source", |_| async { failed() });
        assert!(again.unwrap_err().contains("already running"));
        let node = t.try_start("ns/b", "pve1", "b3", "Source", |_| async { failed() });
        assert!(node.unwrap_err().contains("node pve1"));
        t.try_start("ns/c", "pve2", "b4", "Source", |_| std::future::pending())
            .unwrap();
        let global = t.try_start("ns/d", "pve3", "b5", "Source", |_| async { failed() });
        assert!(global.unwrap_err().contains("--max-concurrent-builds 2"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        match t.view("ns/a") {
            Some(JobView::Running(p)) => {
                assert_eq!(p.stage, "CreateVm");
                assert_eq!(p.stages.len(), 1);
            }
            _ => panic!("expected a running job"),
        }
        let stages = t.take_finished_stages("ns/a");
        assert_eq!(stages.len(), 1);
        assert_eq!(stages[0].0, "Source");
        assert!(t.take_finished_stages("ns/a").is_empty(), "announced once");
        tx.send(()).unwrap();
        for _ in 0..100 {
            if matches!(t.view("ns/a"), Some(JobView::Finished(..))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(t.view("ns/a"), Some(JobView::Finished(..))));
        // A finished job frees its node slot, and stays until its outcome was taken.
        t.try_start("ns/b", "pve1", "b3", "Source", |_| std::future::pending())
            .unwrap();
        assert!(t.is_tracked("ns/a"));
        t.remove_finished("ns/a", recorded("b1", None));
        assert!(!t.is_tracked("ns/a"));
        assert_eq!(
            t.finished("ns/a")
                .map(|f| f.ids.into_iter().collect::<Vec<_>>()),
            Some(vec!["b1".to_string()])
        );
        t.remove_finished("ns/b", recorded("b3", None));
        assert!(t.is_tracked("ns/b"), "a running job is not removed");
        assert!(t.finished("ns/b").is_none(), "nor remembered as finished");
        t.abort("ns/c");
        assert!(!t.is_tracked("ns/c"));
    }

    fn recorded(id: &str, build: Option<BuildStatus>) -> Recorded {
        Recorded {
            id: id.into(),
            build,
            last_validation: None,
        }
    }

    fn build(id: &str, stage: &str) -> BuildStatus {
        BuildStatus {
            id: id.into(),
            stage: stage.into(),
            ..Default::default()
        }
    }

    fn finished_here(ids: &[&str], last: Recorded) -> FinishedHere {
        FinishedHere {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            last,
        }
    }

    #[test]
    fn a_build_finished_here_is_never_resumed_from_an_older_status() {
        use StatusBuild::*;
        let promoted = finished_here(&["b1"], recorded("b1", None));
        // The cache still shows b1 in Promote after this process promoted it: stale.
        assert_eq!(
            judge_status_build(Some(&build("b1", "Promote")), false, Some(&promoted)),
            Stale(recorded("b1", None))
        );
        // The same after a failure: the recorded Failed build is written back.
        let failed = build("b2", "Failed");
        let after_failure = finished_here(&["b1", "b2"], recorded("b2", Some(failed.clone())));
        assert_eq!(
            judge_status_build(Some(&build("b2", "Provision")), false, Some(&after_failure)),
            Stale(recorded("b2", Some(failed.clone())))
        );
        assert_eq!(
            judge_status_build(Some(&failed), false, Some(&after_failure)),
            AsIs,
            "the status as recorded"
        );
        // An even older copy naming an earlier build of this process.
        assert_eq!(
            judge_status_build(Some(&build("b1", "Validate")), false, Some(&after_failure)),
            Stale(recorded("b2", Some(failed)))
        );
        // A build this process never ran (a previous leader's): resumed.
        assert_eq!(
            judge_status_build(Some(&build("b0", "Provision")), false, Some(&promoted)),
            Resume("b0".into())
        );
        assert_eq!(
            judge_status_build(Some(&build("b0", "Provision")), false, None),
            Resume("b0".into())
        );
        // Running here, failed, or no build at all: nothing to decide.
        assert_eq!(
            judge_status_build(Some(&build("b3", "Provision")), true, Some(&promoted)),
            AsIs
        );
        assert_eq!(
            judge_status_build(Some(&build("b0", "Failed")), false, None),
            AsIs
        );
        assert_eq!(judge_status_build(None, false, Some(&promoted)), AsIs);
    }

    #[tokio::test]
    async fn remembered_ids_are_bounded_and_forgotten_on_delete() {
        let t = Tracker::new(
            Limits {
                global: 1,
                per_node: 1,
            },
            Default::default(),
        );
        for n in 0..(REMEMBERED_IDS + 4) {
            let id = format!("b{n}");
            t.try_start("ns/a", "pve1", &id, "Source", |_| async { failed() })
                .unwrap();
            for _ in 0..100 {
                if matches!(t.view("ns/a"), Some(JobView::Finished(..))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            t.remove_finished("ns/a", recorded(&id, None));
        }
        let f = t.finished("ns/a").unwrap();
        assert_eq!(f.ids.len(), REMEMBERED_IDS);
        assert_eq!(f.ids.back().map(String::as_str), Some("b19"));
        assert_eq!(f.last.id, "b19");
        t.abort("ns/a");
        assert!(t.finished("ns/a").is_none());
    }

    #[tokio::test]
    async fn dropping_the_tracker_stops_its_jobs() {
        let t = Tracker::new(
            Limits {
                global: 1,
                per_node: 1,
            },
            Default::default(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.try_start("ns/a", "pve1", "b1", "Source", |_| async move {
            let _tx = tx;
            std::future::pending::<JobOutcome>().await
        })
        .unwrap();
        drop(t);
        // The job's future (holding the sender) is dropped once the aborted task ends.
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the job still runs after its tracker was dropped")
            .unwrap_err();
    }
}
