//! `ferro run`: boot one VM in the foreground, console on the terminal, no daemon.

use ferro_hypervisor::Hypervisor;
use ferro_vmm::console::FdWriter;
use ferro_vmm::serial_socket::SerialHub;
use ferro_vmm::{EventSink, ExitReason, RunOptions, Start, VmBuilder};
use ferro_vmm_api::{
    BootConfig, ConsoleBackend, DeviceConfig, DeviceKind, DiskFormat, Kernel, MacAddr, MemoryConfig, Transport, VmConfig, VmEvent, parse_size,
};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Start the VM saved in this snapshot directory (docs/snapshot-format.md) instead of
    /// booting one: it continues where it was saved, with the devices it had.
    #[arg(long, value_name = "DIR", conflicts_with = "VmArgs")]
    restore: Option<PathBuf>,
    /// Run every VMM thread under its seccomp allowlist (docs/isolation.md); a call outside it
    /// kills the VMM with SIGSYS.
    #[arg(long)]
    seccomp: bool,
}

/// `ferro vmm`: the VMM process ferrod supervises (docs/vmm-control.md). Same VM flags as `run`,
/// or the whole VM as one JSON file.
#[derive(clap::Args)]
pub struct VmmArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// The VM as a JSON `VmConfig` (ferro-vmm-api) instead of the VM flags.
    #[arg(long, value_name = "FILE", conflicts_with = "VmArgs")]
    config: Option<PathBuf>,
    /// Start the VM saved in this snapshot directory (docs/snapshot-format.md) instead of
    /// booting one; its configuration comes from the snapshot. With --config too, that file must
    /// describe the same VM and gives its host wiring: the NICs' taps and inherited descriptors,
    /// and what a guest reset boots.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["VmArgs", "name"])]
    restore: Option<PathBuf>,
    /// With --restore: keep the restored VM paused until a `resume` request.
    #[arg(long, requires = "restore")]
    paused: bool,
    /// Receive the VM from a migrating VMM (docs/migration.md) on `unix:PATH` or
    /// `tcp:HOST:PORT` (listens there for one connection) or `fd:N` (an inherited connected
    /// unix socket), instead of booting one. With --config too, that file must describe the
    /// same VM and gives its host wiring, as with --restore.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["VmArgs", "name", "restore"])]
    incoming: Option<String>,
    /// Run every VMM thread under its seccomp allowlist (docs/isolation.md); a call outside it
    /// kills the VMM with SIGSYS.
    #[arg(long)]
    seccomp: bool,
    /// Serve the control protocol on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serve the serial console on this unix socket.
    #[arg(long)]
    serial_socket: Option<PathBuf>,
    /// Write events (started, device needs reset, exited) as JSON lines to this inherited fd.
    #[arg(long, value_name = "FD")]
    event_fd: Option<i32>,
    /// Domain name, reported by the control socket.
    #[arg(long, default_value = "", conflicts_with = "config")]
    name: String,
}

/// The flags that describe a VM.
#[derive(clap::Args)]
struct VmArgs {
    /// Kernel to boot: ELF vmlinux (PVH note or 64-bit boot protocol) or bzImage.
    #[arg(long, conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// Boot a built-in test guest instead of a kernel file (see `ferro test-guest list`).
    #[arg(long)]
    guest: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory: a size (512M, 512MiB, 1.5G, 2T; plain numbers are bytes) or
    /// size=SIZE[,hugepages=on][,merge=on] (2 MiB huge pages; mergeable by KSM).
    #[arg(long, default_value = "256M", value_name = "SIZE|OPTIONS", value_parser = memory_config)]
    memory: MemoryConfig,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Add a virtio-rng device; `--rng rate=BYTES` limits it to BYTES per second.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    rng: Option<String>,
    /// Add a virtio disk: path=FILE[,format=raw|qcow2][,readonly=on]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<String>,
    /// Add a virtio NIC on a tap: tap=NAME[,mac=52:54:00:12:34:56]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<String>,
    /// Add a virtio-console port: `--console` (this terminal), `--console pty`, `--console socket=PATH`.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    console: Option<String>,
    /// Add a memory balloon: size=SIZE (memory to take back from the guest: MiB, or 16M, 1G)[,deflate_on_oom=on].
    #[arg(long, value_name = "OPTIONS")]
    balloon: Option<String>,
    /// Add a vsock device: cid=N,uds=PATH (Firecracker's host-side convention).
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// How virtio devices attach: pci (modern virtio-pci with MSI-X) or mmio (described in ACPI).
    #[arg(long, value_enum, default_value_t = TransportArg::Pci)]
    transport: TransportArg,
    /// Add QEMU's isa-debug-exit port (0xf4), through which a test guest ends the VMM with a
    /// status of its choosing (always there for --guest).
    #[arg(long)]
    debug_exit: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    Mmio,
    Pci,
}

fn on_off(flag: &str, key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("--{flag} {key}: '{v}' is not on or off")),
    }
}

/// Splits "key=value,key=value" device options, refusing keys not in `known`.
pub(crate) fn device_options(flag: &str, spec: &str, known: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("--{flag}: '{part}' is not key=value"))?;
        if !known.contains(&k) {
            return Err(format!("--{flag}: unknown option '{k}' (known: {})", known.join(", ")));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// `--memory`: a plain size, or size=SIZE with hugepages and merge switches.
fn memory_config(spec: &str) -> Result<MemoryConfig, String> {
    if !spec.contains('=') {
        return parse_size(spec).map(MemoryConfig::new);
    }
    let mut size = None;
    let mut config = MemoryConfig::new(0);
    for (k, v) in device_options("memory", spec, &["size", "hugepages", "merge"])? {
        match k.as_str() {
            "size" => size = Some(parse_size(&v).map_err(|e| format!("size: {e}"))?),
            "hugepages" => config.hugepages = on_off("memory", "hugepages", &v)?,
            _ => config.merge = on_off("memory", "merge", &v)?,
        }
    }
    config.size = size.ok_or("size=SIZE is required")?;
    Ok(config)
}

/// A balloon size: a plain number is MiB (as before sizes took suffixes), else a size that is a
/// whole number of MiB.
fn balloon_mib(v: &str) -> Result<u64, String> {
    if let Ok(mib) = v.parse::<u64>() {
        return Ok(mib);
    }
    let bytes = parse_size(v).map_err(|_| format!("--balloon size: {v:?} is not a number of MiB or a size like 16M or 1G"))?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("--balloon size: {v} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

impl VmArgs {
    /// The VM configuration these flags describe (`name` as given by `ferro vmm --name`).
    fn config(self, name: String) -> Result<VmConfig, String> {
        let kernel = match self.kernel {
            Some(k) => Kernel::Path(k),
            None => Kernel::TestGuest(self.guest.unwrap_or_else(|| "hello".into())),
        };
        let mut devices = Vec::new();
        if let Some(spec) = &self.rng {
            let mut rate = None;
            for (k, v) in device_options("rng", spec, &["rate"])? {
                if k == "rate" {
                    let r = parse_size(&v).map_err(|e| format!("--rng rate: {e}"))?;
                    if r == 0 {
                        return Err("--rng rate: must be at least 1 byte per second".into());
                    }
                    rate = Some(r);
                }
            }
            devices.push(DeviceKind::Rng { rate });
        }
        for spec in &self.disk {
            let mut path = None;
            let mut format = None;
            let mut readonly = false;
            for (k, v) in device_options("disk", spec, &["path", "format", "readonly"])? {
                match k.as_str() {
                    "path" => path = Some(PathBuf::from(v)),
                    "format" => format = Some(DiskFormat::from_name(&v).ok_or_else(|| format!("--disk format: '{v}' is not raw or qcow2"))?),
                    _ => readonly = on_off("disk", "readonly", &v)?,
                }
            }
            let path = path.ok_or("--disk: path=FILE is required")?;
            devices.push(DeviceKind::Block { path, format, readonly });
        }
        for spec in &self.net {
            let mut tap = None;
            let mut mac = None;
            for (k, v) in device_options("net", spec, &["tap", "mac"])? {
                match k.as_str() {
                    "tap" if !v.is_empty() && v.len() < 16 => tap = Some(v),
                    "tap" => return Err(format!("--net tap: '{v}' is not a valid interface name (1 to 15 bytes)")),
                    _ => mac = Some(v.parse::<MacAddr>().map_err(|e| format!("--net mac: {e}"))?),
                }
            }
            devices.push(DeviceKind::Net { tap: tap.ok_or("--net: tap=NAME is required")?, mac, fd: None });
        }
        if let Some(spec) = &self.console {
            let backend = match spec.as_str() {
                "" => ConsoleBackend::Stdio,
                "pty" => ConsoleBackend::Pty,
                other => match other.strip_prefix("socket=") {
                    Some(p) if !p.is_empty() => ConsoleBackend::Socket(PathBuf::from(p)),
                    _ => return Err(format!("--console: '{other}' is not pty or socket=PATH")),
                },
            };
            devices.push(DeviceKind::Console { backend });
        }
        if let Some(spec) = &self.balloon {
            let mut size_mib = 0;
            let mut deflate_on_oom = false;
            for (k, v) in device_options("balloon", spec, &["size", "deflate_on_oom"])? {
                match k.as_str() {
                    "size" => size_mib = balloon_mib(&v)?,
                    _ => deflate_on_oom = on_off("balloon", "deflate_on_oom", &v)?,
                }
            }
            devices.push(DeviceKind::Balloon { size_mib, deflate_on_oom });
        }
        if let Some(spec) = &self.vsock {
            let mut cid = None;
            let mut uds = None;
            for (k, v) in device_options("vsock", spec, &["cid", "uds"])? {
                match k.as_str() {
                    "cid" => cid = Some(v.parse::<u64>().ok().filter(|c| *c >= 3 && *c < u64::from(u32::MAX)).ok_or_else(|| {
                        format!("--vsock cid: '{v}' must be a number from 3 to 4294967294 (0-2 are reserved)")
                    })?),
                    _ => uds = Some(PathBuf::from(v)),
                }
            }
            let cid = cid.ok_or("--vsock: cid=N is required")?;
            devices.push(DeviceKind::Vsock { cid, uds: uds.ok_or("--vsock: uds=PATH is required")? });
        }
        let transport = match self.transport {
            TransportArg::Mmio => Transport::Mmio,
            TransportArg::Pci => Transport::Pci,
        };
        Ok(VmConfig {
            name,
            boot: BootConfig { kernel, initrd: self.initrd, cmdline: self.cmdline },
            memory: self.memory,
            vcpus: self.cpus,
            devices: DeviceConfig::with_default_ids(devices),
            transport,
            debug_exit: self.debug_exit,
            pinning: Default::default(),
        })
    }
}

/// Reads a JSON `VmConfig` file; the error names the file and what was wrong.
fn read_config(path: &std::path::Path) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

fn finish(result: ferro_vmm::Result<ExitReason>) -> ExitCode {
    match result {
        Ok(ExitReason::Error(msg)) => fail(&msg),
        Ok(ExitReason::Reset) => {
            eprintln!("ferro: guest reset");
            ExitCode::SUCCESS
        }
        Ok(reason) => ExitCode::from(reason.status() as u8),
        Err(e) => fail(&e.to_string()),
    }
}

pub fn run(args: RunArgs) -> ExitCode {
    if args.seccomp
        && let Err(e) = ferro_jail::seccomp::enable()
    {
        return fail(&e);
    }
    let start = match &args.restore {
        Some(dir) => Start::Restore(dir),
        None => match args.vm.config(String::new()) {
            Ok(c) => Start::Boot(c),
            Err(e) => return fail(&e),
        },
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(&e.to_string()),
    };
    finish(ferro_vmm::run_foreground(&hv, start))
}

/// Where `ferro vmm`'s VM comes from.
enum VmmStart<'a> {
    /// Booted or restored here.
    Here(Start<'a>),
    /// Received from a migrating VMM on this `--incoming` address; a configuration given along
    /// is its wiring on this host.
    Incoming(&'a str, Option<VmConfig>),
}

pub fn vmm(args: VmmArgs) -> ExitCode {
    let events = match args.event_fd.map(EventSink::from_fd).transpose() {
        Ok(sink) => sink.unwrap_or_else(EventSink::none),
        Err(e) => return fail(&e),
    };
    // Every way out after this point is reported, so a supervisor reading events learns why.
    let failed = |msg: String| {
        events.emit(&VmEvent::Exited { reason: ExitReason::Error(msg.clone()) });
        fail(&msg)
    };
    if args.seccomp
        && let Err(e) = ferro_jail::seccomp::enable()
    {
        return failed(e);
    }
    let start = match (&args.incoming, &args.restore, &args.config) {
        (Some(spec), _, None) => Ok(VmmStart::Incoming(spec, None)),
        (Some(spec), _, Some(path)) => read_config(path).map(|wiring| VmmStart::Incoming(spec, Some(wiring))),
        (None, Some(dir), None) => Ok(VmmStart::Here(Start::Restore(dir))),
        (None, Some(dir), Some(path)) => read_config(path).map(|config| VmmStart::Here(Start::RestoreRewired(dir, config))),
        (None, None, Some(path)) => read_config(path).map(|config| VmmStart::Here(Start::Boot(config))),
        (None, None, None) => args.vm.config(args.name).map(|config| VmmStart::Here(Start::Boot(config))),
    };
    let start = match start {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return failed(e.to_string()),
    };
    // With a console socket the output lives there (and in its replay buffer); stdout is then
    // left to the VMM's own messages so a supervisor's log does not grow with guest output.
    let echo: Option<Box<dyn std::io::Write + Send>> =
        if args.serial_socket.is_some() { None } else { Some(Box::new(FdWriter(1))) };
    let hub = SerialHub::new(echo);
    let builder = VmBuilder::new(&hv).serial_out(hub.writer()).events(events.clone());
    let built = match start {
        VmmStart::Here(start) => builder.build(start),
        VmmStart::Incoming(spec, wiring) => ferro_vmm::migration::receive(builder, spec, wiring.as_ref()),
    };
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => return failed(e.to_string()),
    };
    if let Some(path) = &args.serial_socket {
        if let Err(e) = hub.serve(path, vm.serial()) {
            return failed(format!("serial socket {}: {e}", path.display()));
        }
    }
    // Supervised VMMs tear KVM down themselves: when the process is gone, so is the VM, which
    // is what ferrod's accounting (and its leak tests) rely on.
    // A migrated VM's vCPUs are already in the state its source had them in.
    let paused = args.paused || args.incoming.is_some();
    let opts = RunOptions { interactive: false, api_socket: args.api_socket.clone(), exiting: false, paused };
    let status = finish(vm.run(&opts));
    for p in [&args.api_socket, &args.serial_socket].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    status
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("ferro: {msg}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        Run(RunArgs),
        Vmm(VmmArgs),
    }

    fn run_config(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(["ferro", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Cmd::Run(run) = cli.cmd else { unreachable!() };
        run.vm.config(String::new())
    }

    #[test]
    fn sizes_take_the_shared_grammar() {
        assert_eq!(run_config(&["--memory", "1.5G"]).unwrap().memory.size, 3 << 29);
        assert_eq!(run_config(&["--memory", "512MiB"]).unwrap().memory.size, 512 << 20);
        assert!(run_config(&["--memory", "12Q"]).unwrap_err().contains("suffix"));
        let memory = |spec: &str| run_config(&["--memory", spec]).map(|c| c.memory);
        assert_eq!(memory("size=512M,hugepages=on"), Ok(MemoryConfig { size: 512 << 20, hugepages: true, merge: false }));
        assert_eq!(memory("merge=on,size=1G"), Ok(MemoryConfig { size: 1 << 30, hugepages: false, merge: true }));
        assert!(memory("hugepages=on").unwrap_err().contains("size=SIZE is required"));
        assert!(memory("size=1G,hugepages=maybe").unwrap_err().contains("'maybe' is not on or off"));
        assert!(memory("size=1G,numa=0").unwrap_err().contains("unknown option 'numa'"));
        let balloon = |spec: &str| match run_config(&["--balloon", spec]) {
            Ok(c) => match &c.devices[0].kind {
                DeviceKind::Balloon { size_mib, .. } => Ok(*size_mib),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e),
        };
        assert_eq!(balloon("size=16M"), Ok(16));
        assert_eq!(balloon("size=32"), Ok(32), "a plain number is MiB");
        assert_eq!(balloon("size=1G"), Ok(1024));
        assert!(balloon("size=1536K").unwrap_err().contains("whole number of MiB"));
        assert!(balloon("size=lots").unwrap_err().contains("not a number of MiB"));
        let rng = run_config(&["--rng", "rate=1.5K"]).unwrap();
        assert_eq!(rng.devices[0].kind, DeviceKind::Rng { rate: Some(1536) });
    }

    #[test]
    fn flags_become_one_config_with_linux_device_names() {
        let c = run_config(&[
            "--guest", "idle", "--disk", "path=/a.qcow2,format=qcow2", "--disk", "path=/b,readonly=on", "--net", "tap=t0,mac=52:54:00:AB:CD:EF",
            "--rng", "--cpus", "2",
        ])
        .unwrap();
        let ids: Vec<&str> = c.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["rng0", "vda", "vdb", "net0"]);
        assert_eq!(c.boot.kernel, Kernel::TestGuest("idle".into()));
        assert!(c.debug_exit_enabled(), "test guests have the debug-exit port");
        assert_eq!(c.devices[3].kind, DeviceKind::Net { tap: "t0".into(), mac: Some("52:54:00:ab:cd:ef".parse().unwrap()), fd: None });
        let file = run_config(&["--kernel", "/vmlinux"]).unwrap();
        assert!(!file.debug_exit_enabled(), "a kernel file gets no debug-exit port unless asked");
        assert!(run_config(&["--kernel", "/vmlinux", "--debug-exit"]).unwrap().debug_exit_enabled());
    }

    #[test]
    fn vmm_config_file_excludes_the_vm_flags() {
        let parse = |args: &[&str]| Cli::try_parse_from(["ferro", "vmm"].iter().chain(args)).map(|_| ()).map_err(|e| e.to_string());
        parse(&["--config", "/c.json", "--api-socket", "/a.sock", "--event-fd", "3"]).unwrap();
        assert!(parse(&["--config", "/c.json", "--memory", "1G"]).unwrap_err().contains("cannot be used with"));
        assert!(parse(&["--config", "/c.json", "--guest", "idle"]).unwrap_err().contains("cannot be used with"));
        assert!(parse(&["--config", "/c.json", "--name", "x"]).unwrap_err().contains("cannot be used with"));
    }
}
