//! The pools service: storage pools (directory pools) and their volumes (image files in the
//! pool's directory). It owns the pool records and their rows in the store.
//!
//! - this file: pool definitions and their lifecycle (define, build, start, destroy, undefine);
//! - `volumes`: volume create, info, resize, wipe, delete, upload, and the paths domains use;
//! - `copy`: volume clone and convert, which run as jobs (see `jobs`).
//!
//! Image work goes through the block layer, `ferro-block`, on blocking threads so that no image
//! stalls the API. A volume a running domain or a job uses is protected through `claims`.

pub(crate) mod copy;
mod volumes;

pub use copy::{CopyKind, Imported};
pub(crate) use copy::copy_image;
pub use volumes::{Size, VolumeDefinition};

use crate::claims::Claims;
use crate::domain::validate_name;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::Jobs;
use crate::model::{Paths, PoolInfo, new_uuid};
use crate::store::{Store, StoredPool};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone)]
struct Pool {
    uuid: String,
    target: String,
    autostart: bool,
    active: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDefinition {
    pub name: String,
    #[serde(rename = "type", default = "dir")]
    pub kind: String,
    pub target: String,
    #[serde(default)]
    pub autostart: bool,
}

fn dir() -> String {
    "dir".to_string()
}

pub struct Pools {
    /// ferrod's own directories, which no pool may hold or be in.
    paths: Paths,
    store: Arc<Store>,
    events: Arc<EventHub>,
    jobs: Arc<Jobs>,
    claims: Arc<Claims>,
    pools: Mutex<BTreeMap<String, Pool>>,
}

fn no_pool(name: &str) -> Error {
    Error::not_found(format!("pool {name:?} is not defined (see `ferro pool-list --all`)"))
}

fn not_active(name: &str) -> Error {
    Error::conflict(format!("pool {name} is not active; run `ferro pool-start {name}`"))
}

impl Pools {
    /// Loads every pool from the store.
    pub fn open(
        paths: Paths,
        store: Arc<Store>,
        events: Arc<EventHub>,
        jobs: Arc<Jobs>,
        claims: Arc<Claims>,
    ) -> std::result::Result<Arc<Pools>, String> {
        let pools = store
            .pools()
            .map_err(|e| format!("cannot read pools: {e}"))?
            .into_iter()
            .map(|p| (p.name, Pool { uuid: p.uuid, target: p.target, autostart: p.autostart, active: p.active }))
            .collect();
        Ok(Arc::new(Pools { paths, store, events, jobs, claims, pools: Mutex::new(pools) }))
    }

    fn pools(&self) -> MutexGuard<'_, BTreeMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info_of(name: &str, p: &Pool) -> PoolInfo {
        let mut info = PoolInfo {
            name: name.to_string(),
            uuid: p.uuid.clone(),
            kind: "dir",
            target: p.target.clone(),
            active: p.active,
            autostart: p.autostart,
            capacity: None,
            allocation: None,
            available: None,
            volumes: None,
        };
        if p.active
            && let Some((capacity, available)) = fs_space(Path::new(&p.target))
        {
            info.capacity = Some(capacity);
            info.available = Some(available);
            info.allocation = Some(capacity.saturating_sub(available));
            info.volumes = Some(volumes::volume_files(Path::new(&p.target)).len());
        }
        info
    }

    fn persist(&self, name: &str, p: &Pool) -> Result<()> {
        self.store.put_pool(&StoredPool {
            name: name.to_string(),
            uuid: p.uuid.clone(),
            target: p.target.clone(),
            autostart: p.autostart,
            active: p.active,
        })?;
        Ok(())
    }

    pub fn list(&self) -> Vec<PoolInfo> {
        self.pools().iter().map(|(n, p)| Self::info_of(n, p)).collect()
    }

    pub fn get(&self, name: &str) -> Result<PoolInfo> {
        self.pools().get(name).map(|p| Self::info_of(name, p)).ok_or_else(|| no_pool(name))
    }

    pub fn define(&self, def: PoolDefinition) -> Result<PoolInfo> {
        validate_name(&def.name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        if def.kind != "dir" {
            return Err(Error::invalid(format!("type: {:?} is not supported (only \"dir\")", def.kind)));
        }
        if !def.target.starts_with('/') || def.target.contains('\0') {
            return Err(Error::invalid(format!("target: {:?} is not an absolute path", def.target)));
        }
        let target = def.target.trim_end_matches('/').to_string();
        self.check_target(Path::new(&def.target))?;
        let mut pools = self.pools();
        if pools.contains_key(&def.name) {
            return Err(Error::conflict(format!("pool {} is already defined", def.name)));
        }
        if let Some((other, _)) = pools.iter().find(|(_, p)| p.target == target) {
            return Err(Error::conflict(format!("target: {target} is already used by pool {other}")));
        }
        let pool = Pool { uuid: new_uuid(), target, autostart: def.autostart, active: false };
        self.persist(&def.name, &pool)?;
        let info = Self::info_of(&def.name, &pool);
        pools.insert(def.name.clone(), pool);
        drop(pools);
        self.events.emit("pool", &def.name, "defined", "");
        Ok(info)
    }

    /// Refuses a pool directory that is, or lies in, a system directory, or that holds or lies in
    /// ferrod's own state: a pool's files are written through the API and handed to VMMs.
    fn check_target(&self, target: &Path) -> Result<()> {
        let real = crate::domains::resolve(target);
        let shown = if real == target { String::new() } else { format!(" (resolving to {})", real.display()) };
        let refuse = |why: String| Err(Error::invalid(format!("target: {}{shown} {why}; choose a directory of its own, such as /srv/images", target.display())));
        if let Some(dir) = ferro_jail::jail::system_directory(&real) {
            return refuse(if dir == "/" { "is the root directory".to_string() } else { format!("is in the system directory {dir}") });
        }
        let home = crate::domains::resolve(&self.paths.home);
        if home.starts_with(&real) {
            return refuse(format!("holds ferrod's state directory {}", home.display()));
        }
        for state in [&self.paths.run, &self.paths.snapshots()] {
            if real.starts_with(crate::domains::resolve(state)) {
                return refuse(format!("is in ferrod's state directory {}", state.display()));
            }
        }
        Ok(())
    }

    /// Applies `f` to a pool, persists it, reports `event` and returns the pool's new info.
    fn update(&self, name: &str, event: &'static str, f: impl FnOnce(&mut Pool) -> Result<()>) -> Result<PoolInfo> {
        let mut pools = self.pools();
        let pool = pools.get_mut(name).ok_or_else(|| no_pool(name))?;
        let mut changed = pool.clone();
        f(&mut changed)?;
        self.persist(name, &changed)?;
        *pool = changed;
        let info = Self::info_of(name, pool);
        drop(pools);
        self.events.emit("pool", name, event, "");
        Ok(info)
    }

    /// Creates the pool's directory (pool-build).
    pub fn build(&self, name: &str) -> Result<PoolInfo> {
        self.update(name, "built", |p| {
            std::fs::create_dir_all(&p.target).map_err(|e| Error::conflict(format!("pool {name}: cannot create {}: {e}", p.target)))
        })
    }

    pub fn start(&self, name: &str) -> Result<PoolInfo> {
        self.update(name, "started", |p| {
            if p.active {
                return Err(Error::conflict(format!("pool {name} is already active")));
            }
            if !Path::new(&p.target).is_dir() {
                return Err(Error::conflict(format!(
                    "pool {name}: target {} does not exist; run `ferro pool-build {name}`",
                    p.target
                )));
            }
            p.active = true;
            Ok(())
        })
    }

    /// Deactivates the pool (pool-destroy); its files stay.
    pub fn destroy(&self, name: &str) -> Result<PoolInfo> {
        self.update(name, "stopped", |p| {
            if !p.active {
                return Err(Error::conflict(format!("pool {name} is not active")));
            }
            p.active = false;
            Ok(())
        })
    }

    pub fn refresh(&self, name: &str) -> Result<PoolInfo> {
        self.update(name, "refreshed", |p| if p.active { Ok(()) } else { Err(Error::conflict(format!("pool {name} is not active"))) })
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<PoolInfo> {
        self.update(name, "autostart", |p| {
            p.autostart = enabled;
            Ok(())
        })
    }

    pub fn undefine(&self, name: &str) -> Result<()> {
        let mut pools = self.pools();
        let pool = pools.get(name).ok_or_else(|| no_pool(name))?;
        if pool.active {
            return Err(Error::conflict(format!("pool {name} is active; run `ferro pool-destroy {name}` first")));
        }
        self.store.delete_pool(name)?;
        pools.remove(name);
        drop(pools);
        self.events.emit("pool", name, "undefined", "");
        Ok(())
    }

    /// Starts every pool set to autostart (once per host boot, see `daemon`).
    pub fn autostart(&self) {
        let names: Vec<String> = self.pools().iter().filter(|(_, p)| p.autostart && !p.active).map(|(n, _)| n.clone()).collect();
        for name in names {
            if let Err(e) = self.start(&name) {
                tracing::error!(pool = name, "autostart failed: {e}");
            }
        }
    }

    /// The directory of an active pool.
    fn active_dir(&self, pool: &str) -> Result<PathBuf> {
        let pools = self.pools();
        let p = pools.get(pool).ok_or_else(|| no_pool(pool))?;
        if !p.active {
            return Err(not_active(pool));
        }
        Ok(PathBuf::from(&p.target))
    }

    /// The path of a volume to be made in an active pool, refused when a file or a job has the name.
    pub(crate) fn new_volume_path(&self, pool: &str, name: &str) -> Result<PathBuf> {
        crate::domain::validate_volume_name(name).map_err(|e| Error::invalid(format!("volume name: {e}")))?;
        let path = self.active_dir(pool)?.join(name);
        self.check_new_name(pool, name, &path)?;
        Ok(path)
    }

    /// The file of a volume a domain definition names, for starting the domain; `key` is the
    /// definition's key for the error (`disk[0].pool`).
    pub fn disk_path(&self, pool: &str, volume: &str, key: &str) -> Result<PathBuf> {
        let pools = self.pools();
        let p = pools.get(pool).ok_or_else(|| Error::invalid(format!("{key}: pool {pool:?} is not defined")))?;
        if !p.active {
            return Err(not_active(pool).for_key(key));
        }
        Ok(Path::new(&p.target).join(volume))
    }

    /// Where a volume of a defined pool is, active or not (for domains that already run on it).
    pub fn volume_file(&self, pool: &str, volume: &str) -> Option<PathBuf> {
        self.pools().get(pool).map(|p| Path::new(&p.target).join(volume))
    }
}

/// (total, available) bytes of the filesystem holding `path`.
fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and st a valid, writable statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}
