//! `ferro host-check`: like virt-host-validate, one PASS/WARN/FAIL line per thing a VM needs.
//! Exit status 0 when a VM can run here (no FAIL).

use ferro_hypervisor::host_memory::{self, HugePagePool, Ksm};
use ferro_hypervisor::kvm_ioctls::Kvm;
use ferro_hypervisor::{HostKind, REQUIRED_CAPS, probe_host_kind};
use std::path::Path;
use std::process::ExitCode;

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Pass,
    Warn,
    Fail,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, detail: &str) {
        let tag = match level {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => {
                self.failed = true;
                "FAIL"
            }
        };
        if detail.is_empty() {
            println!("{tag:<5} {what}");
        } else {
            println!("{tag:<5} {what}: {detail}");
        }
    }
}

fn accessible(path: &str, mode: i32) -> bool {
    let c = std::ffi::CString::new(path).expect("static path");
    // SAFETY: access() only reads the NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

pub fn run() -> ExitCode {
    let mut r = Report { failed: false };
    if !Path::new("/dev/kvm").exists() {
        r.line(Level::Fail, "/dev/kvm exists", "missing: load kvm_intel or kvm_amd (modprobe) and enable VT-x/AMD-V in the firmware");
    } else {
        r.line(Level::Pass, "/dev/kvm exists", "");
        if accessible("/dev/kvm", libc::R_OK | libc::W_OK) {
            r.line(Level::Pass, "/dev/kvm is accessible", "");
        } else {
            r.line(Level::Fail, "/dev/kvm is accessible", "no read/write permission: add your user to the 'kvm' group or run as root");
        }
    }

    match probe_host_kind() {
        HostKind::Intel | HostKind::Amd => {
            let kind = probe_host_kind();
            r.line(Level::Pass, "KVM module", &format!("{} (hardware-assisted virtualization)", kind.module()))
        }
        HostKind::Pvm => r.line(
            Level::Warn,
            "KVM module",
            "kvm_pvm (software nested virtualization: guest kernel code is interpreted, ~2 MIPS; stock distro kernels do not boot, small patched ones do)",
        ),
        HostKind::Unknown => r.line(Level::Warn, "KVM module", "could not tell which module backs /dev/kvm"),
    }

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("vmx") || has("svm") {
        r.line(Level::Pass, "CPU virtualization flags", if has("vmx") { "vmx" } else { "svm" });
    } else {
        r.line(Level::Warn, "CPU virtualization flags", "neither vmx nor svm: this host is itself a VM without nested hardware virtualization");
    }

    match Kvm::new() {
        Ok(kvm) => {
            let api = kvm.get_api_version();
            r.line(if api == 12 { Level::Pass } else { Level::Fail }, "KVM API version", &api.to_string());
            for cap in REQUIRED_CAPS {
                let ok = kvm.check_extension(*cap);
                r.line(if ok { Level::Pass } else { Level::Fail }, &format!("KVM capability {cap:?}"), if ok { "" } else { "missing" });
            }
            r.line(Level::Pass, "KVM vCPU limit", &format!("{} recommended, {} maximum per VM", kvm.get_nr_vcpus(), kvm.get_max_vcpus()));
        }
        Err(e) => r.line(Level::Fail, "open /dev/kvm", &e.to_string()),
    }

    if accessible("/dev/net/tun", libc::R_OK | libc::W_OK) {
        r.line(Level::Pass, "/dev/net/tun (tap networking)", "");
    } else {
        r.line(Level::Warn, "/dev/net/tun (tap networking)", "missing or not accessible: modprobe tun");
    }
    if Path::new("/dev/vhost-net").exists() {
        r.line(Level::Pass, "/dev/vhost-net", "");
    } else {
        r.line(Level::Warn, "/dev/vhost-net", "missing: in-kernel virtio-net acceleration unavailable (modprobe vhost_net)");
    }
    for (what, support) in ferro_net::host_support() {
        let what = format!("{what} (for ferrod's nat and isolated networks)");
        match support {
            Ok(detail) => r.line(Level::Pass, &what, &detail),
            Err(why) => r.line(Level::Warn, &what, &why),
        }
    }
    match HugePagePool::read() {
        Ok(pool) if pool.total > 0 => r.line(Level::Pass, "huge pages", &format!("{} of {} 2 MiB pages free", pool.available(), pool.total)),
        Ok(_) => r.line(Level::Warn, "huge pages", "none reserved (echo N > /proc/sys/vm/nr_hugepages to back guests with 2 MiB pages)"),
        Err(why) => r.line(Level::Warn, "huge pages", &why),
    }
    match host_memory::thp_mode() {
        Ok(mode) if mode == "never" => r.line(Level::Warn, "transparent huge pages", "never (guest RAM is advised for THP; echo madvise > /sys/kernel/mm/transparent_hugepage/enabled)"),
        Ok(mode) => r.line(Level::Pass, "transparent huge pages", &mode),
        Err(why) => r.line(Level::Warn, "transparent huge pages", &why),
    }
    match Ksm::read() {
        Ok(ksm) if ksm.running => r.line(Level::Pass, "KSM (memory merging)", &format!("running, {} pages sharing", ksm.pages_sharing)),
        Ok(_) => r.line(Level::Warn, "KSM (memory merging)", "not running (echo 1 > /sys/kernel/mm/ksm/run to merge guests with merge=on / mem_merge)"),
        Err(why) => r.line(Level::Warn, "KSM (memory merging)", &why),
    }
    for (controller, support) in ferro_jail::cgroup::Host::detect().support() {
        let what = format!("cgroup controller {} (per-VM limits)", controller.name());
        match support {
            Ok(detail) => r.line(Level::Pass, &what, &detail),
            Err(why) => r.line(Level::Warn, &what, &why),
        }
    }
    if r.failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
