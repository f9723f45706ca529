//! Isolation of each domain's VMM, checked from the outside the way an administrator would: the
//! cgroups ferrod puts a run in (below its own, with the definition's limits, surviving a ferrod
//! restart, removed at the end) and the limits holding the VM back.

use ferro_jail::cgroup::BlockDevice;
use ferro_test_support::daemon::{Daemon, Home};
use ferro_test_support::{cgroup_of, wait_for};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn info(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}"), None, 200)
}

fn stats(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}/stats"), None, 200)
}

/// A limit file of the VMM's v1 cgroup for `controller` (this host is hybrid; a unified host
/// would have them all in one directory).
fn v1_file(pid: u32, controller: &str, file: &str) -> String {
    let path = PathBuf::from(format!("/sys/fs/cgroup/{controller}{}/{file}", cgroup_of(pid, controller)));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

fn define_and_start(d: &Daemon, home: &Home, name: &str, toml: &str) -> u32 {
    let file = home.path().join(format!("{name}.toml"));
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    d.ferro_ok(&["start", name]);
    info(d, name)["pid"].as_u64().unwrap() as u32
}

#[test]
fn each_domain_runs_in_its_own_cgroup_with_its_limits() {
    assert!(
        !Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        "this test reads the v1 hierarchies of a hybrid host; this host is unified"
    );
    let home = Home::new("cgroups");
    let mut d = Daemon::start(&home);
    let images = home.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let disk = images.join("spin.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let device = BlockDevice::of_file(&disk).unwrap_or_else(|e| panic!("the disk limit needs a block device under the test's home: {e}"));
    // A guest that never stops exiting to the VMM: it wants a whole CPU and gets 10 %.
    let toml = format!(
        "name = \"spin\"\nmemory = \"64M\"\n[boot]\nguest = \"exitbench\"\ncmdline = \"pio=4000000000\"\n\
         [[disk]]\npath = \"{}\"\n[limits]\ncpu_percent = 10\npids = 64\ndisk_read_bps = \"8M\"\ndisk_write_bps = \"4M\"\ndisk_iops = 200\n",
        disk.display()
    );
    let vmm = define_and_start(&d, &home, "spin", &toml);
    let uuid = info(&d, "spin")["uuid"].as_str().unwrap().to_string();
    let ferrod = d.child.id();

    // Below ferrod's own cgroup in every hierarchy, never in it.
    for controller in ["cpu", "memory", "blkio", "pids", ""] {
        let own = cgroup_of(ferrod, controller);
        let expected = format!("{}/vm-spin-{uuid}", own.trim_end_matches('/'));
        assert_eq!(cgroup_of(vmm, controller), expected, "{controller:?} cgroup of the VMM (ferrod is in {own})");
    }
    assert_eq!(v1_file(vmm, "cpu", "cpu.cfs_quota_us"), "10000");
    assert_eq!(v1_file(vmm, "cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(v1_file(vmm, "memory", "memory.limit_in_bytes"), ((64u64 + 64) << 20).to_string(), "guest RAM plus 64 MiB");
    assert_eq!(v1_file(vmm, "pids", "pids.max"), "64");
    assert_eq!(v1_file(vmm, "blkio", "blkio.throttle.read_bps_device"), format!("{device} {}", 8 << 20));
    assert_eq!(v1_file(vmm, "blkio", "blkio.throttle.write_bps_device"), format!("{device} {}", 4 << 20));
    assert_eq!(v1_file(vmm, "blkio", "blkio.throttle.write_iops_device"), format!("{device} 200"));

    // The quota holds the guest back, and domstats says so.
    wait_for("the CPU quota to throttle the spinning guest", Duration::from_secs(60), || {
        stats(&d, "spin")["cgroup"]["cpu"]["throttled_periods"].as_u64().unwrap_or(0) > 0
    });
    let cgroup = stats(&d, "spin")["cgroup"].clone();
    assert_eq!(cgroup["cpu"]["limit_percent"], 10);
    assert_eq!(cgroup["memory"]["limit_bytes"], (64u64 + 64) << 20);
    assert_eq!(cgroup["pids"]["limit"], 64);
    assert!(cgroup["pids"]["current"].as_u64().unwrap() >= 3, "monitor, VMM main thread, vCPU: {cgroup}");
    let io = cgroup["io"].as_array().unwrap().iter().find(|i| i["device"] == device.to_string()).expect("the disk's device");
    assert_eq!((io["read_bps_limit"].as_u64(), io["read_iops_limit"].as_u64()), (Some(8 << 20), Some(200)));
    let text = d.ferro_ok(&["domstats", "spin"]);
    let cpu_line = text.lines().find(|l| l.starts_with("CPU limit:")).unwrap_or_else(|| panic!("{text}"));
    assert!(cpu_line.contains("10% of a host CPU; throttled in") && !cpu_line.contains("throttled in 0 of"), "{cpu_line}");
    assert!(text.contains("Memory limit:   128.00 MiB") && text.contains("Task limit:     64;"), "{text}");
    let paths: Vec<PathBuf> = cgroup["paths"].as_array().unwrap().iter().map(|p| PathBuf::from(p.as_str().unwrap())).collect();
    assert_eq!(paths.len(), 5, "unified, cpu, memory, blkio, pids: {paths:?}");

    // A restarted ferrod, whatever cgroup it starts in, finds the run's cgroup and removes it
    // when the run ends.
    d.kill9();
    let d = Daemon::start(&home);
    assert_eq!(stats(&d, "spin")["cgroup"]["paths"], cgroup["paths"]);
    d.ferro_ok(&["destroy", "spin"]);
    for path in &paths {
        assert!(!path.exists(), "{} outlived its run", path.display());
    }
}

#[test]
fn a_vmm_past_its_memory_limit_is_killed_and_the_crash_says_why() {
    let home = Home::new("oom");
    let d = Daemon::start(&home);
    // The memory guest writes all of its RAM above its image; the VMM may only use 1 MiB beyond
    // the guest's RAM. With 1 GiB of RAM the kernel's own accounting for the VM (its memory slot
    // maps and page tables, charged to the cgroup) outgrows the small headroom below the guest's
    // image (with 64 MiB the guest fits).
    let toml = "name = \"hog\"\nmemory = \"1G\"\n[boot]\nguest = \"memory\"\n[limits]\nmemory_overhead = \"1M\"\n";
    let file = home.path().join("hog.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    // The VMM may die before or after it answers its first request: either way the domain ends
    // up crashed with the reason.
    let _ = d.ferro(&["start", "hog"]);
    wait_for("the VMM to end", Duration::from_secs(60), || ["shutoff", "crashed"].contains(&info(&d, "hog")["state"].as_str().unwrap()));
    let info = info(&d, "hog");
    assert_eq!(info["state"], "crashed", "{info}");
    let crash = info["crash"].clone();
    let reason = crash["reason"].as_str().unwrap();
    assert!(reason.starts_with("out of memory: the kernel killed the VMM at the domain's memory limit of 1025 MiB"), "{crash}");
    assert_eq!(crash["signal"], 9, "{crash}");
}

/// `Seccomp:` and `NoNewPrivs:` of every thread of process `pid`, one pair per thread.
fn thread_filters(pid: u32) -> Vec<(String, String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("threads of {pid}: {e}"));
    tasks
        .flatten()
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("?").trim().to_string();
            Some((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")))
        })
        .collect()
}

/// ferrod runs every VMM under its seccomp filters: each thread of a domain's VMM shows
/// `Seccomp: 2` and `NoNewPrivs: 1`. A VMM thread that makes a forbidden call (the debug-build
/// hook, inherited from ferrod's environment) leaves the domain `crashed` with the reason
/// `seccomp`, the thread kind and the call's number. ferrod `--no-seccomp` runs VMMs unfiltered.
#[test]
fn ferrod_runs_vmms_under_seccomp_and_names_a_forbidden_call() {
    let toml = |name: &str| format!("name = \"{name}\"\nmemory = \"64M\"\nvcpus = 2\n[boot]\nguest = \"idle\"\n");
    let home = Home::new("seccomp");
    let d = Daemon::start(&home);
    let vmm = define_and_start(&d, &home, "filtered", &toml("filtered"));
    // The main thread installs its filter once the VM runs, maybe after the start returned.
    wait_for("every VMM thread filtered", Duration::from_secs(10), || thread_filters(vmm).iter().all(|(_, mode, _)| mode == "2"));
    let threads = thread_filters(vmm);
    let names: Vec<&str> = threads.iter().map(|(name, _, _)| name.as_str()).collect();
    for expected in ["vcpu0", "vcpu1", "api", "serial-sock"] {
        assert!(names.contains(&expected), "no {expected} thread among {names:?}");
    }
    assert!(threads.iter().all(|(_, _, nnp)| nnp == "1"), "{threads:?}");
    drop(d);

    let home = Home::new("seccomp-hook");
    let d = Daemon::start_with(&home, &[("FERRO_SECCOMP_SELFTEST", "vcpu")]);
    let file = home.path().join("doomed.toml");
    std::fs::write(&file, toml("doomed")).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    // The vCPU may die before or after the VMM answers its first request.
    let _ = d.ferro(&["start", "doomed"]);
    wait_for("the VMM to end", Duration::from_secs(30), || ["shutoff", "crashed"].contains(&info(&d, "doomed")["state"].as_str().unwrap()));
    let crash = info(&d, "doomed")["crash"].clone();
    let getppid = libc::SYS_getppid;
    assert_eq!(
        crash["reason"].as_str(),
        Some(format!("seccomp: the VMM's vcpu thread made the forbidden system call {getppid}; killed by SIGSYS").as_str()),
        "{crash}"
    );
    assert_eq!(crash["signal"], libc::SIGSYS, "{crash}");
    let shown = d.ferro_ok(&["dominfo", "doomed"]);
    assert!(shown.contains(&format!("forbidden system call {getppid}")), "{shown}");
    drop(d);

    let home = Home::new("seccomp-off");
    let d = Daemon::start_args(&home, &["--no-seccomp"], &[("FERRO_SECCOMP_SELFTEST", "vcpu")]);
    let vmm = define_and_start(&d, &home, "open", &toml("open"));
    let threads = thread_filters(vmm);
    assert!(threads.iter().all(|(_, mode, _)| mode == "0"), "{threads:?}");
    assert_eq!(info(&d, "open")["state"], "running", "without filters the hook's call is harmless");
}

/// One line of `/proc/PID/status` (or of a thread's), without its name.
fn status_field(status: &str, name: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name} in {status}")).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// ferrod starts each VMM in a jail of its own (docs/isolation.md, "The jail"), seen from /proc
/// the way an administrator would check it: every thread runs as the ferro-vmm user with no
/// capability, no_new_privs and its seccomp filter; the VMM's root holds its own disk and that
/// disk's backing file (read-only) but not the host's /etc/shadow, ferrod's database or another
/// domain's disk; it has mount, IPC and UTS namespaces of its own and limits on open files and
/// core dumps. The disk it writes is the VMM user's while it runs and root's again after.
/// `ferrod --no-jail` runs the VMM as root in the host's file system.
#[test]
fn ferrod_jails_each_vmm_in_its_own_root_as_the_vmm_user() {
    let vmm_user = ferro_jail::jail::User::lookup("ferro-vmm").unwrap_or_else(|e| panic!("{e}"));
    let home = Home::new("jail");
    let d = Daemon::start(&home);
    let images = home.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (base, overlay, other) = (images.join("base.raw"), images.join("a.qcow2"), images.join("b.raw"));
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    ferro_test_support::run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "raw", overlay.to_str().unwrap()]);
    let toml = |name: &str, disk: &Path| {
        let format = disk.extension().unwrap().to_str().unwrap();
        format!("name = \"{name}\"\nmemory = \"64M\"\nvcpus = 2\n[boot]\nguest = \"idle\"\n[[disk]]\npath = \"{}\"\nformat = \"{format}\"\n", disk.display())
    };
    let vmm = define_and_start(&d, &home, "a", &toml("a", &overlay));
    define_and_start(&d, &home, "b", &toml("b", &other));
    wait_for("every VMM thread filtered", Duration::from_secs(10), || thread_filters(vmm).iter().all(|(_, mode, _)| mode == "2"));

    let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{vmm}/task")).unwrap().flatten().map(|t| t.path()).collect();
    assert!(tasks.len() >= 4, "vCPUs, control and serial threads: {tasks:?}");
    let ids = |id: u32| format!("{id} {id} {id} {id}");
    for task in &tasks {
        let Ok(status) = std::fs::read_to_string(task.join("status")) else { continue };
        let thread = status_field(&status, "Name:");
        assert_eq!(status_field(&status, "Uid:"), ids(vmm_user.uid), "thread {thread}");
        assert_eq!(status_field(&status, "Gid:"), ids(vmm_user.gid), "thread {thread}");
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(&status, set), "0000000000000000", "{set} of thread {thread}");
        }
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "thread {thread}");
        assert_eq!(status_field(&status, "Seccomp:"), "2", "thread {thread}");
    }

    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap());
    for absent in [Path::new("/etc/shadow"), Path::new("/etc/passwd"), &home.path().join("ferrod.db"), &other] {
        assert!(!inside(absent).exists(), "{} is visible in the VMM's jail", absent.display());
    }
    for present in [&overlay, &base, Path::new("/dev/kvm")] {
        assert!(inside(present).exists(), "{} is missing from the VMM's jail", present.display());
    }
    let mounts = std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).unwrap();
    let options_of = |path: &Path| {
        let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap())).unwrap_or_else(|| panic!("{} is not mounted: {mounts}", path.display()));
        line.split(' ').nth(5).unwrap().to_string()
    };
    assert!(options_of(&overlay).starts_with("rw,"), "the disk is writable: {}", options_of(&overlay));
    assert!(options_of(&base).starts_with("ro,"), "its backing file is read-only: {}", options_of(&base));
    assert!(options_of(&overlay).contains("noexec") && options_of(&overlay).contains("nosuid"), "{}", options_of(&overlay));
    assert!(options_of(Path::new("/")).starts_with("ro,"), "the jail's root is read-only: {}", options_of(Path::new("/")));
    for ns in ["mnt", "ipc", "uts"] {
        let of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(of(&vmm.to_string()), of("self"), "the VMM has a {ns} namespace of its own");
    }
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    let limit = |name: &str| limits.lines().find_map(|l| l.strip_prefix(name)).unwrap().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(limit("Max open files"), "4096 4096");
    assert_eq!(limit("Max core file size"), "0 0");

    // The VMM may write its socket directory. A link it puts in place of its control socket,
    // naming the other VM's socket by its host path, must not lead ferrod's requests for this
    // VM to that one: the request fails naming the link, and the other VM runs on.
    let sockets = |name: &str| home.path().join("run").join(info(&d, name)["uuid"].as_str().unwrap()).join("vmm");
    let (own, others) = (sockets("a").join("api.sock"), sockets("b").join("api.sock"));
    let aside = sockets("a").join("api.sock.aside");
    std::fs::rename(&own, &aside).unwrap();
    std::os::unix::fs::symlink(&others, &own).unwrap();
    let out = d.ferro(&["suspend", "a"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is a symbolic link; refusing to connect through it"), "{out:?}");
    assert_eq!(info(&d, "b")["state"], "running", "the other VM was not paused");
    assert_eq!(info(&d, "a")["state"], "running");
    std::fs::remove_file(&own).unwrap();
    std::fs::rename(&aside, &own).unwrap();
    d.ferro_ok(&["suspend", "a"]);
    assert_eq!(info(&d, "a")["state"], "paused", "through its real socket the VMM answers");
    d.ferro_ok(&["resume", "a"]);

    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&overlay).unwrap().uid(), vmm_user.uid, "the VMM user owns the disk it writes while it runs");
    assert_eq!(std::fs::metadata(&base).unwrap().uid(), 0, "a backing file others may read keeps its owner");
    d.ferro_ok(&["destroy", "a"]);
    wait_for("the monitor to give the disk back", Duration::from_secs(10), || std::fs::metadata(&overlay).unwrap().uid() == 0);
    drop(d);

    let home = Home::new("jail-off");
    let d = Daemon::start_args(&home, &["--no-jail"], &[]);
    let vmm = define_and_start(&d, &home, "open", &toml("open", &other));
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert_eq!(status_field(&status, "Uid:"), ids(0), "unjailed, the VMM runs as root");
    assert!(PathBuf::from(format!("/proc/{vmm}/root/etc/passwd")).exists(), "unjailed, the VMM sees the host's files");
}
