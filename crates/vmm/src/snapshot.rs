//! Snapshot directories (docs/snapshot-format.md): a paused VM written to disk, and read back
//! for [`VmBuilder::restore`](crate::VmBuilder::restore).
//!
//! A directory holds two files. `memory` is guest RAM as [`crate::memory::save`] writes it (regions
//! back to back, zero pages left as holes) and a restore maps it privately. `state` is a small
//! header (magic, format version, body length, SHA-256 of the body) and a JSON body: the
//! configuration the VM was built from, the CPU features its guest was given, and the
//! [`SavedVm`]. Anything that does not check out (magic, version, length, checksum, JSON,
//! features this host lacks) is refused with a message naming it, before any VM is built.

use crate::memory;
use crate::state::{SAVED_VM_VERSION, SavedVm};
use crate::vm::VmControl;
use ferro_devices::virtio::block::BlockDisk;
use ferro_vmm_api::{VmConfig, snapshot_file};
use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const MEMORY_FILE: &str = "memory";
pub const STATE_FILE: &str = "state";

/// The feature registers of CPUID a guest's code may have come to rely on.
const FEATURE_REGISTERS: &[(u32, u32, Reg)] = &[
    (0x1, 0, Reg::Ecx),
    (0x1, 0, Reg::Edx),
    (0x7, 0, Reg::Ebx),
    (0x7, 0, Reg::Ecx),
    (0x7, 0, Reg::Edx),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

/// Names of the features guests most often use, for the refusal message; others are named by
/// leaf, register and bit.
const FEATURE_NAMES: &[(u32, Reg, u32, &str)] = &[
    (0x1, Reg::Ecx, 0, "sse3"),
    (0x1, Reg::Ecx, 1, "pclmulqdq"),
    (0x1, Reg::Ecx, 9, "ssse3"),
    (0x1, Reg::Ecx, 12, "fma"),
    (0x1, Reg::Ecx, 13, "cx16"),
    (0x1, Reg::Ecx, 19, "sse4_1"),
    (0x1, Reg::Ecx, 20, "sse4_2"),
    (0x1, Reg::Ecx, 21, "x2apic"),
    (0x1, Reg::Ecx, 22, "movbe"),
    (0x1, Reg::Ecx, 23, "popcnt"),
    (0x1, Reg::Ecx, 25, "aes"),
    (0x1, Reg::Ecx, 26, "xsave"),
    (0x1, Reg::Ecx, 28, "avx"),
    (0x1, Reg::Ecx, 29, "f16c"),
    (0x1, Reg::Ecx, 30, "rdrand"),
    (0x7, Reg::Ebx, 3, "bmi1"),
    (0x7, Reg::Ebx, 5, "avx2"),
    (0x7, Reg::Ebx, 8, "bmi2"),
    (0x7, Reg::Ebx, 9, "erms"),
    (0x7, Reg::Ebx, 16, "avx512f"),
    (0x7, Reg::Ebx, 18, "rdseed"),
    (0x7, Reg::Ebx, 19, "adx"),
    (0x7, Reg::Ebx, 29, "sha_ni"),
    (0x7, Reg::Ecx, 1, "avx512vbmi"),
    (0x7, Reg::Ecx, 8, "gfni"),
    (0x7, Reg::Ecx, 9, "vaes"),
    (0xd, Reg::Eax, 0, "xsaveopt"),
    (0xd, Reg::Eax, 1, "xsavec"),
    (0xd, Reg::Eax, 3, "xsaves"),
    (0x8000_0001, Reg::Ecx, 5, "lzcnt"),
    (0x8000_0001, Reg::Edx, 27, "rdtscp"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature register as the guest saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureRegister {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Reg,
    pub bits: u32,
}

/// The CPU features a guest was given, from its vCPUs' CPUID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    pub registers: Vec<FeatureRegister>,
}

impl CpuFeatures {
    /// The feature registers of a CPUID table (absent leaves count as no features).
    pub fn from_cpuid(cpuid: &CpuId) -> CpuFeatures {
        let registers = FEATURE_REGISTERS
            .iter()
            .map(|&(leaf, subleaf, register)| {
                let bits = cpuid
                    .as_slice()
                    .iter()
                    .find(|e| e.function == leaf && e.index == subleaf)
                    .map_or(0, |e| match register {
                        Reg::Eax => e.eax,
                        Reg::Ebx => e.ebx,
                        Reg::Ecx => e.ecx,
                        Reg::Edx => e.edx,
                    });
                FeatureRegister { leaf, subleaf, register, bits }
            })
            .collect();
        CpuFeatures { registers }
    }

    /// The features in `self` that `host` lacks, by name; empty when the host has them all.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        let mut missing = Vec::new();
        for r in &self.registers {
            let have = host
                .registers
                .iter()
                .find(|h| (h.leaf, h.subleaf, h.register) == (r.leaf, r.subleaf, r.register))
                .map_or(0, |h| h.bits);
            let lacking = r.bits & !have;
            for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
                let name = FEATURE_NAMES.iter().find(|&&(leaf, reg, b, _)| (leaf, reg, b) == (r.leaf, r.register, bit));
                missing.push(match name {
                    Some((_, _, _, name)) => (*name).to_string(),
                    None => format!("CPUID {:#x}.{} {:?} bit {bit}", r.leaf, r.subleaf, r.register).to_lowercase(),
                });
            }
        }
        missing
    }
}

/// The body of a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub config: VmConfig,
    pub cpu_features: CpuFeatures,
    pub vm: SavedVm,
}

/// What saving a snapshot cost, and which disks got an internal snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotTimes {
    /// From the pause (or the request, for a VM already paused) until the VM could run again.
    pub paused: Duration,
    /// Bytes of guest memory written to the memory file (zero pages are not).
    pub memory_bytes: u64,
    /// The disk images that got the internal snapshot.
    pub disks: Vec<PathBuf>,
}

/// The memory file of snapshot directory `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// The state file of snapshot directory `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Saves `vm` into `dir` (created; it must not exist yet, or be empty): pauses it, writes its
/// memory and state, and resumes it if `resume` and it was running before. With
/// `disk_snapshot`, every writable disk gets a qcow2 internal snapshot of that name while the
/// VM is paused (its worker stopped, so no request is in flight); the disks are checked first,
/// so a raw disk or a name taken fails the op before anything is changed.
pub fn save(vm: &VmControl, dir: &Path, resume: bool, disk_snapshot: Option<&str>) -> Result<SnapshotTimes, String> {
    let disks: Vec<BlockDisk> = match disk_snapshot {
        None => Vec::new(),
        Some(name) => {
            let disks = vm.writable_disks();
            for d in &disks {
                d.check_snapshot(name)?;
            }
            disks
        }
    };
    let _tracking = vm.claim_dirty_tracking("take a snapshot")?;
    prepare_dir(dir)?;
    let was_running = !vm.is_paused();
    // A guest that goes on running afterwards is paused only for what changed while its memory
    // was written; one that stays paused may as well be paused for the whole write.
    let live = if resume && was_running {
        let live = memory::LiveSave::start(vm.vm_fd(), vm.memory(), &memory_path(dir))
            .and_then(|mut live| live.converge().map(|()| live))
            .map_err(|e| {
                let _ = std::fs::remove_file(memory_path(dir));
                e.to_string()
            })?;
        Some(live)
    } else {
        None
    };
    // Each disk snapshot flushes while the guest is paused: flushed first, it has only the
    // last moments' writes left.
    for d in &disks {
        d.flush()?;
    }
    let start = Instant::now();
    vm.pause()?;
    let written = write_files(vm, dir, live).and_then(|bytes| {
        let name = disk_snapshot.unwrap_or_default();
        snapshot_disks(&disks, name).map(|()| bytes)
    });
    let resumed = if resume && was_running { vm.resume() } else { Ok(()) };
    let paused = start.elapsed();
    // The files are complete in the page cache; making them durable need not keep the guest paused.
    let memory_bytes = written.and_then(|bytes| sync_files(dir).map(|()| bytes)).inspect_err(|_| {
        let _ = std::fs::remove_file(memory_path(dir));
        let _ = std::fs::remove_file(state_path(dir));
    })?;
    resumed.map_err(|e| format!("the snapshot was saved, but the VM did not resume: {e}"))?;
    let disks = disks.iter().map(|d| d.path().to_path_buf()).collect();
    Ok(SnapshotTimes { paused, memory_bytes, disks })
}

/// The `disk_snapshot_delete` op: deletes internal snapshot `name` from every writable disk
/// that has it, while the guest runs (each disk's image is locked against its worker meanwhile).
pub fn delete_disk_snapshot(vm: &VmControl, name: &str) -> Result<(), String> {
    for d in vm.writable_disks() {
        if d.has_snapshot(name)? {
            d.delete_snapshot(name)?;
        }
    }
    Ok(())
}

/// Takes internal snapshot `name` of every disk in `disks`; if one fails, the ones taken are
/// deleted again, so the op changes all disks or none.
fn snapshot_disks(disks: &[BlockDisk], name: &str) -> Result<(), String> {
    for (i, d) in disks.iter().enumerate() {
        if let Err(e) = d.create_snapshot(name) {
            for done in &disks[..i] {
                if let Err(undo) = done.delete_snapshot(name) {
                    eprintln!("ferro: undoing the snapshot: {undo}");
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Makes a written snapshot durable: both files and the directory entries naming them.
fn sync_files(dir: &Path) -> Result<(), String> {
    for path in [memory_path(dir), state_path(dir), dir.to_owned()] {
        File::open(&path).and_then(|f| f.sync_all()).map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn prepare_dir(dir: &Path) -> Result<(), String> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(format!("snapshot directory {} is not empty", dir.display())),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(|e| format!("snapshot directory {}: {e}", dir.display()))
        }
        Err(e) => Err(format!("snapshot directory {}: {e}", dir.display())),
    }
}

/// Writes the paused VM's state file and its memory file, or the last pages of the memory file
/// `live` has been writing.
fn write_files(vm: &VmControl, dir: &Path, live: Option<memory::LiveSave>) -> Result<u64, String> {
    let saved = vm.save()?;
    let memory_bytes = match live {
        Some(live) => live.finish().map_err(|e| e.to_string())?,
        None => vm.save_memory(&memory_path(dir))?,
    };
    let state = SnapshotState { config: vm.config().clone(), cpu_features: vm.cpu_features().clone(), vm: saved };
    write_state(&state_path(dir), &state)?;
    Ok(memory_bytes)
}

/// Writes a state file: header, then the JSON body (not synced yet).
pub fn write_state(path: &Path, state: &SnapshotState) -> Result<(), String> {
    let body = serde_json::to_vec(state).map_err(|e| format!("encoding the VM state: {e}"))?;
    let io = |e: std::io::Error| format!("state file {}: {e}", path.display());
    let mut f = File::options().write(true).create_new(true).open(path).map_err(io)?;
    f.write_all(&snapshot_file::seal(&body)).map_err(io)
}

/// Reads and checks a state file: its frame (see `ferro_vmm_api::snapshot_file`), then the body
/// and the version of its saved VM.
pub fn read_state(path: &Path) -> Result<SnapshotState, String> {
    let body = snapshot_file::read_body(path)?;
    let name = path.display();
    let state: SnapshotState = serde_json::from_slice(&body).map_err(|e| format!("state file {name}: {e}"))?;
    if state.vm.version != SAVED_VM_VERSION {
        return Err(format!("state file {name}: VM state version {}, this VMM reads version {SAVED_VM_VERSION}", state.vm.version));
    }
    Ok(state)
}

/// Reads and checks a snapshot directory's state file; the memory file is checked when it is
/// mapped, the CPU features when the VM is built.
pub fn load(dir: &Path) -> Result<SnapshotState, String> {
    read_state(&state_path(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(bits: &[(u32, u32, Reg, u32)]) -> CpuFeatures {
        CpuFeatures {
            registers: bits.iter().map(|&(leaf, subleaf, register, bits)| FeatureRegister { leaf, subleaf, register, bits }).collect(),
        }
    }

    #[test]
    fn missing_features_are_named() {
        let guest = features(&[(0x7, 0, Reg::Ebx, 1 << 5 | 1 << 3), (0x1, 0, Reg::Ecx, 1 << 28 | 1 << 2)]);
        let host = features(&[(0x7, 0, Reg::Ebx, 1 << 3), (0x1, 0, Reg::Ecx, 1 << 28)]);
        assert_eq!(guest.missing_on(&host), vec!["avx2".to_string(), "cpuid 0x1.0 ecx bit 2".to_string()]);
        assert!(guest.missing_on(&guest).is_empty());
        assert!(host.missing_on(&guest).is_empty(), "a host with more features runs the guest");
    }
}
