//! Templates (Proxmox's "convert to template"; libvirt has none): a shut-off domain turned into
//! the read-only base that linked clones are qcow2 overlays of. A template never starts, its
//! definition stays as it is, its writable disks lose their write permission and are claimed
//! for reading as long as it is a template (so no start, backup, restore, snapshot or volume
//! request of ferrod writes them), and it cannot be undefined while a linked clone uses them.

use super::{Domains, lock, no_domain};
use crate::claims::{Access, Holder};
use crate::error::{Error, Result};
use crate::model::DomainInfo;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// Write permission bits of a file mode.
const WRITE_BITS: u32 = 0o222;
/// The owner's write permission, given back when a template is undefined.
const OWNER_WRITE: u32 = 0o200;

impl Domains {
    /// Turns a shut-off domain into a template (see the module documentation).
    pub async fn make_template(&self, name: &str) -> Result<DomainInfo> {
        let _op = self.lock_op(name).await;
        let info = self.info(name)?;
        if info.template {
            return Err(Error::conflict(format!("domain {name} is a template already")));
        }
        if info.state.is_active() {
            return Err(Error::conflict(format!("domain {name} is {}; shut it down before making it a template", info.state.word())));
        }
        let files = self.writable_disk_files(name)?;
        let uses: Vec<(PathBuf, Access)> = files.iter().map(|f| (f.clone(), Access::Read)).collect();
        let holder = Holder::Template(name.to_string());
        self.claims
            .claim(&uses, &holder)
            .map_err(|busy| Error::conflict(format!("domain {name}: disk {} is in use by {}", busy.path.display(), busy.holder)))?;
        let marked = (|| -> Result<()> {
            for file in &files {
                set_writable(file, false)?;
            }
            self.store.set_template(name, true)?;
            Ok(())
        })();
        if let Err(e) = marked {
            for file in &files {
                let _ = set_writable(file, true);
            }
            self.claims.release(&holder);
            return Err(e);
        }
        if info.autostart {
            let mut domains = lock(&self.domains);
            if let Some(d) = domains.get_mut(name) {
                let definition = super::set_top_level_bool(&d.definition, "autostart", false);
                self.store.put_domain(name, &d.uuid, &definition, false)?;
                d.definition = definition;
                d.autostart = false;
                if let Ok(c) = &mut d.config {
                    c.autostart = false;
                }
            }
        }
        let info = {
            let mut domains = lock(&self.domains);
            let d = domains.get_mut(name).ok_or_else(|| no_domain(name))?;
            d.template = true;
            self.info_of(name, d)
        };
        self.events.emit("domain", name, "template", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
        Ok(info)
    }

    /// The domains with a disk whose backing chain holds a disk of template `name`.
    pub fn linked_clones(&self, name: &str) -> Vec<String> {
        let (base, others) = {
            let domains = lock(&self.domains);
            let Some(config) = domains.get(name).and_then(|d| d.config.clone().ok()) else { return Vec::new() };
            let others: Vec<(String, crate::domain::DomainConfig)> = domains
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .filter_map(|(n, d)| d.config.clone().ok().map(|c| (n.clone(), c)))
                .collect();
            (config, others)
        };
        let base: Vec<PathBuf> = self.disk_paths(&base).into_iter().filter_map(|(p, _)| p.canonicalize().ok()).collect();
        others
            .into_iter()
            .filter(|(_, config)| {
                self.disk_paths(config).into_iter().any(|(path, format)| {
                    ferro_block::ops::info(&path, ferro_block::Format::from_name(&format), true, true)
                        .map(|chain| chain.iter().skip(1).any(|b| b.path.canonicalize().is_ok_and(|p| base.contains(&p))))
                        .unwrap_or(false)
                })
            })
            .map(|(n, _)| n)
            .collect()
    }

    /// Ends a template before its domain is undefined: refused while linked clones use its
    /// disks; else the disks get their write permission back and are no longer claimed.
    pub(super) fn release_template(&self, name: &str) -> Result<()> {
        let clones = self.linked_clones(name);
        if !clones.is_empty() {
            return Err(Error::conflict(format!(
                "domain {name} is a template whose disks linked clones use ({}): undefine them first",
                clones.join(", ")
            )));
        }
        let config = lock(&self.domains).get(name).and_then(|d| d.config.clone().ok());
        for (path, _) in config.map(|c| self.disk_paths(&c)).unwrap_or_default() {
            if path.is_file() {
                set_writable(&path, true)?;
            }
        }
        self.claims.release(&Holder::Template(name.to_string()));
        Ok(())
    }

    /// Claims the disks of every template for reading (at ferrod's start).
    pub(super) fn hold_template_disks(&self) {
        let templates: Vec<(String, crate::domain::DomainConfig)> = lock(&self.domains)
            .iter()
            .filter(|(_, d)| d.template)
            .filter_map(|(n, d)| d.config.clone().ok().map(|c| (n.clone(), c)))
            .collect();
        for (name, config) in templates {
            let uses: Vec<(PathBuf, Access)> = self.disk_paths(&config).into_iter().map(|(p, _)| (p, Access::Read)).collect();
            if let Err(busy) = self.claims.claim(&uses, &Holder::Template(name.clone())) {
                tracing::warn!(domain = name, "template disk {} is also used by {}", busy.path.display(), busy.holder);
            }
        }
    }

    /// The files of a definition's writable disks with their formats, as far as they resolve
    /// (a pool that is not active still names its volumes' files).
    fn disk_paths(&self, config: &crate::domain::DomainConfig) -> Vec<(PathBuf, String)> {
        config
            .disks
            .iter()
            .filter(|disk| !disk.readonly)
            .filter_map(|disk| {
                let path = match (&disk.path, &disk.pool, &disk.volume) {
                    (Some(p), _, _) => PathBuf::from(p),
                    (None, Some(pool), Some(vol)) => self.pools.volume_file(pool, vol)?,
                    _ => return None,
                };
                Some((path, disk.format.clone()))
            })
            .collect()
    }
}

/// Takes away every write permission bit of a disk file, or gives its owner write permission back.
fn set_writable(path: &std::path::Path, writable: bool) -> Result<()> {
    let mode = std::fs::metadata(path).map_err(|e| Error::internal(format!("{}: {e}", path.display())))?.permissions().mode();
    let mode = if writable { mode | OWNER_WRITE } else { mode & !WRITE_BITS };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::internal(format!("cannot change the permissions of {}: {e}", path.display())))
}
