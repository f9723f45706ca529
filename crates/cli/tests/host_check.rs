//! `ferro host-check` reports what ferrod's networks need: nft, dnsmasq and kernel bridges
//! (scripts/setup.sh installs the first two; this kernel has the third).

use std::process::Command;

#[test]
fn host_check_reports_network_support() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferro")).arg("host-check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for what in ["nft", "dnsmasq", "kernel bridges"] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {what} (for ferrod's nat and isolated networks)")))
            .unwrap_or_else(|| panic!("no {what} line in\n{text}"));
        assert!(line.starts_with("PASS"), "{line} (scripts/setup.sh installs nftables and dnsmasq-base)");
    }
}
