//! seccomp filters of the VMM's threads (`--seccomp`): guests run under them with every device
//! kind, every thread of a running VMM is filtered (seen from /proc, as an administrator would),
//! and a call outside a thread's allowlist kills the VMM with SIGSYS (the debug-build hook
//! FERRO_SECCOMP_SELFTEST makes a thread of the named kind call getppid, which no list allows).

use ferro_test_support::vm::{Vmm, ferro_command, run_virtio_guest};
use ferro_test_support::{TempDir, wait_for};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

#[test]
fn guests_run_under_the_filters_with_every_device_kind() {
    run_virtio_guest(&["--seccomp", "--rng", "--cpus", "2"]);
    run_virtio_guest(&["--seccomp", "--transport", "mmio", "--rng"]);
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let dir = TempDir::new("seccomp-threads");
    let serial = dir.join("serial.sock");
    let mut vmm = Vmm::start(
        dir,
        &[
            "--seccomp",
            "--guest",
            "idle",
            "--cpus",
            "2",
            "--rng",
            "--serial-socket",
            serial.to_str().unwrap(),
        ],
    );
    let _console = std::os::unix::net::UnixStream::connect(&serial).expect("serial socket");
    // Requests, so the connection thread exists too. The socket answers from just before the
    // first resume, so a fresh VMM may still say "paused" for a moment.
    wait_for("the VMM to report running", Duration::from_secs(10), || vmm.request(r#"{"op":"info"}"#)["state"] == "running");
    let pid = vmm.child.id();
    let threads = || -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?.path();
                Some((
                    std::fs::read_to_string(task.join("comm"))
                        .ok()?
                        .trim()
                        .to_string(),
                    std::fs::read_to_string(task.join("status")).ok()?,
                ))
            })
            .collect()
    };
    // A new thread carries its parent's name until it has set its own.
    let expected = [
        "api",
        "api-conn",
        "ferro",
        "serial-in",
        "serial-sock",
        "vcpu0",
        "vcpu1",
    ];
    wait_for(
        "every kind of thread to be there",
        Duration::from_secs(10),
        || {
            let names: Vec<String> = threads().into_iter().map(|(name, _)| name).collect();
            expected.iter().all(|e| names.iter().any(|n| n == e))
        },
    );
    for (name, status) in threads() {
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or("?")
                .to_string()
        };
        assert_eq!(
            (field("Seccomp:"), field("NoNewPrivs:")),
            ("2".to_string(), "1".to_string()),
            "thread {name} of the VMM"
        );
    }
    assert_eq!(vmm.request(r#"{"op":"quit"}"#)["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn a_call_outside_the_allowlist_kills_the_vmm() {
    for kind in ["main", "vcpu", "virtio-rng"] {
        let out = ferro_command()
            .args([
                "run",
                "--seccomp",
                "--guest",
                "virtio",
                "--memory",
                "64M",
                "--rng",
            ])
            .env("FERRO_SECCOMP_SELFTEST", kind)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without --seccomp the same hook does nothing.
    let out = ferro_command()
        .args(["run", "--guest", "hello"])
        .env("FERRO_SECCOMP_SELFTEST", "main")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
}
