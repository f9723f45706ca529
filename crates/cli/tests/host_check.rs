//! `ferro host-check` reports what ferrod's networks need: nft, dnsmasq and kernel bridges
//! (scripts/setup.sh installs the first two; this kernel has the third).

use ferro_test_support::vm::{ferro, stdout};

#[test]
fn host_check_reports_network_support() {
    let text = stdout(&ferro(&["host-check"]));
    for what in ["nft", "dnsmasq", "kernel bridges"] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {what} (for ferrod's nat and isolated networks)")))
            .unwrap_or_else(|| panic!("no {what} line in\n{text}"));
        assert!(line.starts_with("PASS"), "{line} (scripts/setup.sh installs nftables and dnsmasq-base)");
    }
}

/// The KSM line follows /sys/kernel/mm/ksm/run, switched here and put back.
#[test]
fn host_check_reports_whether_ksm_runs() {
    const RUN: &str = "/sys/kernel/mm/ksm/run";
    let before = std::fs::read_to_string(RUN).unwrap_or_else(|e| panic!("{RUN}: {e} (the kernel needs CONFIG_KSM)"));
    let ksm_line = |run: &str| {
        std::fs::write(RUN, run).unwrap_or_else(|e| panic!("writing {run} to {RUN}: {e} (the tests run as root)"));
        let text = stdout(&ferro(&["host-check"]));
        text.lines().find(|l| l.contains(" KSM (memory merging)")).unwrap_or_else(|| panic!("no KSM line in\n{text}")).to_owned()
    };
    let (off, on) = (ksm_line("0"), ksm_line("1"));
    std::fs::write(RUN, before.trim()).unwrap();
    assert!(off.starts_with("WARN") && off.contains("not running (echo 1 > /sys/kernel/mm/ksm/run"), "{off}");
    assert!(on.starts_with("PASS") && on.contains("running, "), "{on}");
    let text = stdout(&ferro(&["host-check"]));
    assert!(text.lines().any(|l| l.contains(" transparent huge pages: ")), "{text}");
}
