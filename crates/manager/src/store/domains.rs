//! Domain rows: the definition text as the user wrote it and the runtime record of its current
//! run (JSON owned by the domains service).

use super::{Store, StoreResult};
use rusqlite::params;

/// A domain row as stored; the definition is re-validated by the caller when loading.
pub struct StoredDomain {
    pub name: String,
    pub uuid: String,
    pub definition: String,
    pub autostart: bool,
    pub runtime: Option<String>,
    /// Marked a template (see `domains::template`).
    pub template: bool,
}

impl Store {
    pub fn domains(&self) -> StoreResult<Vec<StoredDomain>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, uuid, definition, autostart, runtime, template FROM domains")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredDomain {
                name: r.get(0)?,
                uuid: r.get(1)?,
                definition: r.get(2)?,
                autostart: r.get(3)?,
                runtime: r.get(4)?,
                template: r.get(5)?,
            })
        })?;
        rows.collect()
    }

    /// Inserts or replaces a definition, keeping the runtime record of an existing domain.
    pub fn put_domain(&self, name: &str, uuid: &str, definition: &str, autostart: bool) -> StoreResult<()> {
        self.conn().execute(
            "INSERT INTO domains (name, uuid, definition, autostart) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, autostart = excluded.autostart",
            params![name, uuid, definition, autostart],
        )?;
        Ok(())
    }

    pub fn set_runtime(&self, name: &str, runtime: &str) -> StoreResult<()> {
        self.conn().execute("UPDATE domains SET runtime = ?2 WHERE name = ?1", params![name, runtime])?;
        Ok(())
    }

    pub fn set_template(&self, name: &str, template: bool) -> StoreResult<()> {
        self.conn().execute("UPDATE domains SET template = ?2 WHERE name = ?1", params![name, template])?;
        Ok(())
    }

    pub fn delete_domain(&self, name: &str) -> StoreResult<()> {
        self.conn().execute("DELETE FROM domains WHERE name = ?1", [name])?;
        Ok(())
    }
}
