//! One dnsmasq per network (Debian's dnsmasq-base, as libvirt runs it): DHCP on the bridge with
//! the network's range and fixed leases, and DNS that answers with the guests' names.
//!
//! Its files live in the network's state directory: `dnsmasq.conf` (rewritten at every start),
//! `dnsmasq.pid`, `leases` (dnsmasq's own lease database) and `hosts` (fixed leases and guest
//! names; dnsmasq rereads it on SIGHUP). dnsmasq runs as a daemon, so it is nobody's child and a
//! restarted ferrod finds it again through the pid file: a pid counts as our dnsmasq only while
//! its command line is `dnsmasq --conf-file=<this network's dnsmasq.conf>`.

use crate::config::{Mode, NetworkConfig};
use crate::{NetError, find_program};
use ferro_vmm_api::MacAddr;
use serde::Serialize;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a dnsmasq gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lease time handed out (libvirt's default).
const LEASE_TIME: &str = "1h";

/// The files of one network's dnsmasq.
#[derive(Debug, Clone)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    /// The files in `dir`, the network's state directory.
    pub fn new(dir: &Path) -> Files {
        Files { dir: dir.to_owned() }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }

    pub fn pid(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }

    pub fn leases(&self) -> PathBuf {
        self.dir.join("leases")
    }

    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// The argument that tells our dnsmasq from any other process.
    fn conf_arg(&self) -> String {
        format!("--conf-file={}", self.conf().display())
    }
}

/// One DHCP lease, from dnsmasq's lease database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
    /// When the lease runs out, in seconds since the epoch (None: never).
    pub expiry: Option<u64>,
}

/// A guest NIC on the network whose MAC should resolve to `name` in DNS.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestName {
    pub mac: MacAddr,
    pub name: String,
}

/// Writes dnsmasq's configuration and hosts file for `config` (a nat or isolated network), and
/// creates an empty lease file if there is none.
pub fn write_files(files: &Files, config: &NetworkConfig, guests: &[GuestName]) -> Result<(), NetError> {
    let Some(gateway) = config.ip else {
        return Err(NetError::Host(format!("network {} has no address for dnsmasq to serve", config.name)));
    };
    std::fs::create_dir_all(&files.dir).map_err(|e| NetError::host(files.dir.display(), e))?;
    let mut conf = format!(
        "# dnsmasq for Ferrovisor network {name}: written by ferrod at every start, do not edit.\n\
         strict-order\n\
         pid-file={pid}\n\
         except-interface=lo\n\
         bind-dynamic\n\
         interface={bridge}\n\
         no-hosts\n\
         domain-needed\n\
         bogus-priv\n\
         dhcp-hostsfile={hosts}\n",
        name = config.name,
        pid = files.pid().display(),
        bridge = config.bridge,
        hosts = files.hosts().display(),
    );
    if config.mode == Mode::Isolated {
        // Nothing leaves an isolated network: no upstream DNS servers, no default route.
        conf.push_str("no-resolv\ndhcp-option=option:router\n");
    }
    if let Some(dhcp) = &config.dhcp {
        let _ = write!(
            conf,
            "dhcp-range={start},{end},{mask},{LEASE_TIME}\n\
             dhcp-no-override\n\
             dhcp-authoritative\n\
             dhcp-lease-max={max}\n\
             dhcp-leasefile={leases}\n",
            start = dhcp.start,
            end = dhcp.end,
            mask = gateway.netmask(),
            max = dhcp.range_size() as usize + dhcp.hosts.len(),
            leases = files.leases().display(),
        );
    }
    write_atomically(&files.conf(), &conf)?;
    write_hosts(files, config, guests)?;
    if !files.leases().exists() {
        write_atomically(&files.leases(), "")?;
    }
    Ok(())
}

/// The hosts file: each fixed lease (`mac,ip[,name]`), then each guest name whose MAC has no
/// fixed lease (`mac,name`); a fixed lease without a name takes the guest's.
fn write_hosts(files: &Files, config: &NetworkConfig, guests: &[GuestName]) -> Result<(), NetError> {
    let fixed = config.dhcp.as_ref().map(|d| d.hosts.as_slice()).unwrap_or_default();
    let mut text = String::new();
    for host in fixed {
        let name = host.name.as_deref().or_else(|| guests.iter().find(|g| g.mac == host.mac).map(|g| g.name.as_str()));
        let _ = match name {
            Some(name) => writeln!(text, "{},{},{name}", host.mac, host.ip),
            None => writeln!(text, "{},{}", host.mac, host.ip),
        };
    }
    for guest in guests.iter().filter(|g| !fixed.iter().any(|h| h.mac == g.mac)) {
        let _ = writeln!(text, "{},{}", guest.mac, guest.name);
    }
    write_atomically(&files.hosts(), &text)
}

/// Rewrites the hosts file and has a running dnsmasq reread it.
pub fn update_hosts(files: &Files, config: &NetworkConfig, guests: &[GuestName], pid: u32) -> Result<(), NetError> {
    write_hosts(files, config, guests)?;
    reload(pid)
}

/// Has dnsmasq `pid` reread its hosts file (SIGHUP).
pub fn reload(pid: u32) -> Result<(), NetError> {
    Process::open(pid).and_then(|p| p.signal(libc::SIGHUP)).map_err(|e| NetError::host(format!("SIGHUP dnsmasq (pid {pid})"), e))
}

fn write_atomically(path: &Path, text: &str) -> Result<(), NetError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| NetError::host(path.display(), e))
}

/// Starts dnsmasq on the files [`write_files`] made; returns the daemon's pid once it serves
/// (dnsmasq's first process exits only after the daemon has bound its sockets, and reports
/// why when it could not).
pub fn start(files: &Files) -> Result<u32, NetError> {
    let dnsmasq = find_program("dnsmasq", "dnsmasq-base")?;
    let _ = std::fs::remove_file(files.pid());
    let out = std::process::Command::new(&dnsmasq)
        .arg(files.conf_arg())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| NetError::host(dnsmasq.display(), e))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ");
        return Err(NetError::Host(format!("dnsmasq failed to start ({}): {why}", out.status)));
    }
    running_pid(files).ok_or_else(|| NetError::Host(format!("dnsmasq started but {} names no running dnsmasq", files.pid().display())))
}

/// The pid of this network's dnsmasq if it runs (pid file and command line agree).
pub fn running_pid(files: &Files) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(files.pid()).ok()?.trim().parse().ok()?;
    is_ours(pid, files).then_some(pid)
}

/// Whether `pid` is a live dnsmasq run on these files.
fn is_ours(pid: u32, files: &Files) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let mut args = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy);
    let Some(program) = args.next() else { return false };
    let conf = files.conf_arg();
    (program == "dnsmasq" || program.ends_with("/dnsmasq")) && args.any(|a| a == conf)
}

/// Stops our dnsmasq `pid` (SIGTERM, then SIGKILL after a grace period) and waits until it is gone.
pub fn stop(pid: u32, files: &Files) -> Result<(), NetError> {
    let process = match Process::open(pid) {
        Ok(p) => p,
        Err(_) => return Ok(()),
    };
    // The pidfd pins this process: a recycled pid cannot be signalled by mistake after the check.
    if !is_ours(pid, files) {
        return Ok(());
    }
    let what = || format!("stop dnsmasq (pid {pid})");
    process.signal(libc::SIGTERM).map_err(|e| NetError::host(what(), e))?;
    if !process.wait_exit(STOP_GRACE).map_err(|e| NetError::host(what(), e))? {
        tracing::warn!(pid, "dnsmasq ignored SIGTERM; killing it");
        process.signal(libc::SIGKILL).map_err(|e| NetError::host(what(), e))?;
        process.wait_exit(STOP_GRACE).map_err(|e| NetError::host(what(), e))?;
    }
    let _ = std::fs::remove_file(files.pid());
    Ok(())
}

/// The leases in dnsmasq's lease file (`expiry mac ip hostname client-id` per line); lines that
/// do not parse are skipped.
pub fn read_leases(files: &Files) -> Vec<Lease> {
    let text = std::fs::read_to_string(files.leases()).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let expiry: u64 = f.next()?.parse().ok()?;
            let mac = f.next()?.parse().ok()?;
            let ip = f.next()?.parse().ok()?;
            let hostname = f.next().filter(|h| *h != "*").map(str::to_owned);
            Some(Lease { mac, ip, hostname, expiry: (expiry != 0).then_some(expiry) })
        })
        .collect()
}

/// A process held by a pidfd: signals reach exactly it, and its exit can be waited for even
/// when it is not our child.
pub struct Process {
    pidfd: OwnedFd,
}

impl Process {
    pub fn open(pid: u32) -> std::io::Result<Process> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        Ok(Process { pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    pub fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with our pidfd, a signal number, no siginfo and no flags.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Waits up to `limit` for the process to exit; true when it has.
    pub fn wait_exit(&self, limit: Duration) -> std::io::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: poll on one pollfd that lives for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if r > 0 {
                return Ok(true);
            }
            if r == 0 {
                return Ok(false);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.pidfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig::parse(
            "name = \"n1\"\nmode = \"isolated\"\nbridge = \"fbr1\"\nip = \"10.9.0.1/24\"\n[dhcp]\nstart = \"10.9.0.100\"\nend = \"10.9.0.199\"\n\
             [[dhcp.host]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.10\"\nname = \"fixed\"\n\
             [[dhcp.host]]\nmac = \"52:54:00:00:00:02\"\nip = \"10.9.0.11\"\n",
        )
        .unwrap()
    }

    #[test]
    fn files_say_what_the_definition_says() {
        let dir = std::env::temp_dir().join(format!("ferro-net-dnsmasq-{}", std::process::id()));
        let files = Files::new(&dir);
        let guests = [
            GuestName { mac: "52:54:00:00:00:02".parse().unwrap(), name: "vm2".into() },
            GuestName { mac: "52:54:00:00:00:03".parse().unwrap(), name: "vm3".into() },
        ];
        write_files(&files, &config(), &guests).unwrap();
        let conf = std::fs::read_to_string(files.conf()).unwrap();
        assert!(conf.contains("interface=fbr1\n"));
        assert!(conf.contains("dhcp-range=10.9.0.100,10.9.0.199,255.255.255.0,1h\n"));
        assert!(conf.contains("dhcp-lease-max=102\n"));
        assert!(conf.contains("no-resolv\n"), "isolated networks have no upstream DNS");
        let hosts = std::fs::read_to_string(files.hosts()).unwrap();
        assert_eq!(hosts, "52:54:00:00:00:01,10.9.0.10,fixed\n52:54:00:00:00:02,10.9.0.11,vm2\n52:54:00:00:00:03,vm3\n");
        assert_eq!(std::fs::read_to_string(files.leases()).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leases_parse() {
        let dir = std::env::temp_dir().join(format!("ferro-net-leases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files::new(&dir);
        std::fs::write(
            files.leases(),
            "1796062852 52:54:00:aa:bb:cc 192.168.150.5 web1 01:52:54:00:aa:bb:cc\n0 52:54:00:aa:bb:cd 192.168.150.6 * *\ngarbage\n",
        )
        .unwrap();
        let leases = read_leases(&files);
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].hostname.as_deref(), Some("web1"));
        assert_eq!(leases[0].expiry, Some(1796062852));
        assert_eq!(leases[1].hostname, None);
        assert_eq!(leases[1].expiry, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
