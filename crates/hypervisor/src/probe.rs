//! Which KVM implementation backs `/dev/kvm`, read from the loaded kernel modules.

use std::path::Path;

/// The kind of KVM on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// Intel VT-x (`kvm_intel`).
    Intel,
    /// AMD-V (`kvm_amd`).
    Amd,
    /// kvm-pvm: software nested virtualization; guest ring 0 is interpreted (docs/kvm-pvm.md).
    Pvm,
    /// KVM is there but the backing module could not be identified.
    Unknown,
}

impl HostKind {
    /// True on hardware-assisted KVM, where stock distro kernels boot at native speed.
    pub fn is_hardware(self) -> bool {
        matches!(self, HostKind::Intel | HostKind::Amd)
    }

    /// The module name, for messages.
    pub fn module(self) -> &'static str {
        match self {
            HostKind::Intel => "kvm_intel",
            HostKind::Amd => "kvm_amd",
            HostKind::Pvm => "kvm_pvm",
            HostKind::Unknown => "unknown",
        }
    }
}

/// Reads `/sys/module` to see which vendor module is loaded.
pub fn probe_host_kind() -> HostKind {
    probe_in(Path::new("/sys/module"))
}

fn probe_in(sys_module: &Path) -> HostKind {
    for (module, kind) in
        [("kvm_pvm", HostKind::Pvm), ("kvm_intel", HostKind::Intel), ("kvm_amd", HostKind::Amd)]
    {
        if sys_module.join(module).exists() {
            return kind;
        }
    }
    HostKind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reads_module_directories() {
        let dir = std::env::temp_dir().join(format!("ferro-probe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(probe_in(&dir), HostKind::Amd);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(probe_in(&dir), HostKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(probe_in(&dir), HostKind::Unknown);
    }
}
