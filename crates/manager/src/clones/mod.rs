//! The clones service: `ferro clone` (virt-clone), a new domain made from a shut-off one. The
//! clone gets a new uuid, new MACs, autostart off, and new files for the source's writable disks
//! (read-only disks are shared, as virt-clone does): in the pool of the source's volume (or the
//! pool the request names) as `<new>-<vda>.<format>` volumes, or for a disk named by path,
//! beside the source file. A full clone copies every disk in one job (sparse, standalone, in the
//! source's format); a linked clone is at once a set of qcow2 overlays backed by the source's
//! disks, so it needs a template (`domains::template`), whose disks never change again.
//! A cloud-init seed is made from the clone's own name and uuid at its first start; a seed whose
//! meta-data the definition spells out gets the clone's name and a new instance id.
//!
//! A full clone copies into hidden `.part` files that get their names when complete, then
//! defines the domain; a failed, cancelled or interrupted clone leaves neither files nor a
//! domain (the job's scratch files are the parts and the named files).

use crate::claims::Access;
use crate::domain::{DiskConfig, DomainConfig, validate_name};
use crate::domains::Domains;
use crate::durable;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::{Job, JobContext, JobError, Jobs, NewJob};
use crate::model::{DomainInfo, ProgressUnit, new_uuid};
use crate::pools::Pools;
use crate::pools::copy::{Zeroes, copy_ranges, data_ranges};
use ferro_block::{CreateOptions, Format};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a clone request asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The new domain's name.
    pub name: String,
    /// qcow2 overlays backed by the source's disks instead of copies (the source must be a template).
    #[serde(default)]
    pub linked: bool,
    /// The pool for the new volumes (default: the source volume's pool, or beside a disk's file).
    #[serde(default)]
    pub pool: Option<String>,
}

/// What a clone request started: the job copying the disks (full), or the domain (linked).
pub enum Cloned {
    Job(Arc<Job>),
    Domain(Box<DomainInfo>),
}

/// One writable disk of the source and the file the clone gets for it.
struct NewDisk {
    source: PathBuf,
    format: Format,
    file: PathBuf,
    part: PathBuf,
}

pub struct Clones {
    events: Arc<EventHub>,
    jobs: Arc<Jobs>,
    pools: Arc<Pools>,
    domains: Arc<Domains>,
}

fn failed(e: impl std::fmt::Display) -> JobError {
    JobError::Failed(e.to_string())
}

impl Clones {
    pub fn open(events: Arc<EventHub>, jobs: Arc<Jobs>, pools: Arc<Pools>, domains: Arc<Domains>) -> Arc<Clones> {
        Arc::new(Clones { events, jobs, pools, domains })
    }

    /// Clones domain `source` as `req.name` (see the module documentation).
    pub async fn clone_domain(&self, source: &str, req: CloneRequest) -> Result<Cloned> {
        validate_name(&req.name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        let info = self.domains.info(source)?;
        if self.domains.info(&req.name).is_ok() {
            return Err(Error::conflict(format!("name: domain {} already exists", req.name)));
        }
        if info.state.is_active() {
            return Err(Error::conflict(format!(
                "domain {source} is {}: a clone copies its disks, which its VMM writes; shut it down first \
                 (or clone a backup of it: ferro backup-begin, then define a domain on the backup files)",
                info.state.word()
            )));
        }
        if req.linked && !info.template {
            return Err(Error::conflict(format!(
                "domain {source} is not a template: a linked clone's disks are overlays of the source's, which must never change \
                 again; run `ferro template {source}` first (or make a full clone without --linked)"
            )));
        }
        let (mut config, files) = self.domains.disk_files(source)?;
        let mut disks = Vec::new();
        for (i, (def, (path, format))) in config.disks.iter_mut().zip(files).enumerate() {
            if def.readonly {
                continue;
            }
            let format = if req.linked { Format::Qcow2 } else { format };
            let target = format!("{}-{}.{}", req.name, crate::backups::target_name(i), format.name());
            let file = self.place(def, &path, &target, req.pool.as_deref())?;
            def.format = format.name().to_string();
            let part = file.with_file_name(format!(".{target}.part"));
            disks.push(NewDisk { source: path, format, file, part });
        }
        config.name = req.name.clone();
        config.autostart = false;
        for nic in &mut config.nics {
            nic.mac = None;
        }
        if let Some(meta) = config.cloud_init.as_mut().and_then(|ci| ci.meta_data.as_mut()) {
            *meta = renamed_meta_data(meta, &req.name);
        }
        let text = toml::to_string(&config).map_err(|e| Error::internal(format!("cannot write the clone's definition: {e}")))?;
        DomainConfig::parse(&text).map_err(|e| Error::internal(format!("the clone's definition does not validate: {e}")))?;
        if req.linked {
            Ok(Cloned::Domain(Box::new(self.linked(source, &req.name, &disks, &text).await?)))
        } else {
            Ok(Cloned::Job(self.full(source, &req.name, disks, text)?))
        }
    }

    /// Where the clone's file for disk `def` (now at `path`) goes, and points `def` at it.
    fn place(&self, def: &mut DiskConfig, path: &Path, target: &str, pool: Option<&str>) -> Result<PathBuf> {
        match (pool, def.pool.as_deref()) {
            (Some(pool), _) | (None, Some(pool)) => {
                let pool = pool.to_string();
                let file = self.pools.new_volume_path(&pool, target)?;
                *def = DiskConfig { path: None, pool: Some(pool), volume: Some(target.to_string()), ..def.clone() };
                Ok(file)
            }
            (None, None) => {
                let file = path.with_file_name(target);
                if file.exists() || file.with_file_name(format!(".{target}.part")).exists() {
                    return Err(Error::conflict(format!("{} exists; a clone never replaces a file (pick another name)", file.display())));
                }
                def.path = Some(file.display().to_string());
                Ok(file)
            }
        }
    }

    /// A linked clone: a qcow2 overlay per disk, backed by the template's disk, then the domain.
    async fn linked(&self, source: &str, name: &str, disks: &[NewDisk], text: &str) -> Result<DomainInfo> {
        let mut made = Vec::new();
        let mut result = Ok(());
        for d in disks {
            let mut opts = CreateOptions::new(Format::Qcow2, None);
            opts.backing_file = Some(d.source.display().to_string());
            opts.backing_format = Some(d.format);
            match ferro_block::create(&d.file, &opts) {
                Ok(()) => made.push(&d.file),
                Err(e) => {
                    result = Err(Error::internal(format!("cannot make the overlay {}: {e}", d.file.display())));
                    break;
                }
            }
        }
        let result = match result {
            Ok(()) => self.domains.define_new(text).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            for file in made {
                let _ = std::fs::remove_file(file);
            }
        } else {
            self.events.emit("domain", name, "cloned", format!("linked clone of template {source}"));
        }
        result
    }

    /// A full clone: a job copying every disk, then defining the domain.
    fn full(&self, source: &str, name: &str, disks: Vec<NewDisk>, text: String) -> Result<Arc<Job>> {
        let mut uses: Vec<(PathBuf, Access)> = Vec::new();
        let mut scratch = Vec::new();
        for d in &disks {
            uses.push((d.source.clone(), Access::Read));
            uses.push((d.file.clone(), Access::Write));
            scratch.extend([d.part.clone(), d.file.clone()]);
        }
        let new = NewJob { kind: "clone", source: source.to_string(), target: name.to_string(), unit: ProgressUnit::Bytes, scratch_files: scratch, uses };
        let (domains, events, source, name) = (self.domains.clone(), self.events.clone(), source.to_string(), name.to_string());
        self.jobs.start(new, move |ctx| async move {
            let work_ctx = ctx.clone();
            tokio::task::spawn_blocking(move || copy_disks(&work_ctx, &disks))
                .await
                .unwrap_or_else(|e| Err(failed(format!("clone task failed: {e}"))))?;
            ctx.check_stop()?;
            domains.define_new(&text).await.map_err(|e| failed(format!("defining the clone: {e}")))?;
            events.emit("domain", &name, "cloned", format!("full clone of {source}"));
            Ok(())
        })
    }
}

/// Copies every disk into its hidden part file (progress counts the data of all of them), then
/// gives each its name.
fn copy_disks(ctx: &JobContext, disks: &[NewDisk]) -> std::result::Result<(), JobError> {
    let mut sources = Vec::new();
    for d in disks {
        let mut image = ferro_block::open(&d.source, Some(d.format), true).map_err(failed)?;
        let ranges = data_ranges(image.as_mut())?;
        sources.push((image, ranges));
    }
    ctx.set_total(sources.iter().flat_map(|(_, r)| r.iter().map(|(_, len)| len)).sum());
    for (d, (source, ranges)) in disks.iter().zip(&mut sources) {
        ferro_block::create(&d.part, &CreateOptions::new(d.format, Some(source.size()))).map_err(failed)?;
        let mut target = ferro_block::open(&d.part, Some(d.format), false).map_err(failed)?;
        copy_ranges(ctx, source.as_mut(), target.as_mut(), ranges, Zeroes::Skip)?;
        target.flush().map_err(failed)?;
    }
    for d in disks {
        durable::rename(&d.part, &d.file).map_err(|e| failed(format!("cannot name {}: {e}", d.file.display())))?;
    }
    Ok(())
}

/// Cloud-init meta-data for a clone: its `local-hostname` is the clone's name and its
/// `instance-id` new (cloud-init runs its first-boot work again for a new instance id).
fn renamed_meta_data(meta: &str, name: &str) -> String {
    meta.lines()
        .map(|line| match line.split_once(':') {
            Some((key, _)) if key.trim() == "local-hostname" => format!("{key}: {name}"),
            Some((key, _)) if key.trim() == "instance-id" => format!("{key}: {}", new_uuid()),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_data_gets_the_clones_name_and_a_new_instance_id() {
        let out = renamed_meta_data("instance-id: web-1\nlocal-hostname: web\nfoo: local-hostname: x\n", "web2");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("instance-id: ") && lines[0] != "instance-id: web-1", "{out}");
        assert_eq!(lines[1..], ["local-hostname: web2", "foo: local-hostname: x"]);
    }
}
