//! Background jobs (build -> validate -> promote) per GoldenImage, so a build of many minutes
//! never blocks the reconcile loop. At most one job per image; a global limit and a per-node
//! limit on jobs running at once. The reconciler starts a job, reads its progress into
//! `status.build` while it runs, and takes its outcome once it finished. The [`Tracker`] also
//! keeps the rest of each image's memory ([`super::memory`]), in one map keyed by the object.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::memory::{FailedBuild, ImageKey, ImageMemory, backoff};
use crate::api::golden_image::{BuildStage, BuildStatus, StageTiming, ValidationReport};
use crate::engine::FailureReason;

/// Progress of a running job, as `status.build` shows it.
#[derive(Debug, Clone)]
pub struct JobProgress {
    pub id: String,
    pub stage: BuildStage,
    pub message: Option<String>,
    pub vmid: Option<u32>,
    pub started_at: DateTime<Utc>,
    pub stages: Vec<(BuildStage, f64)>,
    stage_started: Instant,
}

impl JobProgress {
    /// A job that starts at `stage` at `started_at`.
    pub fn new(id: &str, stage: BuildStage, started_at: DateTime<Utc>) -> Self {
        JobProgress {
            id: id.to_string(),
            stage,
            message: None,
            vmid: None,
            started_at,
            stages: Vec::new(),
            stage_started: Instant::now(),
        }
    }

    pub fn to_status(&self) -> BuildStatus {
        BuildStatus {
            id: self.id.clone(),
            vmid: self.vmid,
            stage: self.stage,
            started_at: Some(crate::api::time::to_time(self.started_at)),
            stages: self
                .stages
                .iter()
                .map(|(s, secs)| StageTiming {
                    stage: *s,
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
    fn new(id: &str, stage: BuildStage, started_at: DateTime<Utc>) -> Self {
        ProgressHandle(Arc::new(Mutex::new(JobProgress::new(
            id, stage, started_at,
        ))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobProgress> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stage starts: the previous one's duration is recorded.
    pub fn stage(&self, stage: BuildStage) {
        let mut p = self.lock();
        if p.stage == stage {
            return;
        }
        let secs = p.stage_started.elapsed().as_secs_f64();
        let prev = std::mem::replace(&mut p.stage, stage);
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
    pub fn finished_stages(&self) -> Vec<(BuildStage, f64)> {
        let p = self.lock();
        let mut v = p.stages.clone();
        v.push((p.stage, p.stage_started.elapsed().as_secs_f64()));
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
        /// Where it failed: a stage, or `Privileges` before any.
        stage: Option<String>,
        reason: FailureReason,
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

impl Job {
    fn running(&self) -> bool {
        self.outcome.lock().map(|o| o.is_none()).unwrap_or(true)
    }
}

/// What the reconciler sees of an image's job.
#[derive(Debug, Clone)]
pub struct JobView {
    pub progress: JobProgress,
    /// Finished stages (`progress.stages`) already announced as Events.
    pub announced: usize,
    /// `None` while it runs.
    pub outcome: Option<JobOutcome>,
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

impl FinishedHere {
    /// With `recorded` as the newest build finished here.
    pub fn with(finished: Option<&FinishedHere>, recorded: Recorded) -> FinishedHere {
        let mut f = finished.cloned().unwrap_or_else(|| FinishedHere {
            ids: VecDeque::new(),
            last: recorded.clone(),
        });
        if !f.ids.contains(&recorded.id) {
            f.ids.push_back(recorded.id.clone());
        }
        while f.ids.len() > REMEMBERED_IDS {
            f.ids.pop_front();
        }
        f.last = recorded;
        f
    }
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
    if b.stage == BuildStage::Failed {
        return StatusBuild::AsIs;
    }
    StatusBuild::Resume(b.id.clone())
}

/// One image's entry: its job and the rest of its memory.
#[derive(Default)]
struct ImageState {
    job: Option<Job>,
    memory: ImageMemory,
    /// Failed reconciles in a row, for the error backoff.
    errors: u32,
}

pub struct Tracker {
    images: Mutex<HashMap<ImageKey, ImageState>>,
    limits: Limits,
    running: prometheus_client::metrics::gauge::Gauge,
}

impl Tracker {
    pub fn new(limits: Limits, running: prometheus_client::metrics::gauge::Gauge) -> Self {
        Tracker {
            images: Mutex::new(HashMap::new()),
            limits,
            running,
        }
    }

    fn images(&self) -> std::sync::MutexGuard<'_, HashMap<ImageKey, ImageState>> {
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a job for `key` on `node` could start now; `Err` says why it has to wait.
    pub fn slot(&self, key: &ImageKey, node: &str) -> Result<(), String> {
        Self::free_slot(&self.images(), self.limits, key, node)
    }

    fn free_slot(
        images: &HashMap<ImageKey, ImageState>,
        limits: Limits,
        key: &ImageKey,
        node: &str,
    ) -> Result<(), String> {
        if images.get(key).is_some_and(|i| i.job.is_some()) {
            return Err("a build of this image is already running".into());
        }
        let running: Vec<&Job> = images
            .values()
            .filter_map(|i| i.job.as_ref())
            .filter(|j| j.running())
            .collect();
        if running.len() >= limits.global {
            return Err(format!(
                "waiting for a build slot: {} builds run (--max-concurrent-builds {})",
                running.len(),
                limits.global
            ));
        }
        let on_node = running.iter().filter(|j| j.node == node).count();
        if on_node >= limits.per_node {
            return Err(format!(
                "waiting for a build slot on node {node}: {on_node} builds run there (--max-builds-per-node {})",
                limits.per_node
            ));
        }
        Ok(())
    }

    /// Starts `work` for `key` (its progress starting at `Source`, `started_at`) unless a job
    /// of that image exists or a limit is reached; `Err` says why it has to wait.
    pub fn try_start<F, Fut>(
        &self,
        key: &ImageKey,
        node: &str,
        id: &str,
        started_at: DateTime<Utc>,
        work: F,
    ) -> Result<(), String>
    where
        F: FnOnce(ProgressHandle) -> Fut,
        Fut: Future<Output = JobOutcome> + Send + 'static,
    {
        let mut images = self.images();
        Self::free_slot(&images, self.limits, key, node)?;
        let progress = ProgressHandle::new(id, BuildStage::Source, started_at);
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
        images.entry(key.clone()).or_default().job = Some(Job {
            node: node.to_string(),
            progress,
            announced: 0,
            outcome,
            handle,
        });
        Ok(())
    }

    pub fn view(&self, key: &ImageKey) -> Option<JobView> {
        let images = self.images();
        let job = images.get(key)?.job.as_ref()?;
        Some(JobView {
            progress: job.progress.snapshot(),
            announced: job.announced,
            outcome: job
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    }

    /// The image's memory: its last failed build and the builds that finished here.
    pub fn memory(&self, key: &ImageKey) -> ImageMemory {
        self.images()
            .get(key)
            .map(|i| i.memory.clone())
            .unwrap_or_default()
    }

    /// Stage Events of `key`'s job were published up to `announced` finished stages.
    pub fn mark_announced(&self, key: &ImageKey, announced: usize) {
        if let Some(job) = self.images().get_mut(key).and_then(|i| i.job.as_mut()) {
            job.announced = job.announced.max(announced);
        }
    }

    /// Forgets a finished job whose outcome was recorded as `recorded`, and remembers its id.
    /// A running job stays.
    pub fn settle(&self, key: &ImageKey, recorded: Recorded) {
        let mut images = self.images();
        let Some(image) = images.get_mut(key) else {
            return;
        };
        if image.job.as_ref().is_some_and(|j| !j.running()) {
            image.job = None;
            image.memory.finished =
                Some(FinishedHere::with(image.memory.finished.as_ref(), recorded));
        }
    }

    /// Sets (or with `None` clears) the image's last failed build.
    pub fn set_failed(&self, key: &ImageKey, failed: Option<FailedBuild>) {
        let mut images = self.images();
        match failed {
            Some(f) => images.entry(key.clone()).or_default().memory.failed = Some(f),
            None => {
                if let Some(i) = images.get_mut(key) {
                    i.memory.failed = None;
                }
            }
        }
    }

    /// Stops the job of `key` and forgets the image (it is being deleted). The build VM stays
    /// with its marker and is removed by the cleanup that follows.
    pub fn forget(&self, key: &ImageKey) {
        if let Some(job) = self.images().remove(key).and_then(|i| i.job) {
            let running = job.running();
            job.handle.abort();
            if running {
                self.running.dec();
            }
        }
    }

    /// Backoff after one more failed reconcile of `key`: 5 s doubling to 5 min.
    pub fn error_backoff(&self, key: &ImageKey) -> Duration {
        let mut images = self.images();
        let i = images.entry(key.clone()).or_default();
        i.errors = i.errors.saturating_add(1);
        backoff(i.errors)
    }

    /// A reconcile of `key` succeeded: the error backoff starts over.
    pub fn reset_errors(&self, key: &ImageKey) {
        if let Some(i) = self.images().get_mut(key) {
            i.errors = 0;
        }
    }
}

/// The jobs belong to this controller: when it stops (shutdown, lost leadership, or an
/// embedding that drops it) they stop too, so they never act next to the next leader, which
/// resumes them from `status.build` and the markers.
impl Drop for Tracker {
    fn drop(&mut self) {
        for job in self.images().drain().filter_map(|(_, i)| i.job) {
            job.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> JobOutcome {
        JobOutcome::Failed {
            stage: None,
            reason: FailureReason::ProxmoxUnreachable,
            message: "x".into(),
            retryable: true,
            touched: vec![],
        }
    }

    fn key(name: &str) -> ImageKey {
        ImageKey {
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("u-{name}"),
        }
    }

    fn finished(t: &Tracker, k: &ImageKey) -> bool {
        t.view(k).is_some_and(|v| v.outcome.is_some())
    }

    async fn wait_finished(t: &Tracker, k: &ImageKey) {
        for _ in 0..200 {
            if finished(t, k) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the job of {k} did not finish");
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
        let now = Utc::now();
        let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.try_start(&a, "pve1", "b1", now, |p| async move {
            p.stage(BuildStage::CreateVm);
            let _ = rx.await;
            failed()
        })
        .unwrap();
        let again = t.try_start(&a, "pve1", "b2", now, |_| async { failed() });
        assert!(again.unwrap_err().contains("already running"));
        assert!(t.slot(&b, "pve1").unwrap_err().contains("node pve1"));
        let node = t.try_start(&b, "pve1", "b3", now, |_| async { failed() });
        assert!(node.unwrap_err().contains("node pve1"));
        t.try_start(&c, "pve2", "b4", now, |_| std::future::pending())
            .unwrap();
        let global = t.try_start(&d, "pve3", "b5", now, |_| async { failed() });
        assert!(global.unwrap_err().contains("--max-concurrent-builds 2"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let v = t.view(&a).expect("a running job");
        assert!(v.outcome.is_none());
        assert_eq!(v.progress.stage, BuildStage::CreateVm);
        assert_eq!(v.progress.started_at, now);
        assert_eq!(v.progress.stages.len(), 1);
        assert_eq!(v.announced, 0);
        t.mark_announced(&a, 1);
        assert_eq!(t.view(&a).unwrap().announced, 1, "announced once");
        tx.send(()).unwrap();
        wait_finished(&t, &a).await;
        // A finished job frees its node slot, and stays until its outcome was settled.
        t.try_start(&b, "pve1", "b3", now, |_| std::future::pending())
            .unwrap();
        assert!(t.view(&a).is_some());
        t.settle(&a, recorded("b1", None));
        assert!(t.view(&a).is_none());
        assert_eq!(
            t.memory(&a)
                .finished
                .map(|f| f.ids.into_iter().collect::<Vec<_>>()),
            Some(vec!["b1".to_string()])
        );
        t.settle(&b, recorded("b3", None));
        assert!(t.view(&b).is_some(), "a running job is not settled");
        assert!(
            t.memory(&b).finished.is_none(),
            "nor remembered as finished"
        );
        t.forget(&c);
        assert!(t.view(&c).is_none());
    }

    #[test]
    fn one_map_keyed_by_the_object_holds_the_memory() {
        let t = Tracker::new(
            Limits {
                global: 1,
                per_node: 1,
            },
            Default::default(),
        );
        let a = key("a");
        // The same name, another uid: a re-created object starts afresh.
        let a2 = ImageKey {
            uid: "u-other".into(),
            ..a.clone()
        };
        let f = FailedBuild {
            spec_hash: "h1".into(),
            reason: FailureReason::ProvisioningFailed,
            message: "m".into(),
            retry_at: None,
            attempts: 2,
        };
        t.set_failed(&a, Some(f.clone()));
        assert_eq!(t.memory(&a).failed, Some(f));
        assert_eq!(t.memory(&a2), ImageMemory::default());
        let delays: Vec<u64> = (0..3).map(|_| t.error_backoff(&a).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20]);
        assert_eq!(t.error_backoff(&a2).as_secs(), 5);
        t.reset_errors(&a);
        assert_eq!(t.error_backoff(&a).as_secs(), 5);
        t.set_failed(&a, None);
        assert!(t.memory(&a).failed.is_none());
        t.forget(&a);
        assert_eq!(t.memory(&a), ImageMemory::default());
    }

    fn recorded(id: &str, build: Option<BuildStatus>) -> Recorded {
        Recorded {
            id: id.into(),
            build,
            last_validation: None,
        }
    }

    fn build(id: &str, stage: BuildStage) -> BuildStatus {
        BuildStatus {
            id: id.into(),
            stage,
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
        use BuildStage::*;
        use StatusBuild::*;
        let promoted = finished_here(&["b1"], recorded("b1", None));
        // The cache still shows b1 in Promote after this process promoted it: stale.
        assert_eq!(
            judge_status_build(Some(&build("b1", Promote)), false, Some(&promoted)),
            Stale(recorded("b1", None))
        );
        // The same after a failure: the recorded Failed build is written back.
        let failed = build("b2", Failed);
        let after_failure = finished_here(&["b1", "b2"], recorded("b2", Some(failed.clone())));
        assert_eq!(
            judge_status_build(Some(&build("b2", Provision)), false, Some(&after_failure)),
            Stale(recorded("b2", Some(failed.clone())))
        );
        assert_eq!(
            judge_status_build(Some(&failed), false, Some(&after_failure)),
            AsIs,
            "the status as recorded"
        );
        // An even older copy naming an earlier build of this process.
        assert_eq!(
            judge_status_build(Some(&build("b1", Validate)), false, Some(&after_failure)),
            Stale(recorded("b2", Some(failed)))
        );
        // A build this process never ran (a previous leader's): resumed.
        assert_eq!(
            judge_status_build(Some(&build("b0", Provision)), false, Some(&promoted)),
            Resume("b0".into())
        );
        assert_eq!(
            judge_status_build(Some(&build("b0", Provision)), false, None),
            Resume("b0".into())
        );
        // Running here, failed, or no build at all: nothing to decide.
        assert_eq!(
            judge_status_build(Some(&build("b3", Provision)), true, Some(&promoted)),
            AsIs
        );
        assert_eq!(
            judge_status_build(Some(&build("b0", Failed)), false, None),
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
        let a = key("a");
        for n in 0..(REMEMBERED_IDS + 4) {
            let id = format!("b{n}");
            t.try_start(&a, "pve1", &id, Utc::now(), |_| async { failed() })
                .unwrap();
            wait_finished(&t, &a).await;
            t.settle(&a, recorded(&id, None));
        }
        let f = t.memory(&a).finished.unwrap();
        assert_eq!(f.ids.len(), REMEMBERED_IDS);
        assert_eq!(f.ids.back().map(String::as_str), Some("b19"));
        assert_eq!(f.last.id, "b19");
        t.forget(&a);
        assert!(t.memory(&a).finished.is_none());
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
        t.try_start(&key("a"), "pve1", "b1", Utc::now(), |_| async move {
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
