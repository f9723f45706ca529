//! Live migration between two ferrods (docs/migration.md): each with its own FERRO_HOME, the
//! destination serving TLS on 127.0.0.1 with certificates and tokens made by openssl. The counter
//! guest churns its 16 MiB pattern the whole time (every pass checks each word against the
//! generation last written), so a page lost or left stale by a move shows as errors, and its
//! count shows it was never rebooted. Refused credentials and a destination VMM killed mid-way
//! leave the guest running on the source and nothing on the destination.

use ferro_test_support::daemon::pki::Pki;
use ferro_test_support::daemon::{Daemon, Home, openapi};
use ferro_test_support::vm::{Console, field};
use ferro_test_support::{ferro_bin, wait_for};
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

    let file = src_home.path().join("mover.toml");
    std::fs::write(&file, GUEST).unwrap();
    src.ferro_ok(&["define", file.to_str().unwrap()]);
    src.ferro_ok(&["start", "mover"]);
    let mut console = Console::on(src.console("mover"));
    console.type_keys("c");
    let first = console.line("counter: 1 ");
    let seed = field(&first, "seed").to_owned();
    assert_eq!(first, format!("counter: 1 seed={seed} errors=0"));
    console.type_keys("d");
    console.line("counter: churning");

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
    let slow = std::process::Command::new(ferro_bin())
        .args(["migrate", "mover", &uri, "--live", "--bandwidth", "8", "--dest-ca", &ca, "--dest-token-file", &tokens])
        .env("FERRO_HOME", src_home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the migration to be under way", Duration::from_secs(30), || {
        let (status, m) = src.api().call("GET", "/v1/domains/mover/migration", None);
        status == 200 && m["progress"]["state"] == "active" && m["progress"]["transferred_bytes"].as_u64().unwrap_or(0) > 0
    });
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
