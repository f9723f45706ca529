//! The state store: one SQLite file per host holding definitions, runtime records, pools and jobs.
//!
//! Every write is a single statement (SQLite makes each atomic and durable in WAL mode), so a crash
//! of ferrod at any point leaves either the old or the new row, never a torn definition.

use crate::jobs::{JobInfo, JobState};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

pub struct Store {
    conn: Connection,
}

/// A domain row as stored; the definition is re-validated by the caller when loading.
pub struct StoredDomain {
    pub name: String,
    pub uuid: String,
    pub definition: String,
    pub autostart: bool,
    pub runtime: Option<String>,
}

/// A pool row as stored.
pub struct StoredPool {
    pub name: String,
    pub uuid: String,
    pub target: String,
    pub autostart: bool,
    pub active: bool,
}

/// A job row as stored: what the API shows plus the scratch file a running job writes.
pub struct StoredJob {
    pub info: JobInfo,
    pub scratch: Option<String>,
}

pub type StoreResult<T> = Result<T, rusqlite::Error>;

impl Store {
    pub fn open(path: &Path) -> StoreResult<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS domains (
                 name TEXT PRIMARY KEY,
                 uuid TEXT NOT NULL,
                 definition TEXT NOT NULL,
                 autostart INTEGER NOT NULL DEFAULT 0,
                 runtime TEXT
             );
             CREATE TABLE IF NOT EXISTS pools (
                 name TEXT PRIMARY KEY,
                 uuid TEXT NOT NULL,
                 target TEXT NOT NULL,
                 autostart INTEGER NOT NULL DEFAULT 0,
                 active INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 kind TEXT NOT NULL,
                 source TEXT NOT NULL,
                 target TEXT NOT NULL,
                 state TEXT NOT NULL,
                 done_bytes INTEGER NOT NULL DEFAULT 0,
                 total_bytes INTEGER NOT NULL DEFAULT 0,
                 started_ms INTEGER NOT NULL,
                 finished_ms INTEGER,
                 error TEXT,
                 scratch TEXT
             );",
        )?;
        Ok(Store { conn })
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
    }

    pub fn set_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn domains(&self) -> StoreResult<Vec<StoredDomain>> {
        let mut stmt = self.conn.prepare("SELECT name, uuid, definition, autostart, runtime FROM domains")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredDomain {
                name: r.get(0)?,
                uuid: r.get(1)?,
                definition: r.get(2)?,
                autostart: r.get(3)?,
                runtime: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Inserts or replaces a definition, keeping the runtime record of an existing domain.
    pub fn put_domain(&self, name: &str, uuid: &str, definition: &str, autostart: bool) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO domains (name, uuid, definition, autostart) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, autostart = excluded.autostart",
            params![name, uuid, definition, autostart],
        )?;
        Ok(())
    }

    pub fn set_runtime(&self, name: &str, runtime: &str) -> StoreResult<()> {
        self.conn.execute("UPDATE domains SET runtime = ?2 WHERE name = ?1", params![name, runtime])?;
        Ok(())
    }

    pub fn delete_domain(&self, name: &str) -> StoreResult<()> {
        self.conn.execute("DELETE FROM domains WHERE name = ?1", [name])?;
        Ok(())
    }

    pub fn pools(&self) -> StoreResult<Vec<StoredPool>> {
        let mut stmt = self.conn.prepare("SELECT name, uuid, target, autostart, active FROM pools")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredPool {
                name: r.get(0)?,
                uuid: r.get(1)?,
                target: r.get(2)?,
                autostart: r.get(3)?,
                active: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    pub fn put_pool(&self, pool: &StoredPool) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO pools (name, uuid, target, autostart, active) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET target = excluded.target, autostart = excluded.autostart,
             active = excluded.active",
            params![pool.name, pool.uuid, pool.target, pool.autostart, pool.active],
        )?;
        Ok(())
    }

    pub fn delete_pool(&self, name: &str) -> StoreResult<()> {
        self.conn.execute("DELETE FROM pools WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Records a job that is starting and returns its id (ids never repeat, even after deletes).
    pub fn insert_job(&self, job: &JobInfo, scratch: &str) -> StoreResult<u64> {
        self.conn.execute(
            "INSERT INTO jobs (kind, source, target, state, done_bytes, total_bytes, started_ms, scratch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![job.kind, job.source, job.target, job.state.name(), job.done_bytes, job.total_bytes, job.started_ms, scratch],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    /// Records how a job ended; its scratch file is gone by then.
    pub fn finish_job(&self, job: &JobInfo) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?2, done_bytes = ?3, total_bytes = ?4, finished_ms = ?5, error = ?6, scratch = NULL
             WHERE id = ?1",
            params![job.id, job.state.name(), job.done_bytes, job.total_bytes, job.finished_ms, job.error],
        )?;
        Ok(())
    }

    /// Every job, oldest first; a row whose state is unreadable comes back as failed.
    pub fn jobs(&self) -> StoreResult<Vec<StoredJob>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, kind, source, target, state, done_bytes, total_bytes, started_ms, finished_ms, error, scratch
             FROM jobs ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let state: String = r.get(4)?;
            Ok(StoredJob {
                info: JobInfo {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    source: r.get(2)?,
                    target: r.get(3)?,
                    state: JobState::from_name(&state).unwrap_or(JobState::Failed),
                    done_bytes: r.get(5)?,
                    total_bytes: r.get(6)?,
                    started_ms: r.get(7)?,
                    finished_ms: r.get(8)?,
                    error: r.get(9)?,
                },
                scratch: r.get(10)?,
            })
        })?;
        rows.collect()
    }

    /// Forgets the oldest finished jobs beyond the newest `keep`.
    pub fn prune_jobs(&self, keep: usize) -> StoreResult<()> {
        self.conn.execute(
            "DELETE FROM jobs WHERE state != 'running' AND id NOT IN
             (SELECT id FROM jobs WHERE state != 'running' ORDER BY id DESC LIMIT ?1)",
            [keep as i64],
        )?;
        Ok(())
    }
}
