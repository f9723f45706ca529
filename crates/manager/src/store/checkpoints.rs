//! Backup checkpoint rows (owned by the backups service): each checkpoint's parent (they form one
//! chain per domain, oldest first), the disks holding a dirty bitmap of its name and the backup
//! file its backup wrote of each, and whether it is still being made.

use super::{Store, StoreResult};
use rusqlite::params;

/// A checkpoint row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCheckpoint {
    pub domain: String,
    pub name: String,
    pub parent: Option<String>,
    pub created_ms: u64,
    /// JSON array of the disks with a bitmap of this name and the backup file made of each.
    pub disks: String,
    /// Still being made: a ferrod that finds it so at start undoes it.
    pub pending: bool,
}

const COLUMNS: &str = "domain, name, parent, created_ms, disks, pending";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
    Ok(StoredCheckpoint {
        domain: r.get(0)?,
        name: r.get(1)?,
        parent: r.get(2)?,
        created_ms: r.get(3)?,
        disks: r.get(4)?,
        pending: r.get(5)?,
    })
}

impl Store {
    /// A domain's checkpoints, oldest first (pending ones included).
    pub fn checkpoints(&self, domain: &str) -> StoreResult<Vec<StoredCheckpoint>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM checkpoints WHERE domain = ?1 ORDER BY created_ms, rowid"))?;
        let rows = stmt.query_map([domain], row)?;
        rows.collect()
    }

    /// Every pending checkpoint of every domain.
    pub fn pending_checkpoints(&self) -> StoreResult<Vec<StoredCheckpoint>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM checkpoints WHERE pending = 1 ORDER BY created_ms, rowid"))?;
        let rows = stmt.query_map([], row)?;
        rows.collect()
    }

    pub fn insert_checkpoint(&self, c: &StoredCheckpoint) -> StoreResult<()> {
        self.conn().execute(
            &format!("INSERT INTO checkpoints ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            params![c.domain, c.name, c.parent, c.created_ms, c.disks, c.pending],
        )?;
        Ok(())
    }

    /// Marks a checkpoint as made.
    pub fn complete_checkpoint(&self, domain: &str, name: &str) -> StoreResult<()> {
        self.conn().execute("UPDATE checkpoints SET pending = 0 WHERE domain = ?1 AND name = ?2", params![domain, name])?;
        Ok(())
    }

    /// Removes a checkpoint from its chain in one transaction: its child's parent becomes its own.
    pub fn delete_checkpoint(&self, domain: &str, name: &str) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let parent: Option<String> =
            tx.query_row("SELECT parent FROM checkpoints WHERE domain = ?1 AND name = ?2", params![domain, name], |r| r.get(0))?;
        tx.execute("UPDATE checkpoints SET parent = ?3 WHERE domain = ?1 AND parent = ?2", params![domain, name, parent])?;
        tx.execute("DELETE FROM checkpoints WHERE domain = ?1 AND name = ?2", params![domain, name])?;
        tx.commit()
    }

    /// Forgets every checkpoint of a domain.
    pub fn delete_domain_checkpoints(&self, domain: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM checkpoints WHERE domain = ?1", [domain])?;
        Ok(())
    }
}
