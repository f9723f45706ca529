//! virtio-balloon with the `virtio` test guest's driver (guests/kit/virtio_balloon.c): the guest
//! touches a region, inflates it when the target asks, and the VMM's RSS drops by about that
//! much; the target is changed through the control socket while the VM runs and the guest
//! follows; its statistics arrive; deflated pages read back as zeros (released on the host).

use ferro_test_support::TempDir;
use ferro_test_support::vm::{Vmm, ferro};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A `ferro vmm` with its control socket; the console is read from stdout.
struct BalloonVm {
    vmm: Vmm,
    console: BufReader<ChildStdout>,
}

impl BalloonVm {
    fn start(tag: &str, args: &[&str]) -> BalloonVm {
        let mut vmm = Vmm::start(TempDir::new(&format!("balloon-{tag}")), args);
        let console = vmm.stdout();
        BalloonVm { vmm, console }
    }

    /// Reads console lines until one contains `needle`; returns that line.
    fn line_with(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = self.console.read_line(&mut line).unwrap();
            assert!(n > 0, "console ended before {needle:?}:\n{seen}");
            seen.push_str(&line);
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn request(&mut self, req: Value) -> Value {
        self.vmm.request(&req.to_string())
    }

    fn stats(&mut self) -> Value {
        let s = self.request(serde_json::json!({"op": "stats"}));
        assert_eq!(s["ok"], true, "{s}");
        s
    }

    /// Polls `stats` until `done` holds (at most 10 s); returns the stats that satisfied it.
    fn stats_until(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if done(&s) {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{what}: last stats {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn number_after(line: &str, key: &str) -> u64 {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key:?} in {line:?}")) + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn inflating_through_the_control_socket_returns_memory_to_the_host_on_mmio() {
    inflate_and_deflate_through_the_control_socket("mmio");
}

#[test]
fn inflating_through_the_control_socket_returns_memory_to_the_host_on_pci() {
    inflate_and_deflate_through_the_control_socket("pci");
}

fn inflate_and_deflate_through_the_control_socket(transport: &str) {
    // The guest's wait (balloon_wait_s) is generous: the test drives each step.
    let mut vm = BalloonVm::start(
        transport,
        &[
            "--guest", "virtio", "--transport", transport, "--memory", "128M", "--balloon", "size=0",
            "--cmdline", "balloon_touch_mib=48 balloon_wait_s=30",
        ],
    );
    let touched = vm.line_with("touched 48 MiB");
    let ram = number_after(&touched, "ram ");
    let before = vm.stats();
    assert_eq!(before["balloon"]["target_pages"], 0, "{before}");
    assert_eq!(before["balloon"]["actual_pages"], 0, "{before}");
    let rss_touched = before["rss_bytes"].as_u64().unwrap();

    let r = vm.request(serde_json::json!({"op": "balloon", "target_mib": 48}));
    assert_eq!(r["ok"], true, "{r}");
    let inflated = vm.line_with("inflated");
    assert!(inflated.contains("inflated 12288 pages (48 MiB), actual 12288"), "{inflated}");
    let after = vm.stats_until("actual reaches 48 MiB", |s| s["balloon"]["actual_mib"] == 48);
    let rss_inflated = after["rss_bytes"].as_u64().unwrap();
    eprintln!(
        "{transport}: VMM RSS: {} MiB after the guest touched 48 MiB, {} MiB after inflating it (-{} MiB)",
        rss_touched / MIB,
        rss_inflated / MIB,
        rss_touched.saturating_sub(rss_inflated) / MIB
    );
    assert!(rss_touched >= rss_inflated + 40 * MIB, "RSS {rss_touched} -> {rss_inflated}: less than 40 MiB released");
    assert_eq!(after["balloon"]["inflated_pages_total"], 12288, "{after}");
    assert_eq!(after["balloon"]["invalid_pages_total"], 0, "{after}");

    // Each `stats` hands the guest's buffer back for a refill: fresh numbers arrive, and (as on
    // Linux) ballooned pages no longer count in the guest's total.
    let fresh = vm.stats_until("guest stats after inflating", |s| {
        s["balloon"]["guest_stats"]["total_memory"].as_u64() == Some(ram - 48 * MIB)
    });
    let guest = &fresh["balloon"]["guest_stats"];
    assert!(guest["free_memory"].as_u64().unwrap() > 0, "{fresh}");
    assert_eq!(guest["swap_in"], 0, "{fresh}");

    for (bad, why) in [
        (serde_json::json!({"op": "balloon", "target_mib": 129}), "more than the guest's 128 MiB"),
        (serde_json::json!({"op": "balloon"}), "target_mib"),
        (serde_json::json!({"op": "balloon", "target_mib": "lots"}), "target_mib"),
    ] {
        let r = vm.request(bad.clone());
        assert_eq!(r["ok"], false, "{bad}");
        assert!(r["error"].as_str().unwrap().contains(why), "{bad}: {r}");
    }

    let r = vm.request(serde_json::json!({"op": "balloon", "target_mib": 16}));
    assert_eq!(r["ok"], true, "{r}");
    vm.line_with("target lowered to 4096 pages");
    let deflated = vm.line_with("deflated to");
    assert!(deflated.contains("32 MiB back read 0 non-zero words, 0 errors"), "{deflated}");
    vm.line_with("virtio: all devices passed");
    let status = vm.vmm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_balloon_op_needs_a_balloon() {
    let mut vm = BalloonVm::start("none", &["--guest", "idle", "--memory", "64M"]);
    let r = vm.request(serde_json::json!({"op": "balloon", "target_mib": 8}));
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("no balloon"), "{r}");
    assert_eq!(vm.stats()["balloon"], Value::Null);
}

#[test]
fn initial_size_inflates_at_boot_and_deflate_on_oom_gives_pages_back() {
    let o = ferro(&["run", "--guest", "virtio", "--transport", "mmio", "--memory", "128M", "--balloon", "size=32,deflate_on_oom=on"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("target 8192 pages, deflate_on_oom 1"), "{out}");
    assert!(out.contains("inflated 8192 pages (32 MiB), actual 8192"), "{out}");
    assert!(out.contains("deflating to 4096 pages as on OOM"), "{out}");
    assert!(out.contains("16 MiB back read 0 non-zero words, 0 errors"), "{out}");

    // Without DEFLATE_ON_OOM the guest keeps its balloon until the host lowers the target.
    let o = ferro(&["run", "--guest", "virtio", "--transport", "mmio", "--memory", "64M", "--balloon", "size=8"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("deflate_on_oom 0"), "{out}");
    assert!(out.contains("inflated 2048 pages (8 MiB)"), "{out}");
    assert!(out.contains("no deflate requested"), "{out}");
}
