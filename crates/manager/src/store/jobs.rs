//! Job rows: one per job, written when it starts and when it ends, whatever its kind.

use super::{Store, StoreResult};
use crate::model::{JobInfo, JobState, Progress, ProgressUnit};
use rusqlite::params;
use std::path::PathBuf;

/// A job row as stored: what the API shows plus the scratch files a running job writes (removed
/// if the job never ends, see `jobs`).
pub struct StoredJob {
    pub info: JobInfo,
    pub scratch_files: Vec<PathBuf>,
}

impl Store {
    /// Records a job that is starting, under the id the runner gave it.
    pub fn insert_job(&self, job: &JobInfo, scratch_files: &[PathBuf]) -> StoreResult<()> {
        let scratch = serde_json::to_string(scratch_files).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
        let (done, total) = job.progress.counts();
        self.conn().execute(
            "INSERT INTO jobs (id, kind, source, target, state, unit, done, total, started_ms, scratch_files)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                job.id,
                job.kind,
                job.source,
                job.target,
                job.state.name(),
                job.progress.unit().name(),
                done,
                total,
                job.started_ms,
                scratch
            ],
        )?;
        Ok(())
    }

    /// Records how a job ended; its scratch files are gone by then.
    pub fn finish_job(&self, job: &JobInfo) -> StoreResult<()> {
        let (done, total) = job.progress.counts();
        self.conn().execute(
            "UPDATE jobs SET state = ?2, done = ?3, total = ?4, finished_ms = ?5, error = ?6, scratch_files = NULL
             WHERE id = ?1",
            params![job.id, job.state.name(), done, total, job.finished_ms, job.error],
        )?;
        Ok(())
    }

    /// The highest job id ever given, even if its row was pruned since (0 before the first job).
    pub fn last_job_id(&self) -> StoreResult<u64> {
        self.conn().query_row(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),
                        COALESCE((SELECT MAX(id) FROM jobs), 0))",
            [],
            |r| r.get(0),
        )
    }

    /// Every job, oldest first; a row whose state or unit is unreadable comes back as a failed
    /// job counting bytes.
    pub fn jobs(&self) -> StoreResult<Vec<StoredJob>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, kind, source, target, state, unit, done, total, started_ms, finished_ms, error, scratch_files
             FROM jobs ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let state: String = r.get(4)?;
            let unit: String = r.get(5)?;
            let scratch: Option<String> = r.get(11)?;
            Ok(StoredJob {
                info: JobInfo {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    source: r.get(2)?,
                    target: r.get(3)?,
                    state: JobState::from_name(&state).unwrap_or(JobState::Failed),
                    progress: Progress::new(ProgressUnit::from_name(&unit).unwrap_or(ProgressUnit::Bytes), r.get(6)?, r.get(7)?),
                    started_ms: r.get(8)?,
                    finished_ms: r.get(9)?,
                    error: r.get(10)?,
                },
                scratch_files: scratch.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default(),
            })
        })?;
        rows.collect()
    }

    /// Forgets the oldest finished jobs beyond the newest `keep`.
    pub fn prune_jobs(&self, keep: usize) -> StoreResult<()> {
        self.conn().execute(
            "DELETE FROM jobs WHERE state != 'running' AND id NOT IN
             (SELECT id FROM jobs WHERE state != 'running' ORDER BY id DESC LIMIT ?1)",
            [keep as i64],
        )?;
        Ok(())
    }
}
