//! [`CpuList`]: a set of host CPUs in the kernel's list format (`0`, `2-3`, `0,2-5`), as
//! `taskset -c`, cpusets, `/sys/devices/system/cpu/online` and libvirt's `cpuset` write them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Highest CPU number a list may name (the kernel's default CPU_SETSIZE is 1024).
pub const MAX_CPU: u32 = 1023;

/// Host CPUs, sorted and without repeats; never empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CpuList(Vec<u32>);

impl CpuList {
    /// A list of the given CPUs (sorted and deduplicated); None when empty or above [`MAX_CPU`].
    pub fn from_cpus(mut cpus: Vec<u32>) -> Option<CpuList> {
        cpus.sort_unstable();
        cpus.dedup();
        (!cpus.is_empty() && cpus.iter().all(|&c| c <= MAX_CPU)).then_some(CpuList(cpus))
    }

    pub fn cpus(&self) -> &[u32] {
        &self.0
    }

    /// Refuses CPUs that `host` (the host's online CPUs) does not have, naming them.
    pub fn check_within(&self, host: &CpuList) -> Result<(), String> {
        let missing: Vec<u32> = self.0.iter().copied().filter(|c| !host.0.contains(c)).collect();
        match CpuList::from_cpus(missing) {
            None => Ok(()),
            Some(missing) => Err(format!("CPU list '{self}': this host has no CPU {missing} (its CPUs are {host})")),
        }
    }

    /// Where the kernel lists the host's online CPUs.
    pub const ONLINE: &'static str = "/sys/devices/system/cpu/online";

    /// The host's online CPUs ([`CpuList::ONLINE`]).
    pub fn host_online() -> Result<CpuList, String> {
        let path = Self::ONLINE;
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        text.trim().parse().map_err(|e| format!("{path}: {e}"))
    }
}

impl FromStr for CpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<CpuList, String> {
        let bad = || format!("'{text}' is not a CPU list such as 0, 2-3 or 0,2-5");
        let number = |s: &str| s.trim().parse::<u32>().ok().filter(|&c| c <= MAX_CPU);
        let mut cpus = Vec::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a).ok_or_else(bad)?, number(b).ok_or_else(bad)?),
                None => {
                    let c = number(part).ok_or_else(bad)?;
                    (c, c)
                }
            };
            if first > last {
                return Err(format!("'{text}': the range {part} runs backwards"));
            }
            cpus.extend(first..=last);
        }
        CpuList::from_cpus(cpus).ok_or_else(bad)
    }
}

impl TryFrom<String> for CpuList {
    type Error = String;

    fn try_from(text: String) -> Result<CpuList, String> {
        text.parse()
    }
}

impl From<CpuList> for String {
    fn from(list: CpuList) -> String {
        list.to_string()
    }
}

/// The shortest list form: runs of consecutive CPUs as ranges (`0,2-5`).
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if start > self.0[0] {
                f.write_str(",")?;
            }
            if start == end { write!(f, "{start}")? } else { write!(f, "{start}-{end}")? }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_in_the_kernel_form() {
        let list = |s: &str| s.parse::<CpuList>();
        assert_eq!(list("2").unwrap().cpus(), [2]);
        assert_eq!(list("3-4").unwrap().cpus(), [3, 4]);
        assert_eq!(list("5,0-2,1").unwrap().cpus(), [0, 1, 2, 5]);
        assert_eq!(list("5,0-2,1").unwrap().to_string(), "0-2,5");
        assert_eq!(list("0,2,3,4,7").unwrap().to_string(), "0,2-4,7");
        for bad in ["", "a", "1-", "-1", "1,,2", "1024", "0-99999999999", "1.5"] {
            assert!(list(bad).unwrap_err().contains("is not a CPU list"), "{bad:?}");
        }
        assert!(list("4-2").unwrap_err().contains("runs backwards"));
        let json: CpuList = serde_json::from_str("\"1-3\"").unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), "\"1-3\"");
        assert!(serde_json::from_str::<CpuList>("\"x\"").is_err());
    }

    #[test]
    fn cpus_the_host_lacks_are_named() {
        let host: CpuList = "0-1".parse().unwrap();
        assert!("1".parse::<CpuList>().unwrap().check_within(&host).is_ok());
        let e = "1-3".parse::<CpuList>().unwrap().check_within(&host).unwrap_err();
        assert_eq!(e, "CPU list '1-3': this host has no CPU 2-3 (its CPUs are 0-1)");
    }
}
