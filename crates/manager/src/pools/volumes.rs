//! Volumes: the image files of a pool. Every change to a volume first checks that no running
//! domain or job holds it (`claims`), and a change that takes time (resize, wipe, upload) holds
//! the volume itself until it ends, so that two of them never interleave and no domain starts on
//! a volume being replaced. Files are replaced by writing beside them and renaming durably
//! (`durable`), so a crash never leaves a half-written volume.

use super::Pools;
use crate::claims::{Access, Held};
use crate::domain::{DISK_FORMATS, parse_size, validate_volume_name};
use crate::durable;
use crate::error::{Error, Result};
use crate::model::VolumeInfo;
use ferro_block::{CreateOptions, Format};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A size given as a byte count or as a string such as "10G".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub fn bytes(&self, key: &str) -> Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t).map_err(|e| Error::invalid(format!("{key}: {e}"))),
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

/// A volume as the block layer reads its header: what the API shows plus what re-creating it needs.
pub(super) struct Image {
    pub info: VolumeInfo,
    pub format: Format,
    /// The backing file name as recorded in the image (relative names stay relative).
    pub backing_raw: Option<String>,
    pub backing_format: Option<String>,
}

fn no_volume(pool: &str, name: &str) -> Error {
    Error::not_found(format!("volume {name:?} does not exist in pool {pool} (see `ferro vol-list {pool}`)"))
}

pub(super) fn block_format(name: &str) -> Format {
    if name == "qcow2" { Format::Qcow2 } else { Format::Raw }
}

impl Pools {
    /// The path of an existing volume; with `for_write`, refuses volumes that a running domain or
    /// a job uses. A volume is a file in the pool's directory: a symbolic link planted there,
    /// which could lead anywhere on the host, is refused (and never listed).
    pub fn volume_path(&self, pool: &str, name: &str, for_write: bool) -> Result<PathBuf> {
        validate_volume_name(name).map_err(|e| Error::invalid(format!("volume name: {e}")))?;
        let path = self.active_dir(pool)?.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::conflict(format!(
                    "volume {name}: {} is a symbolic link; pool volumes must be files in the pool's directory",
                    path.display()
                )));
            }
            Ok(meta) if meta.is_file() => {}
            _ => return Err(no_volume(pool, name)),
        }
        if for_write && let Err(busy) = self.claims.check(&path, Access::Write) {
            return Err(Error::conflict(format!("volume {name} is in use by {}", busy.holder)));
        }
        Ok(path)
    }

    /// The path of a volume, held for the operation `what` until the guard is dropped (409 if
    /// anyone uses it).
    fn hold_volume(&self, pool: &str, name: &str, what: &'static str) -> Result<(PathBuf, Held)> {
        let path = self.volume_path(pool, name, false)?;
        let held = self
            .claims
            .hold(&[(path.clone(), Access::Write)], what)
            .map_err(|busy| Error::conflict(format!("volume {name} is in use by {}", busy.holder)))?;
        Ok((path, held))
    }

    pub fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let dir = self.active_dir(pool)?;
        Ok(volume_files(&dir).into_iter().filter_map(|name| image(pool, &name, &dir.join(&name)).ok().map(|i| i.info)).collect())
    }

    pub fn volume(&self, pool: &str, name: &str) -> Result<VolumeInfo> {
        let path = self.volume_path(pool, name, false)?;
        Ok(image(pool, name, &path)?.info)
    }

    pub async fn create_volume(&self, pool: &str, def: VolumeDefinition) -> Result<VolumeInfo> {
        validate_volume_name(&def.name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        let capacity = def.capacity.bytes("capacity")?;
        if capacity == 0 {
            return Err(Error::invalid("capacity: must be more than 0"));
        }
        if !DISK_FORMATS.contains(&def.format.as_str()) {
            return Err(Error::invalid(format!("format: {:?} is not raw or qcow2", def.format)));
        }
        let path = self.active_dir(pool)?.join(&def.name);
        self.check_new_name(pool, &def.name, &path)?;
        let format = block_format(&def.format);
        let mut opts = CreateOptions::new(format, Some(capacity));
        match &def.backing_volume {
            Some(_) if format != Format::Qcow2 => {
                return Err(Error::invalid("backing_volume: only qcow2 volumes can have a backing volume"));
            }
            Some(backing) => {
                let backing_path = self.volume_path(pool, backing, false).map_err(|e| e.for_key("backing_volume"))?;
                let backing_format = match &def.backing_format {
                    Some(f) if DISK_FORMATS.contains(&f.as_str()) => block_format(f),
                    Some(f) => return Err(Error::invalid(format!("backing_format: {f:?} is not raw or qcow2"))),
                    None => image(pool, backing, &backing_path)?.format,
                };
                opts.backing_file = Some(backing.clone());
                opts.backing_format = Some(backing_format);
            }
            None if def.backing_format.is_some() => return Err(Error::invalid("backing_format: needs backing_volume")),
            None => {}
        }
        // Made under a hidden name and renamed into place once complete and synced: a crash
        // half-way leaves no half-made volume in the list (a stale hidden file is replaced by
        // the next create of the same name).
        let (part, target) = (path.with_file_name(format!(".{}.part", def.name)), path.clone());
        blocking(move || {
            let _ = std::fs::remove_file(&part);
            ferro_block::create(&part, &opts)?;
            let placed = std::fs::File::open(&part).and_then(|f| f.sync_all()).and_then(|()| durable::rename(&part, &target));
            placed.map_err(|e| {
                let _ = std::fs::remove_file(&part);
                ferro_block::Error::Io { path: target.clone(), op: "sync and rename into place", source: e }
            })
        })
        .await?;
        self.events.emit("volume", &format!("{pool}/{}", def.name), "created", def.format.clone());
        Ok(image(pool, &def.name, &path)?.info)
    }

    /// Refuses a new volume's name if a file has it or a job is making it; `name:` errors.
    pub(super) fn check_new_name(&self, pool: &str, name: &str, path: &Path) -> Result<()> {
        if path.exists() {
            return Err(Error::conflict(format!("name: volume {name} already exists in pool {pool}")));
        }
        if let Err(busy) = self.claims.check(path, Access::Write) {
            return Err(Error::conflict(format!("name: volume {name} is being made by {}", busy.holder)));
        }
        Ok(())
    }

    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let path = self.volume_path(pool, name, true)?;
        crate::crashpoint::step("volume delete");
        std::fs::remove_file(&path).map_err(|e| Error::internal(format!("cannot delete {}: {e}", path.display())))?;
        // The name is gone for good only once the directory is synced.
        if let Some(dir) = path.parent() {
            durable::sync_dir(dir).map_err(|e| Error::internal(format!("cannot sync {} after the delete: {e}", dir.display())))?;
        }
        self.events.emit("volume", &format!("{pool}/{name}"), "deleted", "");
        Ok(())
    }

    /// Grows a volume to `capacity` bytes (shrinking is refused).
    pub async fn resize_volume(&self, pool: &str, name: &str, capacity: u64) -> Result<VolumeInfo> {
        let (path, _held) = self.hold_volume(pool, name, "resize")?;
        let img = image(pool, name, &path)?;
        if capacity < img.info.capacity {
            return Err(Error::invalid(format!(
                "capacity: {capacity} is smaller than the current {}; shrinking is refused",
                img.info.capacity
            )));
        }
        let (target, format) = (path.clone(), img.format);
        blocking(move || ferro_block::ops::resize(&target, Some(format), ferro_block::ops::SizeChange::To(capacity), false)).await?;
        self.events.emit("volume", &format!("{pool}/{name}"), "resized", "");
        Ok(image(pool, name, &path)?.info)
    }

    /// Makes a volume read as zeroes (or as its backing file again): a fresh image of the same
    /// size, format and backing file is made beside it and renamed over it, so a crash leaves the
    /// old volume or the wiped one, never a truncated file.
    pub async fn wipe_volume(&self, pool: &str, name: &str) -> Result<VolumeInfo> {
        let (path, _held) = self.hold_volume(pool, name, "wipe")?;
        let img = image(pool, name, &path)?;
        let mut opts = CreateOptions::new(img.format, Some(img.info.capacity));
        opts.backing_file = img.backing_raw.clone();
        opts.backing_format = img.backing_format.as_deref().and_then(Format::from_name);
        let fresh = path.with_file_name(format!(".{name}.wipe"));
        let (made, target) = (fresh.clone(), path.clone());
        let replaced = tokio::task::spawn_blocking(move || {
            ferro_block::create(&made, &opts).map_err(|e| e.to_string())?;
            std::fs::File::open(&made).and_then(|f| f.sync_all()).map_err(|e| format!("{}: sync: {e}", made.display()))?;
            durable::rename(&made, &target).map_err(|e| format!("{}: rename over the volume: {e}", made.display()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("image task failed: {e}")));
        if let Err(e) = replaced {
            let _ = std::fs::remove_file(&fresh);
            return Err(Error::internal(format!("cannot wipe {}: {e}", path.display())));
        }
        self.events.emit("volume", &format!("{pool}/{name}"), "wiped", "");
        Ok(image(pool, name, &path)?.info)
    }

    /// Replaces a volume's contents with the bytes of `body` (vol-upload): written to a hidden
    /// file beside it, synced and renamed over it, so a broken upload leaves the old volume.
    pub async fn upload_volume<S, B, E>(&self, pool: &str, name: &str, mut body: S) -> Result<VolumeInfo>
    where
        S: Stream<Item = std::result::Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        use tokio::io::AsyncWriteExt;
        let (path, _held) = self.hold_volume(pool, name, "upload")?;
        let tmp = path.with_file_name(format!(".{name}.upload"));
        let io = |e: std::io::Error| Error::internal(format!("upload to {}: {e}", path.display()));
        // Made exclusively (a stale one, or anything planted under its name, is unlinked first):
        // the upload never writes through a link into another file.
        let _ = tokio::fs::remove_file(&tmp).await;
        let mut file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).await.map_err(io)?;
        let mut result = Ok(());
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if let Err(e) = file.write_all(bytes.as_ref()).await {
                        result = Err(io(e));
                        break;
                    }
                }
                Err(e) => {
                    result = Err(Error::invalid(format!("upload interrupted: {e}")));
                    break;
                }
            }
        }
        if result.is_ok() {
            result = file.sync_all().await.map_err(io);
        }
        if result.is_ok() {
            let (from, to) = (tmp.clone(), path.clone());
            result = match tokio::task::spawn_blocking(move || durable::rename(&from, &to)).await {
                Ok(renamed) => renamed.map_err(io),
                Err(e) => Err(Error::internal(format!("upload to {}: {e}", path.display()))),
            };
        }
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        self.events.emit("volume", &format!("{pool}/{name}"), "uploaded", "");
        Ok(image(pool, name, &path)?.info)
    }
}

/// Runs block-layer work on a blocking thread, mapping its errors.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ferro_block::Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::internal(e.to_string())),
        Err(e) => Err(Error::internal(format!("image task failed: {e}"))),
    }
}

/// Names of the regular files in a pool directory that are valid volume names, sorted.
pub(super) fn volume_files(dir: &Path) -> Vec<String> {
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
pub(super) fn image(pool: &str, name: &str, path: &Path) -> Result<Image> {
    let meta = std::fs::metadata(path).map_err(|e| Error::internal(format!("cannot read {}: {e}", path.display())))?;
    // Shared: a volume a running domain writes still has readable metadata.
    let header = ferro_block::ops::info(path, None, false, true)
        .ok()
        .and_then(|mut chain| chain.drain(..).next())
        .ok_or_else(|| Error::conflict(format!("volume {name}: {} is not a readable disk image", path.display())))?;
    Ok(Image {
        info: VolumeInfo {
            name: name.to_string(),
            pool: pool.to_string(),
            path: path.display().to_string(),
            format: header.format.name(),
            capacity: header.virtual_size,
            allocation: meta.blocks() * 512,
            backing: header.full_backing_file.as_ref().map(|p| p.display().to_string()),
        },
        format: header.format,
        backing_raw: header.backing_file,
        backing_format: header.backing_format,
    })
}
