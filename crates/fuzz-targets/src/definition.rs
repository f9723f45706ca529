//! The `definition` target: text a user or a REST client hands ferrod or the VMM as a
//! definition, through the parsing and validation each of them runs.
//!
//! - A domain definition (TOML) as POST /v1/domains and `ferro define` take it
//!   (`ferro_manager::domains::checked_definition`: parse, validate, MACs for NICs without one);
//!   once accepted, the text ferrod would store must read back as the same domain, and the domain
//!   is turned into the VMM's configuration as a start does (`ferro_manager::vmm::vm_config`).
//! - The VMM's configuration as JSON (`ferro vmm --config`, what ferrod writes): deserialized and
//!   validated; a valid one, and every one made from a domain, must survive its JSON round trip.
//! - A network definition (`ferro net-define`): once accepted, its re-serialized TOML must read
//!   back the same.
//! - ferrod's own configuration file (`ferrod.toml`).

use ferro_manager::domain::DomainConfig;
use ferro_manager::vmm::{ResolvedDisk, VmNic, vm_config};
use ferro_net::config::NetworkConfig;
use ferro_vmm_api::{DiskFormat, VmConfig};
use std::path::PathBuf;

/// What the input was accepted as.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DefinitionRun {
    /// A domain definition ferrod would define.
    pub domain: bool,
    /// ... whose VMM configuration is valid (a start would hand it to the VMM).
    pub domain_vm: bool,
    /// A valid VMM configuration in JSON.
    pub vm_json: bool,
    /// A network definition.
    pub network: bool,
    /// A valid `ferrod.toml`.
    pub daemon: bool,
}

pub fn definition(data: &[u8]) -> DefinitionRun {
    let mut run = DefinitionRun::default();
    if let Ok(vm) = serde_json::from_slice::<VmConfig>(data)
        && vm.validate().is_ok()
    {
        json_round_trip(&vm);
        run.vm_json = true;
    }
    // POST /v1/domains refuses a body that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(data) else { return run };
    if let Ok((stored, config)) = ferro_manager::domains::checked_definition(text) {
        run.domain = true;
        match DomainConfig::parse(&stored) {
            Ok(again) => assert_eq!(again, config, "the stored text of an accepted definition reads back as another domain:\n{stored}"),
            Err(e) => panic!("the stored text of an accepted definition is refused ({e}):\n{stored}"),
        }
        if let Some(vm) = started(&config) {
            json_round_trip(&vm);
            run.domain_vm = true;
        }
    }
    if let Ok(network) = NetworkConfig::parse(text) {
        run.network = true;
        let toml = network.to_toml();
        match NetworkConfig::parse(&toml) {
            Ok(again) => assert_eq!(again, network, "an accepted network definition re-serialized reads back as another:\n{toml}"),
            Err(e) => panic!("an accepted network definition re-serialized is refused ({e}):\n{toml}"),
        }
    }
    run.daemon = ferro_manager::config::FileConfig::parse(text).is_ok();
    run
}

/// The VMM configuration a start of `config` makes: pool volumes resolved to files in a pool
/// directory, NICs on taps (ferrod's own for networks and bridges), no disk boot.
fn started(config: &DomainConfig) -> Option<VmConfig> {
    let mut disks = Vec::new();
    for disk in &config.disks {
        let path = match (&disk.path, &disk.pool, &disk.volume) {
            (Some(path), _, _) => PathBuf::from(path),
            (None, Some(pool), Some(volume)) => PathBuf::from(format!("/var/lib/ferrovisor/pools/{pool}/{volume}")),
            _ => return None,
        };
        disks.push(ResolvedDisk { path, format: DiskFormat::from_name(&disk.format)?, readonly: disk.readonly });
    }
    let mut nics = Vec::new();
    for (i, nic) in config.nics.iter().enumerate() {
        let tap = nic.tap.clone().unwrap_or_else(|| format!("fvnic{i}"));
        nics.push(VmNic { tap, mac: nic.mac.as_deref()?.parse().ok()?, fd: None });
    }
    vm_config(config, &disks, &nics, None).ok()
}

/// ferrod writes the VMM's configuration as JSON and `ferro vmm --config` reads it: it must read
/// back the same, and still be valid.
fn json_round_trip(vm: &VmConfig) {
    let json = serde_json::to_string(vm).unwrap_or_else(|e| panic!("a valid VMM configuration cannot be written as JSON: {e}\n{vm:?}"));
    match serde_json::from_str::<VmConfig>(&json) {
        Ok(again) => {
            assert_eq!(&again, vm, "a VMM configuration reads back from its JSON as another:\n{json}");
            assert_eq!(again.validate(), Ok(()), "a valid VMM configuration is refused after its JSON round trip:\n{json}");
        }
        Err(e) => panic!("the JSON of a valid VMM configuration is refused ({e}):\n{json}"),
    }
}
