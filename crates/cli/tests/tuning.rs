//! Memory tuning at the VMM level, each proven by what the kernel reports: guest RAM from 2 MiB
//! huge pages (the pool's free count while a guest tests all of its RAM and after it stops, and a
//! snapshot restored into huge pages), the clear error when the pool is short, the
//! transparent-huge-page and KSM advice in the `VmFlags` of the guest RAM mapping, and the
//! pinning control ops seen in each thread's `Cpus_allowed_list`.

use ferro_test_support::hugepages::{self, Reservation};
use ferro_test_support::vm::{Vmm, ferro, ferro_command, read_until, stderr};
use ferro_test_support::{TempDir, wait_exit, wait_for};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Guest RAM in these tests, and the 2 MiB pages it takes.
const MEMORY: &str = "64M";
const MEMORY_KIB: u64 = 64 << 10;
const PAGES: u64 = 32;

/// The `VmFlags` of `pid`'s one mapping of `kib` KiB (guest RAM: no other mapping of the VMM
/// has that size), from /proc/PID/smaps.
fn ram_vmflags(pid: u32, kib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut size = 0;
    let mut found = Vec::new();
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size = rest.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && size == kib
        {
            found.push(flags.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
        }
    }
    assert_eq!(found.len(), 1, "expected one {kib} KiB mapping (guest RAM) in /proc/{pid}/smaps:\n{smaps}");
    found.remove(0)
}

/// Waits until `free` huge pages are available again: a VMM's guest RAM goes back to the pool
/// when KVM lets go of the VM, which happens in a child that outlives the VMM by a moment
/// (ferro_vmm's deferred teardown).
fn pool_back_to(free: u64) {
    wait_for(&format!("{free} free huge pages (now {})", hugepages::available()), Duration::from_secs(10), || hugepages::available() == free);
}

/// `ferro run ARGS` with its console piped, after it printed `ready`.
fn run_until(args: &[&str], ready: &str) -> (Child, String) {
    let mut child = ferro_command().arg("run").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ferro run");
    let mut out = child.stdout.take().expect("piped");
    let mut seen = String::new();
    read_until(&mut out, &mut seen, ready);
    // Keep the pipe open (the guest may print more) for as long as the VM runs.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, seen)
}

/// SIGTERM, and the clean exit that follows.
fn stop(mut child: Child) {
    // SAFETY: kill on the pid of a child this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("ferro run stops on SIGTERM");
    assert!(status.success(), "ferro run ended with {status}");
}

#[test]
fn hugepages_back_all_guest_ram_while_it_runs_and_go_back_when_it_stops() {
    let _pool = Reservation::exactly(PAGES + 8);
    let free_before = hugepages::read("free_hugepages");
    let spec = format!("size={MEMORY},hugepages=on");
    let (child, seen) = run_until(&["--seccomp", "--guest", "memory", "--memory", &spec, "--cmdline", "hold=1"], "memory: holding");
    // The guest wrote and checked every page above its image from ring 3.
    assert!(seen.contains("memory: verified 60 MiB in ring 3 with 0 errors"), "{seen}");
    assert_eq!(free_before - hugepages::read("free_hugepages"), PAGES, "64 MiB of guest RAM, all touched, is 32 huge pages");
    assert_eq!(hugepages::read("resv_hugepages"), 0, "every reserved page is in use");
    let flags = ram_vmflags(child.id(), MEMORY_KIB);
    assert!(flags.iter().any(|f| f == "ht"), "guest RAM is a hugetlb mapping: {flags:?}");
    stop(child);
    pool_back_to(free_before);
}

#[test]
fn too_few_free_huge_pages_is_refused_before_the_vm_starts() {
    let _pool = Reservation::exactly(PAGES - 3);
    let spec = format!("size={MEMORY},hugepages=on");
    let o = ferro(&["run", "--guest", "hello", "--memory", &spec]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("hugepages=on needs 32 free 2 MiB huge pages (64 MiB), the host has 29 free"), "{err}");
    assert!(err.contains("/proc/sys/vm/nr_hugepages"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Hello"), "the guest never ran");
    assert_eq!(hugepages::available(), PAGES - 3, "nothing was taken from the pool");
    let odd = ferro(&["run", "--memory", "size=65M,hugepages=on"]);
    assert!(stderr(&odd).contains("not a whole number of 2 MiB huge pages"), "{}", stderr(&odd));
    let both = ferro(&["run", "--memory", "size=64M,hugepages=on,merge=on"]);
    assert!(stderr(&both).contains("merge cannot be combined with hugepages"), "{}", stderr(&both));
}

#[test]
fn a_snapshot_of_a_huge_page_guest_restores_into_huge_pages() {
    let _pool = Reservation::exactly(PAGES);
    let snaps = TempDir::new("tuning-snap");
    let saved = snaps.join("saved");
    let spec = format!("size={MEMORY},hugepages=on");
    let start = |tag: &str, args: &[&str]| {
        let dir = TempDir::new(tag);
        let serial = dir.join("serial.sock");
        // Under seccomp, as ferrod runs VMMs: saving and restoring huge-page RAM stays allowed.
        let mut all = vec!["--seccomp"];
        all.extend(args);
        all.extend(["--serial-socket", serial.to_str().unwrap()]);
        let vmm = Vmm::start(dir, &all);
        wait_for("the serial socket", Duration::from_secs(10), || serial.exists());
        let console = UnixStream::connect(&serial).unwrap();
        console.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (vmm, console)
    };

    let (mut a, mut console) = start("tuning-a", &["--guest", "counter", "--memory", &spec]);
    let mut seen = String::new();
    read_until(&mut console, &mut seen, "counter: up seed=");
    read_until(&mut console, &mut seen, "\n");
    let seed = seen.rsplit_once("seed=").unwrap().1.trim().to_owned();
    assert_eq!(hugepages::available(), 0, "the running guest holds all 32 pages");
    let reply = a.request(&serde_json::json!({"op": "snapshot", "dir": saved, "resume": false}).to_string());
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(a.request(r#"{"op":"quit"}"#)["ok"], true);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).code(), Some(0));
    pool_back_to(PAGES);

    let (mut b, mut console) = start("tuning-b", &["--restore", saved.to_str().unwrap()]);
    assert_eq!(hugepages::available(), 0, "the restored guest's RAM is huge pages again");
    let flags = ram_vmflags(b.child.id(), MEMORY_KIB);
    assert!(flags.iter().any(|f| f == "ht"), "{flags:?}");
    console.write_all(b"c").unwrap();
    let mut seen = String::new();
    read_until(&mut console, &mut seen, &format!("counter: 1 seed={seed} errors=0"));
    assert!(!seen.contains("counter: up"), "the restored guest rebooted: {seen}");
    assert_eq!(b.request(r#"{"op":"quit"}"#)["ok"], true);
    assert_eq!(b.wait_exit(Duration::from_secs(10)).code(), Some(0));
    pool_back_to(PAGES);
}

#[test]
fn guest_ram_is_advised_for_transparent_huge_pages_and_for_ksm_with_merge() {
    for (memory, merge) in [(MEMORY.to_string(), false), (format!("size={MEMORY},merge=on"), true)] {
        let (child, _) = run_until(&["--guest", "idle", "--memory", &memory], "idle: up");
        let flags = ram_vmflags(child.id(), MEMORY_KIB);
        assert!(flags.iter().any(|f| f == "hg"), "--memory {memory}: MADV_HUGEPAGE in {flags:?}");
        assert_eq!(flags.iter().any(|f| f == "mg"), merge, "--memory {memory}: MADV_MERGEABLE in {flags:?}");
        stop(child);
    }
}

/// `Cpus_allowed_list` of thread `tid` of process `pid`.
fn allowed_cpus(pid: u32, tid: i64) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("task status");
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list").trim().to_owned()
}

/// The control ops under seccomp: vCPU threads carry their names, pin_vcpu and pin_emulator move exactly the threads they
/// name, and bad requests are refused by name.
#[test]
fn pinning_requests_move_threads_under_seccomp() {
    let mut vmm = Vmm::start(TempDir::new("tuning-pin"), &["--seccomp", "--guest", "idle", "--cpus", "2"]);
    let pid = vmm.child.id();
    let pin = |vmm: &mut Vmm, request: serde_json::Value| vmm.request(&request.to_string());
    assert_eq!(pin(&mut vmm, serde_json::json!({"op": "pin_vcpu", "vcpu": 0, "cpus": "1"}))["ok"], true);
    assert_eq!(pin(&mut vmm, serde_json::json!({"op": "pin_emulator", "cpus": "0"}))["ok"], true);
    let info = vmm.request(r#"{"op":"vcpu_info"}"#);
    assert_eq!(info["ok"], true, "{info}");
    let tids: Vec<i64> = info["vcpus"].as_array().unwrap().iter().map(|v| v["thread_id"].as_i64().unwrap()).collect();
    assert_eq!(allowed_cpus(pid, tids[0]), "1");
    assert_eq!(info["vcpus"][0]["affinity"], "1");
    assert_eq!(info["emulator_affinity"], "0");
    for (vcpu, tid) in tids.iter().enumerate() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{vcpu}"));
    }
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i64 = entry.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        // KVM's own worker (kvm-nx-lpage-recovery) is placed by the kernel.
        if !tids.contains(&tid) && !comm.starts_with("kvm-") {
            assert_eq!(allowed_cpus(pid, tid), "0", "thread {tid} ({}) is not a vCPU", comm.trim());
        }
    }
    for (request, why) in [
        (serde_json::json!({"op": "pin_vcpu", "vcpu": 0, "cpus": "9"}), "this host has no CPU 9"),
        (serde_json::json!({"op": "pin_vcpu", "vcpu": 3, "cpus": "0"}), "vCPU 3 does not exist (this VM has 2)"),
        (serde_json::json!({"op": "pin_emulator", "cpus": "0-"}), "is not a CPU list"),
    ] {
        let reply = pin(&mut vmm, request.clone());
        assert!(reply["error"].as_str().is_some_and(|e| e.contains(why)), "{request}: {reply}");
    }
    assert_eq!(allowed_cpus(pid, tids[0]), "1", "a refused request moves nothing");
    assert_eq!(vmm.request(r#"{"op":"quit"}"#)["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(10)).success(), "the VMM was not killed by its seccomp filter");
}
