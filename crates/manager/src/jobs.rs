//! The job runner: any long task (a volume copy today; backups, snapshots, migrations and imports
//! next) runs as a job with progress, cooperative cancellation, a durable record and a final
//! state, while the API keeps answering. The runner knows nothing of what a job does: a service
//! describes the job ([`NewJob`]) and hands over its work, an async closure that reports progress
//! and polls for a stop request through its [`JobContext`].
//!
//! A job is written to the store when it starts and again when it ends, so finished jobs are
//! listed across restarts. A job whose ferrod died under it is found still "running" in the store
//! at the next start: it is recorded as failed and its scratch files are removed. The files a job
//! reads and writes are claimed (see `claims`) while it runs, so nothing changes them under it.

use crate::claims::{Access, Claims, Holder};
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::model::{JobInfo, JobState, Progress, ProgressUnit, now_ms};
use crate::store::Store;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How many finished jobs are remembered (in memory and in the store).
const HISTORY: usize = 200;
/// How long a cancel request waits for the worker to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits for its jobs to wind down.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Values of [`Job::stop`]: keep going, or why to stop.
const RUN: u8 = 0;
const CANCEL: u8 = 1;
const DAEMON_STOPPING: u8 = 2;

/// Why a job started by an earlier ferrod process has no worker any more.
const INTERRUPTED: &str = "ferrod stopped while the job was running (killed or crashed); its unfinished files were removed";

/// What a service asks the runner to run.
pub struct NewJob {
    /// The job kind's name, as the API shows it ("clone", "convert", ...).
    pub kind: &'static str,
    /// What the job reads and what it makes, as the API names them.
    pub source: String,
    pub target: String,
    pub unit: ProgressUnit,
    /// Files the job writes that must not outlive it unless it completes: removed when it fails,
    /// is cancelled, or was cut short by a crash of ferrod (found at the next start).
    pub scratch_files: Vec<PathBuf>,
    /// Files nothing else may change (or, for writes, use) while the job runs.
    pub uses: Vec<(PathBuf, Access)>,
}

/// How a job's work ended early.
#[derive(Debug)]
pub enum JobError {
    /// It saw a cancel request.
    Cancelled,
    /// It saw that ferrod is stopping.
    DaemonStopping,
    Failed(String),
}

/// One job: its info (which waiters watch) and the stop request its work polls.
pub struct Job {
    info: watch::Sender<JobInfo>,
    stop: AtomicU8,
}

impl Job {
    fn new(info: JobInfo) -> Arc<Job> {
        Arc::new(Job { info: watch::Sender::new(info), stop: AtomicU8::new(RUN) })
    }

    pub fn info(&self) -> JobInfo {
        self.info.borrow().clone()
    }

    fn running(&self) -> bool {
        self.info.borrow().state == JobState::Running
    }

    /// Waits (at most `limit`, if given) for the job to end; returns its info then.
    pub async fn finished(&self, limit: Option<Duration>) -> JobInfo {
        let mut rx = self.info.subscribe();
        let ended = rx.wait_for(|j| j.state != JobState::Running);
        match limit {
            Some(limit) => drop(tokio::time::timeout(limit, ended).await),
            None => drop(ended.await),
        }
        self.info()
    }
}

/// What a job's work sees of its job: it reports progress and polls for a stop request. Cheap to
/// clone and usable from a blocking thread.
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
}

impl JobContext {
    /// Sets the amount of work once it is known (0 until then).
    pub fn set_total(&self, total: u64) {
        self.update(|done, _| (done, total));
    }

    /// Adds `amount` to the work done.
    pub fn advance(&self, amount: u64) {
        self.update(|done, total| (done.saturating_add(amount), total));
    }

    /// Sets the work done and the total at once (for work that measures itself, such as a
    /// migration whose remainder grows while the guest writes).
    pub fn set_progress(&self, done: u64, total: u64) {
        self.update(|_, _| (done, total));
    }

    fn update(&self, f: impl FnOnce(u64, u64) -> (u64, u64)) {
        // Progress is polled by readers, not pushed: waiters only wake for the final state.
        self.job.info.send_if_modified(|j| {
            let (done, total) = j.progress.counts();
            let (done, total) = f(done, total);
            j.progress = Progress::new(j.progress.unit(), done, total);
            false
        });
    }

    /// `Err` once the job should stop (cancelled, or ferrod stopping); call it between chunks of
    /// work and return the error as it is.
    pub fn check_stop(&self) -> std::result::Result<(), JobError> {
        match self.job.stop.load(Ordering::Relaxed) {
            CANCEL => Err(JobError::Cancelled),
            DAEMON_STOPPING => Err(JobError::DaemonStopping),
            _ => Ok(()),
        }
    }
}

struct Registry {
    all: BTreeMap<u64, Arc<Job>>,
    last_id: u64,
}

/// Every job the daemon remembers, by id.
pub struct Jobs {
    store: Arc<Store>,
    events: Arc<EventHub>,
    claims: Arc<Claims>,
    registry: Mutex<Registry>,
}

fn holder(info: &JobInfo) -> Holder {
    Holder::Job { id: info.id, kind: info.kind.clone() }
}

fn remove_scratch(files: &[PathBuf]) {
    for file in files {
        let _ = std::fs::remove_file(file);
    }
}

impl Jobs {
    /// Loads the remembered jobs. Jobs the store still shows as running belonged to a ferrod that
    /// died: they are recorded as failed and their scratch files removed.
    pub fn open(store: Arc<Store>, events: Arc<EventHub>, claims: Arc<Claims>) -> std::result::Result<Arc<Jobs>, String> {
        let fail = |e: rusqlite::Error| format!("cannot read jobs: {e}");
        let mut all = BTreeMap::new();
        for row in store.jobs().map_err(fail)? {
            let mut info = row.info;
            if info.state == JobState::Running {
                remove_scratch(&row.scratch_files);
                info.state = JobState::Failed;
                info.error = Some(INTERRUPTED.to_string());
                info.finished_ms = Some(now_ms());
                store.finish_job(&info).map_err(fail)?;
                events.emit("job", &info.id.to_string(), info.state.name(), INTERRUPTED);
            }
            all.insert(info.id, Job::new(info));
        }
        let last_id = store.last_job_id().map_err(fail)?;
        Ok(Arc::new(Jobs { store, events, claims, registry: Mutex::new(Registry { all, last_id }) }))
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<JobInfo> {
        self.registry().all.values().map(|j| j.info()).collect()
    }

    pub fn get(&self, id: u64) -> Result<Arc<Job>> {
        self.registry()
            .all
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("job \"{id}\" does not exist (see `ferro job-list`)")))
    }

    /// Asks a running job to stop and waits for it; returns the job as it ended (completed, if it
    /// finished before it saw the request).
    pub async fn cancel(&self, id: u64) -> Result<JobInfo> {
        let job = self.get(id)?;
        if !job.running() {
            let state = job.info().state;
            return Err(Error::conflict(format!("job {id} is already {}; only running jobs can be cancelled", state.name())));
        }
        let _ = job.stop.compare_exchange(RUN, CANCEL, Ordering::Relaxed, Ordering::Relaxed);
        let info = job.finished(Some(CANCEL_WAIT)).await;
        if info.state == JobState::Running {
            return Err(Error::timeout(format!(
                "job {id} did not stop within {} s; it stops at its next chunk of work",
                CANCEL_WAIT.as_secs()
            )));
        }
        Ok(info)
    }

    /// Records a new job, claims its files and starts its work. A file held by someone else is a
    /// conflict, and then no job is made.
    pub fn start<W, F>(self: &Arc<Self>, new: NewJob, work: W) -> Result<Arc<Job>>
    where
        W: FnOnce(JobContext) -> F + Send + 'static,
        F: Future<Output = std::result::Result<(), JobError>> + Send + 'static,
    {
        let job = {
            // Under one lock: the id, the claims and the record, so two requests cannot both
            // take a file and ids never skip.
            let mut registry = self.registry();
            let info = JobInfo {
                id: registry.last_id + 1,
                kind: new.kind.to_string(),
                source: new.source,
                target: new.target,
                state: JobState::Running,
                progress: Progress::start(new.unit),
                started_ms: now_ms(),
                finished_ms: None,
                error: None,
            };
            self.claims
                .claim(&new.uses, &holder(&info))
                .map_err(|busy| Error::conflict(format!("{} is in use by {}", busy.path.display(), busy.holder)))?;
            if let Err(e) = self.store.insert_job(&info, &new.scratch_files) {
                self.claims.release(&holder(&info));
                return Err(e.into());
            }
            registry.last_id = info.id;
            let job = Job::new(info);
            registry.all.insert(job.info().id, job.clone());
            job
        };
        let info = job.info();
        self.events.emit("job", &info.id.to_string(), "started", format!("{} {} -> {}", info.kind, info.source, info.target));
        let jobs = self.clone();
        let context = JobContext { job: job.clone() };
        let scratch = new.scratch_files;
        let worker = job.clone();
        tokio::spawn(async move {
            // Its own task, so that a panic in the work fails the job instead of leaving it running.
            let result = tokio::spawn(work(context))
                .await
                .unwrap_or_else(|e| Err(JobError::Failed(format!("the job's worker failed: {e}"))));
            jobs.finish(&worker, result, &scratch);
        });
        Ok(job)
    }

    /// Records how a job ended and tells its waiters and the event stream.
    fn finish(&self, job: &Job, result: std::result::Result<(), JobError>, scratch: &[PathBuf]) {
        if result.is_err() {
            remove_scratch(scratch);
        }
        let mut info = job.info();
        // Released before anyone hears of the end: a client told "cancelled" may use the files.
        self.claims.release(&holder(&info));
        (info.state, info.error) = match result {
            Ok(()) => (JobState::Completed, None),
            Err(JobError::Cancelled) => (JobState::Cancelled, None),
            Err(JobError::DaemonStopping) => (JobState::Failed, Some("ferrod was stopped while the job was running".to_string())),
            Err(JobError::Failed(e)) => (JobState::Failed, Some(e)),
        };
        info.finished_ms = Some(now_ms());
        // Recorded before waiters hear of it: a client told "completed" finds it so after a restart.
        if let Err(e) = self.store.finish_job(&info).and_then(|()| self.store.prune_jobs(HISTORY)) {
            tracing::error!(job = info.id, "cannot record the end of the job: {e}");
        }
        job.info.send_replace(info.clone());
        self.forget_old();
        let detail = info.error.clone().unwrap_or_else(|| format!("{} {} -> {}", info.kind, info.source, info.target));
        self.events.emit("job", &info.id.to_string(), info.state.name(), detail);
    }

    /// Keeps the newest HISTORY finished jobs in memory, like the store.
    fn forget_old(&self) {
        let mut registry = self.registry();
        let finished: Vec<u64> = registry.all.iter().filter(|(_, j)| !j.running()).map(|(id, _)| *id).collect();
        for id in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            registry.all.remove(id);
        }
    }

    /// Asks every running job to stop because the daemon is stopping, and waits a little for them.
    pub async fn stop_all(&self) {
        let running: Vec<Arc<Job>> = self.registry().all.values().filter(|j| j.running()).cloned().collect();
        for job in &running {
            let _ = job.stop.compare_exchange(RUN, DAEMON_STOPPING, Ordering::Relaxed, Ordering::Relaxed);
        }
        for job in running {
            job.finished(Some(STOP_WAIT)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_home(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferro-jobs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open(home: &std::path::Path) -> (Arc<Jobs>, Arc<Claims>, Arc<EventHub>) {
        let store = Arc::new(Store::open(&home.join("ferrod.db")).unwrap());
        let (claims, events) = (Arc::new(Claims::default()), Arc::new(EventHub::default()));
        (Jobs::open(store, events.clone(), claims.clone()).unwrap(), claims, events)
    }

    fn steps_job(home: &std::path::Path) -> NewJob {
        NewJob {
            kind: "test",
            source: "a".into(),
            target: "b".into(),
            unit: ProgressUnit::Steps,
            scratch_files: vec![home.join("scratch")],
            uses: vec![(home.join("input"), Access::Read)],
        }
    }

    /// A kind the runner has never heard of: counts steps, is cancelled part way, and its
    /// scratch file and claims go with it.
    #[tokio::test]
    async fn any_kind_of_work_runs_reports_progress_and_stops_on_cancel() {
        let home = temp_home("cancel");
        let (jobs, claims, events) = open(&home);
        let scratch = home.join("scratch");
        let (step_tx, mut step_rx) = tokio::sync::mpsc::unbounded_channel();
        let job = jobs
            .start(steps_job(&home), move |ctx| async move {
                std::fs::write(&scratch, b"partial").unwrap();
                ctx.set_total(10);
                for _ in 0..10 {
                    ctx.check_stop()?;
                    ctx.advance(1);
                    let _ = step_tx.send(());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(())
            })
            .unwrap();
        step_rx.recv().await.unwrap();
        let info = job.info();
        assert_eq!((info.id, info.state), (1, JobState::Running));
        assert!(matches!(info.progress, Progress::Steps { done_steps: 1.., total_steps: 10 }), "{info:?}");
        assert!(claims.check(&home.join("input"), Access::Write).is_err(), "the input is held while the job runs");

        let ended = jobs.cancel(1).await.unwrap();
        assert_eq!(ended.state, JobState::Cancelled);
        let (done, total) = ended.progress.counts();
        assert!(done < total, "{ended:?}");
        assert!(!home.join("scratch").exists(), "scratch files go with a cancelled job");
        assert!(claims.check(&home.join("input"), Access::Write).is_ok());
        assert_eq!(jobs.cancel(1).await.unwrap_err().kind, crate::error::ErrorKind::Conflict);
        let kinds: Vec<&str> = events.since(0).iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["started", "cancelled"]);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[tokio::test]
    async fn a_failed_or_panicking_job_ends_failed_and_a_dead_daemons_job_is_failed_at_open() {
        let home = temp_home("fail");
        let (jobs, _, _) = open(&home);
        let job = jobs.start(steps_job(&home), |_| async { Err(JobError::Failed("disk full".into())) }).unwrap();
        let info = job.finished(None).await;
        assert_eq!((info.state, info.error.as_deref()), (JobState::Failed, Some("disk full")));
        let job = jobs.start(steps_job(&home), |_| async { panic!("bug") }).unwrap();
        let info = job.finished(None).await;
        assert!(info.error.unwrap().contains("worker failed"));

        // A job whose daemon dies: only the start is in the store.
        let scratch = home.join("scratch");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        jobs.start(steps_job(&home), move |_| async move {
            std::fs::write(&scratch, b"partial").unwrap();
            let _ = started_tx.send(());
            std::future::pending().await
        })
        .unwrap();
        started_rx.await.unwrap();
        let (reopened, _, events) = open(&home);
        let info = reopened.get(3).unwrap().info();
        assert_eq!(info.state, JobState::Failed);
        assert!(info.error.unwrap().contains("ferrod stopped while the job was running"));
        assert!(!home.join("scratch").exists(), "the dead job's scratch file is removed");
        assert_eq!(events.since(0).len(), 1);
        assert_eq!(reopened.list().len(), 3);
        // Ids keep counting.
        let next = reopened.start(steps_job(&home), |_| async { Ok(()) }).unwrap();
        assert_eq!(next.finished(None).await.id, 4);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
