//! Live migration between two ferrods (docs/migration.md): each with its own FERRO_HOME, the
//! destination serving TLS on 127.0.0.1 with certificates and tokens made by openssl. The counter
//! guest churns its 16 MiB pattern the whole time (every pass checks each word against the
//! generation last written), so a page lost or left stale by a move shows as errors, and its
//! count shows it was never rebooted; its read-only disk is on storage both ferrods see (checked
//! with a marker). Refused credentials, a destination VMM killed mid-way, a cancel and a link
//! that goes silent (two network namespaces joined by a veth pair, one ferrod in each, the veth
//! taken down) leave the guest running on the source and nothing on the destination. A shut-off domain moves with the disks
//! the destination lacks, byte for byte as `qemu-img compare` reads them. A guest writing its
//! shared qcow2 disk moves with it (the source hands the disk over at the switch-over), and a
//! hand-over that fails gives the disk back to the source. A Linux guest with an ext4 qcow2 disk
//! moves while a shell loop in it writes and syncs the disk: on the destination it answers its
//! console, its file's checksum is the one it had, and what it wrote there is in the image. With
//! `--copy-storage-all` a guest writing its disk moves with the disk copied along to the other
//! ferrod's pool, and back, byte for byte as `qemu-img compare` reads them.

use ferro_test_support::daemon::pki::Pki;
use ferro_test_support::daemon::{Daemon, Home, openapi, read_console};
use ferro_test_support::vm::{Console, field, linux_cmdline, linux_dir};
use ferro_test_support::{ferro_bin, net, qemu, run_ok, wait_for};
use std::io::Write;
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::Duration;

const GUEST: &str = "name = \"mover\"\nmemory = \"64M\"\nvcpus = 2\n[boot]\nguest = \"counter\"\n";

fn stderr_line(out: &Output) -> String {
    assert!(!out.status.success(), "should have failed: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

fn state_of(d: &Daemon, name: &str) -> Option<String> {
    let (_, list) = d.api().call("GET", "/v1/domains", None);
    list.as_array().unwrap().iter().find(|x| x["name"] == name).map(|x| x["state"].as_str().unwrap().to_string())
}

/// Pids of the destination's VMMs waiting for a VM (`ferro vmm ... --incoming ...`).
fn incoming_vmms(home: &Home) -> Vec<i32> {
    home.processes()
        .into_iter()
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"--incoming")))
        .collect()
}

/// Defines `definition` on `src` (as a file in `home`), starts it, and sets its counter guest
/// churning after one count; returns the console and the guest's seed.
fn churning(src: &Daemon, home: &Home, definition: &str) -> (Console, String) {
    let file = home.path().join("mover.toml");
    std::fs::write(&file, definition).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    src.ferro_ok(&["start", "mover"]);
    let mut console = Console::on(src.console("mover"));
    console.type_keys("c");
    let first = console.line("counter: 1 ");
    let seed = field(&first, "seed").to_owned();
    assert_eq!(first, format!("counter: 1 seed={seed} errors=0"));
    console.type_keys("d");
    console.line("counter: churning");
    (console, seed)
}

/// `ferro migrate mover URI --live --bandwidth 8` from `home`'s ferrod, in the background (the
/// first pass takes seconds), once at least `bytes` went over.
fn slow_migration(home: &Home, src: &Daemon, uri: &str, pki: &Pki, bytes: u64) -> std::process::Child {
    let (ca, tokens) = (pki.arg("ca.pem"), pki.arg("tokens"));
    let mut child = std::process::Command::new(ferro_bin())
        .args(["migrate", "mover", uri, "--live", "--bandwidth", "8", "--dest-ca", &ca, "--dest-token-file", &tokens])
        .env("FERRO_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not wait_for: a migrate command that already ended, or a job in another state, is named
    // in the failure (CI once timed out here without saying why).
    let start = std::time::Instant::now();
    loop {
        let (status, m) = src.api().call("GET", "/v1/domains/mover/migration", None);
        if status == 200 && m["progress"]["state"] == "active" && m["progress"]["transferred_bytes"].as_u64().unwrap_or(0) > bytes {
            return child;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            let out = child.wait_with_output().unwrap();
            panic!("ferro migrate ended before the migration was under way: {}; migration {status} {m}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the migration was not under way after 60 s: {status} {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_churning_guest_moves_between_two_ferrods_and_only_then() {
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-src"), Home::new("mig-dst"));
    let src = Daemon::start(&src_home);
    let (dst, addr) = pki.daemon(&dst_home);
    let uri = format!("tls://127.0.0.1:{}", addr.port());
    let (ca, tokens) = (pki.arg("ca.pem"), pki.arg("tokens"));
    let migrate = |extra: &[&str]| -> Output {
        let args = [&["migrate", "mover", uri.as_str(), "--live", "--dest-ca", &ca][..], extra].concat();
        src.ferro(&args)
    };

    // A read-only disk on storage both ferrods see (two VMMs may hold it open for reading).
    let shared = src_home.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let media = shared.join("media.raw");
    std::fs::write(&media, vec![0x33u8; 1 << 20]).unwrap();
    let definition = format!("{GUEST}[[disk]]\npath = \"{}\"\nformat = \"raw\"\nreadonly = true\n", media.display());
    let (console, seed) = churning(&src, &src_home, &definition);

    // Refused before anything moves: a wrong token, a readonly one, a CA that did not sign the
    // destination's certificate.
    let err = stderr_line(&migrate(&["--dest-token-file", &pki.arg("wrong-token")]));
    assert!(err.contains("refused the token") && err.contains("--dest-token-file"), "{err}");
    let err = stderr_line(&migrate(&["--dest-token-file", &pki.arg("reader-token")]));
    assert!(err.contains("readonly") && err.contains("admin token"), "{err}");
    let err = stderr_line(&src.ferro(&[
        "migrate", "mover", &uri, "--live", "--dest-ca", &pki.arg("other-ca.pem"), "--dest-token-file", &tokens,
    ]));
    assert!(err.contains("not signed by the CA"), "{err}");
    let err = stderr_line(&migrate(&[]));
    assert!(err.contains("--dest-token-file"), "no token given: {err}");
    assert_eq!(dst.api().call("GET", "/v1/domains", None).1, serde_json::json!([]), "nothing reached the destination");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));

    // The destination's VMM killed while memory goes over (8 MiB/s: the first pass takes
    // seconds): the job fails, the guest runs on here, the destination keeps nothing.
    let slow = slow_migration(&src_home, &src, &uri, &pki, 0);
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("paused"), "the destination waits for the VM");
    let info = src.ferro_ok(&["domjobinfo", "mover"]);
    assert!(info.contains("migrate") && info.contains("Iteration:") && info.contains(&uri), "{info}");
    let vmms = incoming_vmms(&dst_home);
    assert_eq!(vmms.len(), 1, "one VMM waits for the VM on the destination");
    // SAFETY: kill(2) on the pid of a process of this test's own destination ferrod.
    unsafe { libc::kill(vmms[0], libc::SIGKILL) };
    let out = slow.wait_with_output().unwrap();
    let err = stderr_line(&out);
    assert!(err.contains("failed") && err.contains("runs on here"), "{err}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));
    wait_for("the destination to drop the domain", Duration::from_secs(30), || state_of(&dst, "mover").is_none());
    let job: Value = serde_json::from_str(&src.ferro_ok(&["domjobinfo", "mover", "--json"])).unwrap();
    assert_eq!((job["kind"].as_str(), job["state"].as_str()), (Some("migrate"), Some("failed")), "{job}");

    // domjobabort: the VMM's migrate_cancel; the guest runs on, the destination keeps nothing.
    let slow = slow_migration(&src_home, &src, &uri, &pki, 0);
    let aborted = src.ferro_ok(&["domjobabort", "mover"]);
    assert!(aborted.contains("aborted"), "{aborted}");
    let err = stderr_line(&slow.wait_with_output().unwrap());
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));
    wait_for("the destination to drop the domain", Duration::from_secs(30), || state_of(&dst, "mover").is_none());

    // The move: every page, the count going on, and the guest in one place only.
    let out = migrate(&["--dest-token-file", &tokens, "--bandwidth", "100", "--auto-converge", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numbers: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("migrated between ferrods: {numbers}");
    openapi::validate(&serde_json::json!({"$ref": "#/components/schemas/MigrationResult"}), &numbers, "$").unwrap();
    assert!(numbers["iterations"].as_u64().unwrap() >= 2, "{numbers}");
    assert!(numbers["transferred_bytes"].as_u64().unwrap() > 16 << 20, "the 16 MiB pattern went over: {numbers}");
    assert!(numbers["downtime_ms"].as_f64().unwrap() > 0.0 && numbers["total_ms"].as_u64().unwrap() > 0, "{numbers}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("shutoff"));
    let (_, events) = src.api().call("GET", "/v1/events", None);
    let stopped = events.as_array().unwrap().iter().rev().find(|e| e["name"] == "mover" && e["kind"] == "stopped").cloned();
    assert!(stopped.as_ref().is_some_and(|e| e["detail"].as_str().unwrap().contains("migrated away")), "{events}");
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("running"));
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 1, "the shared-storage marker is gone");
    let listed = String::from_utf8_lossy(
        &std::process::Command::new(ferro_bin())
            .args(["list", "--connect", &uri, "--ca", &ca, "--token-file", &tokens])
            .env_remove("FERRO_HOME")
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(listed.contains("mover") && listed.contains("running"), "{listed}");
    let info: Value = serde_json::from_str(&src.ferro_ok(&["domjobinfo", "mover", "--json"])).unwrap();
    assert_eq!((info["state"].as_str(), info["migration"]["result"]["iterations"].as_u64()), (Some("completed"), numbers["iterations"].as_u64()), "{info}");

    drop(console);
    let mut console = Console::on(dst.console("mover"));
    console.type_keys("c");
    let churned = console.line("counter: churned ");
    assert_eq!(field(&churned, "errors"), "0", "a page was lost or stale: {churned}");
    assert_eq!(console.line("counter: 2 "), format!("counter: 2 seed={seed} errors=0"));
    dst.ferro_ok(&["destroy", "mover"]);
}

/// Defines pool `p` at `dir` on a daemon and starts it.
fn pool(d: &Daemon, dir: &std::path::Path) {
    let api = d.api();
    api.expect("POST", "/v1/pools", Some(&format!(r#"{{"name":"p","type":"dir","target":"{}"}}"#, dir.display())), 201);
    api.expect("POST", "/v1/pools/p/build", None, 200);
    api.expect("POST", "/v1/pools/p/start", None, 200);
}

#[test]
fn a_shut_off_domain_moves_with_the_disks_the_destination_lacks() {
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-off-src"), Home::new("mig-off-dst"));
    let src = Daemon::start(&src_home);
    let (dst, addr) = pki.daemon(&dst_home);
    let uri = format!("tls://127.0.0.1:{}", addr.port());
    let (src_pool, dst_pool) = (src_home.path().join("pool"), dst_home.path().join("pool"));
    pool(&src, &src_pool);
    pool(&dst, &dst_pool);
    // A qcow2 volume with data in two places (the rest unallocated), and a raw disk in a
    // directory both ferrods see.
    let volume = src_pool.join("data.qcow2");
    qemu::img_ok(&["create", "-q", "-f", "qcow2", volume.to_str().unwrap(), "256M"]);
    qemu::io(&volume, "write -P 0x5a 1M 3M");
    qemu::io(&volume, "write -P 0xa5 200M 1M");
    let shared = src_home.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let raw = shared.join("scratch.raw");
    std::fs::write(&raw, vec![0x42u8; 1 << 20]).unwrap();
    let definition = format!(
        "{GUEST}[[disk]]\npool = \"p\"\nvolume = \"data.qcow2\"\nformat = \"qcow2\"\n[[disk]]\npath = \"{}\"\nformat = \"raw\"\n",
        raw.display()
    );
    let file = src_home.path().join("mover.toml");
    std::fs::write(&file, &definition).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    let migrate = |extra: &[&str]| -> Output {
        let base = ["migrate", "mover", uri.as_str(), "--dest-ca", &pki.arg("ca.pem"), "--dest-token-file", &pki.arg("tokens")];
        src.ferro(&[&base[..], extra].concat())
    };

    // A live migration of a shut-off domain, and a file of the destination's own where the
    // volume would go: refused, nothing kept, nothing overwritten.
    assert!(stderr_line(&migrate(&["--live"])).contains("--offline moves a shut-off one"));
    let theirs = dst_pool.join("data.qcow2");
    std::fs::write(&theirs, b"the destination's own file").unwrap();
    let err = stderr_line(&migrate(&["--offline"]));
    assert!(err.contains("disk[0]") && err.contains("not the source's"), "{err}");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"the destination's own file");
    assert_eq!(dst.api().call("GET", "/v1/domains", None).1, serde_json::json!([]));
    std::fs::remove_file(&theirs).unwrap();

    let out = migrate(&["--offline", "--undefine-source", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numbers: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("offline migration: {numbers}");
    openapi::validate(&serde_json::json!({"$ref": "#/components/schemas/MigrationResult"}), &numbers, "$").unwrap();
    let sent = numbers["transferred_bytes"].as_u64().unwrap();
    assert!((4 << 20..64 << 20).contains(&sent), "the volume's data went, not its 256 MiB: {numbers}");
    // The volume arrived byte for byte (as QEMU reads it), and is a sound image; the shared
    // disk was not copied (the directory holds it alone).
    assert!(qemu::identical(&volume, &theirs), "qemu-img compare found the copy different");
    qemu::img_ok(&["check", "-q", theirs.to_str().unwrap()]);
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 1, "no marker or copy is left in the shared directory");
    assert!(state_of(&src, "mover").is_none(), "--undefine-source");
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("shutoff"));
    dst.ferro_ok(&["start", "mover"]);
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("running"));
    dst.ferro_ok(&["destroy", "mover"]);
}

#[test]
fn a_link_that_goes_silent_mid_migration_leaves_the_guest_on_the_source() {
    // Two hosts: the source ferrod in one network namespace, the destination's in another,
    // joined by a veth pair; the link is cut by taking the source's end down (packets vanish,
    // nobody is told).
    let (host, outside) = net::host_and_outside();
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-cut-src"), Home::new("mig-cut-dst"));
    let src = Daemon::start_in(&src_home, &host, &["--no-default-network"]);
    let listen = format!("{}:8443", net::OUTSIDE);
    let (cert, key, tokens) = (pki.arg("ferrod.pem"), pki.arg("ferrod.key"), pki.arg("tokens"));
    let dst = Daemon::start_in(&dst_home, &outside, &[
        "--no-default-network", "--listen", &listen, "--tls-cert", &cert, "--tls-key", &key, "--token-file", &tokens,
    ]);
    let uri = format!("tls://{listen}");
    let (mut console, seed) = churning(&src, &src_home, GUEST);
    let migrating = slow_migration(&src_home, &src, &uri, &pki, 1 << 20);
    host.ip(&["link", "set", "uplink", "down"]);
    let started = std::time::Instant::now();
    let err = stderr_line(&migrating.wait_with_output().unwrap());
    eprintln!("silent link noticed after {:?}: {err}", started.elapsed());
    assert!(err.contains("runs on here"), "{err}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));
    wait_for("the destination to drop the domain", Duration::from_secs(60), || state_of(&dst, "mover").is_none());
    console.type_keys("c");
    let churned = console.line("counter: churned ");
    assert_eq!(field(&churned, "errors"), "0", "{churned}");
    assert_eq!(console.line("counter: 2 "), format!("counter: 2 seed={seed} errors=0"));
    src.ferro_ok(&["destroy", "mover"]);
}

/// The soak guest (guests/src/soak.c) on its qcow2 disk: record k (sector 1 + k % 256) written
/// and flushed every 20 ms, "soak: flushed K" every 16th.
const SOAK: &str = "name = \"mover\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"soak\"\n";
const SOAK_MAGIC: u64 = 0x4345_524b_414f_5346;
const SOAK_MULT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The next "soak: flushed K" on `console` with K above `past`.
fn flushed_past(console: &mut Console, past: u64) -> u64 {
    loop {
        let line = console.line("soak: flushed ");
        let k: u64 = line["soak: flushed ".len()..].parse().unwrap_or_else(|_| panic!("{line:?}"));
        if k > past {
            return k;
        }
    }
}

/// The soak guest's ring as QEMU reads the image (`qemu-img convert` to raw): every record is
/// whole and in its sector, and together they are the last min(256, K + 1) records 0..=K with
/// none missing. Returns K.
fn soak_ring(image: &std::path::Path, scratch: &std::path::Path) -> u64 {
    qemu::img_ok(&["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), scratch.to_str().unwrap()]);
    let raw = std::fs::read(scratch).unwrap();
    let mut records = Vec::new();
    for s in 1..=256usize {
        let sector = &raw[s * 512..(s + 1) * 512];
        let word = |i: usize| u64::from_le_bytes(sector[i * 8..i * 8 + 8].try_into().unwrap());
        if word(0) != SOAK_MAGIC {
            assert!(sector.iter().all(|b| *b == 0), "sector {s} holds neither a record nor zeros");
            continue;
        }
        let k = word(1);
        assert_eq!(word(2), k.wrapping_mul(SOAK_MULT), "sector {s}: record {k} is torn");
        assert_eq!(k % 256, s as u64 - 1, "record {k} in sector {s}");
        assert!(sector[24..].iter().all(|b| *b == (k & 0xff) as u8), "sector {s}: record {k}'s filler is wrong");
        records.push(k);
    }
    records.sort_unstable();
    let last = *records.last().expect("the guest wrote records");
    let expected: Vec<u64> = (last.saturating_sub(255)..=last).collect();
    assert_eq!(records, expected, "the ring holds the last records, none missing");
    last
}

/// Pids of the `ferro vmm` processes of `home`'s domains.
fn vmms(home: &Home) -> Vec<i32> {
    home.processes()
        .into_iter()
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"vmm")))
        .collect()
}

/// The pids /proc/locks gives for the locks on `path`'s inode (OFD locks may show -1).
fn lock_holders(path: &std::path::Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let at = fields.iter().position(|f| f.matches(':').count() == 2)?;
            (fields[at].rsplit(':').next()? == ino.to_string()).then(|| fields[at - 1].parse().ok())?
        })
        .collect()
}

/// Whether a qemu-io write to the image is refused by its locks.
fn qemu_write_refused(image: &std::path::Path) -> bool {
    let out = std::process::Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xee 8M 4k"]).arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.contains("Failed to get") && text.contains("lock")
}

/// A running domain whose writable qcow2 disk (with a persistent dirty bitmap) is on storage
/// both ferrods see, its guest writing and flushing records all along. First a migration that
/// fails after the source has handed the disk over: the destination cannot open it (a reader's
/// lock taken meanwhile refuses writers), so the source takes it back, once that lock is gone,
/// and the guest writes on there under its lock. Then the move: the guest writes on at the
/// destination, every record before and after reads back whole and none is missing, the image
/// and its bitmap are sound, and no lock outlives its process.
#[test]
fn a_guest_writing_its_shared_disk_moves_and_a_failed_hand_over_gives_the_disk_back() {
    use ferro_block::lock::{Use, file_use};
    use std::os::fd::AsRawFd;
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-rw-src"), Home::new("mig-rw-dst"));
    let src = Daemon::start(&src_home);
    let (dst, addr) = pki.daemon(&dst_home);
    let uri = format!("tls://127.0.0.1:{}", addr.port());
    let shared = src_home.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let disk = shared.join("data.qcow2");
    let image = disk.to_str().unwrap();
    qemu::img_ok(&["create", "-q", "-f", "qcow2", image, "16M"]);
    qemu::img_ok(&["bitmap", "--add", image, "since-start"]);
    let file = src_home.path().join("mover.toml");
    std::fs::write(&file, format!("{SOAK}[[disk]]\npath = \"{image}\"\nformat = \"qcow2\"\n")).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    src.ferro_ok(&["start", "mover"]);
    let mut console = Console::on(src.console("mover"));
    let before = flushed_past(&mut console, 16);
    assert_eq!(file_use(&disk).unwrap(), Use::Write);
    let migrate = || {
        std::process::Command::new(ferro_bin())
            .args(["migrate", "mover", &uri, "--live", "--json", "--dest-ca", &pki.arg("ca.pem"), "--dest-token-file", &pki.arg("tokens")])
            .env("FERRO_HOME", src_home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // A lock on byte 201 ("does not share write"), as a reader that opened the image while
    // nobody wrote it would hold: the running source is not asked again, but every new writer
    // is refused.
    let reader = std::fs::File::open(&disk).unwrap();
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 201;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK reads the flock we own; the descriptor is `reader`'s.
    assert_eq!(unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_OFD_SETLK, &fl) }, 0, "{}", std::io::Error::last_os_error());
    let failing = migrate();
    // The source let go of the disk (nobody holds its write lock), the destination could not
    // take it and dropped the domain, and the source waits for the disk, its guest paused.
    wait_for("the source to hand the disk over", Duration::from_secs(30), || file_use(&disk).unwrap() == Use::Unused);
    wait_for("the destination to drop the domain", Duration::from_secs(30), || state_of(&dst, "mover").is_none() && incoming_vmms(&dst_home).is_empty());
    assert_eq!(file_use(&disk).unwrap(), Use::Unused, "the source waits for the disk");
    drop(reader);
    let err = stderr_line(&failing.wait_with_output().unwrap());
    assert!(err.contains("runs on here") && err.contains("opening the disks") && err.contains("write"), "{err}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));
    assert_eq!(file_use(&disk).unwrap(), Use::Write, "the source took its lock back");
    assert!(qemu_write_refused(&disk), "qemu-io may not write the disk the source runs on");
    let resumed = flushed_past(&mut console, before);
    let on_source = flushed_past(&mut console, resumed + 16);

    // The move.
    let out = migrate().wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numbers: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("migrated with a writable disk: {numbers}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("shutoff"));
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("running"));
    wait_for("the source's VMM to exit", Duration::from_secs(10), || vmms(&src_home).is_empty());
    drop(console);
    let mut console = Console::on(dst.console("mover"));
    let arrived = flushed_past(&mut console, on_source);
    let later = flushed_past(&mut console, arrived + 32);
    assert_eq!(file_use(&disk).unwrap(), Use::Write);
    assert!(qemu_write_refused(&disk), "qemu-io may not write the disk the destination runs on");
    let alive = vmms(&dst_home);
    let holders = lock_holders(&disk);
    assert!(!holders.is_empty() && holders.iter().all(|pid| *pid == -1 || alive.contains(pid)), "locks {holders:?}, VMMs {alive:?}");
    dst.ferro_ok(&["destroy", "mover"]);
    wait_for("the destination's VMM to exit", Duration::from_secs(10), || vmms(&dst_home).is_empty());
    assert_eq!(file_use(&disk).unwrap(), Use::Unused, "no lock outlives its VMM");
    assert!(lock_holders(&disk).is_empty(), "no lock outlives its VMM: {:?}", lock_holders(&disk));

    // Every record reads back whole, those written here and there, and the newest the guest
    // saw flushed on the destination is in; the image and its bitmap are sound.
    let last = soak_ring(&disk, &src_home.path().join("ring.raw"));
    assert!(last >= later, "record {later} was flushed on the destination, the image ends at {last}");
    qemu::img_ok(&["check", "-q", image]);
    let info: Value = serde_json::from_str(&qemu::img_ok(&["info", "--output=json", image])).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "since-start", "{info}");
    assert_eq!(bitmaps[0]["flags"], serde_json::json!(["auto"]), "stored consistent, not in use: {info}");
}

/// Shell for the Linux test guest's `ferro.cmd=`, written readably: its /init turns '+' into
/// spaces, so the script may hold neither '+' nor '"' (the kernel's parser eats the latter).
fn guest_cmd(script: &str) -> String {
    assert!(!script.contains('+') && !script.contains('"'), "not expressible in ferro.cmd=: {script}");
    script.split_whitespace().collect::<Vec<_>>().join("+")
}

/// The values after `key` on the console that look like `ok` (the FERRO-CMD line echoes the
/// script, where `key` is followed by a shell variable instead).
fn values_after<'a>(text: &'a str, key: &str, ok: impl Fn(&str) -> bool) -> Vec<&'a str> {
    text.match_indices(key)
        .filter_map(|(at, _)| {
            let rest = &text[at + key.len()..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            Some(&rest[..end]).filter(|v| ok(v))
        })
        .collect()
}

fn sha256_hex(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

fn ticks(text: &str) -> Vec<u64> {
    values_after(text, "TICK-", |v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).iter().map(|v| v.parse().unwrap()).collect()
}

/// Far above the 60-100 s the Linux test guest takes to boot on kvm-pvm (and the 3.5 min to its
/// second count on a loaded host), so only a hang reaches it.
const LINUX_LIMIT: Duration = Duration::from_secs(600);

/// The Linux test guest (busybox, guests/linux) on an ext4 qcow2 disk in a directory both ferrods
/// see. It writes 2 MiB from /dev/urandom to a file and prints its sha256, then a background loop
/// appends a counter to another file, syncs and prints it about every 2 s while the domain moves
/// live to the other ferrod. There the guest answers a line typed on its console, checksums the
/// file again, stops the loop, writes a new file and unmounts. Once it powered off, the image is
/// sound (`qemu-img check`, `e2fsck`), and as the host reads it the file has the checksum the
/// guest printed, the counter file holds 1..N with none missing (N at least every count printed
/// on the destination), and the new file is there. The source keeps no VMM.
#[test]
fn a_linux_guest_with_a_disk_moves_keeping_its_file_and_its_console() {
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-lx-src"), Home::new("mig-lx-dst"));
    let src = Daemon::start(&src_home);
    let (dst, addr) = pki.daemon(&dst_home);
    let uri = format!("tls://127.0.0.1:{}", addr.port());
    let shared = src_home.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let raw = src_home.path().join("fs.raw");
    std::fs::File::create(&raw).and_then(|f| f.set_len(32 << 20)).unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", raw.to_str().unwrap()]);
    let disk = shared.join("linux.qcow2");
    let image = disk.to_str().unwrap();
    qemu::img_ok(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), image]);
    std::fs::remove_file(&raw).unwrap();

    // Every fork+exec costs the guest about a second on kvm-pvm: the loop sticks to builtins
    // but for its sync and sleep.
    let script = "mount -t ext4 /dev/vda /mnt && dd if=/dev/urandom of=/mnt/data bs=64k count=32 2>/dev/null &&
        sha256sum /mnt/data > /tmp/h && read -r h _ < /tmp/h && echo BEFORE-$h ; sync ;
        ( i=0 ; while [ ! -e /tmp/stop ] ; do i=$((i - -1)) ; echo $i >> /mnt/ticks ; sync ; echo TICK-$i ; sleep 1 ; done ) &
        read x ; echo GOT-$x ; sha256sum /mnt/data > /tmp/h ; read -r h _ < /tmp/h ; echo AFTER-$h ;
        touch /tmp/stop ; wait ; echo new-$x > /mnt/new ; umount /mnt && echo UNMOUNTED-$x";
    let dir = linux_dir();
    let definition = format!(
        "name = \"penguin\"\nmemory = \"128M\"\n[boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{} ferro.cmd={}\"\n\
         [[disk]]\npath = \"{image}\"\nformat = \"qcow2\"\n",
        dir.join("vmlinux").display(),
        dir.join("initramfs.cpio").display(),
        linux_cmdline(),
        guest_cmd(script),
    );
    let file = src_home.path().join("penguin.toml");
    std::fs::write(&file, definition).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    src.ferro_ok(&["start", "penguin"]);
    let mut console = src.console("penguin");
    let booted = std::time::Instant::now();
    let on_source = read_console(&mut console, "TICK-2\r", LINUX_LIMIT);
    eprintln!("--- on the source ({:?} to the second count):\n{on_source}", booted.elapsed());
    let before = values_after(&on_source, "BEFORE-", sha256_hex);
    assert_eq!(before.len(), 1, "the guest printed its file's checksum once");
    let before = before[0].to_owned();

    // The move, while the loop writes and syncs.
    let asked = std::time::Instant::now();
    let out = src.ferro(&[
        "migrate", "penguin", &uri, "--live", "--json", "--dest-ca", &pki.arg("ca.pem"), "--dest-token-file", &pki.arg("tokens"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numbers: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state_of(&src, "penguin").as_deref(), Some("shutoff"));
    assert_eq!(state_of(&dst, "penguin").as_deref(), Some("running"));
    wait_for("the source's VMM to exit", Duration::from_secs(10), || vmms(&src_home).is_empty());
    drop(console);

    // The guest answers on the destination's console.
    let mut console = dst.console("penguin");
    console.write_all(b"moved\n").unwrap();
    let answer = read_console(&mut console, "GOT-moved\r", Duration::from_secs(60));
    eprintln!("migrated a Linux guest: {numbers}, request to the guest's answer {:?}", asked.elapsed());
    let rest = read_console(&mut console, "FERRO-POWEROFF", Duration::from_secs(120));
    let on_destination = format!("{answer}{rest}");
    eprintln!("--- on the destination:\n{on_destination}");
    assert_eq!(values_after(&on_destination, "AFTER-", sha256_hex), [before.as_str()], "the file's checksum changed with the move");
    assert!(on_destination.contains("UNMOUNTED-moved\r"), "the guest could not unmount its disk");
    assert!(on_destination.contains("FERRO-CMD-RC 0"), "the guest's command failed");
    wait_for("the destination's guest to power off", Duration::from_secs(30), || state_of(&dst, "penguin").as_deref() == Some("shutoff"));
    wait_for("the destination's VMM to exit", Duration::from_secs(10), || vmms(&dst_home).is_empty());

    // The image as the host reads it.
    qemu::img_ok(&["check", "-q", image]);
    let raw = src_home.path().join("after.raw");
    qemu::img_ok(&["convert", "-f", "qcow2", "-O", "raw", image, raw.to_str().unwrap()]);
    run_ok("e2fsck", &["-fn", raw.to_str().unwrap()]);
    let data = src_home.path().join("data");
    run_ok("debugfs", &["-R", &format!("dump /data {}", data.display()), raw.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 2 << 20);
    let sum = run_ok("sha256sum", &[data.to_str().unwrap()]);
    assert_eq!(sum.split_whitespace().next(), Some(before.as_str()), "the file on the image is not what the guest wrote");
    let new = run_ok("debugfs", &["-R", "cat /new", raw.to_str().unwrap()]);
    assert_eq!(new.trim(), "new-moved", "the file written on the destination");
    let written: Vec<u64> = run_ok("debugfs", &["-R", "cat /ticks", raw.to_str().unwrap()]).lines().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("/ticks holds {l:?}"))).collect();
    let last = *written.last().expect("the loop wrote counts");
    assert_eq!(written, (1..=last).collect::<Vec<_>>(), "the counts on the image");
    let seen = ticks(&on_source).into_iter().chain(ticks(&on_destination)).max().unwrap();
    assert!(last >= seen, "count {seen} was printed after its sync, the image ends at {last}");
    eprintln!("counts: {last} on the image, {:?} printed on the destination", ticks(&on_destination));
}

/// `--copy-storage-all`: a running domain whose writable qcow2 volume is in a pool of each
/// ferrod (same pool name, different directories: nothing shared) moves with its disk copied
/// along while the guest writes and flushes records. Without the flag the move is refused before
/// anything moves (the destination lacks the disk). With it, the guest writes on at the
/// destination into the copy: every record reads back whole there, the newest flushed one
/// included, a pattern written before the start (which the guest never touches) is in the copy,
/// and copy and source volume both pass `qemu-img check`, the source's records ending where the
/// copy's went on. Then the guest, paused, moves back: the old volume still there is refused
/// (never overwritten), and once it is gone the copy made back reads the same as the one it came
/// from (`qemu-img compare`), and the guest stays paused.
#[test]
fn a_guest_writing_its_disk_moves_with_the_disk_copied_along() {
    let pki = Pki::new();
    let (src_home, dst_home) = (Home::new("mig-copy-src"), Home::new("mig-copy-dst"));
    let (src, src_addr) = pki.daemon(&src_home);
    let (dst, dst_addr) = pki.daemon(&dst_home);
    let (src_uri, dst_uri) = (format!("tls://127.0.0.1:{}", src_addr.port()), format!("tls://127.0.0.1:{}", dst_addr.port()));
    let (src_pool, dst_pool) = (src_home.path().join("pool"), dst_home.path().join("pool"));
    pool(&src, &src_pool);
    pool(&dst, &dst_pool);
    let (volume, copy) = (src_pool.join("data.qcow2"), dst_pool.join("data.qcow2"));
    qemu::img_ok(&["create", "-q", "-f", "qcow2", volume.to_str().unwrap(), "16M"]);
    qemu::io(&volume, "write -P 0x5a 8M 3M");
    let file = src_home.path().join("mover.toml");
    std::fs::write(&file, format!("{SOAK}[[disk]]\npool = \"p\"\nvolume = \"data.qcow2\"\nformat = \"qcow2\"\n")).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    src.ferro_ok(&["start", "mover"]);
    let mut console = Console::on(src.console("mover"));
    let before = flushed_past(&mut console, 16);
    let migrate = |from: &Daemon, to: &str, extra: &[&str]| -> Output {
        let base = ["migrate", "mover", to, "--live", "--json", "--dest-ca", &pki.arg("ca.pem"), "--dest-token-file", &pki.arg("tokens")];
        from.ferro(&[&base[..], extra].concat())
    };

    let err = stderr_line(&migrate(&src, &dst_uri, &[]));
    assert!(err.contains("disk[0]") && err.contains("no such file here") && err.contains("share"), "{err}");
    assert!(!copy.exists(), "nothing made on the destination");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("running"));
    assert!(state_of(&dst, "mover").is_none());

    let out = migrate(&src, &dst_uri, &["--copy-storage-all"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numbers: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("migrated with the disk copied along: {numbers}");
    assert!(numbers["transferred_bytes"].as_u64().unwrap() > 3 << 20, "the pattern went over: {numbers}");
    assert_eq!(state_of(&src, "mover").as_deref(), Some("shutoff"));
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("running"));
    wait_for("the source's VMM to exit", Duration::from_secs(10), || vmms(&src_home).is_empty());
    drop(console);
    let mut console = Console::on(dst.console("mover"));
    let arrived = flushed_past(&mut console, before);
    let later = flushed_past(&mut console, arrived + 32);
    dst.ferro_ok(&["suspend", "mover"]);
    // The source's volume, closed by its VMM: sound, its records ending where the copy's go on.
    let source_last = soak_ring(&volume, &src_home.path().join("ring.raw"));
    assert!(source_last >= before, "the source's volume ends at record {source_last}, before {before}");
    qemu::img_ok(&["check", "-q", volume.to_str().unwrap()]);

    // Back, paused: the old volume is never overwritten; without it, the copy is exact.
    src.ferro_ok(&["undefine", "mover"]);
    let err = stderr_line(&migrate(&dst, &src_uri, &["--copy-storage-all"]));
    assert!(err.contains("disk[0]") && err.contains("not the source's"), "{err}");
    assert_eq!(state_of(&dst, "mover").as_deref(), Some("paused"));
    assert_eq!(soak_ring(&volume, &src_home.path().join("ring.raw")), source_last, "the old volume was left alone");
    std::fs::remove_file(&volume).unwrap();
    let out = migrate(&dst, &src_uri, &["--copy-storage-all"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state_of(&src, "mover").as_deref(), Some("paused"));
    wait_for("the destination's VMM to exit", Duration::from_secs(10), || vmms(&dst_home).is_empty());
    src.ferro_ok(&["destroy", "mover"]);
    wait_for("the source's VMM to exit", Duration::from_secs(10), || vmms(&src_home).is_empty());

    // Both images closed, as QEMU reads them.
    let scratch = dst_home.path().join("ring.raw");
    let last = soak_ring(&copy, &scratch);
    assert!(last >= later, "record {later} was flushed on the destination, the copy ends at {last}");
    assert!(source_last < last, "the guest wrote on at the destination: the source's volume ends at {source_last}, the copy at {last}");
    let raw = std::fs::read(&scratch).unwrap();
    assert!(raw[8 << 20..11 << 20].iter().all(|b| *b == 0x5a), "the data written before the start is not in the copy");
    assert!(raw[11 << 20..].iter().all(|b| *b == 0), "the copy holds data past what was written");
    qemu::img_ok(&["check", "-q", copy.to_str().unwrap()]);
    assert!(qemu::identical(&copy, &volume), "qemu-img compare: the copy made back differs");
    qemu::img_ok(&["check", "-q", volume.to_str().unwrap()]);
}
