//! `ferro-bench migrate`: live migration of a 512 MiB `counter` test guest between two VMMs on
//! this host over loopback TCP, for `ferro vmm` and QEMU `-M microvm`, and between two ferrods
//! (`ferro migrate --live`: the same VMM stream relayed through both ferrods and their TLS
//! connection, the CLI's request and checks included; once more with a writable qcow2 disk on
//! storage both see, which changes hands at each switch-over), with the guest idle (its
//! 16 MiB pattern written once, the rest of RAM untouched) and dirtying (churning the pattern:
//! every pass rewrites all 16 MiB, a few milliseconds apart). The guest moves `runs` times in a
//! chain (each destination is the next source), so every run starts from a guest that was
//! itself migrated.
//!
//! - Downtime: as each VMM reports it. Ours: from the source's pause to the destination's word
//!   that the guest runs there (`migrate_send`'s `downtime_us`). QEMU's: `query-migrate`'s
//!   `downtime` (from the source's stop to the end of the migration on the source, which leaves
//!   out the destination loading the last data and the state); and, measured from the outside
//!   the way the issue defines downtime, from the source's `STOP` event to the destination's
//!   `RESUME` event (QMP timestamps, one host clock).
//! - Total: as reported (`total_ms`; QEMU's `total-time`), and, the same way for both, from the
//!   request until the destination's guest answers a byte typed on its console.
//!
//! QEMU runs twice: over plain TCP, and over TLS (`tls-creds-x509`, the same test CA and
//! certificate as the ferrods'), the peer for the ferrod row, whose stream is encrypted too.
//!
//! Both run without a bandwidth cap (QEMU's default of 128 MiB/s is lifted) and with a 300 ms
//! downtime budget (both defaults). After every move the guest must answer, and a churning one
//! must report no stale word.

use crate::common::{Scratch, ferro_bin, median, qemu_bin};
use ferro_test_support::daemon::pki::Pki;
use ferro_test_support::daemon::Home;
use crate::snapshot::{LineSocket, connect, ms, ping, qemu_command, qmp_connect, stop, wait_console};
use serde_json::json;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 512;

/// One workload's medians: reported downtime, reported total, request -> destination answering.
struct Numbers {
    downtime_ms: f64,
    /// QEMU only: from the source's STOP event to the destination's RESUME event.
    stop_to_resume_ms: Option<f64>,
    total_ms: f64,
    answering_ms: f64,
}

/// A free loopback port for the next destination to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Waits until something listens on loopback TCP `port` (a destination ready for the stream),
/// from /proc/net/tcp, without connecting (a destination accepts one connection only).
fn wait_listening(port: u16) {
    let start = Instant::now();
    let wanted = format!(":{port:04X} 00000000:0000 0A");
    while !std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp").contains(&wanted) {
        assert!(start.elapsed() < Duration::from_secs(30), "nothing listens on port {port}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Starts churning when asked to; after a move, checks the churn saw no stale word and churns on.
fn after_move(console: &mut UnixStream, churn: bool) {
    let seen = ping(console);
    if churn {
        assert!(seen.contains("counter: churned") && seen.contains(" errors=0"), "a stale or lost page: {seen}");
        console.write_all(b"d").expect("write to the console");
        wait_console(console, "counter: churning");
    }
}

/// Our VMMs: boots the guest, then moves it `runs` times.
fn ferro(runs: usize, churn: bool, dir: &Path) -> Numbers {
    let ferro = ferro_bin();
    let vmm = |at: &Path, extra: &[&str]| -> Child {
        Command::new(&ferro)
            .arg("vmm")
            .args(extra)
            .arg("--api-socket")
            .arg(at.join("api.sock"))
            .arg("--serial-socket")
            .arg(at.join("serial.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ferro vmm")
    };
    let mut at = dir.join("ferro-0");
    std::fs::create_dir_all(&at).expect("run directory");
    let memory = format!("{MEMORY_MIB}M");
    let mut source = vmm(&at, &["--guest", "counter", "--memory", &memory]);
    let mut console = connect(&at.join("serial.sock"), &mut source);
    wait_console(&mut console, "counter: up");
    if churn {
        console.write_all(b"d").expect("write to the console");
        wait_console(&mut console, "counter: churning");
    }
    let (mut downtimes, mut totals, mut answering) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let next = dir.join(format!("ferro-{run}"));
        std::fs::create_dir_all(&next).expect("run directory");
        let port = free_port();
        let mut dest = vmm(&next, &["--incoming", &format!("tcp:127.0.0.1:{port}")]);
        let mut control = LineSocket(BufReader::new(connect(&at.join("api.sock"), &mut source)));
        wait_listening(port);
        let start = Instant::now();
        control.send(&json!({"op": "migrate_send", "to": format!("tcp:127.0.0.1:{port}")}));
        let reply = control.line();
        assert_eq!(reply["ok"], true, "{reply}");
        let mut dest_console = connect(&next.join("serial.sock"), &mut dest);
        after_move(&mut dest_console, churn);
        answering.push(ms(start.elapsed()));
        downtimes.push(reply["downtime_us"].as_f64().expect("downtime_us") / 1e3);
        totals.push(reply["total_ms"].as_f64().expect("total_ms"));
        let _ = source.wait();
        let _ = std::fs::remove_dir_all(&at);
        (source, console, at) = (dest, dest_console, next);
    }
    drop(console);
    stop(source);
    Numbers { downtime_ms: median(downtimes), stop_to_resume_ms: None, total_ms: median(totals), answering_ms: median(answering) }
}

/// Two ferrods on this host, each with a TLS listener on 127.0.0.1: the guest moves from one to
/// the other and back with `ferro migrate --live --undefine-source --json`. With `disk`, the
/// domain has a writable 64 MiB qcow2 disk with a persistent dirty bitmap in a directory both
/// see, which changes hands at every switch-over (flushed and closed, bitmap stored, on the
/// source; opened on the destination).
fn ferrods(runs: usize, churn: bool, disk: bool) -> Numbers {
    let pki = Pki::new();
    let homes = [Home::new("bench-mig-a"), Home::new("bench-mig-b")];
    let daemons = [pki.daemon(&homes[0]), pki.daemon(&homes[1])];
    let definition = homes[0].path().join("mover.toml");
    let mut toml = format!("name = \"mover\"\nmemory = \"{MEMORY_MIB}M\"\n[boot]\nguest = \"counter\"\n");
    if disk {
        let image = homes[0].path().join("data.qcow2");
        let image = image.to_str().expect("utf-8");
        for args in [&["create", "-q", "-f", "qcow2", image, "64M"][..], &["bitmap", "--add", image, "b0"]] {
            let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
            assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        }
        toml.push_str(&format!("[[disk]]\npath = \"{image}\"\nformat = \"qcow2\"\n"));
    }
    std::fs::write(&definition, toml).expect("write the definition");
    daemons[0].0.ferro_ok(&["define", definition.to_str().expect("utf-8")]);
    daemons[0].0.ferro_ok(&["start", "mover"]);
    let mut console = daemons[0].0.console("mover");
    wait_console(&mut console, "counter: up");
    if churn {
        console.write_all(b"d").expect("write to the console");
        wait_console(&mut console, "counter: churning");
    }
    let (ca, tokens) = (pki.arg("ca.pem"), pki.arg("tokens"));
    let (mut downtimes, mut totals, mut answering) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let (from, to) = (&daemons[(run - 1) % 2].0, &daemons[run % 2]);
        let uri = format!("tls://127.0.0.1:{}", to.1.port());
        let start = Instant::now();
        let numbers: serde_json::Value = serde_json::from_str(&from.ferro_ok(&[
            "migrate", "mover", &uri, "--live", "--undefine-source", "--json", "--dest-ca", &ca, "--dest-token-file", &tokens,
        ]))
        .expect("ferro migrate --json");
        let mut dest_console = to.0.console("mover");
        after_move(&mut dest_console, churn);
        answering.push(ms(start.elapsed()));
        downtimes.push(numbers["downtime_ms"].as_f64().expect("downtime_ms"));
        totals.push(numbers["total_ms"].as_f64().expect("total_ms"));
        console = dest_console;
    }
    drop(console);
    Numbers { downtime_ms: median(downtimes), stop_to_resume_ms: None, total_ms: median(totals), answering_ms: median(answering) }
}

/// QEMU's migration over TLS (`tls-creds-x509`): a server credential for receiving and a client
/// one for sending, each VM given both since every destination becomes the next source.
struct QemuTls {
    server: PathBuf,
    client: PathBuf,
    _pki: Pki,
}

impl QemuTls {
    /// The directories QEMU reads (ca-cert.pem; server-cert.pem and server-key.pem), from the
    /// same test CA and certificate as the ferrods' (for 127.0.0.1).
    fn new(dir: &Path) -> QemuTls {
        let pki = Pki::new();
        let (server, client) = (dir.join("qemu-tls-server"), dir.join("qemu-tls-client"));
        for d in [&server, &client] {
            std::fs::create_dir_all(d).expect("tls directory");
            std::fs::copy(pki.path("ca.pem"), d.join("ca-cert.pem")).expect("ca");
        }
        std::fs::copy(pki.path("ferrod.pem"), server.join("server-cert.pem")).expect("cert");
        std::fs::copy(pki.path("ferrod.key"), server.join("server-key.pem")).expect("key");
        QemuTls { server, client, _pki: pki }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-object".into(),
            format!("tls-creds-x509,id=tls-in,dir={},endpoint=server,verify-peer=off", self.server.display()),
            "-object".into(),
            format!("tls-creds-x509,id=tls-out,dir={},endpoint=client", self.client.display()),
        ]
    }
}

/// QEMU, the peer: the same guest and the same moves, through QMP; over TLS with `tls`.
fn qemu(qemu: &Path, guest: &Path, runs: usize, churn: bool, dir: &Path, tls: Option<&QemuTls>) -> Numbers {
    let files = |run: usize| (dir.join(format!("qemu-{run}.serial")), dir.join(format!("qemu-{run}.qmp")));
    let tls_args = tls.map(QemuTls::args).unwrap_or_default();
    let (serial, qmp_path) = files(0);
    let mut source = qemu_command(qemu, guest, MEMORY_MIB, &serial, &qmp_path).args(&tls_args).spawn().expect("spawn qemu");
    let mut console = connect(&serial, &mut source);
    wait_console(&mut console, "counter: up");
    let mut qmp = qmp_connect(&qmp_path, &mut source);
    if churn {
        console.write_all(b"d").expect("write to the console");
        wait_console(&mut console, "counter: churning");
    }
    let (mut downtimes, mut totals, mut answering, mut stop_to_resume) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let (serial, qmp_path) = files(run);
        let port = free_port();
        let incoming = if tls.is_some() { "defer".to_string() } else { format!("tcp:127.0.0.1:{port}") };
        let mut dest = qemu_command(qemu, guest, MEMORY_MIB, &serial, &qmp_path)
            .args(&tls_args)
            .arg("-incoming")
            .arg(incoming)
            .spawn()
            .expect("spawn qemu -incoming");
        let mut dest_console = connect(&serial, &mut dest);
        let mut dest_qmp = qmp_connect(&qmp_path, &mut dest);
        qmp.qmp(&json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 100u64 << 30, "downtime-limit": 300}}));
        if tls.is_some() {
            // The credentials must be set before the destination listens.
            dest_qmp.qmp(&json!({"execute": "migrate-set-parameters", "arguments": {"tls-creds": "tls-in"}}));
            dest_qmp.qmp(&json!({"execute": "migrate-incoming", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}));
            qmp.qmp(&json!({"execute": "migrate-set-parameters", "arguments": {"tls-creds": "tls-out", "tls-hostname": "127.0.0.1"}}));
        }
        wait_listening(port);
        let start = Instant::now();
        let (mut source_events, mut dest_events) = (Vec::new(), Vec::new());
        qmp.qmp_keeping_events(&json!({"execute": "migrate", "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}), &mut source_events);
        let status = loop {
            let status = qmp.qmp_keeping_events(&json!({"execute": "query-migrate"}), &mut source_events);
            match status["return"]["status"].as_str() {
                Some("completed") | Some("failed") | Some("cancelled") => break status,
                _ if start.elapsed() > Duration::from_secs(60) => panic!("QEMU migration still not done after 60 s: {status}"),
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        };
        assert_eq!(status["return"]["status"], "completed", "QEMU migration: {status}");
        // The source is done before the destination runs: a byte typed before then may be lost.
        while dest_qmp.qmp_keeping_events(&json!({"execute": "query-status"}), &mut dest_events)["return"]["status"] != "running" {
            assert!(start.elapsed() < Duration::from_secs(60), "the destination QEMU never ran the guest");
            std::thread::sleep(Duration::from_micros(200));
        }
        after_move(&mut dest_console, churn);
        answering.push(ms(start.elapsed()));
        downtimes.push(status["return"]["downtime"].as_f64().expect("downtime"));
        // The RESUME event may come after the status said running: one more command fetches it.
        if event_at(&dest_events, "RESUME").is_none() {
            dest_qmp.qmp_keeping_events(&json!({"execute": "query-status"}), &mut dest_events);
        }
        let stopped = event_at(&source_events, "STOP").expect("QEMU's source sent no STOP event");
        let resumed = event_at(&dest_events, "RESUME").expect("QEMU's destination sent no RESUME event");
        stop_to_resume.push((resumed - stopped) * 1e3);
        totals.push(status["return"]["total-time"].as_f64().expect("total-time"));
        stop(source);
        (source, console, qmp) = (dest, dest_console, dest_qmp);
    }
    drop(console);
    stop(source);
    Numbers {
        downtime_ms: median(downtimes),
        stop_to_resume_ms: Some(median(stop_to_resume)),
        total_ms: median(totals),
        answering_ms: median(answering),
    }
}

/// The time (seconds, QMP's microsecond timestamp) of the first `name` event in `events`.
fn event_at(events: &[serde_json::Value], name: &str) -> Option<f64> {
    let e = events.iter().find(|e| e["event"] == name)?;
    Some(e["timestamp"]["seconds"].as_f64()? + e["timestamp"]["microseconds"].as_f64()? / 1e6)
}

fn show(who: &str, n: &Numbers) {
    println!(
        "  {who:<18} downtime {:8.2} ms   total {:8.1} ms   request -> destination answering {:8.1} ms",
        n.downtime_ms, n.total_ms, n.answering_ms
    );
    if let Some(stop_to_resume) = n.stop_to_resume_ms {
        println!("  {:<18} downtime {stop_to_resume:8.2} ms   (source STOP -> destination RESUME, from QMP events)", "");
    }
}

pub fn run(runs: usize) {
    let scratch = Scratch::new();
    let guest = scratch.0.join("counter.elf");
    std::fs::write(&guest, ferro_guests::get("counter").expect("built-in counter guest")).expect("write the guest");
    let peer = qemu_bin();
    let tls = peer.as_ref().map(|_| QemuTls::new(&scratch.0));
    println!("== live migration over loopback TCP, counter guest {MEMORY_MIB} MiB, {runs} moves each, medians");
    for (churn, workload) in [(false, "idle (16 MiB written)"), (true, "dirtying (16 MiB churned)")] {
        println!("  -- {workload}");
        let ours = ferro(runs, churn, &scratch.0);
        show("ferro vmm", &ours);
        let relayed = ferrods(runs, churn, false);
        show("ferrod over TLS", &relayed);
        let with_disk = ferrods(runs, churn, true);
        show("ferrod, qcow2 disk", &with_disk);
        match &peer {
            Some(qemu_path) => {
                let theirs = qemu(qemu_path, &guest, runs, churn, &scratch.0, None);
                show("qemu -M microvm", &theirs);
                let theirs_tls = qemu(qemu_path, &guest, runs, churn, &scratch.0, tls.as_ref());
                show("qemu, TLS", &theirs_tls);
                // The last pair both encrypt: ferrod's relays carry the stream in TLS, QEMU its own.
                for (who, n, peer) in [("ferro/qemu", &ours, &theirs), ("ferrod/qemu", &relayed, &theirs), ("ferrod/qemu-tls", &relayed, &theirs_tls)] {
                    println!(
                        "  ratio {who:<12} downtime {:.3} (against STOP -> RESUME; {:.3} against QEMU's own figure)   total {:.3}   answering {:.3}",
                        n.downtime_ms / peer.stop_to_resume_ms.unwrap_or(peer.downtime_ms),
                        n.downtime_ms / peer.downtime_ms,
                        n.total_ms / peer.total_ms,
                        n.answering_ms / peer.answering_ms
                    );
                }
            }
            None => println!("  (no QEMU peer: see scripts/qemu-peer.sh)"),
        }
    }
}
