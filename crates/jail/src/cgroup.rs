//! cgroups for VM processes: where this host's CPU, memory, block I/O and pid controllers are
//! ([`Host::detect`]), one cgroup per VM below the cgroup of the process that creates it
//! ([`Host::create`]) with its [`Limits`] written in, the counters read back ([`VmCgroup::stats`])
//! and its removal.
//!
//! A controller is used on the unified (v2) hierarchy when it is available there, else on its v1
//! hierarchy: a hybrid host (v1 controllers, an empty v2 at /sys/fs/cgroup/unified) gets a v1
//! cgroup per controller plus one in the unified hierarchy, which has no controllers but is where
//! systemd tracks processes. A VM's cgroups are always created below the creator's own cgroup in
//! each hierarchy, so a daemon never moves a process out of the subtree it was given.
//!
//! cgroup v2 lets only a cgroup without processes of its own hand controllers to its children, so
//! [`Host::enable_for_children`] moves the daemon into a leaf (`<its cgroup>/ferrod`) when it has
//! to; the VMs' cgroups are siblings of that leaf. A daemon that starts in such a leaf (systemd's
//! `DelegateSubgroup=ferrod`) puts its VMs beside it in the same way.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The controllers a VM's limits use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Controller {
    Cpu,
    Memory,
    /// `io` on v2, `blkio` on v1.
    Io,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 4] = [Controller::Cpu, Controller::Memory, Controller::Io, Controller::Pids];

    fn v2_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Io => "io",
            Controller::Pids => "pids",
        }
    }

    fn v1_name(self) -> &'static str {
        match self {
            Controller::Io => "blkio",
            other => other.v2_name(),
        }
    }

    /// The name users know it by, with its v1 name when that differs.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Io => "io (blkio on v1)",
            other => other.v2_name(),
        }
    }
}

/// Where one controller is on this host, seen from the creating process.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// On the unified hierarchy; VM cgroups go below the creator's v2 cgroup.
    Unified,
    /// On a v1 hierarchy; the creator's cgroup in it.
    V1(PathBuf),
    /// Not usable, and why.
    Missing(String),
}

/// The cgroup hierarchies as the process that detected them sees them.
#[derive(Clone, Debug)]
pub struct Host {
    /// The creator's cgroup in the unified hierarchy, when one is mounted.
    unified: Option<PathBuf>,
    places: Vec<(Controller, Place)>,
}

/// Limits for one VM; `None` leaves the controller's default (no limit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Share of one host CPU in percent (150 is one and a half CPUs).
    pub cpu_percent: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// Per block device: cgroups throttle devices, not files.
    pub io: Vec<IoLimit>,
}

/// Throttling of one block device.
#[derive(Clone, Debug, PartialEq)]
pub struct IoLimit {
    pub device: BlockDevice,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    /// Read and write operations per second, each.
    pub iops: Option<u64>,
}

/// A whole block device, as cgroups name it (`major:minor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl BlockDevice {
    /// The disk holding `path` (the whole disk when the file system is on a partition, since
    /// cgroups throttle disks only). Files on file systems without a block device (tmpfs,
    /// overlay, NFS) cannot be throttled.
    pub fn of_file(path: &Path) -> Result<BlockDevice, String> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let real = sys.canonicalize().map_err(|_| {
            format!("{} is on a file system without a block device ({major}:{minor}), which cgroups cannot throttle", path.display())
        })?;
        let disk = if real.join("partition").exists() { real.parent().map(Path::to_path_buf).unwrap_or(real) } else { real };
        let text = std::fs::read_to_string(disk.join("dev")).map_err(|e| format!("{}/dev: {e}", disk.display()))?;
        let (major, minor) = text.trim().split_once(':').ok_or_else(|| format!("{}/dev: unexpected {text:?}", disk.display()))?;
        let number = |s: &str| s.parse::<u32>().map_err(|_| format!("{}/dev: unexpected {text:?}", disk.display()));
        Ok(BlockDevice { major: number(major)?, minor: number(minor)? })
    }
}

/// One directory of a VM's cgroup (one per hierarchy), with the controllers it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CgroupDir {
    pub path: PathBuf,
    /// 2 for the unified hierarchy, 1 for a v1 hierarchy.
    pub version: u8,
    pub controllers: Vec<Controller>,
}

/// A VM's cgroup: a directory in each hierarchy it uses. Serializable so that a daemon can
/// record it and find it again after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmCgroup {
    pub dirs: Vec<CgroupDir>,
}

/// Open `cgroup.procs` files of a VM's cgroup: [`Placement::join`] moves the calling process
/// there. It only writes to descriptors, so it may run between fork and exec.
pub struct Placement {
    procs: Vec<OwnedFd>,
}

/// The counters `domstats` shows: what each limit is and how often it held the VM back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// The VM's cgroup directories.
    pub paths: Vec<String>,
    pub cpu: Option<CpuStats>,
    pub memory: Option<MemoryStats>,
    pub pids: Option<PidsStats>,
    pub io: Vec<IoStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuStats {
    /// The CPU limit in percent of one host CPU; None when unlimited.
    pub limit_percent: Option<u32>,
    /// Scheduler periods in which the VM could run, and in how many it used up its quota.
    pub periods: u64,
    pub throttled_periods: u64,
    /// Time its threads spent ready to run but held back by the quota.
    pub throttled_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub limit_bytes: Option<u64>,
    pub usage_bytes: u64,
    /// How often usage reached the limit (and the kernel reclaimed to stay below it).
    pub limit_hits: u64,
    /// Processes the kernel killed because the limit could not be kept.
    pub oom_kills: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PidsStats {
    pub limit: Option<u64>,
    pub current: u64,
    /// Process or thread creations refused by the limit.
    pub limit_hits: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoStats {
    /// `major:minor` of the block device.
    pub device: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bps_limit: Option<u64>,
    pub write_bps_limit: Option<u64>,
    pub read_iops_limit: Option<u64>,
    pub write_iops_limit: Option<u64>,
}

/// The leaf a v2 daemon moves itself into so that its cgroup can hand controllers to VMs.
pub const DAEMON_LEAF: &str = "ferrod";
/// Swap limit files, which exist only where the kernel accounts swap.
const SWAP_FILES: [&str; 2] = ["memory.swap.max", "memory.memsw.limit_in_bytes"];
/// CFS period used for CPU limits (the kernel's default): 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

impl Host {
    /// Finds the hierarchies from `/proc/self/mountinfo` and the calling process's cgroups from
    /// `/proc/self/cgroup`.
    pub fn detect() -> Host {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Host::from_tables(&mountinfo, &membership)
    }

    fn from_tables(mountinfo: &str, membership: &str) -> Host {
        let mounts = parse_mountinfo(mountinfo);
        let groups = parse_membership(membership);
        let unified = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .and_then(|m| groups.iter().find(|g| g.hierarchy == 0).and_then(|g| m.dir_of(&g.path)));
        let v2_available = unified.as_ref().map(|dir| read_words(&dir.join("cgroup.controllers"))).unwrap_or_default();
        let places = Controller::ALL
            .into_iter()
            .map(|c| {
                if v2_available.iter().any(|w| w == c.v2_name()) {
                    return (c, Place::Unified);
                }
                let v1 = mounts.iter().find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c.v1_name()));
                let place = match v1 {
                    None => Place::Missing(format!("no {} hierarchy is mounted (v1) and cgroup v2 does not offer it", c.v1_name())),
                    Some(mount) => match groups.iter().find(|g| g.hierarchy != 0 && g.controllers.iter().any(|n| n == c.v1_name())) {
                        None => Place::Missing(format!("this process is in no {} cgroup", c.v1_name())),
                        Some(group) => match mount.dir_of(&group.path) {
                            Some(dir) => Place::V1(dir),
                            None => Place::Missing(format!("this process's {} cgroup {} is outside the mount {}", c.v1_name(), group.path, mount.point.display())),
                        },
                    },
                };
                (c, place)
            })
            .collect();
        Host { unified, places }
    }

    /// Where `controller` is.
    pub fn place(&self, controller: Controller) -> &Place {
        self.places.iter().find(|(c, _)| *c == controller).map(|(_, p)| p).expect("every controller has a place")
    }

    /// Whether VM cgroups can use `controller`.
    pub fn usable(&self, controller: Controller) -> bool {
        !matches!(self.place(controller), Place::Missing(_))
    }

    /// One line per controller for `ferro host-check`: where VMs would get it, or why not.
    pub fn support(&self) -> Vec<(Controller, Result<String, String>)> {
        Controller::ALL
            .into_iter()
            .map(|c| {
                let line = match self.place(c) {
                    Place::Unified => {
                        let base = self.unified.as_deref().unwrap_or(Path::new("?"));
                        writable(base).map(|()| format!("cgroup v2, VMs below {}", base.display()))
                    }
                    Place::V1(base) => writable(base).map(|()| format!("cgroup v1 {} hierarchy, VMs below {}", c.v1_name(), base.display())),
                    Place::Missing(why) => Err(why.clone()),
                };
                (c, line)
            })
            .collect()
    }

    /// On the unified hierarchy, lets the caller's cgroup hand its v2 controllers to child
    /// cgroups, moving the calling process into the leaf [`DAEMON_LEAF`] first if its cgroup
    /// holds processes (v2 forbids controllers below a cgroup with processes of its own).
    /// Controllers that cannot be enabled become [`Place::Missing`]; returns a warning for each.
    pub fn enable_for_children(&mut self) -> Vec<String> {
        let Some(base) = self.unified.clone() else { return Vec::new() };
        let wanted: Vec<Controller> = Controller::ALL.into_iter().filter(|c| *self.place(*c) == Place::Unified).collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let subtree = base.join("cgroup.subtree_control");
        let missing = |c: &Controller| !read_words(&subtree).iter().any(|w| w == c.v2_name());
        let request: String = wanted.iter().filter(|c| missing(c)).map(|c| format!("+{} ", c.v2_name())).collect();
        if request.is_empty() {
            return Vec::new();
        }
        let mut result = write_file(&subtree, request.trim());
        if result.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY)) {
            // Processes in our cgroup: move ourselves into a leaf, then try again.
            let leaf = base.join(DAEMON_LEAF);
            let moved = make_dir(&leaf).and_then(|()| write_file(&leaf.join("cgroup.procs"), "0"));
            result = moved.and_then(|()| write_file(&subtree, request.trim()));
        }
        let mut warnings = Vec::new();
        for c in wanted.iter().filter(|c| missing(c)) {
            let why = match &result {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => format!(
                    "cgroup v2: {} holds processes other than ferrod, so it cannot give the {} controller to VMs \
                     (run ferrod as a service with Delegate=yes, or in a cgroup of its own)",
                    base.display(),
                    c.v2_name()
                ),
                Err(e) => format!("cgroup v2: cannot enable the {} controller in {}: {e}", c.v2_name(), subtree.display()),
                Ok(()) => format!("cgroup v2: the {} controller did not appear in {}", c.v2_name(), subtree.display()),
            };
            warnings.push(why.clone());
            self.set_place(*c, Place::Missing(why));
        }
        warnings
    }

    fn set_place(&mut self, controller: Controller, place: Place) {
        if let Some(entry) = self.places.iter_mut().find(|(c, _)| *c == controller) {
            entry.1 = place;
        }
    }

    /// Creates the cgroup `name` below the caller's own in every hierarchy it needs, with
    /// `limits` written in. A limit on a controller this host does not offer is an error; so is
    /// an existing cgroup of that name that still holds processes (a stale empty one is reused).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup, String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("{name:?} is not a cgroup name"));
        }
        for (controller, wanted) in [
            (Controller::Cpu, limits.cpu_percent.is_some()),
            (Controller::Memory, limits.memory_bytes.is_some()),
            (Controller::Pids, limits.pids.is_some()),
            (Controller::Io, !limits.io.is_empty()),
        ] {
            if let (true, Place::Missing(why)) = (wanted, self.place(controller)) {
                return Err(format!("cannot limit {}: {why}", controller.name()));
            }
        }
        let mut dirs: Vec<CgroupDir> = Vec::new();
        if let Some(base) = &self.unified {
            let controllers = Controller::ALL.into_iter().filter(|c| *self.place(*c) == Place::Unified).collect();
            dirs.push(CgroupDir { path: base.join(name), version: 2, controllers });
        }
        for (controller, place) in &self.places {
            if let Place::V1(base) = place {
                let path = base.join(name);
                match dirs.iter_mut().find(|d| d.path == path) {
                    Some(dir) => dir.controllers.push(*controller),
                    None => dirs.push(CgroupDir { path, version: 1, controllers: vec![*controller] }),
                }
            }
        }
        let cgroup = VmCgroup { dirs };
        let made = cgroup.make(limits);
        if made.is_err() {
            let _ = cgroup.remove();
        }
        made.map(|()| cgroup)
    }
}

impl VmCgroup {
    fn make(&self, limits: &Limits) -> Result<(), String> {
        for dir in &self.dirs {
            match std::fs::create_dir(&dir.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !read_pids(&dir.path).is_empty() {
                        return Err(format!("cgroup {} already exists and holds processes", dir.path.display()));
                    }
                }
                Err(e) => return Err(format!("cannot create cgroup {}: {e}", dir.path.display())),
            }
            for controller in &dir.controllers {
                for (file, value) in limit_files(*controller, dir.version, limits) {
                    let path = dir.path.join(file);
                    if SWAP_FILES.contains(&file) && !path.exists() {
                        continue;
                    }
                    write_file(&path, &value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))?;
                }
            }
        }
        Ok(())
    }

    fn dir_with(&self, controller: Controller) -> Option<&CgroupDir> {
        self.dirs.iter().find(|d| d.controllers.contains(&controller))
    }

    /// Opens every `cgroup.procs` of the VM's cgroup for [`Placement::join`].
    pub fn placement(&self) -> Result<Placement, String> {
        let procs = self
            .dirs
            .iter()
            .map(|d| {
                let path = d.path.join("cgroup.procs");
                std::fs::OpenOptions::new().write(true).open(&path).map(OwnedFd::from).map_err(|e| format!("cannot open {}: {e}", path.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Placement { procs })
    }

    /// Pids of the processes in the VM's cgroup.
    pub fn processes(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self.dirs.iter().flat_map(|d| read_pids(&d.path)).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Removes the cgroup; fails while processes are still in it (after a short wait for
    /// processes that are exiting).
    pub fn remove(&self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut last = Ok(());
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(&dir.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => {
                        last = Err(format!("cannot remove cgroup {}: {e}", dir.path.display()));
                        break;
                    }
                }
            }
        }
        last
    }

    /// The limits and how often they held the VM back.
    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats { paths: self.dirs.iter().map(|d| d.path.display().to_string()).collect(), ..CgroupStats::default() };
        if let Some(dir) = self.dir_with(Controller::Cpu) {
            stats.cpu = Some(cpu_stats(dir));
        }
        if let Some(dir) = self.dir_with(Controller::Memory) {
            stats.memory = Some(memory_stats(dir));
        }
        if let Some(dir) = self.dir_with(Controller::Pids) {
            let keyed = read_keyed(&dir.path.join("pids.events"));
            stats.pids = Some(PidsStats {
                limit: read_limit(&dir.path.join("pids.max")),
                current: read_number(&dir.path.join("pids.current")),
                limit_hits: keyed_value(&keyed, "max"),
            });
        }
        if let Some(dir) = self.dir_with(Controller::Io) {
            stats.io = io_stats(dir);
        }
        stats
    }
}

impl Placement {
    /// Moves the calling process (with its threads, and the children it makes afterwards) into
    /// the VM's cgroup. Only write(2) on open descriptors: safe between fork and exec.
    pub fn join(&self) -> std::io::Result<()> {
        for fd in &self.procs {
            // SAFETY: writes one byte from a static buffer to a descriptor this value owns.
            if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The files and values that set `limits` for one controller.
fn limit_files(controller: Controller, version: u8, limits: &Limits) -> Vec<(&'static str, String)> {
    let v2 = version == 2;
    let mut files = Vec::new();
    match controller {
        Controller::Cpu => {
            if let Some(percent) = limits.cpu_percent {
                let quota = u64::from(percent) * CPU_PERIOD_US / 100;
                if v2 {
                    files.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
                } else {
                    files.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    files.push(("cpu.cfs_quota_us", quota.to_string()));
                }
            }
        }
        Controller::Memory => {
            // Swap counts too (where the kernel accounts it), so that a VM cannot swap its way
            // past the limit.
            if let Some(bytes) = limits.memory_bytes {
                if v2 {
                    files.push(("memory.max", bytes.to_string()));
                    files.push(("memory.swap.max", "0".to_string()));
                } else {
                    files.push(("memory.limit_in_bytes", bytes.to_string()));
                    files.push(("memory.memsw.limit_in_bytes", bytes.to_string()));
                }
            }
        }
        Controller::Pids => {
            if let Some(pids) = limits.pids {
                files.push(("pids.max", pids.to_string()));
            }
        }
        Controller::Io => {
            for l in &limits.io {
                if v2 {
                    let keys: Vec<String> = [("rbps", l.read_bps), ("wbps", l.write_bps), ("riops", l.iops), ("wiops", l.iops)]
                        .into_iter()
                        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                        .collect();
                    if !keys.is_empty() {
                        files.push(("io.max", format!("{} {}", l.device, keys.join(" "))));
                    }
                } else {
                    for (file, value) in [
                        ("blkio.throttle.read_bps_device", l.read_bps),
                        ("blkio.throttle.write_bps_device", l.write_bps),
                        ("blkio.throttle.read_iops_device", l.iops),
                        ("blkio.throttle.write_iops_device", l.iops),
                    ] {
                        if let Some(value) = value {
                            files.push((file, format!("{} {value}", l.device)));
                        }
                    }
                }
            }
        }
    }
    files
}

fn cpu_stats(dir: &CgroupDir) -> CpuStats {
    let stat = read_keyed(&dir.path.join("cpu.stat"));
    let (quota, period, throttled_ns) = if dir.version == 2 {
        let max = std::fs::read_to_string(dir.path.join("cpu.max")).unwrap_or_default();
        let mut words = max.split_whitespace();
        let quota = words.next().and_then(|w| w.parse::<u64>().ok());
        let period = words.next().and_then(|w| w.parse::<u64>().ok());
        (quota, period, keyed_value(&stat, "throttled_usec") * 1000)
    } else {
        let quota = std::fs::read_to_string(dir.path.join("cpu.cfs_quota_us")).ok().and_then(|s| s.trim().parse::<u64>().ok());
        let period = std::fs::read_to_string(dir.path.join("cpu.cfs_period_us")).ok().and_then(|s| s.trim().parse::<u64>().ok());
        (quota, period, keyed_value(&stat, "throttled_time"))
    };
    let limit_percent = match (quota, period) {
        (Some(q), Some(p)) if p > 0 => u32::try_from(q * 100 / p).ok(),
        _ => None,
    };
    CpuStats { limit_percent, periods: keyed_value(&stat, "nr_periods"), throttled_periods: keyed_value(&stat, "nr_throttled"), throttled_ns }
}

fn memory_stats(dir: &CgroupDir) -> MemoryStats {
    if dir.version == 2 {
        let events = read_keyed(&dir.path.join("memory.events"));
        MemoryStats {
            limit_bytes: read_limit(&dir.path.join("memory.max")),
            usage_bytes: read_number(&dir.path.join("memory.current")),
            limit_hits: keyed_value(&events, "max"),
            oom_kills: keyed_value(&events, "oom_kill"),
        }
    } else {
        let oom = read_keyed(&dir.path.join("memory.oom_control"));
        MemoryStats {
            limit_bytes: read_limit(&dir.path.join("memory.limit_in_bytes")),
            usage_bytes: read_number(&dir.path.join("memory.usage_in_bytes")),
            limit_hits: read_number(&dir.path.join("memory.failcnt")),
            oom_kills: keyed_value(&oom, "oom_kill"),
        }
    }
}

fn io_stats(dir: &CgroupDir) -> Vec<IoStats> {
    let mut devices: Vec<IoStats> = Vec::new();
    fn entry<'a>(devices: &'a mut Vec<IoStats>, device: &str) -> &'a mut IoStats {
        if let Some(i) = devices.iter().position(|d| d.device == device) {
            return &mut devices[i];
        }
        devices.push(IoStats { device: device.to_string(), ..IoStats::default() });
        devices.last_mut().expect("just pushed")
    }
    let read = |file: &str| std::fs::read_to_string(dir.path.join(file)).unwrap_or_default();
    if dir.version == 2 {
        for (file, is_limit) in [("io.stat", false), ("io.max", true)] {
            for line in read(file).lines() {
                let mut words = line.split_whitespace();
                let Some(device) = words.next() else { continue };
                let d = entry(&mut devices, device);
                for (key, value) in words.filter_map(|w| w.split_once('=')) {
                    let number = value.parse::<u64>().ok();
                    match (is_limit, key) {
                        (false, "rbytes") => d.read_bytes = number.unwrap_or(0),
                        (false, "wbytes") => d.write_bytes = number.unwrap_or(0),
                        (false, "rios") => d.read_ops = number.unwrap_or(0),
                        (false, "wios") => d.write_ops = number.unwrap_or(0),
                        (true, "rbps") => d.read_bps_limit = number,
                        (true, "wbps") => d.write_bps_limit = number,
                        (true, "riops") => d.read_iops_limit = number,
                        (true, "wiops") => d.write_iops_limit = number,
                        _ => {}
                    }
                }
            }
        }
    } else {
        for (file, bytes) in [("blkio.throttle.io_service_bytes", true), ("blkio.throttle.io_serviced", false)] {
            for line in read(file).lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let [device, op, value] = words[..] else { continue };
                let Ok(value) = value.parse::<u64>() else { continue };
                let d = entry(&mut devices, device);
                match (op, bytes) {
                    ("Read", true) => d.read_bytes = value,
                    ("Write", true) => d.write_bytes = value,
                    ("Read", false) => d.read_ops = value,
                    ("Write", false) => d.write_ops = value,
                    _ => {}
                }
            }
        }
        for file in ["read_bps_device", "write_bps_device", "read_iops_device", "write_iops_device"] {
            for line in read(&format!("blkio.throttle.{file}")).lines() {
                let Some((device, value)) = line.split_once(' ') else { continue };
                let value = value.trim().parse::<u64>().ok();
                let d = entry(&mut devices, device);
                match file {
                    "read_bps_device" => d.read_bps_limit = value,
                    "write_bps_device" => d.write_bps_limit = value,
                    "read_iops_device" => d.read_iops_limit = value,
                    _ => d.write_iops_limit = value,
                }
            }
        }
    }
    devices
}

/// One cgroup mount from mountinfo.
struct Mount {
    /// The directory of the hierarchy that is mounted (`/` unless a subtree is bind-mounted).
    root: String,
    point: PathBuf,
    fstype: String,
    /// Super-block options: the v1 controller names.
    options: Vec<String>,
}

impl Mount {
    /// The directory of cgroup `path` (as /proc/PID/cgroup names it) under this mount.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rest = if self.root == "/" { path } else { path.strip_prefix(self.root.as_str())? };
        let rest = rest.trim_start_matches('/');
        Some(if rest.is_empty() { self.point.clone() } else { self.point.join(rest) })
    }
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let fstype = *right.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
                fstype: fstype.to_string(),
                options: right.get(2).map(|o| o.split(',').map(str::to_string).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/PID/cgroup.
struct Membership {
    hierarchy: u32,
    controllers: Vec<String>,
    path: String,
}

fn parse_membership(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            Some(Membership { hierarchy, controllers, path: vm_parent(parts.next()?).to_string() })
        })
        .collect()
}

/// Where the VMs of a daemon in cgroup `path` go: below it, or beside it when it already is in the
/// leaf [`DAEMON_LEAF`] (where systemd's `DelegateSubgroup=ferrod` starts the service, so that a
/// restarted daemon is never put into a cgroup that hands controllers to VMs: docs/service.md).
fn vm_parent(path: &str) -> &str {
    match path.strip_suffix(DAEMON_LEAF).and_then(|p| p.strip_suffix('/')) {
        Some("") => "/",
        Some(parent) => parent,
        None => path,
    }
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// "key value" lines.
fn read_keyed(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn keyed_value(keyed: &[(String, u64)], key: &str) -> u64 {
    keyed.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// A limit file: "max" (v2) or a value near 2^63 (v1) means none.
fn read_limit(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok().filter(|v| *v < 1 << 62)
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    // cgroup files take one value per write(2); a buffered writer could split it.
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

fn make_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn writable(dir: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| format!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: access(2) only reads the NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(format!("{} is not writable by this user: {}", dir.display(), std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
34 25 0:30 /inner /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
35 25 0:31 / /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpuacct
";
    const HYBRID_GROUPS: &str = "9:name=systemd:/\n8:pids:/other\n7:blkio:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_hosts_use_the_v1_hierarchies() {
        let host = Host::from_tables(HYBRID_MOUNTS, HYBRID_GROUPS);
        assert_eq!(host.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(*host.place(Controller::Cpu), Place::V1("/sys/fs/cgroup/cpu".into()));
        assert_eq!(*host.place(Controller::Memory), Place::V1("/sys/fs/cgroup/memory/process_api/abc".into()));
        assert_eq!(*host.place(Controller::Io), Place::V1("/sys/fs/cgroup/blkio".into()));
        // The pids hierarchy is mounted from /inner, and this process is outside it.
        assert!(matches!(host.place(Controller::Pids), Place::Missing(why) if why.contains("outside the mount")), "{:?}", host.place(Controller::Pids));
        assert_eq!(parse_mountinfo(HYBRID_MOUNTS)[5].point, PathBuf::from("/sys/fs/cgroup/cpu x"));
    }

    #[test]
    fn a_daemon_started_in_its_leaf_puts_vms_beside_it() {
        let groups = "9:name=systemd:/system.slice/ferrod.service/ferrod\n7:blkio:/ferrod\n1:cpu:/a/myferrod\n0::/system.slice/ferrod.service/ferrod\n";
        let host = Host::from_tables(HYBRID_MOUNTS, groups);
        assert_eq!(host.unified, Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/ferrod.service")));
        assert_eq!(*host.place(Controller::Io), Place::V1("/sys/fs/cgroup/blkio".into()));
        assert_eq!(*host.place(Controller::Cpu), Place::V1("/sys/fs/cgroup/cpu/a/myferrod".into()));
    }

    #[test]
    fn limits_become_the_files_of_each_version() {
        let limits = Limits {
            cpu_percent: Some(150),
            memory_bytes: Some(64 << 20),
            pids: Some(32),
            io: vec![IoLimit { device: BlockDevice { major: 254, minor: 0 }, read_bps: Some(1000), write_bps: None, iops: Some(50) }],
        };
        assert_eq!(limit_files(Controller::Cpu, 2, &limits), [("cpu.max", "150000 100000".to_string())]);
        assert_eq!(
            limit_files(Controller::Cpu, 1, &limits),
            [("cpu.cfs_period_us", "100000".to_string()), ("cpu.cfs_quota_us", "150000".to_string())]
        );
        let mib64 = (64u64 << 20).to_string();
        assert_eq!(limit_files(Controller::Memory, 1, &limits), [("memory.limit_in_bytes", mib64.clone()), ("memory.memsw.limit_in_bytes", mib64)]);
        assert_eq!(limit_files(Controller::Io, 2, &limits), [("io.max", "254:0 rbps=1000 riops=50 wiops=50".to_string())]);
        assert_eq!(
            limit_files(Controller::Io, 1, &limits),
            [
                ("blkio.throttle.read_bps_device", "254:0 1000".to_string()),
                ("blkio.throttle.read_iops_device", "254:0 50".to_string()),
                ("blkio.throttle.write_iops_device", "254:0 50".to_string()),
            ]
        );
        assert!(limit_files(Controller::Pids, 1, &Limits::default()).is_empty());
    }

    /// On this host, for real: a cgroup below our own with every limit, this process's child
    /// placed in it, the counters read back, and the cgroup removed.
    #[test]
    fn a_cgroup_with_limits_holds_a_process() {
        let host = Host::detect();
        let mut limits = Limits { cpu_percent: Some(25), memory_bytes: Some(96 << 20), pids: Some(16), io: Vec::new() };
        let device = BlockDevice::of_file(Path::new(env!("CARGO_MANIFEST_DIR")));
        if let Ok(device) = device {
            limits.io.push(IoLimit { device, read_bps: Some(10 << 20), write_bps: Some(5 << 20), iops: Some(100) });
        }
        for c in Controller::ALL {
            assert!(host.usable(c), "the {} controller is needed by this test: {:?}", c.name(), host.place(c));
        }
        let name = format!("ferro-jail-test-{}", std::process::id());
        let cgroup = host.create(&name, &limits).unwrap();
        let placement = cgroup.placement().unwrap();
        let mut child = {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("30");
            // SAFETY: the closure only writes to descriptors opened before the fork.
            unsafe { cmd.pre_exec(move || placement.join()) };
            cmd.spawn().unwrap()
        };
        assert_eq!(cgroup.processes(), [child.id() as i32]);
        let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(membership.lines().filter(|l| !l.contains("name=")).filter(|l| l.contains(&name)).count() >= 4, "{membership}");
        let stats = cgroup.stats();
        assert_eq!(stats.cpu.as_ref().unwrap().limit_percent, Some(25));
        assert_eq!(stats.memory.as_ref().unwrap().limit_bytes, Some(96 << 20));
        assert!(stats.memory.as_ref().unwrap().usage_bytes > 0);
        assert_eq!(stats.pids.as_ref().map(|p| (p.limit, p.current)), Some((Some(16), 1)));
        if let Some(l) = limits.io.first() {
            let io = stats.io.iter().find(|d| d.device == l.device.to_string()).unwrap();
            assert_eq!((io.read_bps_limit, io.write_bps_limit, io.read_iops_limit), (Some(10 << 20), Some(5 << 20), Some(100)));
        }
        assert!(cgroup.remove().unwrap_err().contains("Device or resource busy"), "a cgroup with a process stays");
        child.kill().unwrap();
        child.wait().unwrap();
        cgroup.remove().unwrap();
        assert!(cgroup.dirs.iter().all(|d| !d.path.exists()));
    }

    #[test]
    fn limits_on_missing_controllers_and_bad_names_are_refused() {
        let host = Host::from_tables("", "");
        let e = host.create("vm", &Limits { pids: Some(3), ..Limits::default() }).unwrap_err();
        assert!(e.starts_with("cannot limit pids: no pids hierarchy"), "{e}");
        assert!(host.create("../x", &Limits::default()).unwrap_err().contains("not a cgroup name"));
        let e = BlockDevice::of_file(Path::new("/proc/self/status")).unwrap_err();
        assert!(e.contains("without a block device"), "{e}");
    }
}
