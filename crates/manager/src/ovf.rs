//! The OVF service: importing an OVF package (`.ova`, or an `.ovf` beside its files, on ferrod's
//! host) as a new domain, and exporting a shut-off domain as one. Both run as jobs (see `jobs`).
//! The package format itself (descriptor, manifest, archive checks) is `ferro_images::ovf` and
//! `ferro_images::ova`; this module decides names, volumes and the domain definition.
//!
//! Import: the request is checked at once (the descriptor parses, the name and volumes are free,
//! every NIC's network maps to a tap); the job then verifies the manifest and every file size
//! before it writes anything, copies each VMDK out of the archive to a hidden file of the target
//! pool and converts it to a qcow2 volume named after the domain, and defines the domain to boot
//! from its first disk. Nothing is ever written under a name taken from the package, and a failed
//! or cancelled import leaves neither volumes nor a domain.
//!
//! Export: each disk becomes a streamOptimized VMDK, described by an OVF 1.0 envelope (what
//! VirtualBox and VMware read, see docs/ovf.md) with a SHA-256 manifest; an `.ova` target is the
//! tar of the three, a directory target holds them as files.

use crate::claims::Access;
use crate::domain::validate_name;
use crate::domains::Domains;
use crate::error::{Error, Result};
use crate::jobs::{Job, JobContext, JobError, Jobs, NewJob};
use crate::model::{DomainState, ProgressUnit};
use crate::pools::Pools;
use ferro_images::ova::{self, Package};
use ferro_images::ovf;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Ovf {
    jobs: Arc<Jobs>,
    pools: Arc<Pools>,
    domains: Arc<Domains>,
}

/// What an import request asks for.
pub struct ImportRequest {
    pub source: PathBuf,
    pub name: Option<String>,
    pub pool: String,
    /// Network names of the package -> tap names ("none" drops the NIC).
    pub network_map: BTreeMap<String, String>,
}

/// A volume the import makes: from a package file (None: an empty disk) and its capacity.
struct NewVolume {
    file: Option<String>,
    capacity: u64,
    name: String,
    path: PathBuf,
}

fn failed(e: impl std::fmt::Display) -> JobError {
    JobError::Failed(e.to_string())
}

/// A name valid for a domain, made from an envelope's name.
fn domain_name(text: &str) -> String {
    let mut name: String = text.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
    name = name.trim_start_matches(['.', '-']).chars().take(64).collect();
    if name.is_empty() { "imported".to_string() } else { name }
}

/// TOML basic string (JSON's escapes are TOML's).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

impl Ovf {
    pub fn open(jobs: Arc<Jobs>, pools: Arc<Pools>, domains: Arc<Domains>) -> Arc<Ovf> {
        Arc::new(Ovf { jobs, pools, domains })
    }

    /// Checks an import request and starts its job.
    pub fn import(&self, req: ImportRequest) -> Result<Arc<Job>> {
        if !req.source.is_absolute() {
            return Err(Error::invalid(format!("source: {} is not an absolute path", req.source.display())));
        }
        let package = Package::open(&req.source).map_err(|e| Error::invalid(format!("source: {e}")))?;
        let env = &package.envelope;
        let name = match &req.name {
            Some(n) => n.clone(),
            None => domain_name(&env.name),
        };
        validate_name(&name).map_err(|e| Error::invalid(format!("name: {e}")))?;
        if self.domains.info(&name).is_ok() {
            return Err(Error::conflict(format!("name: domain {name} already exists (give another with --name)")));
        }
        let mut volumes = Vec::new();
        for (i, disk) in env.disks.iter().enumerate() {
            let vol = format!("{name}-disk{}.qcow2", i + 1);
            let path = self.pools.new_volume_path(&req.pool, &vol)?;
            if disk.capacity == 0 || disk.capacity % 512 != 0 {
                return Err(Error::invalid(format!("source: disk {} has a capacity of {} bytes", disk.id, disk.capacity)));
            }
            volumes.push(NewVolume { file: disk.file.clone(), capacity: disk.capacity, name: vol, path });
        }
        let mut nics = Vec::new();
        for nic in &env.nics {
            let tap = req.network_map.get(&nic.network).cloned().unwrap_or_else(|| nic.network.clone());
            if tap == "none" {
                continue;
            }
            let valid = !tap.is_empty() && tap.len() <= 15 && tap.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid {
                return Err(Error::invalid(format!(
                    "network_map: the package's network {:?} is no tap name; map it with --network-map \"{}=TAP\" (or =none)",
                    nic.network, nic.network
                )));
            }
            nics.push((tap, nic.mac.clone()));
        }
        let mut toml = format!("name = {}\nmemory = \"{}\"\nvcpus = {}\n\n[boot]\nfrom = \"disk\"\n", toml_string(&name), env.memory, env.vcpus);
        if volumes.is_empty() {
            return Err(Error::invalid("source: the package has no disk to boot from"));
        }
        for v in &volumes {
            toml += &format!("\n[[disk]]\npool = {}\nvolume = {}\nformat = \"qcow2\"\n", toml_string(&req.pool), toml_string(&v.name));
        }
        for (tap, mac) in &nics {
            toml += &format!("\n[[nic]]\ntap = {}\n", toml_string(tap));
            if let Some(mac) = mac {
                toml += &format!("mac = {}\n", toml_string(&mac.to_ascii_lowercase()));
            }
        }
        crate::domain::DomainConfig::parse(&toml).map_err(|e| Error::invalid(format!("source: the package describes no valid domain: {e}")))?;

        let mut scratch = Vec::new();
        let mut uses = vec![(req.source.clone(), Access::Read)];
        for v in &volumes {
            scratch.extend([v.path.clone(), part(&v.path, "part"), part(&v.path, "vmdk")]);
            uses.push((v.path.clone(), Access::Write));
        }
        let new = NewJob {
            kind: "import-ovf",
            source: req.source.display().to_string(),
            target: name.clone(),
            unit: ProgressUnit::Bytes,
            scratch_files: scratch,
            uses,
        };
        let domains = self.domains.clone();
        self.jobs.start(new, move |ctx| async move {
            let work_ctx = ctx.clone();
            tokio::task::spawn_blocking(move || import_volumes(&work_ctx, &package, &volumes))
                .await
                .unwrap_or_else(|e| Err(failed(format!("import task failed: {e}"))))?;
            ctx.check_stop()?;
            domains.define(&toml).await.map_err(|e| failed(format!("defining the domain: {e}")))?;
            Ok(())
        })
    }

    /// Checks an export request and starts its job: `target` is an `.ova` file (format "ova") or
    /// a directory (format "ovf"), on ferrod's host, that must not exist yet.
    pub fn export(&self, name: &str, target: &Path, format: &str) -> Result<Arc<Job>> {
        if !target.is_absolute() {
            return Err(Error::invalid(format!("target: {} is not an absolute path", target.display())));
        }
        if target.exists() {
            return Err(Error::conflict(format!("target: {} already exists", target.display())));
        }
        if !matches!(format, "ova" | "ovf") {
            return Err(Error::invalid(format!("format: {format:?} is not ova or ovf")));
        }
        let info = self.domains.info(name)?;
        if info.state != DomainState::Shutoff && info.state != DomainState::Crashed {
            return Err(Error::conflict(format!("domain {name} is {}; shut it down before exporting it", info.state.word())));
        }
        let (config, disks) = self.domains.disk_files(name)?;
        let parent = target.parent().filter(|p| p.is_dir()).ok_or_else(|| Error::invalid(format!("target: the directory of {} does not exist", target.display())))?;
        let work = parent.join(format!(".{}.export", target.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let mut uses: Vec<(PathBuf, Access)> = disks.iter().map(|(p, _)| (p.clone(), Access::Read)).collect();
        uses.push((target.to_path_buf(), Access::Write));
        let new = NewJob {
            kind: "export-ovf",
            source: name.to_string(),
            target: target.display().to_string(),
            unit: ProgressUnit::Bytes,
            scratch_files: if format == "ova" { vec![target.to_path_buf(), part(target, "part")] } else { Vec::new() },
            uses,
        };
        let (target, format, name) = (target.to_path_buf(), format.to_string(), name.to_string());
        self.jobs.start(new, move |ctx| async move {
            tokio::task::spawn_blocking(move || {
                let result = export(&ctx, &name, &config, &disks, &work, &target, &format);
                if format == "ova" || result.is_err() {
                    let _ = std::fs::remove_dir_all(&work);
                }
                if result.is_err() && format == "ovf" {
                    let _ = std::fs::remove_dir_all(&target);
                }
                result
            })
            .await
            .unwrap_or_else(|e| Err(failed(format!("export task failed: {e}"))))
        })
    }
}

/// `path` with `.EXT` appended to its hidden name: `.NAME.EXT` beside it.
fn part(path: &Path, ext: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{ext}"))
}

/// Verifies the package, then makes each volume: the VMDK copied to a hidden file of the pool,
/// converted into a hidden qcow2, grown to the descriptor's capacity, renamed into place.
fn import_volumes(ctx: &JobContext, package: &Package, volumes: &[NewVolume]) -> std::result::Result<(), JobError> {
    ctx.set_total(package.verify_bytes() + volumes.iter().map(|v| v.capacity).sum::<u64>());
    let mut progress = |n: u64| {
        ctx.check_stop().map_err(|_| ferro_images::Error::new("stopped"))?;
        ctx.advance(n);
        Ok(())
    };
    if let Err(e) = package.verify(&mut progress) {
        ctx.check_stop()?;
        return Err(failed(format!("the package does not check out: {e}")));
    }
    for v in volumes {
        ctx.check_stop()?;
        let qcow2 = part(&v.path, "part");
        match &v.file {
            None => ferro_block::create(&qcow2, &ferro_block::CreateOptions::new(ferro_block::Format::Qcow2, Some(v.capacity))).map_err(failed)?,
            Some(file) => {
                let vmdk = part(&v.path, "vmdk");
                package.copy_member(file, &vmdk).map_err(failed)?;
                let size = ferro_block::open(&vmdk, Some(ferro_block::Format::Vmdk), true)
                    .map_err(|e| failed(format!("{file}: {e}")))?
                    .size();
                if size > v.capacity {
                    return Err(failed(format!("{file} holds a {size}-byte disk, larger than the {} bytes the descriptor declares", v.capacity)));
                }
                crate::pools::copy_image(ctx, &vmdk, ferro_block::Format::Vmdk, &qcow2, ferro_block::Format::Qcow2)?;
                let _ = std::fs::remove_file(&vmdk);
                if size < v.capacity {
                    ferro_block::ops::resize(&qcow2, Some(ferro_block::Format::Qcow2), ferro_block::ops::SizeChange::To(v.capacity), false).map_err(failed)?;
                }
            }
        }
        crate::durable::rename(&qcow2, &v.path).map_err(|e| failed(format!("cannot move the volume to {}: {e}", v.path.display())))?;
    }
    Ok(())
}

/// Writes the VMDKs, descriptor and manifest into `work` (or the target directory), then packs
/// an OVA.
fn export(
    ctx: &JobContext,
    name: &str,
    config: &crate::domain::DomainConfig,
    disks: &[(PathBuf, ferro_block::Format)],
    work: &Path,
    target: &Path,
    format: &str,
) -> std::result::Result<(), JobError> {
    let dir = if format == "ova" { work.to_path_buf() } else { target.to_path_buf() };
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    let mut sizes = Vec::new();
    for (path, fmt) in disks {
        sizes.push(ferro_block::open(path, Some(*fmt), true).map_err(failed)?.size());
    }
    ctx.set_total(sizes.iter().sum());
    let mut described = Vec::new();
    let mut files = Vec::new();
    for (i, ((path, fmt), size)) in disks.iter().zip(&sizes).enumerate() {
        ctx.check_stop()?;
        let href = format!("{name}-disk{}.vmdk", i + 1);
        let out = dir.join(&href);
        let mut dst = ferro_block::CreateOptions::new(ferro_block::Format::Vmdk, None);
        dst.subformat = Some("streamOptimized".into());
        dst.adapter_type = ferro_block::vmdk::Adapter::LsiLogic;
        let opts = ferro_block::ops::ConvertOptions { src_format: Some(*fmt), force_share: false, dst };
        let mut last = 0;
        ferro_block::ops::convert(path, &out, &opts, &mut |done, _| {
            ctx.advance(done - last);
            last = done;
        })
        .map_err(failed)?;
        let file_size = std::fs::metadata(&out).map_err(failed)?.len();
        described.push(ovf::ExportDisk { href: href.clone(), file_size, capacity: *size });
        files.push((href, out));
    }
    let nics: Vec<ovf::Nic> = config.nics.iter().map(|n| ovf::Nic { network: n.attachment().source().to_string(), mac: n.mac.clone() }).collect();
    let descriptor = ovf::write(name, config.vcpus, config.memory_bytes(), &described, &nics);
    let ovf_name = format!("{name}.ovf");
    let ovf_path = dir.join(&ovf_name);
    std::fs::write(&ovf_path, descriptor).map_err(|e| failed(format!("writing {}: {e}", ovf_path.display())))?;
    let mut manifest = format!("SHA256({ovf_name})= {}\n", ova::sha256_file(&ovf_path).map_err(failed)?);
    for (href, path) in &files {
        manifest += &format!("SHA256({href})= {}\n", ova::sha256_file(path).map_err(failed)?);
    }
    let mf_name = format!("{name}.mf");
    let mf_path = dir.join(&mf_name);
    std::fs::write(&mf_path, manifest).map_err(|e| failed(format!("writing {}: {e}", mf_path.display())))?;
    if format == "ova" {
        let mut members = vec![(ovf_name, ovf_path), (mf_name, mf_path)];
        members.extend(files);
        let tmp = part(target, "part");
        ova::write_ova(&tmp, &members).map_err(failed)?;
        crate::durable::rename(&tmp, target).map_err(|e| failed(format!("cannot move the OVA to {}: {e}", target.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_names_become_domain_names() {
        assert_eq!(domain_name("Ubuntu 22.04 (Server)"), "Ubuntu-22.04--Server-");
        assert_eq!(domain_name("--x"), "x");
        assert_eq!(domain_name("日本"), "imported");
    }
}
