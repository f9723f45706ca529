//! ferrod as a service: its configuration file (flags win over it, unknown keys refused,
//! `--check-config`), the systemd notifications (`READY=1` once it serves, `STOPPING=1` when it
//! stops) and the git revision in `--version` of both binaries.

use ferro_test_support::daemon::Api;
use ferro_test_support::{TempDir, ferro_bin, ferrod_bin, wait_exit};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// ferrod with only a configuration file: no FERRO_HOME, no RUST_LOG from the test's environment.
fn ferrod(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(ferrod_bin());
    cmd.arg("--config").arg(config).args(args).env_remove("FERRO_HOME").env_remove("RUST_LOG").env("FERRO_BIN", ferro_bin());
    cmd
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong_in_a_bad_one() {
    let dir = TempDir::new("check-config");
    let config = dir.join("ferrod.toml");
    let check = |body: &str, args: &[&str]| {
        std::fs::write(&config, body).unwrap();
        ferrod(&config, &["--check-config"]).args(args).output().unwrap()
    };
    let home = format!("home = \"{}\"\n", dir.join("home").display());
    let good = format!("{home}default_network = false\nlog_level = \"warn,ferro_manager=debug\"\n[listen]\naddresses = [\"127.0.0.1:0\"]\ninsecure = true\nno_auth = true\n");
    let out = check(&good, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("the configuration is valid (file {} and flags)", config.display())), "{}", text(&out));
    assert!(!dir.join("home").exists(), "--check-config created the state directory");

    let bad = [
        (format!("{home}listen_on = [\"x\"]\n"), &[][..], "listen_on: unknown field `listen_on`, expected one of `home`"),
        ("[listen]\ntls_crt = \"/c.pem\"\n".to_string(), &[], "listen.tls_crt: unknown field `tls_crt`"),
        ("home = \"var/lib\"\n".to_string(), &[], "home: var/lib is a relative path"),
        ("log_level = \"info,ferro=loud\"\n".to_string(), &[], "log_level: \"info,ferro=loud\" is not a log filter"),
        // Checked beyond syntax: the listeners as a whole, the socket's group, flags over the file.
        ("[listen]\naddresses = [\"0.0.0.0:8443\"]\n".to_string(), &[], "serves TLS: give --tls-cert and --tls-key"),
        ("socket_group = \"no-such-group-here\"\n".to_string(), &[], "--socket-group no-such-group-here: no such group"),
        (good.clone(), &["--log-level", "info,=x"], "is not a log filter"),
    ];
    for (body, args, expected) in bad {
        let out = check(&body, args);
        assert!(!out.status.success(), "{body:?} {args:?} was accepted");
        let said = text(&out);
        assert!(said.starts_with("ferrod: ") && said.contains(expected) && said.lines().count() == 1, "{body:?}: {said}");
    }
    let out = ferrod(&dir.join("missing.toml"), &["--check-config"]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("cannot read the configuration"), "{}", text(&out));
}

#[test]
fn the_file_configures_ferrod_flags_win_and_systemd_hears_ready_and_stopping() {
    let dir = TempDir::new("service");
    let home = dir.join("home");
    let config = dir.join("ferrod.toml");
    std::fs::write(
        &config,
        format!(
            "# as the package's file: comments are fine\nhome = \"{}\"\nsocket = \"{}\"\ndefault_network = false\nlog_level = \"info\"\n",
            home.display(),
            dir.join("from-file.sock").display()
        ),
    )
    .unwrap();
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let flag_socket = dir.join("from-flag.sock");
    let mut child = ferrod(&config, &["--socket", flag_socket.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no notification from ferrod ({e}): {}", stderr()));
    assert_eq!(&buf[..n], b"READY=1", "{}", stderr());
    // Ready means serving: the socket answers at once, at the flag's path, not the file's.
    UnixStream::connect(&flag_socket).unwrap_or_else(|e| panic!("READY=1 before {} accepts: {e}", flag_socket.display()));
    assert!(!dir.join("from-file.sock").exists());
    let (status, _) = Api::unix(&flag_socket).call("GET", "/v1/networks", None);
    assert_eq!(status, 200);
    assert!(home.join("ferrod.db").exists(), "the file's home is not used: {}", stderr());
    assert!(stderr().contains("ferrod ready"), "the file's log level (info) is not used: {}", stderr());
    let (_, networks) = Api::unix(&flag_socket).call("GET", "/v1/networks", None);
    assert_eq!(networks, serde_json::json!([]), "default_network = false still defined one");

    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no STOPPING=1 from ferrod ({e}): {}", stderr()));
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = wait_exit(&mut child, Duration::from_secs(30)).expect("ferrod did not stop on SIGTERM");
    assert!(status.success(), "{status}: {}", stderr());
}

#[test]
fn both_binaries_print_the_git_revision_they_were_built_from() {
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    let expected = match head {
        Ok(out) if out.status.success() => format!("{} (git {})", env!("CARGO_PKG_VERSION"), String::from_utf8_lossy(&out.stdout).trim()),
        _ => format!("{} (not built from a git checkout)", env!("CARGO_PKG_VERSION")),
    };
    for (bin, name) in [(ferro_bin(), "ferro"), (ferrod_bin(), "ferrod")] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{name} {expected}"));
    }
}
