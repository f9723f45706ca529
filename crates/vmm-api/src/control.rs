//! The per-VM control protocol: [`Request`]s on the VMM's control socket, the typed replies,
//! and the [`VmEvent`]s a VMM reports to its supervisor.
//!
//! Wire form (docs/vmm-control.md): one JSON object per line each way. A request is
//! `{"op": "<snake_case variant>", ...fields}`; a reply is the reply type's fields plus
//! `"ok": true`, or `{"ok": false, "error": "<one line>"}`. [`encode_reply`] and [`decode_reply`]
//! are the two ends of that rule, so the VMM and its clients cannot drift apart.

use crate::cpulist::CpuList;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest request or reply line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// What a client can ask a running VMM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Name, state, pid and size of the VM. Reply: [`InfoReply`].
    Info,
    /// Stops every vCPU and device worker (idempotent). Reply: [`Done`].
    Pause,
    /// Resumes after a pause (idempotent). Reply: [`Done`].
    Resume,
    /// Presses the ACPI power button. Reply: [`Done`].
    PowerButton,
    /// Hard reset: the VMM exits and reports [`ExitReason::Reset`]. Reply: [`Done`].
    Reset,
    /// Stops the VM at once (pulling the plug, disks flushed). Reply: [`Done`].
    Quit,
    /// Counters of the VM and its devices. Reply: [`StatsReply`].
    Stats,
    /// Sets how much memory the balloon takes from the guest. Reply: [`BalloonReply`].
    Balloon { target_mib: u64 },
    /// Saves the VM into snapshot directory `dir` (created; an existing one must be empty):
    /// memory and state, the VM paused meanwhile. A running VM runs again afterwards when
    /// `resume` is true and stays paused otherwise. With `disk_snapshot`, every writable disk
    /// also gets a qcow2 internal snapshot of that name, taken while the VM is paused; a
    /// writable disk that is not qcow2, or has that snapshot name already, fails the op before
    /// anything is changed. Reply: [`SnapshotReply`].
    Snapshot {
        dir: std::path::PathBuf,
        #[serde(default)]
        resume: bool,
        #[serde(default)]
        disk_snapshot: Option<String>,
    },
    /// Starts a backup of the disks at one point in time (docs/backups.md): while the VM is
    /// paused, every writable disk (all qcow2) gets checkpoint bitmap `checkpoint` (`parent`'s
    /// stops tracking) and internal snapshot `snapshot`, the frozen view the backup then reads
    /// while the guest runs on. With `since` (a checkpoint and every later one, oldest first)
    /// the clusters written since that checkpoint are written for the `i`th writable disk to
    /// `ranges_dir/<i>`, as pairs of little-endian u64 offset and length. Every disk is checked
    /// before anything changes, and a failure on one undoes the others. Reply:
    /// [`BackupBeginReply`].
    BackupBegin {
        checkpoint: String,
        #[serde(default)]
        parent: Option<String>,
        snapshot: String,
        #[serde(default)]
        since: Vec<String>,
        #[serde(default)]
        ranges_dir: Option<std::path::PathBuf>,
    },
    /// Ends a backup: deletes internal snapshot `snapshot` from every writable disk that has
    /// it. Reply: [`Done`].
    BackupEnd { snapshot: String },
    /// Deletes internal snapshot `name` from every writable disk that has it, while the VM runs
    /// (a domain snapshot deleted while its domain runs). Reply: [`Done`].
    DiskSnapshotDelete { name: String },
    /// Removes checkpoint `checkpoint` from every writable disk: its bitmap is merged into
    /// `parent`'s (which tracks again if it tracked). Reply: [`Done`].
    CheckpointRemove {
        checkpoint: String,
        #[serde(default)]
        parent: Option<String>,
    },
    /// Each vCPU's host thread, state, CPU time and CPU affinity, and the emulator threads'
    /// affinity. Reply: [`VcpuInfoReply`].
    VcpuInfo,
    /// Lets vCPU `vcpu`'s thread run only on host CPUs `cpus`. Reply: [`Done`].
    PinVcpu { vcpu: u8, cpus: CpuList },
    /// Lets every thread but the vCPUs (main loop, device workers, sockets, and threads started
    /// later) run only on host CPUs `cpus`. Reply: [`Done`].
    PinEmulator { cpus: CpuList },
    /// Live-migrates the VM to the VMM listening at `to` (`unix:PATH` or `tcp:HOST:PORT`, a
    /// `ferro vmm --incoming`; docs/migration.md): pre-copy while the guest runs until the
    /// dirty remainder fits `max_downtime_ms` at the measured rate, then pause, send the rest
    /// and the device state, and let the destination run. The reply comes once the destination
    /// runs the guest, and this VMM then exits ([`ExitReason::Migrated`]). Before that point
    /// any failure leaves the VM running here. `bandwidth_mib` caps the pre-copy rate (MiB/s);
    /// `auto_converge` throttles the vCPUs step by step while the guest dirties memory faster
    /// than it can be sent; `copy_storage` copies the writable disks along. Reply: [`MigrateReply`].
    MigrateSend {
        to: String,
        #[serde(default = "default_max_downtime_ms")]
        max_downtime_ms: u64,
        #[serde(default)]
        bandwidth_mib: Option<u64>,
        #[serde(default)]
        auto_converge: bool,
        /// Copy the writable disks along to the destination's own files (which must exist there,
        /// fresh, of the same format and size) instead of handing shared ones over.
        #[serde(default)]
        copy_storage: bool,
    },
    /// Progress of the migration under way, or how the last one ended. Reply: [`MigrationInfo`].
    MigrateInfo,
    /// Cancels the migration under way before its switch-over; the VM keeps running here.
    /// Reply: [`Done`].
    MigrateCancel,
}

/// The downtime a migration aims for when the request names none.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

fn default_max_downtime_ms() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

impl Request {
    /// The op name as it appears on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Info => "info",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::PowerButton => "power_button",
            Request::Reset => "reset",
            Request::Quit => "quit",
            Request::Stats => "stats",
            Request::Balloon { .. } => "balloon",
            Request::Snapshot { .. } => "snapshot",
            Request::BackupBegin { .. } => "backup_begin",
            Request::BackupEnd { .. } => "backup_end",
            Request::DiskSnapshotDelete { .. } => "disk_snapshot_delete",
            Request::CheckpointRemove { .. } => "checkpoint_remove",
            Request::VcpuInfo => "vcpu_info",
            Request::PinVcpu { .. } => "pin_vcpu",
            Request::PinEmulator { .. } => "pin_emulator",
            Request::MigrateSend { .. } => "migrate_send",
            Request::MigrateInfo => "migrate_info",
            Request::MigrateCancel => "migrate_cancel",
        }
    }
}

/// The reply of requests that only succeed or fail.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {}

/// Whether the guest's vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InfoReply {
    pub state: RunState,
    pub pid: u32,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub name: String,
}

/// Counters of one virtio disk since the VM started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStats {
    /// The device id (`vda`, ...).
    pub id: String,
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    /// Requests answered with an error status.
    pub errors: u64,
}

/// Counters of one virtio NIC since the VM started (from the guest's point of view: `rx` is
/// what the guest received).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NicStats {
    /// The device id (`net0`, ...).
    pub id: String,
    pub mac: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames from the tap dropped because the guest had no buffer for them.
    pub rx_dropped: u64,
}

/// The balloon as the host and the guest see it (4 KiB pages).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u64,
    pub actual_mib: u64,
    /// Pages the driver put in the balloon / took back since the VM started.
    pub inflated_pages_total: u64,
    pub deflated_pages_total: u64,
    /// Page numbers outside guest RAM the driver sent (ignored).
    pub invalid_pages_total: u64,
    /// The guest's latest statistics by name (only those it reported), and their age.
    pub guest_stats: BTreeMap<String, u64>,
    pub guest_stats_age_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// CPU time of each vCPU thread.
    pub vcpu_time_ns: Vec<u64>,
    /// CPU time of the whole VMM process.
    pub cpu_time_ns: u64,
    pub rss_bytes: u64,
    /// Exits to userspace, all vCPUs.
    pub exits: u64,
    pub disks: Vec<DiskStats>,
    pub nics: Vec<NicStats>,
    /// None without a balloon device.
    pub balloon: Option<BalloonStats>,
    /// Pages of the VMM that KSM merged (`/proc/PID/ksm_merging_pages`); None where the kernel
    /// does not report it (before Linux 6.1).
    #[serde(default)]
    pub ksm_merging_pages: Option<u64>,
    /// Resident memory of the VMM beyond guest RAM (its code, heap, thread stacks, device
    /// buffers): what the host pays for running this VM besides the guest's pages.
    #[serde(default)]
    pub overhead_bytes: u64,
}

/// One vCPU as `vcpu_info` reports it (virsh vcpuinfo).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub vcpu: u8,
    /// The host thread running it (/proc/PID/task/TID), named `vcpuN`.
    pub thread_id: i32,
    /// `running`, `paused` or `exited` (the VM is ending).
    pub state: String,
    /// CPU time of its thread.
    pub cpu_time_ns: u64,
    /// The host CPUs its thread may run on.
    pub affinity: CpuList,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuInfoReply {
    pub vcpus: Vec<VcpuInfo>,
    /// The host CPUs of the VMM's other threads.
    pub emulator_affinity: CpuList,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalloonReply {
    pub target_mib: u64,
    pub actual_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// How long the guest was paused for the snapshot (for a VM that was already paused, how
    /// long saving took), in microseconds.
    pub pause_us: u64,
    /// Guest memory written to the memory file; pages of zeros are holes and not counted.
    pub memory_bytes_written: u64,
    /// Whether the VM runs now.
    pub state: RunState,
    /// The disk images that got the internal snapshot `disk_snapshot` (none without it).
    #[serde(default)]
    pub disks: Vec<std::path::PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupBeginReply {
    /// How long the guest was paused while the bitmaps switched and the snapshots were taken.
    pub pause_us: u64,
    /// The writable disks, in order (the `i` of the ranges files).
    pub disks: Vec<std::path::PathBuf>,
}

/// How a migration went, when the destination runs the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateReply {
    /// From the pause here to the destination's word that the guest runs there, in microseconds.
    pub downtime_us: u64,
    /// From the request to that word, in milliseconds.
    pub total_ms: u64,
    /// Bytes sent on the migration stream (memory, state and framing).
    pub transferred_bytes: u64,
    /// Memory passes: the first full one, the dirty rounds, and the final one while paused.
    pub iterations: u32,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// No migration has been asked for.
    #[default]
    None,
    /// Memory is being sent while the guest runs.
    Active,
    /// The guest is paused and the rest is being sent.
    SwitchingOver,
    /// The destination runs the guest; this VMM is exiting.
    Completed,
    /// It failed before the switch-over; the guest runs here.
    Failed,
    /// Cancelled before the switch-over; the guest runs here.
    Cancelled,
    /// The destination was told to run the guest but did not confirm it: the guest is left
    /// paused here, since it may run there.
    Unconfirmed,
}

/// Progress of a migration (virsh domjobinfo's numbers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub state: MigrationState,
    /// The memory pass under way (1: the first full pass).
    pub iteration: u32,
    pub transferred_bytes: u64,
    /// Dirty memory still to send, as of the last look at the dirty log.
    pub remaining_bytes: u64,
    /// How fast the guest dirtied memory during the last round, bytes per second.
    pub dirty_rate_bytes_per_s: u64,
    /// How fast the stream carried memory during the last round, bytes per second.
    pub transfer_rate_bytes_per_s: u64,
    /// The pause the remainder would cost now, at the measured transfer rate.
    pub expected_downtime_ms: u64,
    /// The share of time the vCPUs are held back (auto-converge), percent.
    pub throttle_percent: u32,
    /// Since the migration began.
    pub elapsed_ms: u64,
    /// Why it failed, for `failed`, `cancelled` and `unconfirmed`.
    #[serde(default)]
    pub error: Option<String>,
    /// For `completed`: the final numbers.
    #[serde(default)]
    pub result: Option<MigrateReply>,
}

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off (ACPI S5 or a KVM shutdown event).
    PowerOff,
    /// The guest reset (i8042, triple fault, KVM reset event) or a `reset` request.
    Reset,
    /// A test guest wrote to isa-debug-exit; the process status to exit with.
    DebugExit(i32),
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The user typed the console escape, or the control socket asked to quit.
    Quit,
    /// The VM was migrated away and runs on the destination now.
    Migrated,
    /// A fatal error; the message says what failed.
    Error(String),
}

impl ExitReason {
    /// The process exit status for `ferro run`.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Quit | ExitReason::Migrated | ExitReason::Signal(_) => 0,
            ExitReason::DebugExit(s) => *s,
            ExitReason::Error(_) => 2,
        }
    }
}

/// What a VMM tells its supervisor, one JSON object per line on the event pipe it was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VmEvent {
    /// The VM is built and its vCPUs run; the control socket answers.
    Started { pid: u32 },
    /// A device found its queue broken and waits for the driver to reset it.
    DeviceNeedsReset { device: String, reason: String },
    /// The VM has stopped, with why; the process exits right after.
    Exited { reason: ExitReason },
}

/// The line for a reply: its fields plus `"ok": true`, or `{"ok": false, "error": ...}`.
/// No trailing newline.
pub fn encode_reply<T: Serialize>(reply: &Result<T, String>) -> String {
    let value = match reply {
        Ok(body) => match serde_json::to_value(body) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.insert("ok".into(), true.into());
                serde_json::Value::Object(fields)
            }
            Ok(other) => serde_json::json!({"ok": false, "error": format!("internal error: reply is not an object: {other}")}),
            Err(e) => serde_json::json!({"ok": false, "error": format!("internal error: reply not serializable: {e}")}),
        },
        Err(message) => serde_json::json!({"ok": false, "error": message}),
    };
    value.to_string()
}

/// Reads a reply line as `T`; `Err` carries the VMM's error message, or says the line was not
/// a reply of that shape.
pub fn decode_reply<T: DeserializeOwned>(line: &str) -> Result<T, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("malformed reply from the VMM: {e}"))?;
    match value.get("ok").and_then(serde_json::Value::as_bool) {
        Some(true) => serde_json::from_value(value).map_err(|e| format!("unexpected reply from the VMM: {e}")),
        Some(false) => Err(value.get("error").and_then(serde_json::Value::as_str).unwrap_or("no error message").to_string()),
        None => Err("reply from the VMM has no \"ok\" field".to_string()),
    }
}

/// Reads a request line; the error says what was wrong with it, naming the field when one
/// field has the wrong type (serde names missing and unknown fields, not mistyped ones).
pub fn decode_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    serde_json::from_value(value.clone()).map_err(|e| {
        let serde_json::Value::Object(fields) = value else { return format!("bad request: {e}") };
        // The mistyped field is the one whose absence turns the error into "missing field".
        let mistyped = fields.keys().filter(|k| *k != "op").find(|key| {
            let mut without = fields.clone();
            without.remove(*key);
            serde_json::from_value::<Request>(serde_json::Value::Object(without))
                .is_err_and(|e2| e2.to_string().contains(&format!("missing field `{key}`")))
        });
        match mistyped {
            Some(key) => format!("bad request: {key}: {e}"),
            None => format!("bad request: {e}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        assert_eq!(serde_json::to_string(&Request::PowerButton).unwrap(), r#"{"op":"power_button"}"#);
        assert_eq!(decode_request(r#"{"op":"balloon","target_mib":16}"#), Ok(Request::Balloon { target_mib: 16 }));
        for bad in ["not json", r#"{"op":42}"#, r#"{"op":"explode"}"#, "{}", r#"{"op":"balloon"}"#] {
            assert!(decode_request(bad).is_err(), "{bad}");
        }
        assert!(decode_request(r#"{"op":"balloon"}"#).unwrap_err().contains("target_mib"));
        assert_eq!(
            decode_request(r#"{"op":"snapshot","dir":"/s"}"#),
            Ok(Request::Snapshot { dir: "/s".into(), resume: false, disk_snapshot: None }),
            "resume and disk_snapshot are optional"
        );
        assert_eq!(
            decode_request(r#"{"op":"snapshot","dir":"/s","resume":true,"disk_snapshot":"before"}"#),
            Ok(Request::Snapshot { dir: "/s".into(), resume: true, disk_snapshot: Some("before".into()) }),
        );
        assert_eq!(
            decode_request(r#"{"op":"backup_begin","checkpoint":"c2","snapshot":"s"}"#),
            Ok(Request::BackupBegin { checkpoint: "c2".into(), parent: None, snapshot: "s".into(), since: Vec::new(), ranges_dir: None }),
            "parent, since and ranges_dir are optional"
        );
        assert!(decode_request(r#"{"op":"checkpoint_remove"}"#).unwrap_err().contains("checkpoint"));
        let mistyped = decode_request(r#"{"op":"balloon","target_mib":"lots"}"#).unwrap_err();
        assert!(mistyped.starts_with("bad request: target_mib: invalid type"), "{mistyped}");
    }

    #[test]
    fn replies_round_trip() {
        let info = InfoReply { state: RunState::Paused, pid: 7, vcpus: 2, memory_bytes: 1 << 28, name: "vm".into() };
        let line = encode_reply(&Ok(info.clone()));
        assert!(line.contains(r#""ok":true"#) && line.contains(r#""state":"paused""#), "{line}");
        assert_eq!(decode_reply::<InfoReply>(&line), Ok(info));
        assert_eq!(decode_reply::<Done>(&encode_reply(&Ok(Done {}))), Ok(Done {}));
        let err = encode_reply::<Done>(&Err("no balloon".into()));
        assert_eq!(decode_reply::<Done>(&err), Err("no balloon".into()));
        assert!(decode_reply::<InfoReply>(&encode_reply(&Ok(Done {}))).unwrap_err().contains("unexpected reply"));
    }

    #[test]
    fn events_are_tagged() {
        let e = VmEvent::Exited { reason: ExitReason::DebugExit(3) };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(line, r#"{"event":"exited","reason":{"debug_exit":3}}"#);
        assert_eq!(serde_json::from_str::<VmEvent>(&line).unwrap(), e);
        let reset = serde_json::to_string(&VmEvent::Exited { reason: ExitReason::Reset }).unwrap();
        assert_eq!(reset, r#"{"event":"exited","reason":"reset"}"#);
    }
}
