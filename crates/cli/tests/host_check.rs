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
