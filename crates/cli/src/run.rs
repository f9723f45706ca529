//! `ferro run`: boot one VM in the foreground, console on the terminal, no daemon.

use ferro_hypervisor::Hypervisor;
use ferro_vmm::console::FdWriter;
use ferro_vmm::serial_socket::SerialHub;
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
        Ok((VmConfig { kernel, initrd: self.initrd, cmdline: self.cmdline, memory: self.memory, vcpus: self.cpus }, fd))
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

pub fn run(args: RunArgs) -> ExitCode {
    let (config, _guest_fd) = match args.vm.config() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(&e.to_string()),
    };
    finish(ferro_vmm::run_foreground(&hv, config))
}

pub fn vmm(args: VmmArgs) -> ExitCode {
    let (config, _guest_fd) = match args.vm.config() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(&e.to_string()),
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
