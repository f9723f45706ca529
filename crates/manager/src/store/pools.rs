//! Storage pool rows.

use super::{Store, StoreResult};
use rusqlite::params;

/// A pool row as stored.
pub struct StoredPool {
    pub name: String,
    pub uuid: String,
    pub target: String,
    pub autostart: bool,
    pub active: bool,
}

impl Store {
    pub fn pools(&self) -> StoreResult<Vec<StoredPool>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, uuid, target, autostart, active FROM pools")?;
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
        self.conn().execute(
            "INSERT INTO pools (name, uuid, target, autostart, active) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET target = excluded.target, autostart = excluded.autostart,
             active = excluded.active",
            params![pool.name, pool.uuid, pool.target, pool.autostart, pool.active],
        )?;
        Ok(())
    }

    pub fn delete_pool(&self, name: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM pools WHERE name = ?1", [name])?;
        Ok(())
    }
}
