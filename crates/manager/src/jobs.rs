//! Jobs: long volume operations (clone, convert) that run on a blocking thread while the API keeps
//! answering, with progress, cooperative cancellation and a final state.
//!
//! A job is written to the store when it starts and again when it ends, so `GET /v1/jobs` keeps
//! finished jobs across restarts and a job cut short by a daemon crash is reported as failed on the
//! next start. The copy goes to a hidden scratch file in the pool that is renamed into place only
//! when complete: a cancelled, failed or interrupted job leaves no volume behind.

use crate::error::{ApiError, ApiResult};
use crate::manager::{Manager, lock};
use crate::store::Store;
use ferro_block::{CreateOptions, DiskImage, Format};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How many finished jobs are remembered (in memory and in the store).
const HISTORY: usize = 200;
/// Bytes copied between two looks at the stop request (and two progress updates).
const CHUNK: usize = 1 << 20;
/// Granularity of zero detection: all-zero blocks are not written, so the copy stays sparse.
const ZERO_BLOCK: usize = 64 << 10;
/// How long a cancel request waits for the worker to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits for its jobs to wind down.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Values of [`Job::stop`]: keep going, or why to stop.
const RUN: u8 = 0;
const CANCEL: u8 = 1;
const DAEMON_STOPPING: u8 = 2;

/// Why a job started by an earlier ferrod process has no worker any more.
const INTERRUPTED: &str = "ferrod stopped while the job was running (killed or crashed); its unfinished copy was removed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<JobState> {
        [JobState::Running, JobState::Completed, JobState::Failed, JobState::Cancelled].into_iter().find(|s| s.name() == name)
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: u64,
    /// "clone" or "convert".
    pub kind: String,
    /// The volume read, as "pool/volume".
    pub source: String,
    /// The volume made, as "pool/volume".
    pub target: String,
    pub state: JobState,
    /// Bytes of the source's data copied so far, out of `total_bytes` (ranges that read as zeroes
    /// are not copied and not counted).
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why the job failed.
    pub error: Option<String>,
}

/// One job: its info (which waiters watch) and the stop request its worker polls.
pub struct Job {
    info: watch::Sender<JobInfo>,
    stop: AtomicU8,
    /// The files a running job reads and writes; other requests may not change them meanwhile.
    source_path: PathBuf,
    target_path: PathBuf,
}

impl Job {
    fn new(info: JobInfo, source_path: PathBuf, target_path: PathBuf) -> Arc<Job> {
        Arc::new(Job { info: watch::Sender::new(info), stop: AtomicU8::new(RUN), source_path, target_path })
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

/// Every job the daemon remembers, by id.
pub struct Jobs {
    all: Mutex<BTreeMap<u64, Arc<Job>>>,
}

/// A copy of one volume into a new one, as the pool layer resolved it.
pub struct CopySpec {
    pub kind: &'static str,
    pub pool: String,
    pub source: String,
    pub source_path: PathBuf,
    pub source_format: Format,
    pub target: String,
    pub target_path: PathBuf,
    pub target_format: Format,
}

/// Loads the remembered jobs. Jobs the store still shows as running belonged to a ferrod that
/// died: they are recorded as failed and their scratch files removed; returned for the event log.
pub(crate) fn load(store: &Store) -> rusqlite::Result<(Jobs, Vec<JobInfo>)> {
    let mut all = BTreeMap::new();
    let mut interrupted = Vec::new();
    for row in store.jobs()? {
        let mut info = row.info;
        if info.state == JobState::Running {
            if let Some(scratch) = &row.scratch {
                let _ = std::fs::remove_file(scratch);
            }
            info.state = JobState::Failed;
            info.error = Some(INTERRUPTED.to_string());
            info.finished_ms = Some(crate::now_ms());
            store.finish_job(&info)?;
            interrupted.push(info.clone());
        }
        all.insert(info.id, Job::new(info, PathBuf::new(), PathBuf::new()));
    }
    Ok((Jobs { all: Mutex::new(all) }, interrupted))
}

/// How a worker ended early.
enum Stop {
    Cancelled,
    DaemonStopping,
    Failed(String),
}

impl From<ferro_block::Error> for Stop {
    fn from(e: ferro_block::Error) -> Stop {
        Stop::Failed(e.to_string())
    }
}

impl Manager {
    pub fn jobs_list(&self) -> Vec<JobInfo> {
        lock(&self.jobs.all).values().map(|j| j.info()).collect()
    }

    /// A job by the id given in a URL; anything that names no job is 404.
    pub fn job(&self, id: &str) -> ApiResult<Arc<Job>> {
        id.parse::<u64>()
            .ok()
            .and_then(|n| lock(&self.jobs.all).get(&n).cloned())
            .ok_or_else(|| ApiError::not_found(format!("job {id:?} does not exist (see `ferro job-list`)")))
    }

    /// Asks a running job to stop and waits for it; returns the job as it ended (completed, if it
    /// finished before it saw the request).
    pub async fn job_cancel(&self, id: &str) -> ApiResult<JobInfo> {
        let job = self.job(id)?;
        if !job.running() {
            let state = job.info().state;
            return Err(ApiError::conflict(format!("job {id} is already {}; only running jobs can be cancelled", state.name())));
        }
        let _ = job.stop.compare_exchange(RUN, CANCEL, Ordering::Relaxed, Ordering::Relaxed);
        let info = job.finished(Some(CANCEL_WAIT)).await;
        if info.state == JobState::Running {
            return Err(ApiError::timeout(format!("job {id} did not stop within {} s; it stops at its next chunk", CANCEL_WAIT.as_secs())));
        }
        Ok(info)
    }

    /// The running job that reads or writes `path`, if any.
    pub(crate) fn job_using(&self, path: &Path) -> Option<u64> {
        lock(&self.jobs.all)
            .iter()
            .find(|(_, j)| j.running() && (j.source_path == path || j.target_path == path))
            .map(|(id, _)| *id)
    }

    /// Records a new copy job and starts its worker.
    pub(crate) fn start_copy(self: &Arc<Self>, spec: CopySpec) -> ApiResult<Arc<Job>> {
        let scratch = spec.target_path.with_file_name(format!(".{}.part", spec.target));
        let mut info = JobInfo {
            id: 0,
            kind: spec.kind.to_string(),
            source: format!("{}/{}", spec.pool, spec.source),
            target: format!("{}/{}", spec.pool, spec.target),
            state: JobState::Running,
            done_bytes: 0,
            total_bytes: 0,
            started_ms: crate::now_ms(),
            finished_ms: None,
            error: None,
        };
        let job = {
            // Checked and recorded under one lock, so two requests cannot both take the name.
            let mut all = lock(&self.jobs.all);
            if let Some(other) = all.iter().find(|(_, j)| j.running() && j.target_path == spec.target_path).map(|(id, _)| id) {
                return Err(ApiError::conflict(format!("name: volume {} is being made by job {other}", spec.target)));
            }
            if spec.target_path.exists() {
                return Err(ApiError::conflict(format!("name: volume {} already exists in pool {}", spec.target, spec.pool)));
            }
            info.id = self.store().insert_job(&info, &scratch.display().to_string())?;
            let job = Job::new(info.clone(), spec.source_path.clone(), spec.target_path.clone());
            all.insert(info.id, job.clone());
            job
        };
        self.events.emit("job", &info.id.to_string(), "started", format!("{} {} -> {}", info.kind, info.source, info.target));
        let mgr = self.clone();
        let worker = job.clone();
        tokio::spawn(async move { mgr.run_copy(worker, spec, scratch).await });
        Ok(job)
    }

    async fn run_copy(&self, job: Arc<Job>, spec: CopySpec, scratch: PathBuf) {
        let worker = job.clone();
        let (src, dst) = (spec.source_path.clone(), scratch.clone());
        let (src_format, dst_format) = (spec.source_format, spec.target_format);
        let copied = tokio::task::spawn_blocking(move || copy_image(&worker, &src, src_format, &dst, dst_format))
            .await
            .unwrap_or_else(|e| Err(Stop::Failed(format!("image task failed: {e}"))));
        let result = copied.and_then(|()| {
            std::fs::rename(&scratch, &spec.target_path)
                .map_err(|e| Stop::Failed(format!("cannot move the copy to {}: {e}", spec.target_path.display())))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&scratch);
        }
        let mut info = job.info();
        (info.state, info.error) = match result {
            Ok(()) => (JobState::Completed, None),
            Err(Stop::Cancelled) => (JobState::Cancelled, None),
            Err(Stop::DaemonStopping) => (JobState::Failed, Some("ferrod was stopped while the job was running".to_string())),
            Err(Stop::Failed(e)) => (JobState::Failed, Some(e)),
        };
        info.finished_ms = Some(crate::now_ms());
        // Recorded before waiters hear of it: a client told "completed" finds it so after a restart.
        let recorded = {
            let store = self.store();
            store.finish_job(&info).and_then(|()| store.prune_jobs(HISTORY))
        };
        if let Err(e) = recorded {
            tracing::error!(job = info.id, "cannot record the end of the job: {e}");
        }
        job.info.send_replace(info.clone());
        self.forget_old_jobs();
        let detail = info.error.clone().unwrap_or_else(|| format!("{} {} -> {}", info.kind, info.source, info.target));
        self.events.emit("job", &info.id.to_string(), info.state.name(), detail);
        if info.state == JobState::Completed {
            self.events.emit("volume", &info.target, "created", format!("{} of {}", info.kind, info.source));
        }
    }

    /// Keeps the newest HISTORY finished jobs in memory, like the store.
    fn forget_old_jobs(&self) {
        let mut all = lock(&self.jobs.all);
        let finished: Vec<u64> = all.iter().filter(|(_, j)| !j.running()).map(|(id, _)| *id).collect();
        for id in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            all.remove(id);
        }
    }

    /// Asks every running job to stop because the daemon is stopping, and waits a little for them.
    pub async fn stop_jobs(&self) {
        let running: Vec<Arc<Job>> = lock(&self.jobs.all).values().filter(|j| j.running()).cloned().collect();
        for job in &running {
            let _ = job.stop.compare_exchange(RUN, DAEMON_STOPPING, Ordering::Relaxed, Ordering::Relaxed);
        }
        for job in running {
            job.finished(Some(STOP_WAIT)).await;
        }
    }
}

/// Copies the data of `src` into a new image at `dst`, one chunk at a time, checking the job's
/// stop request between chunks. Ranges the whole backing chain reads as zeroes are skipped, so
/// the copy is as sparse as the source and stands alone (no backing file).
fn copy_image(job: &Job, src: &Path, src_format: Format, dst: &Path, dst_format: Format) -> Result<(), Stop> {
    let ranges: Vec<(u64, u64)> = ferro_block::ops::map(src, Some(src_format))?
        .into_iter()
        .filter(|e| e.data || !e.zero)
        .map(|e| (e.start, e.length))
        .collect();
    let total = ranges.iter().map(|(_, len)| len).sum();
    job.info.send_if_modified(|j| {
        j.total_bytes = total;
        false
    });
    let mut source = ferro_block::open(src, Some(src_format), true)?;
    ferro_block::create(dst, &CreateOptions::new(dst_format, Some(source.size())))?;
    let mut target = ferro_block::open(dst, Some(dst_format), false)?;
    let mut buf = vec![0u8; CHUNK];
    for (start, len) in ranges {
        let mut off = start;
        while off < start + len {
            match job.stop.load(Ordering::Relaxed) {
                CANCEL => return Err(Stop::Cancelled),
                DAEMON_STOPPING => return Err(Stop::DaemonStopping),
                _ => {}
            }
            let n = (start + len - off).min(CHUNK as u64) as usize;
            source.read_at(&mut buf[..n], off)?;
            write_nonzero(target.as_mut(), &buf[..n], off)?;
            off += n as u64;
            // Progress is polled by readers, not pushed: waiters only wake for the final state.
            job.info.send_if_modified(|j| {
                j.done_bytes += n as u64;
                false
            });
        }
    }
    target.flush()?;
    Ok(())
}

/// Writes the runs of `data` that are not all zeroes; the new image already reads zeroes elsewhere.
fn write_nonzero(img: &mut dyn DiskImage, data: &[u8], off: u64) -> ferro_block::Result<()> {
    let mut run_start = None;
    for (i, block) in data.chunks(ZERO_BLOCK).enumerate() {
        let at = i * ZERO_BLOCK;
        match (run_start, block.iter().all(|&b| b == 0)) {
            (None, false) => run_start = Some(at),
            (Some(start), true) => {
                img.write_at(&data[start..at], off + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        img.write_at(&data[start..], off + start as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for state in [JobState::Running, JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert_eq!(JobState::from_name(state.name()), Some(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
        assert_eq!(JobState::from_name("paused"), None);
    }

    #[test]
    fn only_nonzero_runs_are_written() {
        let dir = std::env::temp_dir().join(format!("ferro-jobs-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse.raw");
        ferro_block::create(&path, &CreateOptions::new(Format::Raw, Some(4 << 20))).unwrap();
        let mut data = vec![0u8; 4 * ZERO_BLOCK];
        data[ZERO_BLOCK + 5] = 7;
        data[3 * ZERO_BLOCK..].fill(9);
        let mut img = ferro_block::open(&path, Some(Format::Raw), false).unwrap();
        write_nonzero(img.as_mut(), &data, 1 << 20).unwrap();
        img.flush().unwrap();
        let mut back = vec![1u8; data.len()];
        img.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == data, "written data reads back");
        let map = ferro_block::ops::map(&path, Some(Format::Raw)).unwrap();
        let data_ranges: Vec<(u64, u64)> = map.iter().filter(|e| e.data).map(|e| (e.start, e.length)).collect();
        let block = ZERO_BLOCK as u64;
        assert!(
            data_ranges.iter().all(|&(s, l)| s >= (1 << 20) + block && s + l <= (1 << 20) + 4 * block),
            "zero blocks stay holes: {data_ranges:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
