//! Storage pools (directory pools) and their volumes (image files in the pool's directory).
//!
//! Image work (create, resize, header info) goes through the block layer, `ferro-block`, on
//! blocking threads so that no image stalls the API; copies (clone, convert) run as jobs (`jobs`).

use crate::domain::{DISK_FORMATS, parse_size, validate_name, validate_volume_name};
use crate::error::{ApiError, ApiResult};
use crate::jobs::{CopySpec, Job};
use crate::manager::{Manager, lock};
use crate::store::{Store, StoredPool};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use ferro_block::Format;
use ferro_block::CreateOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Pool {
    pub uuid: String,
    pub target: String,
    pub autostart: bool,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub target: String,
    pub active: bool,
    pub autostart: bool,
    /// Filesystem sizes in bytes; absent while the pool is inactive.
    pub capacity: Option<u64>,
    pub allocation: Option<u64>,
    pub available: Option<u64>,
    pub volumes: Option<usize>,
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

#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: String,
    pub format: &'static str,
    /// Virtual size in bytes (what the guest sees).
    pub capacity: u64,
    /// Bytes the file occupies on the host.
    pub allocation: u64,
    pub backing: Option<String>,
    #[serde(skip)]
    format_enum: Format,
    /// The backing file name as recorded in the image (relative names stay relative).
    #[serde(skip)]
    backing_raw: Option<String>,
    #[serde(skip)]
    backing_format: Option<String>,
}

/// A size given as a byte count or as a string such as "10G".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> ApiResult<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t).map_err(|e| ApiError::invalid(format!("{key}: {e}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDefinition {
    pub name: String,
    pub capacity: Size,
    #[serde(default = "raw")]
    pub format: String,
    pub backing_volume: Option<String>,
    pub backing_format: Option<String>,
}

fn raw() -> String {
    "raw".to_string()
}

pub(crate) fn load(store: &Store) -> rusqlite::Result<BTreeMap<String, Pool>> {
    Ok(store
        .pools()?
        .into_iter()
        .map(|p| (p.name, Pool { uuid: p.uuid, target: p.target, autostart: p.autostart, active: p.active }))
        .collect())
}

fn no_pool(name: &str) -> ApiError {
    ApiError::not_found(format!("pool {name:?} is not defined (see `ferro pool-list --all`)"))
}

fn no_volume(pool: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("volume {name:?} does not exist in pool {pool} (see `ferro vol-list {pool}`)"))
}

impl Manager {
    fn pool_info(&self, name: &str, p: &Pool) -> PoolInfo {
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
            info.volumes = Some(volume_files(Path::new(&p.target)).len());
        }
        info
    }

    fn persist_pool(&self, name: &str, p: &Pool) -> ApiResult<()> {
        self.store().put_pool(&StoredPool {
            name: name.to_string(),
            uuid: p.uuid.clone(),
            target: p.target.clone(),
            autostart: p.autostart,
            active: p.active,
        })?;
        Ok(())
    }

    pub fn pools_list(&self) -> Vec<PoolInfo> {
        lock(&self.pools).iter().map(|(n, p)| self.pool_info(n, p)).collect()
    }

    pub fn pool_get(&self, name: &str) -> ApiResult<PoolInfo> {
        let pools = lock(&self.pools);
        pools.get(name).map(|p| self.pool_info(name, p)).ok_or_else(|| no_pool(name))
    }

    pub fn pool_define(&self, def: PoolDefinition) -> ApiResult<PoolInfo> {
        validate_name(&def.name).map_err(|e| ApiError::invalid(format!("name: {e}")))?;
        if def.kind != "dir" {
            return Err(ApiError::invalid(format!("type: {:?} is not supported (only \"dir\")", def.kind)));
        }
        if !def.target.starts_with('/') || def.target.contains('\0') {
            return Err(ApiError::invalid(format!("target: {:?} is not an absolute path", def.target)));
        }
        let target = def.target.trim_end_matches('/').to_string();
        let mut pools = lock(&self.pools);
        if pools.contains_key(&def.name) {
            return Err(ApiError::conflict(format!("pool {} is already defined", def.name)));
        }
        if let Some((other, _)) = pools.iter().find(|(_, p)| p.target == target) {
            return Err(ApiError::conflict(format!("target: {target} is already used by pool {other}")));
        }
        let pool = Pool { uuid: crate::manager::new_uuid(), target, autostart: def.autostart, active: false };
        self.persist_pool(&def.name, &pool)?;
        let info = self.pool_info(&def.name, &pool);
        pools.insert(def.name.clone(), pool);
        drop(pools);
        self.events.emit("pool", &def.name, "defined", "");
        Ok(info)
    }

    /// Applies `f` to a pool, persists it and returns its new info.
    fn pool_update(&self, name: &str, f: impl FnOnce(&mut Pool) -> ApiResult<()>) -> ApiResult<PoolInfo> {
        let mut pools = lock(&self.pools);
        let pool = pools.get_mut(name).ok_or_else(|| no_pool(name))?;
        let mut changed = pool.clone();
        f(&mut changed)?;
        self.persist_pool(name, &changed)?;
        *pool = changed;
        Ok(self.pool_info(name, pool))
    }

    pub fn pool_action(&self, name: &str, action: &str, body: &serde_json::Value) -> ApiResult<PoolInfo> {
        let info = match action {
            "build" => self.pool_update(name, |p| {
                std::fs::create_dir_all(&p.target)
                    .map_err(|e| ApiError::conflict(format!("pool {name}: cannot create {}: {e}", p.target)))
            })?,
            "start" => self.pool_update(name, |p| {
                if p.active {
                    return Err(ApiError::conflict(format!("pool {name} is already active")));
                }
                if !Path::new(&p.target).is_dir() {
                    return Err(ApiError::conflict(format!(
                        "pool {name}: target {} does not exist; run `ferro pool-build {name}`",
                        p.target
                    )));
                }
                p.active = true;
                Ok(())
            })?,
            "destroy" => self.pool_update(name, |p| {
                if !p.active {
                    return Err(ApiError::conflict(format!("pool {name} is not active")));
                }
                p.active = false;
                Ok(())
            })?,
            "refresh" => self.pool_update(name, |p| {
                if p.active { Ok(()) } else { Err(ApiError::conflict(format!("pool {name} is not active"))) }
            })?,
            "autostart" => {
                let enabled = enabled_flag(body)?;
                self.pool_update(name, |p| {
                    p.autostart = enabled;
                    Ok(())
                })?
            }
            _ => return Err(ApiError::not_found(format!("pools have no action {action:?}"))),
        };
        self.events.emit("pool", name, pool_event(action), "");
        Ok(info)
    }

    pub fn pool_undefine(&self, name: &str) -> ApiResult<()> {
        let mut pools = lock(&self.pools);
        let pool = pools.get(name).ok_or_else(|| no_pool(name))?;
        if pool.active {
            return Err(ApiError::conflict(format!("pool {name} is active; run `ferro pool-destroy {name}` first")));
        }
        self.store().delete_pool(name)?;
        pools.remove(name);
        drop(pools);
        self.events.emit("pool", name, "undefined", "");
        Ok(())
    }

    pub(crate) fn autostart_pools(&self) {
        let names: Vec<String> =
            lock(&self.pools).iter().filter(|(_, p)| p.autostart && !p.active).map(|(n, _)| n.clone()).collect();
        for name in names {
            if let Err(e) = self.pool_action(&name, "start", &serde_json::Value::Null) {
                tracing::error!(pool = name, "autostart failed: {e}");
            }
        }
    }

    /// The directory of an active pool.
    fn active_pool_dir(&self, pool: &str) -> ApiResult<PathBuf> {
        let pools = lock(&self.pools);
        let p = pools.get(pool).ok_or_else(|| no_pool(pool))?;
        if !p.active {
            return Err(ApiError::conflict(format!("pool {pool} is not active; run `ferro pool-start {pool}`")));
        }
        Ok(PathBuf::from(&p.target))
    }

    /// The path of an existing volume; with `for_write`, refuses volumes that a running domain uses.
    pub fn volume_path(&self, pool: &str, name: &str, for_write: bool) -> ApiResult<PathBuf> {
        validate_volume_name(name).map_err(|e| ApiError::invalid(format!("volume name: {e}")))?;
        let path = self.active_pool_dir(pool)?.join(name);
        if !path.is_file() {
            return Err(no_volume(pool, name));
        }
        if for_write && let Some((domain, _)) = self.disks_in_use().into_iter().find(|(_, p)| *p == path) {
            return Err(ApiError::conflict(format!("volume {name} is in use by running domain {domain}")));
        }
        if for_write && let Some(job) = self.job_using(&path) {
            return Err(ApiError::conflict(format!("volume {name} is being copied by job {job} (see `ferro job-info {job}`)")));
        }
        Ok(path)
    }

    pub fn volumes_list(&self, pool: &str) -> ApiResult<Vec<VolumeInfo>> {
        let dir = self.active_pool_dir(pool)?;
        Ok(volume_files(&dir).into_iter().filter_map(|name| volume_info(pool, &name, &dir.join(&name)).ok()).collect())
    }

    pub fn volume_get(&self, pool: &str, name: &str) -> ApiResult<VolumeInfo> {
        let path = self.volume_path(pool, name, false)?;
        volume_info(pool, name, &path)
    }

    pub async fn volume_create(&self, pool: &str, def: VolumeDefinition) -> ApiResult<VolumeInfo> {
        validate_volume_name(&def.name).map_err(|e| ApiError::invalid(format!("name: {e}")))?;
        let capacity = def.capacity.bytes("capacity")?;
        if capacity == 0 {
            return Err(ApiError::invalid("capacity: must be more than 0"));
        }
        if !DISK_FORMATS.contains(&def.format.as_str()) {
            return Err(ApiError::invalid(format!("format: {:?} is not raw or qcow2", def.format)));
        }
        let dir = self.active_pool_dir(pool)?;
        let path = dir.join(&def.name);
        if path.exists() {
            return Err(ApiError::conflict(format!("volume {} already exists in pool {pool}", def.name)));
        }
        if let Some(job) = self.job_using(&path) {
            return Err(ApiError::conflict(format!("name: volume {} is being made by job {job}", def.name)));
        }
        let format = block_format(&def.format);
        let mut opts = CreateOptions::new(format, Some(capacity));
        match &def.backing_volume {
            Some(_) if format != Format::Qcow2 => {
                return Err(ApiError::invalid("backing_volume: only qcow2 volumes can have a backing volume"));
            }
            Some(backing) => {
                let backing_path = self
                    .volume_path(pool, backing, false)
                    .map_err(|e| ApiError { message: format!("backing_volume: {}", e.message), ..e })?;
                let backing_format = match &def.backing_format {
                    Some(f) if DISK_FORMATS.contains(&f.as_str()) => block_format(f),
                    Some(f) => return Err(ApiError::invalid(format!("backing_format: {f:?} is not raw or qcow2"))),
                    None => volume_info(pool, backing, &backing_path)?.format_enum,
                };
                opts.backing_file = Some(backing.clone());
                opts.backing_format = Some(backing_format);
            }
            None if def.backing_format.is_some() => return Err(ApiError::invalid("backing_format: needs backing_volume")),
            None => {}
        }
        let target = path.clone();
        blocking(move || ferro_block::create(&target, &opts)).await?;
        self.events.emit("volume", &format!("{pool}/{}", def.name), "created", def.format.clone());
        volume_info(pool, &def.name, &path)
    }

    pub fn volume_delete(&self, pool: &str, name: &str) -> ApiResult<()> {
        let path = self.volume_path(pool, name, true)?;
        std::fs::remove_file(&path).map_err(|e| ApiError::internal(format!("cannot delete {}: {e}", path.display())))?;
        self.events.emit("volume", &format!("{pool}/{name}"), "deleted", "");
        Ok(())
    }

    /// Starts a job copying a volume into a new one of the same pool: `clone` keeps the format,
    /// `convert` writes the format the body names. The copy stands alone (backing data is copied in).
    pub fn volume_copy(self: &Arc<Self>, pool: &str, name: &str, kind: &str, body: &Value) -> ApiResult<Arc<Job>> {
        let (kind, fields): (&'static str, &[&str]) = match kind {
            "clone" => ("clone", &["name"]),
            "convert" => ("convert", &["name", "format"]),
            _ => return Err(ApiError::not_found(format!("volumes have no action {kind:?}"))),
        };
        if let Some(key) = body.as_object().and_then(|o| o.keys().find(|k| !fields.contains(&k.as_str()))) {
            return Err(ApiError::invalid(format!("{key}: unknown field (expected {})", fields.join(", "))));
        }
        let target = match body.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(ApiError::invalid("name: missing (the name of the new volume, a string)")),
        };
        validate_volume_name(&target).map_err(|e| ApiError::invalid(format!("name: {e}")))?;
        let target_format = match body.get("format") {
            None if kind == "clone" => None,
            None => return Err(ApiError::invalid("format: missing (raw or qcow2)")),
            Some(Value::String(f)) if DISK_FORMATS.contains(&f.as_str()) => Some(block_format(f)),
            Some(f) => return Err(ApiError::invalid(format!("format: {f} is not raw or qcow2"))),
        };
        let source_path = self.volume_path(pool, name, false)?;
        let source_format = volume_info(pool, name, &source_path)?.format_enum;
        let target_format = match target_format {
            Some(f) => f,
            None if DISK_FORMATS.contains(&source_format.name()) => source_format,
            None => {
                return Err(ApiError::conflict(format!(
                    "volume {name} is {source_format}, which ferrod only reads; convert it to raw or qcow2 instead"
                )));
            }
        };
        self.start_copy(CopySpec {
            kind,
            pool: pool.to_string(),
            source: name.to_string(),
            target_path: source_path.with_file_name(&target),
            source_path,
            source_format,
            target,
            target_format,
        })
    }

    pub async fn volume_action(&self, pool: &str, name: &str, action: &str, body: &serde_json::Value) -> ApiResult<VolumeInfo> {
        let info = match action {
            "resize" => {
                let capacity = match body.get("capacity") {
                    Some(v) => serde_json::from_value::<Size>(v.clone())
                        .map_err(|_| ApiError::invalid("capacity: expected a byte count or a size like \"20G\""))?
                        .bytes("capacity")?,
                    None => return Err(ApiError::invalid("capacity: missing")),
                };
                let path = self.volume_path(pool, name, true)?;
                let info = volume_info(pool, name, &path)?;
                if capacity < info.capacity {
                    return Err(ApiError::invalid(format!(
                        "capacity: {capacity} is smaller than the current {}; shrinking is refused",
                        info.capacity
                    )));
                }
                let (target, format) = (path.clone(), info.format_enum);
                blocking(move || ferro_block::ops::resize(&target, Some(format), &capacity.to_string(), false)).await?;
                volume_info(pool, name, &path)?
            }
            "wipe" => {
                let path = self.volume_path(pool, name, true)?;
                let info = volume_info(pool, name, &path)?;
                if info.format == "raw" {
                    set_len(&path, 0)?;
                    set_len(&path, info.capacity)?;
                } else {
                    // A fresh image of the same size and backing file reads as the backing file
                    // again (zeros without one); written to the side, then renamed over the old.
                    let mut opts = CreateOptions::new(info.format_enum, Some(info.capacity));
                    opts.backing_file = info.backing_raw.clone();
                    opts.backing_format = info.backing_format.as_deref().and_then(Format::from_name);
                    let fresh = path.with_file_name(format!(".{name}.wipe"));
                    let target = fresh.clone();
                    blocking(move || ferro_block::create(&target, &opts)).await?;
                    std::fs::rename(&fresh, &path).map_err(|e| ApiError::internal(format!("cannot replace {}: {e}", path.display())))?;
                }
                volume_info(pool, name, &path)?
            }
            _ => return Err(ApiError::not_found(format!("volumes have no action {action:?}"))),
        };
        self.events.emit("volume", &format!("{pool}/{name}"), volume_event(action), "");
        Ok(info)
    }
}

fn pool_event(action: &str) -> &'static str {
    match action {
        "build" => "built",
        "start" => "started",
        "destroy" => "stopped",
        "refresh" => "refreshed",
        _ => "autostart",
    }
}

fn volume_event(action: &str) -> &'static str {
    match action {
        "resize" => "resized",
        _ => "wiped",
    }
}

/// Reads `{"enabled": bool}` (missing means true).
pub fn enabled_flag(body: &serde_json::Value) -> ApiResult<bool> {
    match body.get("enabled") {
        None => Ok(true),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid("enabled: must be true or false")),
    }
}

fn set_len(path: &Path, len: u64) -> ApiResult<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .map_err(|e| ApiError::internal(format!("cannot resize {}: {e}", path.display())))
}

/// Runs block-layer work on a blocking thread, mapping its errors.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ferro_block::Result<T> + Send + 'static) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::internal(e.to_string())),
        Err(e) => Err(ApiError::internal(format!("image task failed: {e}"))),
    }
}

fn block_format(name: &str) -> Format {
    if name == "qcow2" { Format::Qcow2 } else { Format::Raw }
}

/// Names of the regular files in a pool directory that are valid volume names, sorted.
fn volume_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_volume_name(n).is_ok())
        .collect();
    names.sort();
    names
}

/// Format, virtual size and backing file as the block layer reads them from the image.
fn volume_info(pool: &str, name: &str, path: &Path) -> ApiResult<VolumeInfo> {
    let meta = std::fs::metadata(path).map_err(|e| ApiError::internal(format!("cannot read {}: {e}", path.display())))?;
    let info = ferro_block::ops::info(path, None, false)
        .ok()
        .and_then(|mut chain| chain.drain(..).next())
        .ok_or_else(|| ApiError::conflict(format!("volume {name}: {} is not a readable disk image", path.display())))?;
    Ok(VolumeInfo {
        name: name.to_string(),
        pool: pool.to_string(),
        path: path.display().to_string(),
        format: info.format.name(),
        capacity: info.virtual_size,
        allocation: meta.blocks() * 512,
        backing: info.full_backing_file.as_ref().map(|p| p.display().to_string()),
        format_enum: info.format,
        backing_raw: info.backing_file,
        backing_format: info.backing_format,
    })
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
