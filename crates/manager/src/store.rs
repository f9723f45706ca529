//! The state store: one SQLite file per host holding definitions, runtime records and pools.
//!
//! Every write is a single statement (SQLite makes each atomic and durable in WAL mode), so a crash
//! of ferrod at any point leaves either the old or the new row, never a torn definition.

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
}
