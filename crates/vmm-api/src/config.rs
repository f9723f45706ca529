//! [`VmConfig`]: everything the VMM needs to build a VM, in one serde type.
//!
//! `ferro run` fills it from flags, `ferrod` from a domain definition (and hands it to `ferro vmm
//! --config FILE`), and the VMM's builder consumes it. Paths are resolved by whoever builds the
//! config; the VMM opens exactly what it is given. [`VmConfig::validate`] checks what can be
//! checked without touching the host, so every producer refuses the same things the same way.

use crate::cpulist::CpuList;
use crate::mac::MacAddr;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;

/// Most vCPUs one VM may have (the vCPU index is a u8 in the MADT).
pub const MAX_VCPUS: u8 = 255;
/// Smallest guest RAM accepted: the boot tables and a test guest fit in less, Linux needs more.
pub const MIN_MEMORY: u64 = 2 << 20;

/// One virtual machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The domain name (used in log lines and `info`); empty for `ferro run`.
    #[serde(default)]
    pub name: String,
    pub boot: BootConfig,
    pub memory: MemoryConfig,
    pub vcpus: u8,
    /// Virtio devices, in the order they appear to the guest.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub transport: Transport,
    /// QEMU's isa-debug-exit port (0xf4), which lets the guest end the VMM with a status of its
    /// choosing: for test guests only. Always on for a [`Kernel::TestGuest`].
    #[serde(default)]
    pub debug_exit: bool,
    /// Host CPUs the VMM's threads run on (any when not given).
    #[serde(default, skip_serializing_if = "Pinning::is_empty")]
    pub pinning: Pinning,
}

/// CPU affinity of the VMM's threads (libvirt's `vcpupin` and `emulatorpin`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinning {
    /// `vcpus[i]`: the host CPUs of vCPU i's thread; vCPUs past the end are not pinned.
    #[serde(default)]
    pub vcpus: Vec<CpuList>,
    /// The host CPUs of every other thread (main loop, device workers, sockets).
    #[serde(default)]
    pub emulator: Option<CpuList>,
}

impl Pinning {
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty() && self.emulator.is_none()
    }
}

/// What the guest boots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    pub kernel: Kernel,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// A kernel file: ELF vmlinux (PVH note or 64-bit boot protocol) or bzImage.
    Path(PathBuf),
    /// A test guest built into `ferro` (`ferro test-guest list`).
    TestGuest(String),
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
    /// Back RAM with 2 MiB huge pages (hugetlb).
    #[serde(default)]
    pub hugepages: bool,
    /// Mark RAM mergeable for KSM.
    #[serde(default)]
    pub merge: bool,
}

impl MemoryConfig {
    pub fn new(size: u64) -> MemoryConfig {
        MemoryConfig { size, hugepages: false, merge: false }
    }
}

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// virtio-mmio windows described in the DSDT.
    Mmio,
    /// The default: modern virtio-pci with MSI-X, what stock guests expect.
    #[default]
    Pci,
}

/// One virtio device and the name it is known by (`vda`, `net0`, ...): in stats, in saved
/// state, and in requests that address a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: String,
    pub kind: DeviceKind,
}

/// Image formats a virtio disk can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    pub fn from_name(name: &str) -> Option<DiskFormat> {
        match name {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }
}

/// The kinds of virtio device and their settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceKind {
    /// Entropy from the host; `rate` limits bytes per second.
    Rng {
        #[serde(default)]
        rate: Option<u64>,
    },
    /// A disk image; `format` None means detect (qcow2 by its magic, else raw).
    Block {
        path: PathBuf,
        #[serde(default)]
        format: Option<DiskFormat>,
        #[serde(default)]
        readonly: bool,
    },
    /// A NIC on a tap device (created if missing); `mac` None means a generated address. With
    /// `fd`, the tap `tap` is already open on that inherited descriptor (ferrod opens it, so the
    /// VMM needs no network privileges) and the VMM takes it over instead of opening the tap.
    Net {
        tap: String,
        #[serde(default)]
        mac: Option<MacAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fd: Option<i32>,
    },
    /// A virtio-console port.
    Console { backend: ConsoleBackend },
    /// A memory balloon; `size_mib` is the initial target of memory taken from the guest.
    Balloon {
        #[serde(default)]
        size_mib: u64,
        #[serde(default)]
        deflate_on_oom: bool,
    },
    /// AF_VSOCK with Firecracker's host convention: guest CID `cid`, host side on unix socket `uds`.
    Vsock { cid: u64, uds: PathBuf },
}

impl DeviceKind {
    /// The prefix of default device ids: disks are vda, vdb, ...; the others `<prefix><n>`.
    fn id_prefix(&self) -> &'static str {
        match self {
            DeviceKind::Rng { .. } => "rng",
            DeviceKind::Block { .. } => "vd",
            DeviceKind::Net { .. } => "net",
            DeviceKind::Console { .. } => "console",
            DeviceKind::Balloon { .. } => "balloon",
            DeviceKind::Vsock { .. } => "vsock",
        }
    }
}

/// Where a virtio-console port's other end is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleBackend {
    /// The VMM's stdin/stdout (the terminal of `ferro run`).
    Stdio,
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
    /// A unix socket the VMM listens on.
    Socket(PathBuf),
}

/// The disk name of the `n`-th disk: vda .. vdz, vdaa .. (as Linux names virtio disks).
pub fn disk_name(n: usize) -> String {
    let mut letters = Vec::new();
    let mut i = n + 1;
    while i > 0 {
        i -= 1;
        letters.push(b'a' + (i % 26) as u8);
        i /= 26;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

impl DeviceConfig {
    /// Gives every device of `kinds` its default id, in order: vda, vdb, net0, rng0, ...
    pub fn with_default_ids(kinds: Vec<DeviceKind>) -> Vec<DeviceConfig> {
        let mut counts = std::collections::HashMap::<&'static str, usize>::new();
        kinds
            .into_iter()
            .map(|kind| {
                let prefix = kind.id_prefix();
                let n = counts.entry(prefix).or_default();
                let id = if prefix == "vd" { disk_name(*n) } else { format!("{prefix}{n}") };
                *n += 1;
                DeviceConfig { id, kind }
            })
            .collect()
    }
}

impl VmConfig {
    /// The saved VM `self` wired to this host as `given` says: each NIC's tap and inherited
    /// descriptor, and the boot source (only used if the guest resets later), come from `given`,
    /// which must describe the same machine otherwise (a restore gets a new process, so a tap
    /// the supervisor opened for it has a new descriptor). The error names what differs.
    pub fn rewired(&self, given: &VmConfig) -> Result<VmConfig, String> {
        self.rewired_with_disks(given, &[])
    }

    /// As [`rewired`](Self::rewired), and the disks with ids in `copied` (a migration that
    /// copies them along to files of this host's) take their paths from `given` too.
    pub fn rewired_with_disks(&self, given: &VmConfig, copied: &[&str]) -> Result<VmConfig, String> {
        if self.devices.len() != given.devices.len() {
            return Err(format!("devices: the snapshot has {}, the configuration {}", self.devices.len(), given.devices.len()));
        }
        let mut wired = self.clone();
        wired.boot = given.boot.clone();
        for (mine, theirs) in wired.devices.iter_mut().zip(&given.devices) {
            if let (DeviceKind::Net { tap, fd, .. }, DeviceKind::Net { tap: new_tap, fd: new_fd, .. }) = (&mut mine.kind, &theirs.kind) {
                tap.clone_from(new_tap);
                *fd = *new_fd;
            }
            if let (DeviceKind::Block { path, .. }, DeviceKind::Block { path: new_path, .. }) = (&mut mine.kind, &theirs.kind)
                && copied.contains(&mine.id.as_str())
            {
                path.clone_from(new_path);
            }
            if mine != theirs {
                return Err(format!("devices ({}): the snapshot has {:?}, the configuration {:?}", mine.id, mine.kind, theirs.kind));
            }
        }
        let same = [
            ("name", wired.name == given.name),
            ("memory", wired.memory == given.memory),
            ("vcpus", wired.vcpus == given.vcpus),
            ("transport", wired.transport == given.transport),
            ("debug_exit", wired.debug_exit == given.debug_exit),
        ];
        match same.iter().find(|(_, same)| !same) {
            Some((field, _)) => Err(format!("{field}: the configuration differs from the snapshot's")),
            None => Ok(wired),
        }
    }

    /// Whether the guest may end the VMM through the debug-exit port.
    pub fn debug_exit_enabled(&self) -> bool {
        self.debug_exit || matches!(self.boot.kernel, Kernel::TestGuest(_))
    }

    /// Checks what can be checked without the host: vCPU count, memory size, device ids and
    /// per-device values. The error names the field (`devices[2].id: ...`).
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 {
            return Err(format!("vcpus: {} requested; a VM needs 1 to {MAX_VCPUS}", self.vcpus));
        }
        if self.memory.size < MIN_MEMORY {
            return Err(format!("memory: {} bytes is less than the {} MiB minimum", self.memory.size, MIN_MEMORY >> 20));
        }
        if self.pinning.vcpus.len() > usize::from(self.vcpus) {
            return Err(format!("pinning.vcpus: {} CPU lists for {} vCPUs", self.pinning.vcpus.len(), self.vcpus));
        }
        if self.memory.hugepages && self.memory.merge {
            return Err("memory: merge cannot be combined with hugepages: KSM merges only small pages".into());
        }
        if self.boot.cmdline.len() > 2047 {
            return Err(format!("boot.cmdline: {} bytes; the limit is 2047", self.boot.cmdline.len()));
        }
        let mut ids = HashSet::new();
        let mut stdio_consoles = 0;
        let mut balloons = 0;
        for (i, d) in self.devices.iter().enumerate() {
            let at = |what: String| format!("devices[{i}] ({}).{what}", d.id);
            let id_ok = !d.id.is_empty() && d.id.len() <= 32 && d.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(format!("devices[{i}].id: {:?} must be 1-32 letters, digits, '-' or '_'", d.id));
            }
            if !ids.insert(d.id.as_str()) {
                return Err(format!("devices[{i}].id: {:?} is used by another device", d.id));
            }
            match &d.kind {
                DeviceKind::Rng { rate: Some(0) } => return Err(at("rate: must be at least 1 byte per second".into())),
                DeviceKind::Net { tap, .. } if tap.is_empty() || tap.len() > 15 => {
                    return Err(at(format!("tap: {tap:?} is not an interface name (1 to 15 bytes)")));
                }
                DeviceKind::Net { fd: Some(fd), .. } if *fd < 3 => {
                    return Err(at(format!("fd: {fd} is not an inherited descriptor (0-2 are stdio)")));
                }
                DeviceKind::Console { backend: ConsoleBackend::Stdio } => stdio_consoles += 1,
                DeviceKind::Balloon { size_mib, .. } => {
                    balloons += 1;
                    if size_mib << 20 > self.memory.size {
                        return Err(at(format!("size_mib: {size_mib} MiB is more than the guest's memory")));
                    }
                }
                DeviceKind::Vsock { cid, .. } if *cid < 3 || *cid >= u64::from(u32::MAX) => {
                    return Err(at(format!("cid: {cid} must be from 3 to 4294967294 (0-2 are reserved)")));
                }
                _ => {}
            }
        }
        if stdio_consoles > 1 {
            return Err("devices: only one virtio console can be on stdio".into());
        }
        if balloons > 1 {
            return Err("devices: only one balloon device is supported".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(devices: Vec<DeviceKind>) -> VmConfig {
        VmConfig {
            name: "t".into(),
            boot: BootConfig { kernel: Kernel::TestGuest("hello".into()), initrd: None, cmdline: String::new() },
            memory: MemoryConfig::new(256 << 20),
            vcpus: 1,
            devices: DeviceConfig::with_default_ids(devices),
            transport: Transport::Pci,
            debug_exit: false,
            pinning: Default::default(),
        }
    }

    #[test]
    fn default_ids_follow_linux_names() {
        let disk = || DeviceKind::Block { path: "/d".into(), format: None, readonly: false };
        let c = config(vec![disk(), DeviceKind::Rng { rate: None }, disk(), DeviceKind::Net { tap: "t0".into(), mac: None, fd: None }]);
        let ids: Vec<&str> = c.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["vda", "rng0", "vdb", "net0"]);
        assert_eq!(disk_name(25), "vdz");
        assert_eq!(disk_name(26), "vdaa");
    }

    #[test]
    fn round_trips_through_json() {
        let c = config(vec![
            DeviceKind::Block { path: "/d.qcow2".into(), format: Some(DiskFormat::Qcow2), readonly: true },
            DeviceKind::Net { tap: "tap0".into(), mac: Some("52:54:00:00:00:01".parse().unwrap()), fd: Some(7) },
            DeviceKind::Console { backend: ConsoleBackend::Socket("/run/c.sock".into()) },
            DeviceKind::Vsock { cid: 3, uds: "/run/v.sock".into() },
        ]);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(&text.replacen("\"vcpus\"", "\"vcpu\"", 1)).is_err(), "unknown keys are refused");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = config(vec![DeviceKind::Rng { rate: Some(0) }]);
        assert!(c.validate().unwrap_err().starts_with("devices[0] (rng0).rate"));
        c.devices[0].kind = DeviceKind::Rng { rate: None };
        c.validate().unwrap();
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().starts_with("vcpus"));
        c.vcpus = 1;
        c.devices.push(c.devices[0].clone());
        assert!(c.validate().unwrap_err().contains("used by another device"));
    }

    #[test]
    fn a_restore_takes_the_nic_wiring_of_the_given_configuration_only() {
        let net = |tap: &str, fd| DeviceKind::Net { tap: tap.into(), mac: Some("52:54:00:00:00:01".parse().unwrap()), fd };
        let saved = config(vec![net("fvab-0", Some(9))]);
        let given = config(vec![net("fvab-0", Some(14))]);
        assert_eq!(saved.rewired(&given).unwrap(), given);
        let mut bigger = given.clone();
        bigger.memory.size *= 2;
        assert!(saved.rewired(&bigger).unwrap_err().starts_with("memory:"));
        let other_mac = config(vec![DeviceKind::Net { tap: "fvab-0".into(), mac: None, fd: Some(14) }]);
        assert!(saved.rewired(&other_mac).unwrap_err().contains("devices (net0)"), "a NIC's MAC is the guest's, not wiring");
        assert!(saved.rewired(&config(vec![])).unwrap_err().starts_with("devices: the snapshot has 1"));
    }
}
