//! Domain snapshot rows: the tree (each snapshot's parent), which snapshot is a domain's current
//! one, and what each holds (owned by the snapshots service). The memory and device state of a
//! snapshot are files, not rows.

use super::{Store, StoreResult};
use rusqlite::params;

/// A snapshot row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSnapshot {
    pub domain: String,
    pub name: String,
    pub parent: Option<String>,
    /// The domain's state when it was taken: "running", "paused" or "shutoff".
    pub state: String,
    pub created_ms: u64,
    pub description: Option<String>,
    /// The domain's definition when it was taken (a revert brings it back).
    pub definition: String,
    pub current: bool,
    /// With memory and device state: how long the guest was paused, and the memory written.
    pub pause_us: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// The disk files holding an internal snapshot of this name (JSON array of paths).
    pub disks: String,
}

const COLUMNS: &str = "domain, name, parent, state, created_ms, description, definition, current, pause_us, memory_bytes, disks";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredSnapshot> {
    Ok(StoredSnapshot {
        domain: r.get(0)?,
        name: r.get(1)?,
        parent: r.get(2)?,
        state: r.get(3)?,
        created_ms: r.get(4)?,
        description: r.get(5)?,
        definition: r.get(6)?,
        current: r.get(7)?,
        pause_us: r.get(8)?,
        memory_bytes: r.get(9)?,
        disks: r.get(10)?,
    })
}

impl Store {
    /// A domain's snapshots, oldest first.
    pub fn snapshots(&self, domain: &str) -> StoreResult<Vec<StoredSnapshot>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM snapshots WHERE domain = ?1 ORDER BY created_ms, rowid"))?;
        let rows = stmt.query_map([domain], row)?;
        rows.collect()
    }

    /// Adds a snapshot and makes it its domain's current one, in one transaction.
    pub fn insert_snapshot(&self, s: &StoredSnapshot) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("UPDATE snapshots SET current = 0 WHERE domain = ?1", [&s.domain])?;
        tx.execute(
            &format!("INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?9, ?10)"),
            params![s.domain, s.name, s.parent, s.state, s.created_ms, s.description, s.definition, s.pause_us, s.memory_bytes, s.disks],
        )?;
        tx.commit()
    }

    /// Makes `name` the domain's current snapshot (None: no current one).
    pub fn set_current_snapshot(&self, domain: &str, name: Option<&str>) -> StoreResult<()> {
        self.conn().execute("UPDATE snapshots SET current = (name IS ?2) WHERE domain = ?1", params![domain, name])?;
        Ok(())
    }

    /// Removes a snapshot from the tree in one transaction: its children move to its parent, and
    /// if it was current its parent becomes current.
    pub fn delete_snapshot(&self, domain: &str, name: &str) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (parent, current): (Option<String>, bool) =
            tx.query_row("SELECT parent, current FROM snapshots WHERE domain = ?1 AND name = ?2", params![domain, name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        tx.execute("UPDATE snapshots SET parent = ?3 WHERE domain = ?1 AND parent = ?2", params![domain, name, parent])?;
        if current {
            tx.execute("UPDATE snapshots SET current = 1 WHERE domain = ?1 AND name IS ?2", params![domain, parent])?;
        }
        tx.execute("DELETE FROM snapshots WHERE domain = ?1 AND name = ?2", params![domain, name])?;
        tx.commit()
    }

    /// Forgets every snapshot of a domain.
    pub fn delete_domain_snapshots(&self, domain: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM snapshots WHERE domain = ?1", [domain])?;
        Ok(())
    }
}
