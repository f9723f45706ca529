//! The virtio-pci transport seen from the `virtio` test guest (guests/kit/virtio_pci.c): the
//! guest finds the PCI host bridge's ECAM through ACPI MCFG (or uses the 0xcf8 ports), finds the
//! device's function and capabilities, programs MSI-X, and moves data with an MSI-X interrupt
//! delivered by KVM (irqfd + GSI route) and kicks caught by KVM ioeventfds. Hostile
//! configuration and MSI-X traffic from the guest must leave the VMM and the device working.

use std::process::{Command, Output, Stdio};

fn ferro(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferro")).args(args).stdin(Stdio::null()).output().expect("run ferro")
}

/// Runs the virtio guest with `extra` flags; asserts it passed and returns its console output.
fn run_virtio_guest(extra: &[&str]) -> String {
    let mut args = vec!["run", "--guest", "virtio", "--memory", "64M"];
    args.extend_from_slice(extra);
    let o = ferro(&args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{extra:?}: {out}{err}");
    assert!(out.contains("virtio: all devices passed"), "{out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

#[test]
fn rng_on_pci_moves_data_with_an_msix_interrupt() {
    let out = run_virtio_guest(&["--transport", "pci", "--rng"]);
    assert!(out.contains("virtio-pci: config through ECAM at e0000000"), "MCFG gives the ECAM base: {out}");
    assert!(out.contains("virtio-pci: 00:1.0 type 4, BAR c0000000, 2 MSI-X vectors, notify x4"), "{out}");
    assert!(out.contains("virtio: device 0 type 4 on pci"), "{out}");
    assert!(out.contains("virtio-rng: got 64 bytes"), "{out}");
    assert!(out.contains("irqs 1"), "exactly one MSI-X interrupt for one request: {out}");
}

#[test]
fn pci_is_the_default_transport() {
    let out = run_virtio_guest(&["--rng"]);
    assert!(out.contains("virtio: device 0 type 4 on pci"), "{out}");
}

#[test]
fn legacy_config_ports_reach_the_same_function() {
    let out = run_virtio_guest(&["--rng", "--cmdline", "pci_ports=1"]);
    assert!(out.contains("virtio-pci: config through ports cf8"), "{out}");
    assert!(out.contains("virtio-pci: 00:1.0 type 4, BAR c0000000"), "{out}");
    assert!(out.contains("virtio-rng: got 64 bytes"), "{out}");
}

#[test]
fn hostile_config_and_msix_writes_leave_the_device_working() {
    for cmdline in ["pci_hostile=1", "pci_hostile=1 pci_ports=1"] {
        let out = run_virtio_guest(&["--rng", "--cmdline", cmdline]);
        assert!(out.contains("pci-hostile: 00:1.0 config space held (BAR size 8000)"), "{cmdline}: {out}");
        assert!(out.contains("pci-hostile: 00:1.0 MSI-X garbage absorbed"), "{cmdline}: {out}");
        assert!(!out.contains("pci-hostile: FAILED"), "{cmdline}: {out}");
        // After garbage MSI-X entries the driver reprograms them and gets its interrupt.
        assert!(out.contains("virtio-rng: got 64 bytes") && out.contains("irqs 1"), "{cmdline}: {out}");
    }
}

#[test]
fn virtio_mmio_guests_still_see_an_empty_pci_bus() {
    let out = run_virtio_guest(&["--transport", "mmio", "--rng"]);
    assert!(out.contains("virtio-pci: config through ECAM at e0000000"), "{out}");
    assert!(out.contains("virtio: 1 devices") && out.contains("on mmio"), "{out}");
}
