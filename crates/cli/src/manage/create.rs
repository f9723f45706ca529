//! `ferro create`: a domain from flags, with virt-install's habits. It turns the flags into the
//! TOML definition `define` takes (printed with `--dry-run`), makes the volumes it names (a new
//! empty one for `--disk size=`, a copy or a linked overlay of `--import IMAGE`, as a job with
//! progress), defines the domain, and with `--start` starts it (`--console` attaches).
//!
//! Defaults: 1 GiB of memory, 1 vCPU, volumes in pool "default" (`--pool`), qcow2 volumes, and
//! `--boot disk` when a disk image is imported without a kernel. A plain number for `--memory` is
//! MiB, as in virt-install; anything else is a size (512M, 1.5G). Images named by `--import` are
//! paths on ferrod's host.

use super::client::Client;
use super::seg;
use crate::run::device_options;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Domain name.
    #[arg(long)]
    name: String,
    /// Guest memory: MiB as a plain number (virt-install's habit) or a size such as 512M or 2G.
    #[arg(long, default_value = "1024")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A disk: size=SIZE[,pool=P][,format=qcow2|raw] (a new volume), vol=POOL/VOLUME (an
    /// existing one) or path=FILE[,format=][,readonly=on] (a file on ferrod's host). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// A disk image on ferrod's host to copy (qcow2, raw or VMDK) into a new volume, the first disk.
    #[arg(long, value_name = "IMAGE")]
    import: Option<PathBuf>,
    /// With --import: make a qcow2 overlay on the image instead of a copy (the image must stay).
    #[arg(long, requires = "import")]
    linked: bool,
    /// Pool for new volumes (--import, --disk size= without pool=).
    #[arg(long, default_value = "default")]
    pool: String,
    /// A NIC: NAME or network=NAME (a virtual network of ferrod), bridge=BR (a host bridge),
    /// tap=TAP (an existing tap device), or none. Repeatable. Without it the domain gets a NIC
    /// on the network "default" when ferrod has one.
    #[arg(long, value_name = "NETWORK")]
    network: Vec<String>,
    /// Kernel to boot (a file on ferrod's host).
    #[arg(long, conflicts_with = "boot")]
    kernel: Option<String>,
    /// Initial ramdisk (with --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    /// Kernel command line (with --boot disk: appended to the one found on the disk).
    #[arg(long)]
    cmdline: Option<String>,
    /// Boot source: disk (the kernel the first disk's boot configuration names).
    #[arg(long, value_parser = ["disk"])]
    boot: Option<String>,
    /// cloud-init NoCloud seed: user-data=FILE[,meta-data=FILE][,network-config=FILE].
    #[arg(long, value_name = "OPTIONS", conflicts_with = "ssh_key")]
    cloud_init: Option<String>,
    /// cloud-init: let this public key (a .pub file) log in, through generated user-data.
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// Start the domain whenever the host boots.
    #[arg(long)]
    autostart: bool,
    /// Start the domain once it is defined.
    #[arg(long)]
    start: bool,
    /// Attach to the serial console after --start.
    #[arg(long, requires = "start")]
    console: bool,
    /// Print the TOML definition that would be defined, and do nothing else.
    #[arg(long)]
    dry_run: bool,
}

/// A disk of the definition, and what must be made for it first.
#[derive(Debug, Clone, PartialEq)]
enum Disk {
    /// A new empty volume.
    New { pool: String, volume: String, format: String, size: u64 },
    /// A copy (or, linked, an overlay) of a host image in a new volume.
    Import { pool: String, volume: String, source: PathBuf, linked: bool },
    Volume { pool: String, volume: String, format: Option<String> },
    Path { path: String, format: String, readonly: bool },
}

/// Everything the definition says, before any volume exists.
struct Plan {
    toml: String,
    disks: Vec<Disk>,
}

fn size(flag: &str, text: &str) -> Result<u64, String> {
    ferro_vmm_api::parse_size(text).map_err(|e| format!("--{flag}: {e}"))
}

/// A size as a definition writes it: whole GiB or MiB when it is one, else bytes.
fn size_text(bytes: u64) -> String {
    match bytes {
        b if b > 0 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b > 0 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => b.to_string(),
    }
}

fn format_name(flag: &str, f: &str) -> Result<String, String> {
    match f {
        "raw" | "qcow2" => Ok(f.to_string()),
        _ => Err(format!("--{flag} format: {f:?} is not raw or qcow2")),
    }
}

/// A TOML string: a multi-line literal for text such as user-data, else a basic string (JSON's
/// escapes are TOML's).
fn toml_string(text: &str) -> String {
    let plain = !text.contains("'''") && text.chars().all(|c| c == '\n' || c == '\t' || !c.is_control());
    if text.contains('\n') && plain {
        format!("'''\n{text}'''")
    } else {
        serde_json::to_string(text).unwrap_or_default()
    }
}

fn read_file(flag: &str, path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("--{flag}: cannot read {path}: {e}"))
}

/// The user-data that lets `key` log in as the image's default user.
fn ssh_user_data(key_file: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(key_file).map_err(|e| format!("--ssh-key: cannot read {}: {e}", key_file.display()))?;
    let key = text.trim();
    let known = ["ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-"];
    if key.contains('\n') || !known.iter().any(|p| key.starts_with(p)) || key.split_whitespace().count() < 2 {
        return Err(format!("--ssh-key: {} is not one OpenSSH public key (a line like \"ssh-ed25519 AAAA... user\")", key_file.display()));
    }
    Ok(format!("#cloud-config\nssh_authorized_keys:\n  - {key}\n"))
}

impl CreateArgs {
    /// What to make and define; `default_network`: ferrod has a network named "default", which
    /// a domain without --network joins.
    fn plan(&self, default_network: bool) -> Result<Plan, String> {
        let memory = if self.memory.bytes().all(|b| b.is_ascii_digit()) { format!("{}M", self.memory) } else { self.memory.clone() };
        let memory = size("memory", &memory)?;
        let mut disks = Vec::new();
        let volume_name = |n: usize| if n == 0 { format!("{}.qcow2", self.name) } else { format!("{}-{n}.qcow2", self.name) };
        if let Some(image) = &self.import {
            if !image.is_absolute() {
                return Err(format!("--import: {} is not an absolute path (images are read on ferrod's host)", image.display()));
            }
            disks.push(Disk::Import { pool: self.pool.clone(), volume: volume_name(0), source: image.clone(), linked: self.linked });
        }
        for spec in &self.disk {
            let opts = device_options("disk", spec, &["size", "pool", "format", "vol", "path", "readonly"])?;
            let get = |k: &str| opts.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let disk = match (get("size"), get("vol"), get("path")) {
                (Some(s), None, None) => {
                    let format = format_name("disk", &get("format").unwrap_or_else(|| "qcow2".into()))?;
                    let mut volume = volume_name(disks.len());
                    if format == "raw" {
                        volume = volume.replace(".qcow2", ".raw");
                    }
                    Disk::New { pool: get("pool").unwrap_or_else(|| self.pool.clone()), volume, format, size: size("disk size", &s)? }
                }
                (None, Some(v), None) => {
                    let (pool, volume) = v.split_once('/').ok_or_else(|| format!("--disk vol={v}: expected POOL/VOLUME"))?;
                    let format = get("format").map(|f| format_name("disk", &f)).transpose()?;
                    Disk::Volume { pool: pool.to_string(), volume: volume.to_string(), format }
                }
                (None, None, Some(path)) => {
                    let readonly = matches!(get("readonly").as_deref(), Some("on" | "yes" | "true"));
                    Disk::Path { path, format: format_name("disk", &get("format").unwrap_or_else(|| "raw".into()))?, readonly }
                }
                _ => return Err(format!("--disk {spec}: give exactly one of size=, vol= or path=")),
            };
            disks.push(disk);
        }

        let mut t = format!("name = {}\nmemory = \"{}\"\nvcpus = {}\n", toml_string(&self.name), size_text(memory), self.vcpus);
        if self.autostart {
            t.push_str("autostart = true\n");
        }
        t.push_str("\n[boot]\n");
        let boot_disk = self.boot.is_some() || (self.kernel.is_none() && self.import.is_some());
        if boot_disk {
            if disks.is_empty() {
                return Err("--boot disk: there is no disk to boot from (add --import or --disk)".to_string());
            }
            t.push_str("from = \"disk\"\n");
        } else if let Some(kernel) = &self.kernel {
            t.push_str(&format!("kernel = {}\n", toml_string(kernel)));
            if let Some(initrd) = &self.initrd {
                t.push_str(&format!("initrd = {}\n", toml_string(initrd)));
            }
        } else {
            return Err("nothing to boot: give --kernel, --boot disk, or --import an image".to_string());
        }
        if let Some(cmdline) = &self.cmdline {
            t.push_str(&format!("cmdline = {}\n", toml_string(cmdline)));
        }
        for disk in &disks {
            t.push_str("\n[[disk]]\n");
            match disk {
                Disk::New { pool, volume, format, .. } => {
                    t.push_str(&format!("pool = {}\nvolume = {}\nformat = \"{format}\"\n", toml_string(pool), toml_string(volume)))
                }
                Disk::Import { pool, volume, .. } => {
                    t.push_str(&format!("pool = {}\nvolume = {}\nformat = \"qcow2\"\n", toml_string(pool), toml_string(volume)))
                }
                Disk::Volume { pool, volume, format } => {
                    let format = format.clone().unwrap_or_else(|| if volume.ends_with(".raw") { "raw".into() } else { "qcow2".into() });
                    t.push_str(&format!("pool = {}\nvolume = {}\nformat = \"{format}\"\n", toml_string(pool), toml_string(volume)))
                }
                Disk::Path { path, format, readonly } => {
                    t.push_str(&format!("path = {}\nformat = \"{format}\"\n", toml_string(path)));
                    if *readonly {
                        t.push_str("readonly = true\n");
                    }
                }
            }
        }
        for spec in &self.network {
            if spec == "none" {
                continue;
            }
            let (key, value) = match spec.split_once('=') {
                Some((k @ ("tap" | "bridge" | "network"), v)) => (k, v),
                Some((k, _)) => return Err(format!("--network: unknown option {k:?} (NAME, network=NAME, bridge=BR, tap=TAP or none)")),
                None => ("network", spec.as_str()),
            };
            if value.is_empty() {
                return Err(format!("--network {spec}: the {key} name is empty"));
            }
            t.push_str(&format!("\n[[nic]]\n{key} = {}\n", toml_string(value)));
        }
        if self.network.is_empty() && default_network {
            t.push_str("\n[[nic]]\nnetwork = \"default\"\n");
        }
        let cloud_init = match (&self.cloud_init, &self.ssh_key) {
            (Some(spec), _) => {
                let opts = device_options("cloud-init", spec, &["user-data", "meta-data", "network-config"])?;
                let get = |k: &str| opts.iter().find(|(key, _)| key == k).map(|(_, v)| read_file("cloud-init", v)).transpose();
                let user_data = get("user-data")?.ok_or("--cloud-init: user-data=FILE is required")?;
                Some((user_data, get("meta-data")?, get("network-config")?))
            }
            (None, Some(key)) => Some((ssh_user_data(key)?, None, None)),
            (None, None) => None,
        };
        if let Some((user_data, meta_data, network_config)) = cloud_init {
            t.push_str(&format!("\n[cloud_init]\nuser_data = {}\n", toml_string(&user_data)));
            if let Some(m) = meta_data {
                t.push_str(&format!("meta_data = {}\n", toml_string(&m)));
            }
            if let Some(n) = network_config {
                t.push_str(&format!("network_config = {}\n", toml_string(&n)));
            }
        }
        Ok(Plan { toml: t, disks })
    }
}

pub fn run(args: CreateArgs, c: &Client) -> Result<(), String> {
    let default_network = args.network.is_empty() && c.get("/v1/networks/default").is_ok();
    let plan = args.plan(default_network)?;
    if args.dry_run {
        print!("{}", plan.toml);
        return Ok(());
    }
    let mut made: Vec<(String, String)> = Vec::new();
    let result = make_and_define(c, &plan, &mut made);
    if let Err(e) = result {
        // Leave nothing half made: the volumes this command created go again.
        for (pool, volume) in made {
            let _ = c.json("DELETE", &format!("/v1/pools/{pool}/volumes/{volume}"), None);
        }
        return Err(e);
    }
    println!("Domain '{}' defined", args.name);
    if args.start {
        c.post(&format!("/v1/domains/{}/start", seg(&args.name)?), None)?;
        println!("Domain '{}' started", args.name);
        if args.console {
            super::console::attach(c, &args.name)?;
        }
    }
    Ok(())
}

fn make_and_define(c: &Client, plan: &Plan, made: &mut Vec<(String, String)>) -> Result<(), String> {
    for disk in &plan.disks {
        match disk {
            Disk::New { pool, volume, format, size } => {
                let body = json!({ "name": volume, "capacity": size, "format": format });
                c.post(&format!("/v1/pools/{}/volumes", seg(pool)?), Some(&body))?;
                made.push((pool.clone(), volume.clone()));
                println!("Vol {volume} created in pool {pool}");
            }
            Disk::Import { pool, volume, source, linked } => {
                let body = json!({ "source": source.display().to_string(), "name": volume, "format": "qcow2", "linked": linked });
                let answer = c.post(&format!("/v1/pools/{}/import", seg(pool)?), Some(&body))?;
                if answer.get("id").is_some() {
                    super::follow_job(c, &answer)?;
                }
                made.push((pool.clone(), volume.clone()));
                let how = if *linked { "linked to" } else { "copied from" };
                println!("Vol {volume} in pool {pool} {how} {}", source.display());
            }
            Disk::Volume { .. } | Disk::Path { .. } => {}
        }
    }
    c.call("POST", "/v1/domains", super::client::Body::Bytes(plan.toml.as_bytes(), "application/toml"))?;
    Ok(())
}
