//! virsh-like verbs that talk to `ferrod` (REST, see crates/manager/openapi.json).
//!
//! Human tables by default, `--json` for scripts; on failure one line on stderr and exit status 1.

mod backup;
mod client;
mod clone;
pub mod complete;
mod console;
mod create;
mod migrate;
mod show;

use client::{Body, Client};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

/// Which daemon the verbs talk to: global options, accepted before or after the verb.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// ferrod to talk to: its socket (a path or unix://PATH; default $FERRO_HOME/ferrod.sock, else
    /// /run/ferrovisor/ferrod.sock), tls://HOST:PORT for a `ferrod --listen`, or tcp://127.0.0.1:PORT
    /// for a loopback `--insecure` one.
    #[arg(long, env = "FERRO_CONNECT", value_name = "URI", global = true)]
    connect: Option<String>,
    /// CA certificate(s) (PEM) to trust for tls:// (default: the system's CA bundle).
    #[arg(long, env = "FERRO_CA", value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// File whose first token is sent to a TCP listener (ferrod's --token-file format).
    #[arg(long, env = "FERRO_TOKEN_FILE", value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct Dom {
    /// Domain name.
    #[arg(add = complete::domains())]
    name: String,
}

#[derive(clap::Args, Debug)]
pub struct DomJson {
    /// Domain name.
    #[arg(add = complete::domains())]
    name: String,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Include inactive objects too.
    #[arg(long)]
    all: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PoolArg {
    /// Pool name.
    #[arg(add = complete::pools())]
    pool: String,
}

#[derive(clap::Args, Debug)]
pub struct VolArg {
    /// Volume name.
    vol: String,
    /// Pool holding the volume.
    #[arg(long)]
    #[arg(add = complete::pools())]
    pool: String,
}

#[derive(clap::Args, Debug)]
pub struct NetArg {
    /// Network name.
    #[arg(add = complete::networks())]
    network: String,
}

#[derive(clap::Args, Debug)]
pub struct NetJson {
    /// Network name.
    #[arg(add = complete::networks())]
    network: String,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum ManageCommand {
    /// Make a domain from flags, like virt-install: new or imported volumes, cloud-init, start.
    Create(Box<create::CreateArgs>),
    /// Import an OVF package (an .ova, or an .ovf beside its files, on ferrod's host) as a new
    /// domain booting from its first disk; the disks become qcow2 volumes (a job with progress).
    ImportOvf {
        /// The .ova or .ovf file.
        file: PathBuf,
        /// Domain name (default: the package's, made valid).
        #[arg(long)]
        name: Option<String>,
        /// Pool for the disks.
        #[arg(long, default_value = "default")]
        #[arg(add = complete::pools())]
        pool: String,
        /// Map a network of the package to a tap (or to none, dropping its NIC). Repeatable.
        #[arg(long, value_name = "SRC=DST")]
        network_map: Vec<String>,
    },
    /// Export a shut-off domain as an OVA file or an OVF directory (on ferrod's host; a job):
    /// streamOptimized VMDKs, an OVF 1.0 envelope and a SHA-256 manifest.
    ExportOvf {
        #[arg(add = complete::domains())]
        name: String,
        /// FILE.ova, or a directory for --format ovf.
        target: PathBuf,
        /// ova or ovf (default: ova when TARGET ends in .ova).
        #[arg(long, value_parser = ["ova", "ovf"])]
        format: Option<String>,
    },
    /// Define (or redefine) a domain from a TOML file.
    Define {
        /// The TOML definition.
        file: PathBuf,
    },
    /// Remove a domain's definition (the domain must not be running; one with snapshots needs
    /// --snapshots-metadata or --remove-all-snapshots).
    Undefine {
        name: String,
        /// Forget the domain's snapshots (their internal snapshots stay in the disks).
        #[arg(long, conflicts_with = "remove_all_snapshots")]
        snapshots_metadata: bool,
        /// Delete the domain's snapshots, the disks' internal snapshots included.
        #[arg(long)]
        remove_all_snapshots: bool,
    },
    /// Start a defined domain.
    Start {
        #[arg(add = complete::domains())]
        name: String,
        /// Attach to the serial console once started.
        #[arg(long)]
        console: bool,
    },
    /// Ask the guest to shut down (ACPI power button).
    Shutdown {
        #[arg(add = complete::domains())]
        name: String,
        /// Wait up to this many seconds for the domain to be off; fail if it is not.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Stop a domain at once (like pulling the plug).
    Destroy(Dom),
    /// Ask the guest to reboot (power button, then start again once it is off).
    Reboot(Dom),
    /// Hard-reset a domain.
    Reset(Dom),
    /// Pause every vCPU of a domain.
    Suspend(Dom),
    /// Resume a paused domain.
    Resume(Dom),
    /// List domains (running ones; --all for every defined domain).
    List(ListArgs),
    /// Show a domain's details.
    Dominfo(DomJson),
    /// Show a domain's state.
    Domstate {
        #[arg(add = complete::domains())]
        name: String,
        /// Also show why it is in that state.
        #[arg(long)]
        reason: bool,
    },
    /// Print a domain's TOML definition.
    Dumpconfig(Dom),
    /// List a domain's NICs: tap, type, source, MAC.
    Domiflist(DomJson),
    /// Show the addresses of a domain's NICs on virtual networks (from their DHCP leases).
    Domifaddr(DomJson),
    /// List a domain's disks: target and source.
    Domblklist(DomJson),
    /// Attach to a domain's serial console (Ctrl-] detaches).
    Console(Dom),
    /// Start a domain whenever the host boots (ferrod's first start after boot).
    Autostart {
        #[arg(add = complete::domains())]
        name: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Show a running domain's counters (CPU time, memory, disks, NICs).
    Domstats(DomJson),
    /// Show the host: CPUs, RAM, memory committed to running domains, huge pages, KSM.
    Nodeinfo {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show each vCPU of a running domain: host thread, state, CPU time, CPU affinity.
    Vcpuinfo(DomJson),
    /// Pin a vCPU to host CPUs (live; --config also changes the definition).
    Vcpupin {
        name: String,
        vcpu: u8,
        /// Host CPUs, e.g. 2, 3-4 or 0,2-3.
        cpulist: String,
        /// Also store it in the definition (needed when the domain does not run).
        #[arg(long)]
        config: bool,
    },
    /// Pin a domain's emulator threads (all but the vCPUs) to host CPUs (live; --config also
    /// changes the definition).
    Emulatorpin {
        name: String,
        /// Host CPUs, e.g. 0 or 0-1.
        cpulist: String,
        #[arg(long)]
        config: bool,
    },
    /// Set how much memory a running domain's guest may use (its balloon takes the rest back).
    Setmem {
        #[arg(add = complete::domains())]
        name: String,
        /// Memory for the guest, e.g. 256M; at most the defined memory.
        size: String,
    },
    /// Show lifecycle events (follows new ones until interrupted, unless --no-follow).
    Events {
        /// Print past events and exit.
        #[arg(long)]
        no_follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// A live view of running domains (like virt-top).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        delay: u64,
        /// Stop after this many refreshes.
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Take a snapshot of a domain (a job): running or paused, its memory, devices and disks,
    /// the guest paused only while its state is saved; shut off, its disks.
    SnapshotCreateAs {
        domain: String,
        /// The snapshot's name.
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List a domain's snapshots.
    SnapshotList {
        domain: String,
        /// Show each snapshot under its parent.
        #[arg(long, conflicts_with = "json")]
        tree: bool,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot's details.
    SnapshotInfo {
        domain: String,
        name: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the name of a domain's current snapshot (the last taken or reverted to).
    SnapshotCurrent {
        domain: String,
    },
    /// Revert a domain to a snapshot (a job): one taken while it ran comes back running (or
    /// paused, as it was); one taken shut off leaves it shut off with its disks reverted.
    SnapshotRevert {
        domain: String,
        name: String,
        /// Leave the domain running afterwards.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Leave the domain paused afterwards.
        #[arg(long)]
        paused: bool,
    },
    /// Delete a snapshot: its children move to its parent, its disks' clusters are freed.
    SnapshotDelete {
        domain: String,
        name: String,
    },
    #[command(flatten)]
    Backup(backup::BackupCommand),
    #[command(flatten)]
    Clone(clone::CloneCommand),
    /// Move a running or paused domain to another ferrod (a job; see domjobinfo, domjobabort):
    /// memory, vCPUs and devices go over a TLS connection between the two ferrods; the disks
    /// must be on storage both hosts share (checked before anything moves). --offline moves a
    /// shut-off domain, copying the disks the destination does not share.
    Migrate(migrate::MigrateArgs),
    /// Define a storage pool (only `dir` pools).
    PoolDefineAs {
        name: String,
        /// Pool type: dir.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Directory holding the volumes.
        #[arg(long)]
        target: PathBuf,
    },
    /// Create a pool's directory.
    PoolBuild(PoolArg),
    /// Activate a pool.
    PoolStart(PoolArg),
    /// Deactivate a pool (its volumes stay on disk).
    PoolDestroy(PoolArg),
    /// Remove a pool's definition.
    PoolUndefine(PoolArg),
    /// Rescan a pool's volumes.
    PoolRefresh(PoolArg),
    /// Activate a pool whenever the host boots.
    PoolAutostart {
        #[arg(add = complete::pools())]
        pool: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// List pools (active ones; --all for every pool).
    PoolList(ListArgs),
    /// Show a pool's details.
    PoolInfo {
        #[arg(add = complete::pools())]
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a volume in a pool.
    VolCreateAs {
        #[arg(add = complete::pools())]
        pool: String,
        name: String,
        /// Virtual size, e.g. 10G.
        capacity: String,
        /// raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Volume of the same pool to use as a qcow2 backing file.
        #[arg(long)]
        backing_vol: Option<String>,
        /// Format of the backing volume (detected if omitted).
        #[arg(long)]
        backing_vol_format: Option<String>,
    },
    /// List a pool's volumes.
    VolList {
        #[arg(add = complete::pools())]
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's details.
    VolInfo {
        #[command(flatten)]
        vol: VolArg,
        #[arg(long)]
        json: bool,
    },
    /// Print a volume's file path.
    VolPath(VolArg),
    /// Delete a volume (refused while a running domain uses it).
    VolDelete(VolArg),
    /// Fill a volume with zeros (keeps its size and format).
    VolWipe(VolArg),
    /// Copy a volume to a new volume in the same pool (a job: progress on a terminal; Ctrl-C
    /// stops watching, not the job, see job-cancel).
    VolClone {
        #[command(flatten)]
        vol: VolArg,
        /// Name of the copy.
        new_name: String,
    },
    /// Convert a volume to a new volume of the same pool in another format (a job, like vol-clone).
    VolConvert {
        #[command(flatten)]
        vol: VolArg,
        /// Name of the new volume.
        new_name: String,
        /// Format of the new volume: raw or qcow2.
        #[arg(long)]
        format: String,
    },
    /// Grow a volume.
    VolResize {
        #[command(flatten)]
        vol: VolArg,
        /// New virtual size, e.g. 20G.
        capacity: String,
    },
    /// Replace a volume's contents with a local file.
    VolUpload {
        #[command(flatten)]
        vol: VolArg,
        file: PathBuf,
    },
    /// Save a volume's contents to a local file.
    VolDownload {
        #[command(flatten)]
        vol: VolArg,
        file: PathBuf,
    },
    /// Define (or redefine an inactive) virtual network from a TOML file.
    NetDefine {
        /// The TOML definition.
        file: PathBuf,
    },
    /// Remove an inactive network's definition (and its lease database).
    NetUndefine(NetArg),
    /// Start a network: its bridge, firewall rules and DHCP/DNS server.
    NetStart(NetArg),
    /// Stop a network, removing everything it put on the host.
    NetDestroy(NetArg),
    /// List networks (active ones; --all for every defined network).
    NetList(ListArgs),
    /// Show a network's details.
    NetInfo(NetJson),
    /// Print a network's TOML definition.
    #[command(alias = "net-dumpxml")]
    NetDumpconfig(NetArg),
    /// Start a network whenever the host boots (ferrod's first start after boot).
    NetAutostart {
        #[arg(add = complete::networks())]
        network: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Show the DHCP leases of a running network.
    NetDhcpLeases(NetJson),
    /// List jobs (volume clones and conversions): running ones and the last finished ones.
    JobList {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show a job's state and progress.
    JobInfo {
        /// Job id (see job-list).
        id: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job; its unfinished volume is removed.
    JobCancel {
        /// Job id (see job-list).
        id: String,
    },
}

pub fn run(cmd: ManageCommand, connect: &Connect) -> ExitCode {
    let client = Client::new(connect.connect.as_deref(), connect.ca.as_deref(), connect.token_file.as_deref());
    match client.and_then(|client| execute(cmd, &client, connect)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Percent-free path segment check: names are validated by the daemon, but never let a `/`, `?`
/// or space change which URL we ask for.
fn seg(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"._-".contains(&b))) {
        return Err(format!("{name:?} is not a valid name (letters, digits, '.', '-', '_')"));
    }
    Ok(name)
}

fn dom_path(name: &str) -> Result<String, String> {
    Ok(format!("/v1/domains/{}", seg(name)?))
}

fn snapshot_path(domain: &str, name: &str) -> Result<String, String> {
    Ok(format!("{}/snapshots/{}", dom_path(domain)?, seg(name)?))
}

fn net_path(name: &str) -> Result<String, String> {
    Ok(format!("/v1/networks/{}", seg(name)?))
}

fn vol_path(v: &VolArg) -> Result<String, String> {
    Ok(format!("/v1/pools/{}/volumes/{}", seg(&v.pool)?, seg(&v.vol)?))
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn execute(cmd: ManageCommand, c: &Client, connect: &Connect) -> Result<(), String> {
    use ManageCommand as C;
    match cmd {
        C::Create(args) => create::run(*args, c)?,
        C::ImportOvf { file, name, pool, network_map } => {
            let mut map = serde_json::Map::new();
            for pair in &network_map {
                let (src, dst) = pair.split_once('=').ok_or_else(|| format!("--network-map {pair}: expected SRC=DST"))?;
                map.insert(src.to_string(), json!(dst));
            }
            let source = absolute(&file)?;
            let mut body = json!({ "source": source, "pool": pool, "network_map": map });
            if let Some(n) = &name {
                body["name"] = json!(n);
            }
            let job = c.post("/v1/ovf/import", Some(&body))?;
            follow_job(c, &job)?;
            println!("Domain '{}' imported from {}", job["target"].as_str().unwrap_or("?"), file.display());
        }
        C::ExportOvf { name, target, format } => {
            let mut body = json!({ "target": absolute(&target)? });
            if let Some(f) = format {
                body["format"] = json!(f);
            }
            let job = c.post(&format!("{}/export", dom_path(&name)?), Some(&body))?;
            follow_job(c, &job)?;
            println!("Domain '{name}' exported to {}", target.display());
        }
        C::Define { file } => {
            let (name, verb) = define_from_file(c, "/v1/domains", &file)?;
            println!("Domain '{name}' {verb} from {}", file.display());
        }
        C::Undefine { name, snapshots_metadata, remove_all_snapshots } => {
            let query = match (snapshots_metadata, remove_all_snapshots) {
                (true, _) => "?snapshots=metadata",
                (_, true) => "?snapshots=all",
                _ => "",
            };
            c.json("DELETE", &format!("{}{query}", dom_path(&name)?), None)?;
            println!("Domain '{name}' has been undefined");
        }
        C::SnapshotCreateAs { domain, name, description } => {
            let mut body = json!({ "name": name });
            if let Some(text) = description {
                body["description"] = json!(text);
            }
            let job = c.post(&format!("{}/snapshots", dom_path(&domain)?), Some(&body))?;
            follow_job(c, &job)?;
            let snapshot = c.get(&snapshot_path(&domain, &name)?)?;
            match show::pause_ms(&snapshot) {
                Some(pause) => println!("Domain snapshot {name} created (guest paused {pause})"),
                None => println!("Domain snapshot {name} created"),
            }
        }
        C::SnapshotList { domain, tree, json } => {
            let list = c.get(&format!("{}/snapshots", dom_path(&domain)?))?;
            let list = list.as_array().map(Vec::as_slice).unwrap_or(&[]);
            match (json, tree) {
                (true, _) => print_json(&Value::Array(list.to_vec())),
                (_, true) => show::snapshot_tree(list),
                _ => show::snapshot_table(list),
            }
        }
        C::SnapshotInfo { domain, name, json } => {
            let info = c.get(&snapshot_path(&domain, &name)?)?;
            if json { print_json(&info) } else { show::snapshot_info(&info) }
        }
        C::SnapshotCurrent { domain } => {
            let list = c.get(&format!("{}/snapshots", dom_path(&domain)?))?;
            let current = list.as_array().into_iter().flatten().find(|s| s["current"] == true);
            let name = current.and_then(|s| s["name"].as_str()).ok_or_else(|| format!("domain {domain} has no current snapshot"))?;
            println!("{name}");
        }
        C::SnapshotRevert { domain, name, running, paused } => {
            let body = match (running, paused) {
                (true, _) => json!({ "state": "running" }),
                (_, true) => json!({ "state": "paused" }),
                _ => json!({}),
            };
            let job = c.post(&format!("{}/revert", snapshot_path(&domain, &name)?), Some(&body))?;
            follow_job(c, &job)?;
            let state = c.get(&dom_path(&domain)?)?;
            println!("Domain '{domain}' reverted to snapshot {name} ({})", show::state_word(&state["state"]));
        }
        C::SnapshotDelete { domain, name } => {
            c.json("DELETE", &snapshot_path(&domain, &name)?, None)?;
            println!("Domain snapshot {name} deleted");
        }
        C::Start { name, console } => {
            c.post(&format!("{}/start", dom_path(&name)?), None)?;
            println!("Domain '{name}' started");
            if console {
                console::attach(c, &name)?;
            }
        }
        C::Shutdown { name, timeout } => {
            let body = timeout.map(|t| json!({ "timeout": t }));
            c.post(&format!("{}/shutdown", dom_path(&name)?), body.as_ref())?;
            if timeout.is_some() {
                println!("Domain '{name}' is shut off");
            } else {
                println!("Domain '{name}' is being shutdown");
            }
        }
        C::Destroy(d) => action(c, &d, "destroy", "destroyed")?,
        C::Reboot(d) => action(c, &d, "reboot", "is being rebooted")?,
        C::Reset(d) => action(c, &d, "reset", "was reset")?,
        C::Suspend(d) => action(c, &d, "suspend", "suspended")?,
        C::Resume(d) => action(c, &d, "resume", "resumed")?,
        C::List(ListArgs { all, json }) => {
            let list = c.get("/v1/domains")?;
            let shown: Vec<Value> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| all || matches!(d["state"].as_str(), Some("running" | "paused")))
                .cloned()
                .collect();
            if json { print_json(&Value::Array(shown)) } else { show::domain_table(&shown) }
        }
        C::Dominfo(d) => {
            let info = c.get(&dom_path(&d.name)?)?;
            if d.json { print_json(&info) } else { show::dominfo(&info) }
        }
        C::Domstate { name, reason } => {
            let info = c.get(&dom_path(&name)?)?;
            let state = show::state_word(&info["state"]);
            match (reason, info["crash"]["reason"].as_str(), info["error"].as_str()) {
                (true, Some(why), _) => println!("{state} ({why})"),
                (_, _, Some(error)) => println!("{state} (invalid definition: {error})"),
                _ => println!("{state}"),
            }
        }
        C::Dumpconfig(d) => {
            let (_, data) = c.call("GET", &format!("{}/config", dom_path(&d.name)?), Body::None)?;
            print!("{}", String::from_utf8_lossy(&data));
        }
        C::Console(d) => console::attach(c, seg(&d.name)?)?,
        C::Domiflist(d) => {
            let list = c.get(&format!("{}/interfaces", dom_path(&d.name)?))?;
            if d.json { print_json(&list) } else { show::interface_table(list.as_array().map(Vec::as_slice).unwrap_or(&[])) }
        }
        C::Domifaddr(d) => {
            let list = c.get(&format!("{}/interfaces", dom_path(&d.name)?))?;
            let on_networks: Vec<Value> = list.as_array().into_iter().flatten().filter(|i| i["type"] == "network").cloned().collect();
            if d.json { print_json(&Value::Array(on_networks)) } else { show::address_table(&on_networks) }
        }
        C::Domblklist(d) => {
            let info = c.get(&dom_path(&d.name)?)?;
            let disks = show::disk_list(&info["config"]["disk"]);
            if d.json { print_json(&disks) } else { show::disk_table(&disks) }
        }
        C::Autostart { name, disable } => {
            c.post(&format!("{}/autostart", dom_path(&name)?), Some(&json!({ "enabled": !disable })))?;
            let word = if disable { "unmarked" } else { "marked" };
            println!("Domain '{name}' {word} as autostarted");
        }
        C::Domstats(d) => {
            let stats = c.get(&format!("{}/stats", dom_path(&d.name)?))?;
            if d.json { print_json(&stats) } else { show::domstats(&stats) }
        }
        C::Nodeinfo { json } => {
            let info = c.get("/v1/nodeinfo")?;
            if json { print_json(&info) } else { show::nodeinfo(&info) }
        }
        C::Vcpuinfo(d) => {
            let info = c.get(&format!("{}/vcpuinfo", dom_path(&d.name)?))?;
            if d.json { print_json(&info["vcpus"]) } else { show::vcpuinfo(&info) }
        }
        C::Vcpupin { name, vcpu, cpulist, config } => {
            c.post(&format!("{}/vcpupin", dom_path(&name)?), Some(&json!({ "vcpu": vcpu, "cpus": cpulist, "config": config })))?;
            println!("Domain '{name}' vCPU {vcpu} pinned to CPUs {cpulist}");
        }
        C::Emulatorpin { name, cpulist, config } => {
            c.post(&format!("{}/emulatorpin", dom_path(&name)?), Some(&json!({ "cpus": cpulist, "config": config })))?;
            println!("Domain '{name}' emulator pinned to CPUs {cpulist}");
        }
        C::Setmem { name, size } => {
            c.post(&format!("{}/setmem", dom_path(&name)?), Some(&json!({ "memory": size })))?;
            println!("Domain '{name}' memory set to {size}");
        }
        C::Events { no_follow, json } => events(c, !no_follow, json)?,
        C::Top { delay, iterations } => show::top(c, delay, iterations)?,
        C::PoolDefineAs { name, kind, target } => {
            let body = json!({ "name": name, "type": kind, "target": target.display().to_string() });
            c.post("/v1/pools", Some(&body))?;
            println!("Pool {name} defined");
        }
        C::PoolBuild(p) => pool_action(c, &p, "build", "built")?,
        C::PoolStart(p) => pool_action(c, &p, "start", "started")?,
        C::PoolDestroy(p) => pool_action(c, &p, "destroy", "destroyed")?,
        C::PoolRefresh(p) => pool_action(c, &p, "refresh", "refreshed")?,
        C::PoolUndefine(p) => {
            c.json("DELETE", &format!("/v1/pools/{}", seg(&p.pool)?), None)?;
            println!("Pool {} has been undefined", p.pool);
        }
        C::PoolAutostart { pool, disable } => {
            let path = format!("/v1/pools/{}/autostart", seg(&pool)?);
            c.post(&path, Some(&json!({ "enabled": !disable })))?;
            println!("Pool {pool} {} as autostarted", if disable { "unmarked" } else { "marked" });
        }
        C::PoolList(ListArgs { all, json }) => {
            let list = c.get("/v1/pools")?;
            let shown: Vec<Value> =
                list.as_array().into_iter().flatten().filter(|p| all || p["active"] == true).cloned().collect();
            if json { print_json(&Value::Array(shown)) } else { show::pool_table(&shown) }
        }
        C::PoolInfo { pool, json } => {
            let info = c.get(&format!("/v1/pools/{}", seg(&pool)?))?;
            if json { print_json(&info) } else { show::pool_info(&info) }
        }
        C::VolCreateAs { pool, name, capacity, format, backing_vol, backing_vol_format } => {
            let mut body = json!({ "name": name, "capacity": capacity, "format": format });
            if let Some(b) = backing_vol {
                body["backing_volume"] = json!(b);
            }
            if let Some(f) = backing_vol_format {
                body["backing_format"] = json!(f);
            }
            c.post(&format!("/v1/pools/{}/volumes", seg(&pool)?), Some(&body))?;
            println!("Vol {name} created");
        }
        C::VolList { pool, json } => {
            let list = c.get(&format!("/v1/pools/{}/volumes", seg(&pool)?))?;
            if json { print_json(&list) } else { show::volume_table(list.as_array().map(Vec::as_slice).unwrap_or(&[])) }
        }
        C::VolInfo { vol, json } => {
            let info = c.get(&vol_path(&vol)?)?;
            if json { print_json(&info) } else { show::volume_info(&info) }
        }
        C::VolPath(vol) => {
            let info = c.get(&vol_path(&vol)?)?;
            println!("{}", info["path"].as_str().unwrap_or_default());
        }
        C::VolDelete(vol) => {
            c.json("DELETE", &vol_path(&vol)?, None)?;
            println!("Vol {} deleted", vol.vol);
        }
        C::VolWipe(vol) => {
            c.post(&format!("{}/wipe", vol_path(&vol)?), None)?;
            println!("Vol {} wiped", vol.vol);
        }
        C::VolClone { vol, new_name } => {
            copy_volume(c, &vol, "clone", json!({ "name": new_name }))?;
            println!("Vol {new_name} cloned from {}", vol.vol);
        }
        C::VolConvert { vol, new_name, format } => {
            copy_volume(c, &vol, "convert", json!({ "name": new_name, "format": format }))?;
            println!("Vol {new_name} converted from {} to {format}", vol.vol);
        }
        C::VolResize { vol, capacity } => {
            c.post(&format!("{}/resize", vol_path(&vol)?), Some(&json!({ "capacity": capacity })))?;
            println!("Size of volume '{}' successfully changed to {capacity}", vol.vol);
        }
        C::VolUpload { vol, file } => {
            let f = std::fs::File::open(&file).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
            let len = f.metadata().map_err(|e| format!("cannot stat {}: {e}", file.display()))?.len();
            c.call("PUT", &format!("{}/data", vol_path(&vol)?), Body::File(&f, len))?;
            println!("Vol {} uploaded from {}", vol.vol, file.display());
        }
        C::VolDownload { vol, file } => download(c, &vol, &file)?,
        C::NetDefine { file } => {
            let (name, verb) = define_from_file(c, "/v1/networks", &file)?;
            println!("Network {name} {verb} from {}", file.display());
        }
        C::NetUndefine(n) => {
            c.json("DELETE", &net_path(&n.network)?, None)?;
            println!("Network {} has been undefined", n.network);
        }
        C::NetStart(n) => {
            c.post(&format!("{}/start", net_path(&n.network)?), None)?;
            println!("Network {} started", n.network);
        }
        C::NetDestroy(n) => {
            c.post(&format!("{}/destroy", net_path(&n.network)?), None)?;
            println!("Network {} destroyed", n.network);
        }
        C::NetList(ListArgs { all, json }) => {
            let list = c.get("/v1/networks")?;
            let shown: Vec<Value> =
                list.as_array().into_iter().flatten().filter(|n| all || n["active"] == true).cloned().collect();
            if json { print_json(&Value::Array(shown)) } else { show::network_table(&shown) }
        }
        C::NetInfo(n) => {
            let info = c.get(&net_path(&n.network)?)?;
            if n.json { print_json(&info) } else { show::network_info(&info) }
        }
        C::NetDumpconfig(n) => {
            let (_, data) = c.call("GET", &format!("{}/config", net_path(&n.network)?), Body::None)?;
            print!("{}", String::from_utf8_lossy(&data));
        }
        C::NetAutostart { network, disable } => {
            c.post(&format!("{}/autostart", net_path(&network)?), Some(&json!({ "enabled": !disable })))?;
            println!("Network {network} {} as autostarted", if disable { "unmarked" } else { "marked" });
        }
        C::NetDhcpLeases(n) => {
            let leases = c.get(&format!("{}/leases", net_path(&n.network)?))?;
            if n.json { print_json(&leases) } else { show::lease_table(leases.as_array().map(Vec::as_slice).unwrap_or(&[])) }
        }
        C::Backup(cmd) => backup::execute(cmd, c)?,
        C::Clone(cmd) => clone::execute(cmd, c)?,
        C::Migrate(args) => migrate::execute(args, c, connect)?,
        C::JobList { json } => {
            let list = c.get("/v1/jobs")?;
            if json { print_json(&list) } else { show::job_table(list.as_array().map(Vec::as_slice).unwrap_or(&[])) }
        }
        C::JobInfo { id, json } => {
            let job = c.get(&format!("/v1/jobs/{}", seg(&id)?))?;
            if json { print_json(&job) } else { show::job_info(&job) }
        }
        C::JobCancel { id } => {
            let job = c.post(&format!("/v1/jobs/{}/cancel", seg(&id)?), None)?;
            match job["state"].as_str() {
                Some("cancelled") => println!("Job {id} cancelled"),
                other => println!("Job {id} {} before it could be cancelled", other.unwrap_or("ended")),
            }
        }
    }
    Ok(())
}

/// Posts the TOML definition in `file` to `collection`; the defined object's name and whether it
/// was "defined" or "redefined".
fn define_from_file(c: &Client, collection: &str, file: &std::path::Path) -> Result<(String, &'static str), String> {
    let text = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let (status, data) = c.call("POST", collection, Body::Bytes(&text, "application/toml"))?;
    let info: Value = serde_json::from_slice(&data).map_err(|e| format!("ferrod sent invalid JSON: {e}"))?;
    let name = info["name"].as_str().unwrap_or("?").to_string();
    Ok((name, if status == 201 { "defined" } else { "redefined" }))
}

fn action(c: &Client, d: &Dom, action: &str, done: &str) -> Result<(), String> {
    c.post(&format!("{}/{action}", dom_path(&d.name)?), None)?;
    println!("Domain '{}' {done}", d.name);
    Ok(())
}

fn pool_action(c: &Client, p: &PoolArg, action: &str, done: &str) -> Result<(), String> {
    c.post(&format!("/v1/pools/{}/{action}", seg(&p.pool)?), None)?;
    println!("Pool {} {done}", p.pool);
    Ok(())
}

/// Starts a clone or convert job and follows it to its end.
fn copy_volume(c: &Client, vol: &VolArg, action: &str, body: Value) -> Result<(), String> {
    let job = c.post(&format!("{}/{action}", vol_path(vol)?), Some(&body))?;
    follow_job(c, &job)
}

/// Follows a job ferrod started until it ends, with a progress line on stderr when that is a
/// terminal; Ctrl-C stops watching, not the job.
fn follow_job(c: &Client, job: &Value) -> Result<(), String> {
    use std::io::{IsTerminal, Write};
    let id = job["id"].as_u64().ok_or("ferrod answered without a job id")?;
    let tty = std::io::stderr().is_terminal();
    let job = loop {
        // ferrod answers when the job ends, or after 200 ms with its progress.
        let job = c.get(&format!("/v1/jobs/{id}?wait_ms=200"))?;
        if tty {
            eprint!("\r\x1b[K{}", show::job_line(&job));
            let _ = std::io::stderr().flush();
        }
        if job["state"] != "running" {
            break job;
        }
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    match job["state"].as_str() {
        Some("completed") => Ok(()),
        Some("cancelled") => Err(format!("job {id} was cancelled")),
        _ => Err(format!("job {id} failed: {}", job["error"].as_str().unwrap_or("no reason given"))),
    }
}

/// A path as ferrod must see it: absolute (ferrod does not share our working directory).
fn absolute(path: &std::path::Path) -> Result<String, String> {
    std::path::absolute(path).map(|p| p.display().to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

fn download(c: &Client, vol: &VolArg, file: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let mut pending = c.send("GET", &format!("{}/data", vol_path(vol)?), "", Body::None)?;
    if pending.status != 200 {
        let mut data = Vec::new();
        while let Ok(Some(chunk)) = pending.next_chunk() {
            data.extend_from_slice(&chunk);
        }
        return Err(c.refusal(pending.status, &data));
    }
    let mut out = std::fs::File::create(file).map_err(|e| format!("cannot create {}: {e}", file.display()))?;
    while let Some(chunk) = pending.next_chunk()? {
        out.write_all(&chunk).map_err(|e| format!("writing {}: {e}", file.display()))?;
    }
    println!("Vol {} downloaded to {}", vol.vol, file.display());
    Ok(())
}

fn events(c: &Client, follow: bool, json: bool) -> Result<(), String> {
    let print = |event: &Value| {
        if json {
            println!("{event}");
        } else {
            show::event_line(event);
        }
    };
    if !follow {
        for event in c.get("/v1/events")?.as_array().into_iter().flatten() {
            print(event);
        }
        return Ok(());
    }
    // Only what happens from now on, like `virsh event --loop`.
    let last = c.get("/v1/events")?.as_array().and_then(|a| a.last()).and_then(|e| e["seq"].as_u64()).unwrap_or(0);
    let mut pending = c.send("GET", &format!("/v1/events?follow=true&since={last}"), "", Body::None)?;
    if pending.status != 200 {
        let data = pending.next_chunk().ok().flatten().unwrap_or_default();
        return Err(c.refusal(pending.status, &data));
    }
    let mut partial = Vec::new();
    while let Some(chunk) = pending.next_chunk()? {
        partial.extend_from_slice(&chunk);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                print(&event);
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    Ok(())
}
