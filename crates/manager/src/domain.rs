//! Domain definitions: the human-edited TOML model, its parsing and its validation.
//!
//! Every rejection names the offending key (`disk[1].format: ...`) so that a caller can fix the file
//! without guessing. The TOML text the user defined is kept verbatim for `dumpconfig`.

use ferro_vmm_api::{CpuList, MacAddr};
use serde::{Deserialize, Serialize};

/// Sizes in definitions and requests follow the one grammar of ferro-vmm-api (`512M`, `1.5G`).
pub use ferro_vmm_api::parse_size;

/// One domain definition as written in TOML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    /// Guest memory, e.g. "512M" or "2G" (a bare number is bytes).
    pub memory: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub autostart: bool,
    pub boot: BootConfig,
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, rename = "nic", skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
    /// A memory balloon, so that `setmem` can take memory back while the domain runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// A cloud-init NoCloud seed, attached read-only after the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitConfig>,
    /// Limits of the domain's cgroup; memory is limited even without this table.
    #[serde(default, skip_serializing_if = "LimitsConfig::is_empty")]
    pub limits: LimitsConfig,
    /// How guest memory is backed (libvirt's `<memoryBacking>`).
    #[serde(default, skip_serializing_if = "TuningConfig::is_empty")]
    pub tuning: TuningConfig,
}

fn default_vcpus() -> u32 {
    1
}

/// How the guest boots: a Linux kernel (plus optional initrd and command line), the kernel the
/// first disk's own boot configuration names (`from = "disk"`; `cmdline` is then appended to the
/// one found there), or one of the VMM's built-in test guests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// "disk": boot the kernel, initrd and command line found on the first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Name of a test guest built into the VMM (`ferro run --guest NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default)]
    pub readonly: bool,
}

/// `[cloud_init]`: the NoCloud seed's files, as text. Without `meta_data` the seed says
/// `instance-id: <domain uuid>` and `local-hostname: <domain name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    pub user_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// Largest cloud-init file in a definition.
pub const MAX_CLOUD_INIT_FILE: usize = 256 << 10;

fn default_format() -> String {
    "raw".to_string()
}

/// `[[nic]]`: a virtio NIC on exactly one of a virtual network of ferrod's (`network`), an
/// existing host bridge (`bridge`; ferrod makes the tap) or a tap of the user's (`tap`). A NIC
/// defined without `mac` gets one at define time, written into the stored definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What a NIC is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicAttachment<'a> {
    Network(&'a str),
    Bridge(&'a str),
    Tap(&'a str),
}

impl<'a> NicAttachment<'a> {
    /// `network`, `bridge` or `ethernet` (a tap of the user's), as virsh domiflist names them.
    pub fn kind(self) -> &'static str {
        match self {
            NicAttachment::Network(_) => "network",
            NicAttachment::Bridge(_) => "bridge",
            NicAttachment::Tap(_) => "ethernet",
        }
    }

    /// The network, bridge or tap name.
    pub fn source(self) -> &'a str {
        match self {
            NicAttachment::Network(s) | NicAttachment::Bridge(s) | NicAttachment::Tap(s) => s,
        }
    }
}

/// `[balloon]`: a virtio balloon that starts empty (the guest has all of `memory`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The guest may take pages back from the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
}

/// `[limits]`: what the domain's VMM may use (docs/isolation.md). Sizes take the size grammar.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// CPU time in percent of one host CPU (150: one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
    /// Memory the VMM may use beyond the guest's RAM (its own code, threads, caches, page
    /// cache); [`DEFAULT_MEMORY_OVERHEAD`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overhead: Option<String>,
    /// Bytes per second the domain may read from (write to) each host disk its images are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_read_bps: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_write_bps: Option<String>,
    /// Read and write operations per second, each, on each such disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u64>,
    /// Processes and threads of the VMM (each vCPU, device worker and socket is a thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// `[tuning]`: how guest memory is backed and which host CPUs the VMM's threads run on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TuningConfig {
    /// Guest RAM from 2 MiB huge pages reserved on the host (`/proc/sys/vm/nr_hugepages`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hugepages: bool,
    /// Guest RAM mergeable by KSM (identical pages shared copy-on-write across domains).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mem_merge: bool,
    /// `vcpu_pin[i]`: the host CPUs vCPU i runs on (`"2"`, `"3-4"`); vCPUs past the end are not
    /// pinned (libvirt's `<vcpupin>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_pin: Vec<CpuList>,
    /// The host CPUs of the VMM's other threads (libvirt's `<emulatorpin>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator_pin: Option<CpuList>,
}

impl TuningConfig {
    fn is_empty(&self) -> bool {
        *self == TuningConfig::default()
    }

    fn validate(&self, memory: u64, vcpus: u32) -> Result<(), ConfigError> {
        if self.vcpu_pin.len() > vcpus as usize {
            return Err(err("vcpu_pin", format!("{} CPU lists for {vcpus} vCPUs", self.vcpu_pin.len())));
        }
        if self.hugepages && memory % (2 << 20) != 0 {
            return Err(err("hugepages", format!("memory ({memory} bytes) must be a whole number of 2 MiB huge pages")));
        }
        if self.hugepages && self.mem_merge {
            return Err(err("mem_merge", "cannot be combined with hugepages: KSM merges only small pages"));
        }
        Ok(())
    }
}

/// Memory a VMM may use beyond guest RAM unless `[limits] memory_overhead` says otherwise.
pub const DEFAULT_MEMORY_OVERHEAD: u64 = 64 << 20;

impl LimitsConfig {
    fn is_empty(&self) -> bool {
        *self == LimitsConfig::default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(percent) = self.cpu_percent
            && !(1..=100 * MAX_VCPUS).contains(&percent)
        {
            return Err(err("cpu_percent", format!("must be between 1 and {}", 100 * MAX_VCPUS)));
        }
        self.memory_overhead_bytes()?;
        for (key, value) in [("disk_read_bps", &self.disk_read_bps), ("disk_write_bps", &self.disk_write_bps)] {
            if let Some(text) = value {
                let bytes = parse_size(text).map_err(|reason| err(key, reason))?;
                if bytes == 0 {
                    return Err(err(key, "must be at least 1 byte per second"));
                }
            }
        }
        for (key, value) in [("disk_iops", self.disk_iops), ("pids", self.pids)] {
            if value == Some(0) {
                return Err(err(key, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The memory overhead in bytes (the default when not given).
    pub fn memory_overhead_bytes(&self) -> Result<u64, ConfigError> {
        match &self.memory_overhead {
            None => Ok(DEFAULT_MEMORY_OVERHEAD),
            Some(text) => {
                let bytes = parse_size(text).map_err(|reason| err("memory_overhead", reason))?;
                if bytes < 1 << 20 {
                    return Err(err("memory_overhead", "must be at least 1M"));
                }
                Ok(bytes)
            }
        }
    }

    /// A disk rate in bytes per second (validated, so it parses).
    pub fn rate(value: &Option<String>) -> Option<u64> {
        value.as_deref().and_then(|text| parse_size(text).ok())
    }
}

/// A definition that could not be accepted; `key` is the dotted path of the offending key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), reason: reason.into() }
}

/// Disk formats the VMM can open.
pub const DISK_FORMATS: &[&str] = &["raw", "qcow2"];

/// Largest vCPU count accepted in a definition.
pub const MAX_VCPUS: u32 = 255;

impl DomainConfig {
    /// Parses and validates a TOML definition.
    pub fn parse(text: &str) -> Result<DomainConfig, ConfigError> {
        let config: DomainConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; see the module documentation for the error shape.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name).map_err(|reason| err("name", reason))?;
        let memory = parse_size(&self.memory).map_err(|reason| err("memory", reason))?;
        if memory < 1 << 20 {
            return Err(err("memory", "must be at least 1M"));
        }
        if memory > 1 << 40 {
            return Err(err("memory", "must be at most 1T"));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(err("vcpus", format!("must be between 1 and {MAX_VCPUS}")));
        }
        self.boot.validate()?;
        if self.boot.from_disk() && self.disks.is_empty() {
            return Err(err("boot.from", "\"disk\" needs a [[disk]] to boot from (the first one)"));
        }
        if let Some(ci) = &self.cloud_init {
            let files = [("user_data", Some(&ci.user_data)), ("meta_data", ci.meta_data.as_ref()), ("network_config", ci.network_config.as_ref())];
            for (key, text) in files {
                if let Some(text) = text
                    && text.len() > MAX_CLOUD_INIT_FILE
                {
                    return Err(err(format!("cloud_init.{key}"), format!("{} bytes, more than {MAX_CLOUD_INIT_FILE}", text.len())));
                }
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            disk.validate().map_err(|e| err(format!("disk[{i}].{}", e.key), e.reason))?;
        }
        self.limits.validate().map_err(|e| err(format!("limits.{}", e.key), e.reason))?;
        self.tuning.validate(memory, self.vcpus).map_err(|e| err(format!("tuning.{}", e.key), e.reason))?;
        for (i, nic) in self.nics.iter().enumerate() {
            nic.validate().map_err(|e| err(format!("nic[{i}].{}", e.key), e.reason))?;
            if nic.tap.is_some() && self.nics[..i].iter().any(|other| other.tap == nic.tap) {
                return Err(err(format!("nic[{i}].tap"), format!("tap {:?} is used twice", nic.tap.as_deref().unwrap_or(""))));
            }
            if nic.mac.is_some() && self.nics[..i].iter().any(|other| other.mac.as_ref().map(|m| m.to_ascii_lowercase()) == nic.mac.as_ref().map(|m| m.to_ascii_lowercase())) {
                return Err(err(format!("nic[{i}].mac"), format!("{} is used by another NIC", nic.mac.as_deref().unwrap_or(""))));
            }
        }
        Ok(())
    }

    /// Guest memory in bytes (the definition is validated, so this cannot fail afterwards).
    pub fn memory_bytes(&self) -> u64 {
        parse_size(&self.memory).unwrap_or(0)
    }
}

impl BootConfig {
    /// Whether the kernel comes from the first disk (`from = "disk"`).
    pub fn from_disk(&self) -> bool {
        self.from.as_deref() == Some("disk")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(from) = &self.from {
            if from != "disk" {
                return Err(err("boot.from", format!("{from:?} is not a boot source (only \"disk\")")));
            }
            for (key, set) in [("boot.kernel", self.kernel.is_some()), ("boot.initrd", self.initrd.is_some()), ("boot.guest", self.guest.is_some())] {
                if set {
                    return Err(err(key, "cannot be combined with boot.from = \"disk\" (the disk names its kernel)"));
                }
            }
            return self.validate_cmdline();
        }
        match (&self.kernel, &self.guest) {
            (None, None) => {
                return Err(err("boot", "set boot.kernel (a Linux kernel), boot.from = \"disk\" or boot.guest (a built-in test guest)"));
            }
            (Some(_), Some(_)) => return Err(err("boot.guest", "cannot be combined with boot.kernel")),
            (Some(kernel), None) => check_abs_path(kernel).map_err(|r| err("boot.kernel", r))?,
            (None, Some(guest)) => {
                let ok = !guest.is_empty()
                    && guest.len() <= 32
                    && guest.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
                if !ok {
                    return Err(err("boot.guest", "must be a built-in guest name such as \"hello\""));
                }
                if self.initrd.is_some() {
                    return Err(err("boot.initrd", "needs boot.kernel"));
                }
            }
        }
        if let Some(initrd) = &self.initrd {
            check_abs_path(initrd).map_err(|r| err("boot.initrd", r))?;
        }
        self.validate_cmdline()
    }

    fn validate_cmdline(&self) -> Result<(), ConfigError> {
        if let Some(cmdline) = &self.cmdline {
            if cmdline.len() > 2048 {
                return Err(err("boot.cmdline", "longer than 2048 bytes"));
            }
            if cmdline.chars().any(|c| c.is_control()) {
                return Err(err("boot.cmdline", "contains control characters"));
            }
        }
        Ok(())
    }
}

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.path, &self.pool, &self.volume) {
            (Some(path), None, None) => check_abs_path(path).map_err(|r| err("path", r))?,
            (None, Some(pool), Some(volume)) => {
                validate_name(pool).map_err(|r| err("pool", r))?;
                validate_volume_name(volume).map_err(|r| err("volume", r))?;
            }
            (Some(_), _, _) => return Err(err("path", "give either path or pool + volume, not both")),
            (None, Some(_), None) => return Err(err("volume", "missing (pool needs a volume)")),
            (None, None, Some(_)) => return Err(err("pool", "missing (volume needs a pool)")),
            (None, None, None) => return Err(err("path", "missing (give path, or pool + volume)")),
        }
        if !DISK_FORMATS.contains(&self.format.as_str()) {
            return Err(err("format", format!("unknown format {:?} (expected raw or qcow2)", self.format)));
        }
        Ok(())
    }
}

impl NicConfig {
    /// What the NIC is attached to (the definition is validated: exactly one is set).
    pub fn attachment(&self) -> NicAttachment<'_> {
        match (&self.network, &self.bridge, &self.tap) {
            (Some(n), _, _) => NicAttachment::Network(n),
            (None, Some(b), _) => NicAttachment::Bridge(b),
            (None, None, t) => NicAttachment::Tap(t.as_deref().unwrap_or("")),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let given: Vec<&str> = [("network", self.network.is_some()), ("bridge", self.bridge.is_some()), ("tap", self.tap.is_some())]
            .into_iter()
            .filter_map(|(key, set)| set.then_some(key))
            .collect();
        match given.as_slice() {
            [] => return Err(err("network", "missing: give one of network (a virtual network), bridge (a host bridge) or tap")),
            [_] => {}
            [first, second, ..] => return Err(err(*second, format!("cannot be combined with {first}: give one of network, bridge or tap"))),
        }
        if let Some(network) = &self.network {
            ferro_net::config::validate_name(network).map_err(|r| err("network", r))?;
        }
        if let Some(bridge) = &self.bridge {
            ferro_net::config::validate_ifname(bridge).map_err(|r| err("bridge", r))?;
        }
        if let Some(tap) = &self.tap {
            let ok = !tap.is_empty() && tap.len() <= 15 && tap.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !ok {
                return Err(err("tap", "must be an interface name of 1-15 letters, digits, '-', '_' or '.'"));
            }
        }
        if let Some(mac) = &self.mac {
            mac.parse::<MacAddr>().map_err(|reason| err("mac", reason))?;
        }
        Ok(())
    }
}

fn check_abs_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".to_string());
    }
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    if path.contains('\0') || path.contains(',') {
        return Err(format!("{path:?} contains a NUL or ',' character"));
    }
    Ok(())
}

/// Names of domains and pools: 1-64 letters, digits, '.', '-' and '_', not starting with '.' or '-'.
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_object_name(name, 64)
}

/// Volume names are file names inside a pool directory: the same rule, up to 128 characters.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    validate_object_name(name, 128)
}

fn validate_object_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name.len() > max {
        return Err(format!("{name:?} is longer than {max} characters"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{name:?} must not start with '.' or '-'"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_') {
        return Err(format!("{name:?} may only contain letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

/// Turns a TOML/serde error into a one-line error naming the key it happened at.
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    let key = e.span().map(|span| key_at(text, span.start)).unwrap_or_default();
    // serde's "missing field `x`" errors point at the enclosing table; name the field itself.
    let key = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
        Some(field) if key.is_empty() || !key.ends_with(field) => join_key(&table_at(text, e.span().map_or(0, |s| s.start)), field),
        _ => key,
    };
    ConfigError { key, reason: message }
}

fn join_key(table: &str, key: &str) -> String {
    if table.is_empty() { key.to_string() } else { format!("{table}.{key}") }
}

/// The dotted key path of the `key = value` line (or table header) containing byte offset `at`.
fn key_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = text[line_start..line_end].trim();
    if line.starts_with('[') {
        return line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
    }
    let table = table_at(text, line_start);
    match line.split_once('=') {
        Some((key, _)) => join_key(&table, key.trim().trim_matches('"')),
        None => table,
    }
}

/// The table header (`boot`, `disk[1]`) in force at byte offset `at`.
fn table_at(text: &str, at: usize) -> String {
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > at {
            break;
        }
        offset += line.len();
        let l = line.trim();
        if let Some(inner) = l.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = inner.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(inner) = l.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = inner.trim().to_string();
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web1"
memory = "512M"
vcpus = 2
[boot]
kernel = "/boot/vmlinux"
cmdline = "console=ttyS0"
[[disk]]
path = "/var/disk.qcow2"
format = "qcow2"
[[disk]]
pool = "default"
volume = "web1.raw"
[[nic]]
tap = "tap-web1"
[balloon]
"#;

    #[test]
    fn accepts_a_full_definition() {
        let c = DomainConfig::parse(GOOD).unwrap();
        assert_eq!(c.memory_bytes(), 512 << 20);
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[1].format, "raw");
        assert_eq!(c.balloon, Some(BalloonConfig { deflate_on_oom: false }));
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.memory_overhead_bytes(), Ok(64 << 20));
        let limited = GOOD.to_string() + "[limits]\ncpu_percent = 150\nmemory_overhead = \"32M\"\ndisk_read_bps = \"10M\"\ndisk_iops = 500\npids = 64\n";
        let limits = DomainConfig::parse(&limited).unwrap().limits;
        assert_eq!((limits.cpu_percent, limits.memory_overhead_bytes(), limits.disk_iops), (Some(150), Ok(32 << 20), Some(500)));
        assert_eq!((LimitsConfig::rate(&limits.disk_read_bps), LimitsConfig::rate(&limits.disk_write_bps)), (Some(10 << 20), None));
        let tuned = DomainConfig::parse(&(GOOD.to_string() + "[tuning]\nhugepages = true\n")).unwrap();
        assert_eq!(tuned.tuning, TuningConfig { hugepages: true, ..TuningConfig::default() });
        let pinned = DomainConfig::parse(&(GOOD.to_string() + "[tuning]\nvcpu_pin = [\"1\", \"0-1\"]\nemulator_pin = \"0\"\n")).unwrap();
        assert_eq!(pinned.tuning.vcpu_pin.iter().map(ToString::to_string).collect::<Vec<_>>(), ["1", "0-1"]);
        assert_eq!(pinned.tuning.emulator_pin, Some("0".parse().unwrap()));
        let odd = DomainConfig::parse(&(GOOD.replace("512M", "513M") + "[tuning]\nhugepages = true\n")).unwrap_err();
        assert_eq!(odd.to_string(), "tuning.hugepages: memory (537919488 bytes) must be a whole number of 2 MiB huge pages");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = DomainConfig::parse(&GOOD.replace("vcpus = 2", "vcpus = 2\ncolour = 3")).unwrap_err();
        assert_eq!(e.key, "colour");
        let e = DomainConfig::parse(&GOOD.replace("format = \"qcow2\"", "format = \"qcow2\"\nsize = 1")).unwrap_err();
        assert_eq!(e.key, "disk[0].size");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("vcpus = 2", "vcpus = 0", "vcpus"),
            ("vcpus = 2", "vcpus = \"two\"", "vcpus"),
            ("memory = \"512M\"", "memory = \"lots\"", "memory"),
            ("name = \"web1\"", "name = \"a/b\"", "name"),
            ("format = \"qcow2\"", "format = \"vmdk\"", "disk[0].format"),
            ("volume = \"web1.raw\"", "", "disk[1].volume"),
            ("tap = \"tap-web1\"", "tap = \"a-very-long-tap-name\"", "nic[0].tap"),
            ("kernel = \"/boot/vmlinux\"", "kernel = \"vmlinux\"", "boot.kernel"),
            ("kernel = \"/boot/vmlinux\"", "", "boot"),
            ("name = \"web1\"", "", "name"),
            ("[balloon]", "[limits]\ncpu_percent = 0", "limits.cpu_percent"),
            ("[balloon]", "[limits]\nmemory_overhead = \"512K\"", "limits.memory_overhead"),
            ("[balloon]", "[limits]\ndisk_read_bps = \"fast\"", "limits.disk_read_bps"),
            ("[balloon]", "[limits]\ndisk_iops = 0", "limits.disk_iops"),
            ("[balloon]", "[limits]\npids = -1", "limits.pids"),
            ("[balloon]", "[limits]\nswap = 1", "limits.swap"),
            ("[balloon]", "[tuning]\nhugepages = true\nmem_merge = true", "tuning.mem_merge"),
            ("[balloon]", "[tuning]\nhugepages = \"yes\"", "tuning.hugepages"),
            ("[balloon]", "[tuning]\nvcpu_pin = [\"0\", \"1\", \"0\"]", "tuning.vcpu_pin"),
            ("[balloon]", "[tuning]\nvcpu_pin = [\"2-1\"]", "tuning.vcpu_pin"),
            ("[balloon]", "[tuning]\nemulator_pin = \"all\"", "tuning.emulator_pin"),
        ];
        for (from, to, key) in cases {
            let e = DomainConfig::parse(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.key, key, "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn memory_takes_the_shared_size_grammar() {
        for &(text, bytes) in ferro_test_support::grammar::SIZES {
            let def = GOOD.replace("memory = \"512M\"", &format!("memory = \"{text}\""));
            match DomainConfig::parse(&def) {
                Ok(c) => assert_eq!(c.memory_bytes(), bytes, "{text:?}"),
                // Sizes the grammar accepts but memory does not: a range, not a syntax error.
                Err(e) => {
                    assert!(!(1 << 20..=1 << 40).contains(&bytes), "{text:?}: {e}");
                    assert!(e.key == "memory" && e.reason.starts_with("must be at"), "{text:?}: {e}");
                }
            }
        }
        for &text in ferro_test_support::grammar::NOT_SIZES {
            let e = DomainConfig::parse(&GOOD.replace("memory = \"512M\"", &format!("memory = \"{text}\""))).unwrap_err();
            assert!(e.key == "memory" && (e.reason.contains("not a size") || e.reason.contains("too large")), "{text:?}: {e}");
        }
    }

    #[test]
    fn nic_macs_take_the_shared_mac_grammar() {
        for &(text, _) in ferro_test_support::grammar::MACS {
            let def = GOOD.replace("tap = \"tap-web1\"", &format!("tap = \"tap-web1\"\nmac = \"{text}\""));
            assert!(DomainConfig::parse(&def).is_ok(), "{text:?}");
        }
        for &(text, why) in ferro_test_support::grammar::NOT_MACS {
            let def = GOOD.replace("tap = \"tap-web1\"", &format!("tap = \"tap-web1\"\nmac = \"{text}\""));
            let e = DomainConfig::parse(&def).unwrap_err();
            assert!(e.key == "nic[0].mac" && e.reason.contains(why), "{text:?}: {e}");
        }
    }
}
