//! Network definitions: the human-edited TOML model, its parsing and its validation.
//!
//! ```toml
//! name = "default"
//! mode = "nat"                 # nat | isolated | bridge
//! bridge = "ferbr0"            # created by ferrod (nat, isolated) or an existing host bridge (bridge)
//! ip = "192.168.122.1/24"      # the gateway's address on the bridge (nat, isolated)
//! [dhcp]
//! start = "192.168.122.2"
//! end = "192.168.122.254"
//! [[dhcp.host]]
//! mac = "52:54:00:12:34:56"
//! ip = "192.168.122.10"
//! name = "web1"
//! ```
//!
//! Every rejection names the offending key (`dhcp.host[1].ip: ...`). Checks against the host
//! (routes, bridge names in use) happen when the network starts, in [`crate::host`].

use ferro_vmm_api::MacAddr;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// What a network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A bridge of ferrod's own, with DHCP/DNS, masqueraded to the outside world.
    Nat,
    /// A bridge of ferrod's own, with DHCP/DNS; nothing leaves it.
    Isolated,
    /// An existing host bridge: guests' taps are attached to it, nothing else is set up.
    Bridge,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Isolated => "isolated",
            Mode::Bridge => "bridge",
        }
    }
}

/// One network definition as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    pub mode: Mode,
    pub bridge: String,
    /// The gateway (the host's address on the bridge) with the subnet's prefix length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpConfig>,
}

/// `[dhcp]`: the dynamic range and the fixed leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    #[serde(default, rename = "host", skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<FixedLease>,
}

/// `[[dhcp.host]]`: the address (and optionally the DNS name) a MAC always gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedLease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A definition that could not be accepted; `key` is the dotted path of the offending key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() { write!(f, "{}", self.reason) } else { write!(f, "{}: {}", self.key, self.reason) }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), reason: reason.into() }
}

/// Longest network name: it becomes part of nftables chain and file names.
pub const MAX_NAME_LEN: usize = 32;

impl NetworkConfig {
    /// Parses and validates a TOML definition.
    pub fn parse(text: &str) -> Result<NetworkConfig, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| err("", e.message().trim().replace('\n', " ")))?;
        let config: NetworkConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let message = e.inner().message().trim().replace('\n', " ");
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // Missing and unknown fields are reported at the enclosing table: name the field.
            let field = ["missing field `", "unknown field `"]
                .iter()
                .find_map(|prefix| message.strip_prefix(prefix).and_then(|m| m.split('`').next()));
            let key = match field {
                Some(field) if !path.ends_with(field) && path.is_empty() => field.to_string(),
                Some(field) if !path.ends_with(field) => format!("{path}.{field}"),
                _ => path,
            };
            err(key, message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The definition as TOML (what `net-dumpconfig` shows for a definition made by ferrod).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every value; see the module documentation for the error shape.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name).map_err(|r| err("name", r))?;
        validate_ifname(&self.bridge).map_err(|r| err("bridge", r))?;
        if self.mode == Mode::Bridge {
            if self.ip.is_some() {
                return Err(err("ip", "a bridge network uses the host bridge's own addressing; remove ip"));
            }
            if self.dhcp.is_some() {
                return Err(err("dhcp", "a bridge network has no DHCP server of ferrod's; remove [dhcp]"));
            }
            return Ok(());
        }
        let Some(gateway) = self.ip else {
            return Err(err("ip", format!("missing: a {} network needs its gateway address, e.g. \"192.168.122.1/24\"", self.mode.name())));
        };
        if !(8..=30).contains(&gateway.prefix_len()) {
            return Err(err("ip", format!("/{} is not a usable subnet: give a prefix from /8 to /30", gateway.prefix_len())));
        }
        check_host_address(gateway, gateway.addr()).map_err(|r| err("ip", r))?;
        if let Some(dhcp) = &self.dhcp {
            dhcp.validate(gateway).map_err(|e| err(format!("dhcp.{}", e.key), e.reason))?;
        }
        Ok(())
    }

    /// The subnet of a nat or isolated network (`192.168.122.0/24`).
    pub fn subnet(&self) -> Option<Ipv4Net> {
        self.ip.map(|ip| ip.trunc())
    }
}

impl DhcpConfig {
    fn validate(&self, gateway: Ipv4Net) -> Result<(), ConfigError> {
        check_host_address(gateway, self.start).map_err(|r| err("start", r))?;
        check_host_address(gateway, self.end).map_err(|r| err("end", r))?;
        if self.start > self.end {
            return Err(err("end", format!("{} comes before start {}", self.end, self.start)));
        }
        if (self.start..=self.end).contains(&gateway.addr()) {
            return Err(err("start", format!("the range {}-{} contains the gateway {}", self.start, self.end, gateway.addr())));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let key = |field: &str| format!("host[{i}].{field}");
            check_host_address(gateway, host.ip).map_err(|r| err(key("ip"), r))?;
            if host.ip == gateway.addr() {
                return Err(err(key("ip"), format!("{} is the gateway's address", host.ip)));
            }
            if let Some(name) = &host.name {
                validate_hostname(name).map_err(|r| err(key("name"), r))?;
            }
            let earlier = &self.hosts[..i];
            if earlier.iter().any(|h| h.mac == host.mac) {
                return Err(err(key("mac"), format!("{} has two fixed leases", host.mac)));
            }
            if earlier.iter().any(|h| h.ip == host.ip) {
                return Err(err(key("ip"), format!("{} is given to two MACs", host.ip)));
            }
            if host.name.is_some() && earlier.iter().any(|h| h.name == host.name) {
                return Err(err(key("name"), format!("{:?} is used twice", host.name.as_deref().unwrap_or(""))));
            }
        }
        Ok(())
    }

    /// How many addresses the range holds.
    pub fn range_size(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
}

/// `addr` must be a host address of `net`: inside it, neither its network nor its broadcast address.
fn check_host_address(net: Ipv4Net, addr: Ipv4Addr) -> Result<(), String> {
    if !net.contains(&addr) {
        return Err(format!("{addr} is outside the subnet {}", net.trunc()));
    }
    if addr == net.network() || addr == net.broadcast() {
        return Err(format!("{addr} is the subnet's network or broadcast address"));
    }
    Ok(())
}

/// Network names: 1-32 letters, digits, '.', '-' and '_', not starting with '.' or '-'.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("{name:?} is longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("{name:?} must not start with '.' or '-'"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Err(format!("{name:?} may only contain letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

/// Interface names (bridges, taps): 1-15 letters, digits, '.', '-' and '_', not "." or "..".
pub fn validate_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(format!("{name:?} is not an interface name (1-15 letters, digits, '.', '-' or '_')")) }
}

/// DNS names given to guests: one label of 1-63 letters, digits and '-', not starting or ending
/// with '-'.
pub fn validate_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok { Ok(()) } else { Err(format!("{name:?} is not a host name (1-63 letters, digits and '-')")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "default"
mode = "nat"
bridge = "ferbr0"
ip = "192.168.122.1/24"
[dhcp]
start = "192.168.122.2"
end = "192.168.122.254"
[[dhcp.host]]
mac = "52:54:00:12:34:56"
ip = "192.168.122.10"
name = "web1"
[[dhcp.host]]
mac = "52:54:00:12:34:57"
ip = "192.168.122.11"
"#;

    #[test]
    fn accepts_the_issue_example() {
        let c = NetworkConfig::parse(GOOD).unwrap();
        assert_eq!(c.mode, Mode::Nat);
        assert_eq!(c.subnet().unwrap().to_string(), "192.168.122.0/24");
        assert_eq!(c.ip.unwrap().addr(), Ipv4Addr::new(192, 168, 122, 1));
        let dhcp = c.dhcp.as_ref().unwrap();
        assert_eq!(dhcp.range_size(), 253);
        assert_eq!(dhcp.hosts[0].name.as_deref(), Some("web1"));
        assert_eq!(NetworkConfig::parse(&c.to_toml()).unwrap(), c, "to_toml round-trips");
    }

    #[test]
    fn keys_are_named() {
        let cases = [
            ("mode = \"nat\"", "mode = \"nat\"\ncolour = 1", "colour"),
            ("name = \"web1\"", "name = \"web1\"\nttl = 3", "dhcp.host[0].ttl"),
            ("mode = \"nat\"", "mode = \"routed\"", "mode"),
            ("mode = \"nat\"", "", "mode"),
            ("name = \"default\"", "name = \"a/b\"", "name"),
            ("bridge = \"ferbr0\"", "bridge = \"a-bridge-name-too-long\"", "bridge"),
            ("ip = \"192.168.122.1/24\"", "ip = \"192.168.122.1\"", "ip"),
            ("ip = \"192.168.122.1/24\"", "ip = \"192.168.122.0/24\"", "ip"),
            ("ip = \"192.168.122.1/24\"", "ip = \"192.168.122.1/31\"", "ip"),
            ("ip = \"192.168.122.1/24\"", "", "ip"),
            ("start = \"192.168.122.2\"", "start = \"192.168.123.2\"", "dhcp.start"),
            ("start = \"192.168.122.2\"", "start = \"192.168.122.1\"", "dhcp.start"),
            ("end = \"192.168.122.254\"", "end = \"192.168.122.255\"", "dhcp.end"),
            ("end = \"192.168.122.254\"", "end = \"192.168.122.200\"\nstart2 = 1", "dhcp.start2"),
            ("mac = \"52:54:00:12:34:56\"", "mac = \"52:54:00:12:34\"", "dhcp.host[0].mac"),
            ("mac = \"52:54:00:12:34:57\"", "mac = \"52:54:00:12:34:56\"", "dhcp.host[1].mac"),
            ("ip = \"192.168.122.11\"", "ip = \"192.168.122.10\"", "dhcp.host[1].ip"),
            ("ip = \"192.168.122.11\"", "ip = \"10.0.0.1\"", "dhcp.host[1].ip"),
            ("ip = \"192.168.122.11\"", "ip = \"not an address\"", "dhcp.host[1].ip"),
            ("name = \"web1\"", "name = \"web_1\"", "dhcp.host[0].name"),
            ("ip = \"192.168.122.10\"", "", "dhcp.host[0].ip"),
        ];
        for (from, to, key) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from} not found");
            let e = NetworkConfig::parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{from} -> {to}: {e}");
        }
        let e = NetworkConfig::parse("name = \n").unwrap_err();
        assert!(!e.reason.is_empty(), "syntax errors say why");
    }

    #[test]
    fn bridge_mode_takes_no_addressing() {
        let bridged = "name = \"lan\"\nmode = \"bridge\"\nbridge = \"br0\"\n";
        let c = NetworkConfig::parse(bridged).unwrap();
        assert_eq!(c.subnet(), None);
        let e = NetworkConfig::parse(&format!("{bridged}ip = \"10.0.0.1/24\"\n")).unwrap_err();
        assert_eq!(e.key, "ip");
        let e = NetworkConfig::parse(&format!("{bridged}[dhcp]\nstart = \"10.0.0.2\"\nend = \"10.0.0.3\"\n")).unwrap_err();
        assert_eq!(e.key, "dhcp");
    }

    #[test]
    fn names() {
        assert!(validate_name("default").is_ok());
        assert!(validate_name(&"n".repeat(33)).is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_ifname("ferbr0").is_ok());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_hostname("web-1").is_ok());
        assert!(validate_hostname("web.example").is_err());
        assert!(validate_hostname("-web").is_err());
    }
}
