//! The state store: one SQLite file per host holding definitions, runtime records, pools, networks,
//! jobs, domain snapshots and backup checkpoints. It depends only on the shared types of `model`; each service keeps
//! its own rows in its own file here (`domains.rs`, `pools.rs`, `networks.rs`, `jobs.rs`,
//! `snapshots.rs`, `checkpoints.rs`).
//!
//! Every write is a single statement, so a crash of ferrod at any point leaves either the old or
//! the new row, never a torn one. Writes are durable when they return: the database runs in WAL
//! mode with `synchronous=FULL`, which syncs the WAL at every commit (with NORMAL, a power loss
//! could take back the last acknowledged definitions, though never corrupt the file).
//!
//! The schema is versioned with `PRAGMA user_version`: [`MIGRATIONS`] lists the steps from an
//! empty file to the current schema, and opening applies the missing ones in one transaction.
//! A database written by a newer ferrod (a version above the steps this one knows) is refused.

mod checkpoints;
mod domains;
mod jobs;
mod networks;
mod pools;
mod snapshots;

pub use checkpoints::StoredCheckpoint;
pub use domains::StoredDomain;
pub use jobs::StoredJob;
pub use networks::StoredNetwork;
pub use pools::StoredPool;
pub use snapshots::StoredSnapshot;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The schema steps, in order: step `i` takes the database from version `i` to `i + 1`. Add a
/// schema change as a new step at the end; never edit a step that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema. Databases made before versioning (user_version 0) already have these
    // tables, hence IF NOT EXISTS.
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
    // 2: jobs of any kind: progress in bytes or steps, and any number of scratch files (a JSON
    // array of paths) to remove when a job dies unfinished.
    "ALTER TABLE jobs RENAME COLUMN done_bytes TO done;
     ALTER TABLE jobs RENAME COLUMN total_bytes TO total;
     ALTER TABLE jobs ADD COLUMN unit TEXT NOT NULL DEFAULT 'bytes';
     ALTER TABLE jobs RENAME COLUMN scratch TO scratch_files;
     UPDATE jobs SET scratch_files = json_array(scratch_files) WHERE scratch_files IS NOT NULL;",
    // 3: virtual networks: the definition as the user wrote it, and whether it should be running
    // (so a restarted ferrod adopts it).
    "CREATE TABLE networks (
         name TEXT PRIMARY KEY,
         uuid TEXT NOT NULL,
         definition TEXT NOT NULL,
         autostart INTEGER NOT NULL DEFAULT 0,
         active INTEGER NOT NULL DEFAULT 0
     );",
    // 4: domain snapshots: the tree (parent names within a domain), the current one, the
    // definition each was taken with, and what it holds (memory state, disks with an internal
    // snapshot of its name).
    "CREATE TABLE snapshots (
         domain TEXT NOT NULL,
         name TEXT NOT NULL,
         parent TEXT,
         state TEXT NOT NULL,
         created_ms INTEGER NOT NULL,
         description TEXT,
         definition TEXT NOT NULL,
         current INTEGER NOT NULL DEFAULT 0,
         pause_us INTEGER,
         memory_bytes INTEGER,
         disks TEXT NOT NULL DEFAULT '[]',
         PRIMARY KEY (domain, name)
     );",
    // 5: backup checkpoints: one chain per domain (parent names), the disks with a dirty bitmap
    // of the checkpoint's name and the backup file made of each (a JSON array), and whether the
    // checkpoint is still being made (undone at the next start if ferrod died meanwhile).
    "CREATE TABLE checkpoints (
         domain TEXT NOT NULL,
         name TEXT NOT NULL,
         parent TEXT,
         created_ms INTEGER NOT NULL,
         disks TEXT NOT NULL,
         pending INTEGER NOT NULL DEFAULT 1,
         PRIMARY KEY (domain, name)
     );",
    // 6: templates: a domain marked a template cannot start, its disks are read-only and linked
    // clones use them as backing files.
    "ALTER TABLE domains ADD COLUMN template INTEGER NOT NULL DEFAULT 0;",
];

/// The schema version this ferrod writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub struct Store {
    conn: Mutex<Connection>,
}

pub type StoreResult<T> = Result<T, rusqlite::Error>;

impl Store {
    /// Opens (or creates) the database and brings its schema up to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Store, String> {
        let fail = |e: rusqlite::Error| format!("state store {}: {e}", path.display());
        let mut conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(fail)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
        migrate(&mut conn, path)?;
        // Every commit is a step of some operation (see crashpoint): returning false lets it go on.
        conn.commit_hook(Some(|| {
            crate::crashpoint::step("state store commit");
            false
        }));
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        self.conn().query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
    }

    pub fn set_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Applies the steps the database lacks, all in one transaction with the new version number, so
/// a crash leaves the old schema or the new one.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), String> {
    let fail = |e: rusqlite::Error| format!("state store {}: cannot update its schema: {e}", path.display());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(fail)?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > SCHEMA_VERSION {
        return Err(format!(
            "state store {} has schema version {version}, written by a newer ferrod; this ferrod knows versions up to \
             {SCHEMA_VERSION}: run the newer ferrod (or restore a backup of the file made before the upgrade)",
            path.display()
        ));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    for step in &MIGRATIONS[version..] {
        tx.execute_batch(step).map_err(fail)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION as i64).map_err(fail)?;
    tx.commit().map_err(fail)?;
    if version > 0 {
        tracing::info!(from = version, to = SCHEMA_VERSION, "state store schema updated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, Progress};
    use std::path::PathBuf;

    fn temp_db(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferro-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("ferrod.db")
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_new_store_has_the_current_schema_and_syncs_every_commit() {
        let path = temp_db("new");
        let store = Store::open(&path).unwrap();
        let synchronous: i64 = store.conn().pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap();
        assert_eq!(synchronous, 2, "synchronous=FULL");
        let journal: String = store.conn().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(journal, "wal");
        drop(store);
        assert_eq!(user_version(&path), SCHEMA_VERSION as i64);
        // Opening again changes nothing.
        Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION as i64);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// A database as ferrod wrote it before schema versions (user_version 0, the version-1
    /// tables), with a domain, a finished job and one cut short by a crash.
    #[test]
    fn a_database_from_before_versioning_is_migrated() {
        let path = temp_db("old");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        old.execute_batch(
            "INSERT INTO domains (name, uuid, definition, autostart) VALUES ('web', 'u-1', 'name = \"web\"', 1);
             INSERT INTO jobs (kind, source, target, state, done_bytes, total_bytes, started_ms, finished_ms)
                 VALUES ('clone', 'p/a', 'p/b', 'completed', 8, 8, 1, 2);
             INSERT INTO jobs (kind, source, target, state, done_bytes, total_bytes, started_ms, scratch)
                 VALUES ('convert', 'p/a', 'p/c', 'running', 3, 9, 5, '/pool/.c.part');",
        )
        .unwrap();
        drop(old);
        assert_eq!(user_version(&path), 0);

        let store = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION as i64);
        let domains = store.domains().unwrap();
        assert_eq!((domains.len(), domains[0].name.as_str(), domains[0].autostart), (1, "web", true));
        let jobs = store.jobs().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].info.state, JobState::Completed);
        assert_eq!(jobs[0].info.progress, Progress::Bytes { done_bytes: 8, total_bytes: 8 });
        assert!(jobs[0].scratch_files.is_empty());
        assert_eq!((jobs[1].info.id, jobs[1].info.state), (2, JobState::Running));
        assert_eq!(jobs[1].info.progress, Progress::Bytes { done_bytes: 3, total_bytes: 9 });
        assert_eq!(jobs[1].scratch_files, [PathBuf::from("/pool/.c.part")]);
        assert_eq!(store.last_job_id().unwrap(), 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_database_from_a_newer_ferrod_is_refused() {
        let path = temp_db("newer");
        drop(Store::open(&path).unwrap());
        let newer = Connection::open(&path).unwrap();
        newer.pragma_update(None, "user_version", SCHEMA_VERSION as i64 + 1).unwrap();
        newer.execute_batch("CREATE TABLE from_the_future (name TEXT)").unwrap();
        drop(newer);
        let message = Store::open(&path).err().expect("a newer schema must be refused");
        let expected = format!("has schema version {}, written by a newer ferrod", SCHEMA_VERSION + 1);
        assert!(message.contains(&expected) && message.contains("run the newer ferrod"), "{message}");
        assert_eq!(user_version(&path), SCHEMA_VERSION as i64 + 1, "the file is left as it was");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
