//! The per-VM control socket (docs/vmm-control.md): [`Request`]s from `ferrod` (or any client)
//! to pause, resume, press the power button, reset, quit, read stats, set the balloon, save a
//! snapshot, start and end a backup (`backup`), read and set where vCPU and emulator threads run, and migrate the VM away, one JSON line each way, typed by `ferro-vmm-api`, answered through [`VmControl`].

use crate::backup;
use crate::exit::ExitReason;
use crate::migration::{self, SendOptions};
use crate::vm::VmControl;
use ferro_jail::seccomp::{self, ThreadKind};
use ferro_vmm_api::Request;
use ferro_vmm_api::control::{BalloonReply, Done, MAX_LINE, RunState, SnapshotReply, decode_request, encode_reply};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Sets the balloon's target to `mib` MiB of guest memory to take back.
fn balloon(vm: &VmControl, mib: u64) -> Result<BalloonReply, String> {
    let Some(balloon) = &vm.devices().handles().balloon else {
        return Err("this VM has no balloon device (start it with --balloon size=0)".into());
    };
    let memory_mib = vm.config().memory.size >> 20;
    if mib > memory_mib {
        return Err(format!("target_mib {mib} is more than the guest's {memory_mib} MiB"));
    }
    balloon.set_target_pages((mib << 8) as u32);
    Ok(BalloonReply { target_mib: mib, actual_mib: balloon.stats().actual_mib })
}

/// Saves the VM into `dir`, and its disks as internal snapshots named `disk_snapshot`.
fn snapshot(vm: &VmControl, dir: &Path, resume: bool, disk_snapshot: Option<&str>) -> Result<SnapshotReply, String> {
    let times = crate::snapshot::save(vm, dir, resume, disk_snapshot)?;
    Ok(SnapshotReply {
        pause_us: u64::try_from(times.paused.as_micros()).unwrap_or(u64::MAX),
        memory_bytes_written: times.memory_bytes,
        state: if vm.is_paused() { RunState::Paused } else { RunState::Running },
        disks: times.disks,
    })
}

/// Answers one request line with one reply line, and the way the VM should end once that reply
/// is sent (`quit` and `reset`: the reply goes out before the VMM starts to exit, so a client
/// always hears it).
pub fn handle(vm: &VmControl, line: &str) -> (String, Option<ExitReason>) {
    let request = match decode_request(line) {
        Ok(r) => r,
        Err(e) => return (encode_reply::<Done>(&Err(e)), None),
    };
    let done = |r: Result<(), String>| encode_reply(&r.map(|()| Done {}));
    let reply = match request {
        Request::Info => encode_reply(&Ok(vm.info())),
        Request::Pause => done(vm.pause()),
        Request::Resume => done(vm.resume()),
        Request::PowerButton => done(vm.press_power_button().map_err(|e| format!("power button: {e}"))),
        Request::Reset => return (done(Ok(())), Some(ExitReason::Reset)),
        Request::Quit => return (done(Ok(())), Some(ExitReason::Quit)),
        Request::Stats => encode_reply(&Ok(vm.stats())),
        Request::Balloon { target_mib } => encode_reply(&balloon(vm, target_mib)),
        Request::Snapshot { dir, resume, disk_snapshot } => {
            encode_reply(&snapshot(vm, &dir, resume, disk_snapshot.as_deref()))
        }
        Request::BackupBegin { checkpoint, parent, snapshot, since, ranges_dir } => {
            encode_reply(&backup::begin(vm, &checkpoint, parent.as_deref(), &snapshot, &since, ranges_dir.as_deref()))
        }
        Request::BackupEnd { snapshot } => done(backup::end(vm, &snapshot)),
        Request::DiskSnapshotDelete { name } => done(crate::snapshot::delete_disk_snapshot(vm, &name)),
        Request::CheckpointRemove { checkpoint, parent } => done(backup::remove_checkpoint(vm, &checkpoint, parent.as_deref())),
        Request::VcpuInfo => encode_reply(&vm.vcpu_info()),
        Request::PinVcpu { vcpu, cpus } => done(vm.pin_vcpu(vcpu, &cpus)),
        Request::PinEmulator { cpus } => done(vm.pin_emulator(&cpus)),
        Request::MigrateSend { to, max_downtime_ms, bandwidth_mib, auto_converge, copy_storage } => {
            let opts = SendOptions {
                max_downtime: Duration::from_millis(max_downtime_ms),
                bandwidth: bandwidth_mib.map(|mib| mib.saturating_mul(1 << 20)),
                auto_converge,
                copy_storage,
            };
            let sent = migration::send(vm, &to, &opts);
            let exit = sent.is_ok().then_some(ExitReason::Migrated);
            return (encode_reply(&sent), exit);
        }
        Request::MigrateInfo => encode_reply(&Ok(vm.migration().info())),
        Request::MigrateCancel => done(vm.migration().cancel()),
    };
    (reply, None)
}

/// Binds `path` (replacing a stale socket file) and serves requests on background threads.
pub fn serve(path: &Path, vm: Arc<VmControl>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    seccomp::spawn(ThreadKind::ControlListener, "api", move || {
        for stream in listener.incoming().flatten() {
            let vm = vm.clone();
            let _ = seccomp::spawn(ThreadKind::ControlConnection, "api-conn", move || serve_connection(stream, &vm));
        }
    })?;
    Ok(())
}

fn serve_connection(stream: UnixStream, vm: &VmControl) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= MAX_LINE {
            let _ = writeln!(out, "{}", encode_reply::<Done>(&Err("request line longer than 64 KiB".into())));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (reply, exit) = handle(vm, &line);
        let sent = writeln!(out, "{reply}");
        if let Some(reason) = exit {
            vm.request_exit(reason);
        }
        if sent.is_err() {
            return;
        }
    }
}
