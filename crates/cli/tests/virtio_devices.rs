//! Virtio devices driven by the `virtio` test guest's own driver (guests/kit/virtio*.c): each
//! device must move real data on each transport, with an interrupt.

use ferro_test_support::vm::{ferro, run_virtio_guest};

#[test]
fn rng_returns_random_bytes_with_an_interrupt_on_both_transports() {
    for transport in ["mmio", "pci"] {
        let out = run_virtio_guest(&["--transport", transport, "--rng"]);
        assert!(out.contains(&format!("type 4 on {transport}")), "{out}");
        assert!(out.contains("virtio-rng: got 64 bytes"), "{transport}: {out}");
        assert!(out.contains("irqs 1"), "{transport}: {out}");
    }
}

#[test]
fn rng_rate_limit_still_answers_on_both_transports() {
    for transport in ["mmio", "pci"] {
        let out = run_virtio_guest(&["--transport", transport, "--rng", "rate=1K"]);
        assert!(out.contains("virtio-rng: got 64 bytes"), "{transport}: {out}");
    }
}

#[test]
fn bad_device_flags_are_refused_with_the_option_named() {
    for (args, expect) in [
        (vec!["--rng", "speed=3"], "unknown option 'speed'"),
        (vec!["--rng", "rate=0"], "at least 1 byte"),
        (vec!["--disk", "format=raw"], "path=FILE is required"),
        (vec!["--disk", "path=/x,format=vmdk"], "not raw or qcow2"),
        (vec!["--net", "tap=averyveryverylongname"], "not a valid interface name"),
        (vec!["--net", "tap=t0,mac=01:00:00:00:00:01"], "multicast"),
        (vec!["--net", "tap=t0,mac=zz"], "not a MAC address"),
        (vec!["--vsock", "cid=2,uds=/tmp/v"], "0-2 are reserved"),
        (vec!["--balloon", "size=lots"], "not a number of MiB"),
        (vec!["--console", "serial"], "not pty or socket=PATH"),
    ] {
        let mut full = vec!["run", "--guest", "hello"];
        full.extend_from_slice(&args);
        let o = ferro(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
