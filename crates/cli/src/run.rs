//! `ferro run`: boot one VM in the foreground, console on the terminal, no daemon.

use ferro_hypervisor::Hypervisor;
use ferro_vmm::console::FdWriter;
use ferro_vmm::serial_socket::SerialHub;
use ferro_vmm::virtio::{ConsoleBackend, Transport, VirtioConfig};
use ferro_vmm::{ExitReason, RunOptions, Vm, VmConfig};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
}

/// `ferro vmm`: the VMM process ferrod supervises (docs/vmm-control.md). Same VM flags as `run`.
#[derive(clap::Args)]
pub struct VmmArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Serve the control protocol on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serve the serial console on this unix socket.
    #[arg(long)]
    serial_socket: Option<PathBuf>,
    /// Domain name, reported by the control socket.
    #[arg(long, default_value = "")]
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
    /// Guest memory, with a K, M or G suffix (plain numbers are bytes).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
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
    /// Add a memory balloon: size=MIB (memory to take back from the guest)[,deflate_on_oom=on].
    #[arg(long, value_name = "OPTIONS")]
    balloon: Option<String>,
    /// Add a vsock device: cid=N,uds=PATH (Firecracker's host-side convention).
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// How virtio devices attach: pci (modern virtio-pci with MSI-X) or mmio (described in ACPI).
    #[arg(long, value_enum, default_value_t = TransportArg::Pci)]
    transport: TransportArg,
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

fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let bad = || format!("--net mac: '{v}' is not a MAC address like 52:54:00:12:34:56");
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("--net mac: '{v}' is a multicast address"));
    }
    Ok(mac)
}

/// Splits "key=value,key=value" device options, refusing keys not in `known`.
fn device_options(flag: &str, spec: &str, known: &[&str]) -> Result<Vec<(String, String)>, String> {
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

/// Parses "256M", "1G", "65536K", "1048576".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size (examples: 256M, 2G)"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size suffix '{suffix}' in '{s}': use K, M, G or T")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

/// Writes a built-in guest into an anonymous memory file and returns a path to it.
fn builtin_guest_path(name: &str) -> Result<(PathBuf, OwnedFd), String> {
    let image = ferro_guests::get(name).ok_or_else(|| {
        let names: Vec<&str> = ferro_guests::names().collect();
        format!("no built-in guest named '{name}'; available: {}", names.join(", "))
    })?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferro-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned.try_clone().map_err(|e| e.to_string())?);
    file.write_all(image).map_err(|e| format!("writing the guest image: {e}"))?;
    Ok((PathBuf::from(format!("/proc/self/fd/{fd}")), owned))
}

impl VmArgs {
    /// The VM configuration; the returned fd keeps a built-in guest's memory file open.
    fn config(self) -> Result<(VmConfig, Option<OwnedFd>), String> {
        let (kernel, fd) = match self.kernel {
            Some(k) => (k, None),
            None => {
                let (p, fd) = builtin_guest_path(self.guest.as_deref().unwrap_or("hello"))?;
                (p, Some(fd))
            }
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
            devices.push(VirtioConfig::Rng { rate });
        }
        for spec in &self.disk {
            let mut path = None;
            let mut format = None;
            let mut readonly = false;
            for (k, v) in device_options("disk", spec, &["path", "format", "readonly"])? {
                match k.as_str() {
                    "path" => path = Some(PathBuf::from(v)),
                    "format" if v == "raw" || v == "qcow2" => format = Some(v),
                    "format" => return Err(format!("--disk format: '{v}' is not raw or qcow2")),
                    _ => readonly = on_off("disk", "readonly", &v)?,
                }
            }
            let path = path.ok_or("--disk: path=FILE is required")?;
            devices.push(VirtioConfig::Block { path, format, readonly });
        }
        for spec in &self.net {
            let mut tap = None;
            let mut mac = None;
            for (k, v) in device_options("net", spec, &["tap", "mac"])? {
                match k.as_str() {
                    "tap" if !v.is_empty() && v.len() < 16 => tap = Some(v),
                    "tap" => return Err(format!("--net tap: '{v}' is not a valid interface name (1 to 15 bytes)")),
                    _ => mac = Some(parse_mac(&v)?),
                }
            }
            devices.push(VirtioConfig::Net { tap: tap.ok_or("--net: tap=NAME is required")?, mac });
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
            devices.push(VirtioConfig::Console { backend });
        }
        if let Some(spec) = &self.balloon {
            let mut size_mib = 0;
            let mut deflate_on_oom = false;
            for (k, v) in device_options("balloon", spec, &["size", "deflate_on_oom"])? {
                match k.as_str() {
                    "size" => size_mib = v.parse().map_err(|_| format!("--balloon size: '{v}' is not a number of MiB"))?,
                    _ => deflate_on_oom = on_off("balloon", "deflate_on_oom", &v)?,
                }
            }
            devices.push(VirtioConfig::Balloon { size_mib, deflate_on_oom });
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
            devices.push(VirtioConfig::Vsock { cid, uds: uds.ok_or("--vsock: uds=PATH is required")? });
        }
        let transport = match self.transport {
            TransportArg::Mmio => Transport::Mmio,
            TransportArg::Pci => Transport::Pci,
        };
        let config = VmConfig { kernel, initrd: self.initrd, cmdline: self.cmdline, memory: self.memory, vcpus: self.cpus, devices, transport };
        Ok((config, fd))
    }
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

/// The VM configuration and an open /dev/kvm, or the exit code of the one-line error. The fd
/// keeps a built-in guest's memory file open.
fn prepare(vm: VmArgs) -> Result<(VmConfig, Option<OwnedFd>, Hypervisor), ExitCode> {
    let (config, fd) = vm.config().map_err(|e| fail(&e))?;
    let hv = Hypervisor::open().map_err(|e| fail(&e.to_string()))?;
    Ok((config, fd, hv))
}

pub fn run(args: RunArgs) -> ExitCode {
    let (config, _guest_fd, hv) = match prepare(args.vm) {
        Ok(p) => p,
        Err(code) => return code,
    };
    finish(ferro_vmm::run_foreground(&hv, config))
}

pub fn vmm(args: VmmArgs) -> ExitCode {
    let (config, _guest_fd, hv) = match prepare(args.vm) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // With a console socket the output lives there (and in its replay buffer); stdout is then
    // left to the VMM's own messages so a supervisor's log does not grow with guest output.
    let echo: Option<Box<dyn std::io::Write + Send>> =
        if args.serial_socket.is_some() { None } else { Some(Box::new(FdWriter(1))) };
    let hub = SerialHub::new(echo);
    let vm = match Vm::new(&hv, config, hub.writer()) {
        Ok(vm) => vm,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(path) = &args.serial_socket {
        if let Err(e) = hub.serve(path, vm.serial()) {
            return fail(&format!("serial socket {}: {e}", path.display()));
        }
    }
    // Supervised VMMs tear KVM down themselves: when the process is gone, so is the VM, which
    // is what ferrod's accounting (and its leak tests) rely on.
    let opts = RunOptions { interactive: false, api_socket: args.api_socket.clone(), name: args.name, exiting: false };
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
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999G").unwrap_err().contains("too large"));
    }
}
