//! Ethernet MAC addresses: parsing (`52:54:00:12:34:56`, hex pairs with `:` or `-`), printing,
//! and the locally administered unicast addresses Ferrovisor makes up for NICs that have none.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A unicast MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address in QEMU/libvirt's 52:54:00 range, from 3 bytes.
    pub fn local(tail: [u8; 3]) -> MacAddr {
        MacAddr([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
    }

    /// A new random address in the 52:54:00 range (from the kernel's getrandom).
    pub fn random() -> MacAddr {
        let mut tail = [0u8; 3];
        // std has no getrandom; /dev/urandom is on every Linux host this runs on, and a failed
        // read leaves a time-derived fallback that is still locally administered.
        if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut tail)).is_err() {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            tail = [(nanos >> 16) as u8, (nanos >> 8) as u8, nanos as u8];
        }
        MacAddr::local(tail)
    }

    pub fn bytes(self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<MacAddr, String> {
        let bad = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("{text:?} is a multicast address; a NIC needs a unicast one (first byte even)"));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"52:54:00:ab:cd:0f\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
    }

    #[test]
    fn accepts_and_refuses_the_shared_table() {
        for &(text, bytes) in ferro_test_support::grammar::MACS {
            assert_eq!(text.parse::<MacAddr>(), Ok(MacAddr(bytes)), "{text:?}");
        }
        for &(text, why) in ferro_test_support::grammar::NOT_MACS {
            let e = text.parse::<MacAddr>().unwrap_err();
            assert!(e.contains(why) && e.contains(&format!("{text:?}")), "{text:?}: {e}");
        }
    }

    #[test]
    fn made_up_addresses_are_local_unicast() {
        let mac = MacAddr::random();
        assert_eq!(&mac.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(mac.0[0] & 1, 0);
    }
}
