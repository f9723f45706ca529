//! Talking to one VMM process: the VM configuration ferrod builds from a domain definition, the
//! files of one run, and typed requests on its control socket (`ferro_vmm_api::control`, wire form
//! in docs/vmm-control.md).

use crate::domain::DomainConfig;
use crate::model::{Confinement, Jailer};
use ferro_hypervisor::host_memory::HugePagePool;
use ferro_jail::jail::{Access, Bind, JailSpec};
use ferro_vmm_api::control::{self, Request};
use ferro_vmm_api::{BootConfig, CpuList, DeviceConfig, DeviceKind, DiskFormat, Kernel, MacAddr, MemoryConfig, Pinning, Transport, VmConfig};
use serde::de::DeserializeOwned;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Files of one running domain, under `$FERRO_HOME/run/<uuid>/` (the uuid keeps socket paths short).
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn new(run_root: &Path, uuid: &str) -> RunFiles {
        RunFiles { dir: run_root.join(uuid) }
    }
    /// The one directory of the run a jailed VMM may write: its sockets.
    pub fn vmm_dir(&self) -> PathBuf {
        self.dir.join("vmm")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.vmm_dir().join("api.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.vmm_dir().join("serial.sock")
    }
    /// The jail's description, for the monitor (`ferro_jail::jail::JailSpec`).
    pub fn jail_spec(&self) -> PathBuf {
        self.dir.join("jail.json")
    }
    /// The VMM's root directory when jailed.
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("vmm.stderr")
    }
    /// The cloud-init NoCloud seed volume of a domain with `[cloud_init]` (see `ferro_images::seed`).
    pub fn cloud_init_seed(&self) -> PathBuf {
        self.dir.join("cidata.img")
    }
    /// Written by the monitor when the VMM has finally exited (see `monitor`).
    pub fn exit_report(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    /// The VM's configuration, as JSON, for `ferro vmm --config`.
    pub fn vm_config(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    /// Where a VMM waiting for a VM to migrate in listens (`ferro vmm --incoming`).
    pub fn incoming_socket(&self) -> PathBuf {
        self.vmm_dir().join("incoming.sock")
    }
    /// Where ferrod waits for its VMM's outgoing migration stream, to carry it to the destination
    /// (in the VMM's directory, so a jailed VMM reaches it; see [`RunFiles::give_to_vmm`]).
    pub fn outgoing_socket(&self) -> PathBuf {
        self.vmm_dir().join("outgoing.sock")
    }
    /// Makes a file or directory ferrod made in [`RunFiles::vmm_dir`] the VMM's, like that
    /// directory: a jailed VMM runs as an unprivileged user (docs/isolation.md). A symbolic link
    /// found there (the VMM may write the directory, so it could swap one in) is what changes
    /// owner, never the file it points to.
    pub fn give_to_vmm(&self, path: &Path) -> std::io::Result<()> {
        let owner = std::fs::metadata(self.vmm_dir())?;
        std::os::unix::fs::lchown(path, Some(owner.uid()), Some(owner.gid()))
    }
}

/// Connects to a socket in a VMM's directory without following a symbolic link. A jailed VMM
/// may write that directory; a link it put in place of its own socket, naming another VM's
/// socket by its host path, would otherwise send ferrod's requests for this VM to that one. The
/// name is opened as a path only (`O_PATH | O_NOFOLLOW`: a link is opened as itself), must be a
/// socket, and is connected to through that descriptor, so the socket checked is the one used.
pub async fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let node = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_NOFOLLOW).open(socket)?;
    let kind = node.metadata()?.file_type();
    if !kind.is_socket() {
        let what = if kind.is_symlink() { "a symbolic link" } else { "not a socket" };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is {what}; refusing to connect through it", socket.display()),
        ));
    }
    let stream = UnixStream::connect(format!("/proc/self/fd/{}", node.as_raw_fd())).await;
    drop(node);
    stream
}

/// A disk as handed to the VMM, after pool volumes have been resolved to paths.
pub struct ResolvedDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
}

/// A NIC as handed to the VMM: its tap, its MAC and, for a tap ferrod made and opened, the
/// descriptor number the VMM inherits it on.
#[derive(Debug, Clone, PartialEq)]
pub struct VmNic {
    pub tap: String,
    pub mac: MacAddr,
    pub fd: Option<i32>,
}

/// The kernel, initrd and command line found on a domain's first disk (`[boot] from = "disk"`),
/// copied into its run directory.
pub struct DiskBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// The VM a domain runs: its definition with pool volumes resolved to files (and, with
/// `from = "disk"`, the kernel found on its first disk) and its NICs' taps. Devices come in the
/// order of `disks`: vda, vdb, ... (the definition's disks, then a cloud-init seed), NICs (net0,
/// ...), the balloon.
pub fn vm_config(config: &DomainConfig, disks: &[ResolvedDisk], nics: &[VmNic], disk_boot: Option<&DiskBoot>) -> Result<VmConfig, String> {
    let extra = config.boot.cmdline.clone().unwrap_or_default();
    let (kernel, initrd, cmdline) = match (&config.boot.kernel, &config.boot.guest, disk_boot) {
        (_, _, Some(found)) if config.boot.from_disk() => {
            (Kernel::Path(found.kernel.clone()), found.initrd.clone(), format!("{} {extra}", found.cmdline).trim().to_string())
        }
        (Some(kernel), _, _) => (Kernel::Path(kernel.into()), config.boot.initrd.as_ref().map(PathBuf::from), extra),
        (None, Some(guest), _) => (Kernel::TestGuest(guest.clone()), None, extra),
        _ => return Err("boot: set boot.kernel, boot.from = \"disk\" or boot.guest".to_string()),
    };
    let mut devices: Vec<DeviceKind> = disks
        .iter()
        .map(|d| DeviceKind::Block { path: d.path.clone(), format: Some(d.format), readonly: d.readonly })
        .collect();
    devices.extend(nics.iter().map(|nic| DeviceKind::Net { tap: nic.tap.clone(), mac: Some(nic.mac), fd: nic.fd }));
    if let Some(balloon) = &config.balloon {
        // Empty at start; `setmem` sets the target through the control socket.
        devices.push(DeviceKind::Balloon { size_mib: 0, deflate_on_oom: balloon.deflate_on_oom });
    }
    let vm = VmConfig {
        name: config.name.clone(),
        boot: BootConfig { kernel, initrd, cmdline },
        memory: MemoryConfig { size: config.memory_bytes(), hugepages: config.tuning.hugepages, merge: config.tuning.mem_merge },
        vcpus: u8::try_from(config.vcpus).map_err(|_| format!("vcpus: {} is more than a VM can have", config.vcpus))?,
        devices: DeviceConfig::with_default_ids(devices),
        transport: Transport::Pci,
        // Built-in test guests have the debug-exit port anyway; a domain's kernel never does.
        debug_exit: false,
        pinning: pinning(config)?,
    };
    vm.validate()?;
    Ok(vm)
}

/// The domain's `[tuning]` CPU lists, each checked against the host's online CPUs (a definition
/// may come from another host).
fn pinning(config: &DomainConfig) -> Result<Pinning, String> {
    let tuning = &config.tuning;
    if tuning.vcpu_pin.is_empty() && tuning.emulator_pin.is_none() {
        return Ok(Pinning::default());
    }
    let host = CpuList::host_online()?;
    for (vcpu, cpus) in tuning.vcpu_pin.iter().enumerate() {
        cpus.check_within(&host).map_err(|e| format!("tuning.vcpu_pin[{vcpu}]: {e}"))?;
    }
    if let Some(cpus) = &tuning.emulator_pin {
        cpus.check_within(&host).map_err(|e| format!("tuning.emulator_pin: {e}"))?;
    }
    Ok(Pinning { vcpus: tuning.vcpu_pin.clone(), emulator: tuning.emulator_pin.clone() })
}

/// The `ferro vmm` arguments that run the VM whose configuration is in `files.vm_config()`, with
/// its control and console sockets and the confinement ferrod was told to apply (the monitor adds
/// `--event-fd`).
pub fn vmm_args(files: &RunFiles, confinement: &Confinement) -> Vec<String> {
    let mut args = [
        "vmm".to_string(),
        "--config".to_string(),
        files.vm_config().display().to_string(),
        "--api-socket".to_string(),
        files.api_socket().display().to_string(),
        "--serial-socket".to_string(),
        files.serial_socket().display().to_string(),
    ]
    .to_vec();
    if confinement.seccomp {
        args.push("--seccomp".to_string());
    }
    args
}

/// The devices every jailed VMM may open: KVM, taps by name, randomness, and /dev/null.
const JAIL_DEVICES: [&str; 4] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom", "/dev/null"];

/// RLIMIT_NOFILE of a jailed VMM: a VM's descriptors (vCPUs, queues' event and irq fds, disks,
/// taps, sockets) are a few hundred at most.
const JAIL_MAX_OPEN_FILES: u64 = 4096;

/// The jail of the VMM that runs `vm` (docs/isolation.md, "The jail"): the VMM program, the VM
/// configuration, the run's sockets directory, the domain's snapshot directory (`snapshots`,
/// where the VMM writes memory snapshots; a restore reads `restore`), the host's list of online
/// CPUs, the kernel and initrd, each
/// disk with its backing chain (only the top of a writable disk is writable), a few devices and,
/// for huge-page RAM, the kernel's huge page counters.
pub fn jail_spec(files: &RunFiles, vm: &VmConfig, jailer: &Jailer, snapshots: &Path, restore: Option<&Path>) -> Result<JailSpec, String> {
    let mut binds: Vec<Bind> = jailer.program.iter().map(|path| Bind { path: path.clone(), access: Access::Exec }).collect();
    let mut bind = |path: &Path, access| binds.push(Bind { path: path.to_path_buf(), access });
    bind(&files.vm_config(), Access::Read);
    bind(&files.vmm_dir(), Access::Write);
    bind(snapshots, Access::Write);
    // Pinning checks CPU lists against it.
    bind(Path::new(CpuList::ONLINE), Access::Read);
    if let Some(dir) = restore {
        // The VMM that took the snapshot wrote this directory's parent: a link it put in the
        // snapshot's place would have the jail bind, and hand over, whatever it names.
        let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("snapshot {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("snapshot {} is not a directory (a symbolic link?); refusing to restore from it", dir.display()));
        }
        bind(dir, Access::Read);
    }
    if let Kernel::Path(kernel) = &vm.boot.kernel {
        bind(kernel, Access::Read);
    }
    if let Some(initrd) = &vm.boot.initrd {
        bind(initrd, Access::Read);
    }
    for device in &vm.devices {
        let DeviceKind::Block { path, format, readonly } = &device.kind else { continue };
        let format = format.and_then(|f| ferro_block::Format::from_name(f.name()));
        let chain = ferro_block::ops::info(path, format, true, true).map_err(|e| format!("disk {}: {e}", device.id))?;
        for (depth, image) in chain.iter().enumerate() {
            let block_device = std::fs::metadata(&image.path).is_ok_and(|m| m.file_type().is_block_device());
            let access = match (block_device, depth == 0 && !readonly) {
                (true, _) => Access::Device,
                (false, true) => Access::Write,
                (false, false) => Access::Read,
            };
            bind(&image.path, access);
        }
    }
    for device in JAIL_DEVICES {
        bind(Path::new(device), Access::Device);
    }
    if vm.memory.hugepages {
        bind(Path::new(HugePagePool::DIR), Access::Read);
    }
    // /dev/kvm is usually root:kvm 0660: the VMM user needs its group.
    let kvm = std::fs::metadata(JAIL_DEVICES[0]).map_err(|e| format!("{}: {e}", JAIL_DEVICES[0]))?;
    let groups = if kvm.mode() & 0o006 == 0o006 { Vec::new() } else { vec![kvm.gid()] };
    Ok(JailSpec {
        root: files.jail_root(),
        uid: jailer.user.uid,
        gid: jailer.user.gid,
        groups,
        binds,
        max_open_files: JAIL_MAX_OPEN_FILES,
    })
}

/// Sends one request on a fresh connection to the VMM's control socket and returns its typed
/// reply; an error is one line for the caller (the VMM's own message when it refused).
pub async fn call<R: DeserializeOwned>(socket: &Path, request: &Request, timeout: Duration) -> Result<R, String> {
    call_peer(socket, request, timeout).await.map(|(reply, _)| reply)
}

/// The process a VMM's `info` is from, and its answer. The pid is the kernel's word (the
/// credentials of the process listening on the socket), not the pid the VMM reports about
/// itself, which a compromised VMM could make any process's.
pub async fn info(socket: &Path, timeout: Duration) -> Result<(control::InfoReply, i32), String> {
    let (reply, pid) = call_peer::<control::InfoReply>(socket, &Request::Info, timeout).await?;
    let pid = pid.ok_or_else(|| format!("{}: the kernel did not say which process listens there", socket.display()))?;
    if u64::from(reply.pid) != pid as u64 {
        tracing::warn!(socket = %socket.display(), reported = reply.pid, pid, "a VMM reported another pid than its own");
    }
    Ok((reply, pid))
}

/// [`call`], also giving the pid of the process that listens on the socket.
async fn call_peer<R: DeserializeOwned>(socket: &Path, request: &Request, timeout: Duration) -> Result<(R, Option<i32>), String> {
    let op = request.op();
    let exchange = async {
        let mut stream = connect(socket).await.map_err(|e| format!("cannot connect to VMM: {e}"))?;
        let pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let mut line = serde_json::to_string(request).map_err(|e| format!("cannot encode `{op}`: {e}"))?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(|e| format!("VMM control socket: {e}"))?;
        let mut reader = BufReader::new(stream).take(control::MAX_LINE as u64);
        let mut answer = String::new();
        let n = reader.read_line(&mut answer).await.map_err(|e| format!("VMM control socket: {e}"))?;
        if n == 0 {
            return Err("VMM closed the control socket without answering".to_string());
        }
        Ok((answer, pid))
    };
    let (answer, pid) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("VMM did not answer `{op}` within {} ms", timeout.as_millis()))??;
    let reply = control::decode_reply(&answer).map_err(|e| format!("`{op}` on the VMM failed: {e}"))?;
    Ok((reply, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_becomes_one_vm_config_and_its_command_line() {
        let text = "name = \"web\"\nmemory = \"1.5G\"\nvcpus = 2\n[boot]\nkernel = \"/k\"\ninitrd = \"/i\"\ncmdline = \"console=ttyS0\"\n\
                    [[nic]]\ntap = \"tap0\"\nmac = \"52:54:00:00:00:07\"\n[balloon]\ndeflate_on_oom = true\n";
        let config = DomainConfig::parse(text).unwrap();
        let disks = [
            ResolvedDisk { path: "/pool/a.qcow2".into(), format: DiskFormat::Qcow2, readonly: false },
            ResolvedDisk { path: "/iso/b.raw".into(), format: DiskFormat::Raw, readonly: true },
        ];
        let nics = [VmNic { tap: "fvtap0".into(), mac: "52:54:00:00:00:07".parse().unwrap(), fd: Some(9) }];
        let vm = vm_config(&config, &disks, &nics, None).unwrap();
        assert_eq!((vm.name.as_str(), vm.vcpus, vm.memory.size), ("web", 2, 3 << 29));
        assert!(!vm.memory.hugepages && !vm.memory.merge);
        let tuned = DomainConfig::parse(&format!("{text}[tuning]\nmem_merge = true\n")).unwrap();
        assert_eq!(vm_config(&tuned, &disks, &nics, None).unwrap().memory, MemoryConfig { size: 3 << 29, hugepages: false, merge: true });
        let pinned = DomainConfig::parse(&format!("{text}[tuning]\nvcpu_pin = [\"1\", \"0-1\"]\nemulator_pin = \"0\"\n")).unwrap();
        let pinning = vm_config(&pinned, &disks, &nics, None).unwrap().pinning;
        assert_eq!((pinning.vcpus[1].to_string(), pinning.emulator.map(|c| c.to_string())), ("0-1".to_string(), Some("0".to_string())));
        let elsewhere = DomainConfig::parse(&format!("{text}[tuning]\nvcpu_pin = [\"0\", \"1000\"]\n")).unwrap();
        assert_eq!(
            vm_config(&elsewhere, &disks, &nics, None).unwrap_err(),
            format!("tuning.vcpu_pin[1]: CPU list '1000': this host has no CPU 1000 (its CPUs are {})", CpuList::host_online().unwrap())
        );
        assert_eq!(vm.devices[2].kind, DeviceKind::Net { tap: "fvtap0".into(), mac: Some(nics[0].mac), fd: Some(9) });
        assert_eq!(vm.boot.kernel, Kernel::Path("/k".into()));
        let ids: Vec<&str> = vm.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["vda", "vdb", "net0", "balloon0"]);
        // The JSON form is what `ferro vmm --config` reads.
        let json = serde_json::to_string(&vm).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), vm);

        let files = RunFiles::new(Path::new("/run"), "u");
        assert_eq!(
            vmm_args(&files, &Confinement { seccomp: false, jail: None, allowed_paths: Vec::new() }).join(" "),
            "vmm --config /run/u/vm.json --api-socket /run/u/vmm/api.sock --serial-socket /run/u/vmm/serial.sock"
        );
        assert_eq!(vmm_args(&files, &Confinement { seccomp: true, jail: None, allowed_paths: Vec::new() }).last().unwrap(), "--seccomp");

        let guest = DomainConfig::parse("name = \"t\"\nmemory = \"64M\"\n[boot]\nguest = \"idle\"\n").unwrap();
        let vm = vm_config(&guest, &[], &[], None).unwrap();
        assert_eq!(vm.boot.kernel, Kernel::TestGuest("idle".into()));
        assert!(vm.debug_exit_enabled(), "test guests report through the debug-exit port");
    }

    #[test]
    fn a_disk_boot_takes_the_found_kernel_and_appends_the_cmdline() {
        let text = "name = \"d\"\nmemory = \"1G\"\n[boot]\nfrom = \"disk\"\ncmdline = \"ferro.cmd=true\"\n[[disk]]\npath = \"/d.qcow2\"\nformat = \"qcow2\"\n";
        let config = DomainConfig::parse(text).unwrap();
        let disks = [ResolvedDisk { path: "/d.qcow2".into(), format: DiskFormat::Qcow2, readonly: false }];
        assert!(vm_config(&config, &disks, &[], None).is_err(), "nothing found, nothing to boot");
        let found = DiskBoot { kernel: "/run/u/kernel".into(), initrd: Some("/run/u/initrd".into()), cmdline: "root=/dev/vda1 ro".into() };
        let vm = vm_config(&config, &disks, &[], Some(&found)).unwrap();
        assert_eq!(vm.boot.kernel, Kernel::Path("/run/u/kernel".into()));
        assert_eq!(vm.boot.initrd, Some(PathBuf::from("/run/u/initrd")));
        assert_eq!(vm.boot.cmdline, "root=/dev/vda1 ro ferro.cmd=true");
        for (from, to, key) in [
            ("from = \"disk\"", "from = \"net\"", "boot.from"),
            ("cmdline", "kernel = \"/k\"\ncmdline", "boot.kernel"),
            ("[[disk]]\npath = \"/d.qcow2\"\nformat = \"qcow2\"\n", "", "boot.from"),
        ] {
            assert_eq!(DomainConfig::parse(&text.replace(from, to)).unwrap_err().key, key, "{from} -> {to}");
        }
    }
}
