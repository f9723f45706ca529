//! Virtual network rows: the definition text as the user wrote it, autostart, and whether the
//! network should be running.

use super::{Store, StoreResult};
use rusqlite::params;

/// A network row as stored; the definition is re-validated by the caller when loading.
pub struct StoredNetwork {
    pub name: String,
    pub uuid: String,
    pub definition: String,
    pub autostart: bool,
    pub active: bool,
}

impl Store {
    pub fn networks(&self) -> StoreResult<Vec<StoredNetwork>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, uuid, definition, autostart, active FROM networks")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredNetwork { name: r.get(0)?, uuid: r.get(1)?, definition: r.get(2)?, autostart: r.get(3)?, active: r.get(4)? })
        })?;
        rows.collect()
    }

    pub fn put_network(&self, network: &StoredNetwork) -> StoreResult<()> {
        self.conn().execute(
            "INSERT INTO networks (name, uuid, definition, autostart, active) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, autostart = excluded.autostart,
             active = excluded.active",
            params![network.name, network.uuid, network.definition, network.autostart, network.active],
        )?;
        Ok(())
    }

    pub fn delete_network(&self, name: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM networks WHERE name = ?1", [name])?;
        Ok(())
    }
}
