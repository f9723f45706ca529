//! ferrod as a service: its configuration file (flags win over it, unknown keys refused,
//! `--check-config`), the systemd notifications (`READY=1` once it serves, `STOPPING=1` when it
//! stops), the git revision in `--version` of both binaries, the unit's settings as docs/service.md
//! explains them, and VMs outliving ferrod in the cgroup layout the unit gives it.

use ferro_test_support::daemon::{Api, Daemon, Home, guest_toml};
use ferro_test_support::{TempDir, alive, cgroup_of, ferro_bin, ferrod_bin, start_time, wait_exit, wait_for};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
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

/// A stand-in for the cgroup systemd gives the unit (`Delegate=yes`, `DelegateSubgroup=ferrod`):
/// `<this test's cgroup>/<name>` with the leaf `ferrod` in it, in the unified hierarchy and in each
/// v1 hierarchy ferrod uses. Removed on drop (the VM cgroups are ferrod's to remove).
struct UnitCgroup {
    /// (controller as /proc/PID/cgroup names it, "" for unified; the unit's directory)
    dirs: Vec<(&'static str, PathBuf)>,
}

const HIERARCHIES: [(&str, &str); 5] = [("", "unified"), ("cpu", "cpu"), ("memory", "memory"), ("blkio", "blkio"), ("pids", "pids")];

impl UnitCgroup {
    fn new(name: &str) -> UnitCgroup {
        assert!(
            !Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
            "this test makes the unit's cgroup in the v1 hierarchies of a hybrid host; this host is unified"
        );
        let me = std::process::id();
        let dirs = HIERARCHIES
            .iter()
            .map(|(controller, mount)| {
                let own = cgroup_of(me, controller);
                let dir = PathBuf::from(format!("/sys/fs/cgroup/{mount}{}/{name}", own.trim_end_matches('/')));
                std::fs::create_dir_all(dir.join("ferrod")).unwrap_or_else(|e| panic!("cannot make {}/ferrod: {e}", dir.display()));
                (*controller, dir)
            })
            .collect();
        UnitCgroup { dirs }
    }

    /// ferrod, joining the leaf between fork and exec as systemd's child does.
    fn ferrod(&self) -> Command {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let procs: Vec<OwnedFd> = self
            .dirs
            .iter()
            .map(|(_, dir)| std::fs::OpenOptions::new().write(true).open(dir.join("ferrod/cgroup.procs")).unwrap().into())
            .collect();
        let mut cmd = Command::new(ferrod_bin());
        cmd.arg("--no-default-network");
        // SAFETY: the closure runs between fork and exec and only calls write(2) on descriptors
        // opened before the fork, which is async-signal-safe; `procs` lives in the closure.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &procs {
                    if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// The unit's cgroup path as /proc/PID/cgroup shows it in the hierarchy of `controller`.
    fn path(&self, controller: &str) -> String {
        let me = std::process::id();
        let name = self.dirs[0].1.file_name().unwrap().to_str().unwrap().to_string();
        format!("{}/{name}", cgroup_of(me, controller).trim_end_matches('/'))
    }
}

impl Drop for UnitCgroup {
    fn drop(&mut self) {
        for (_, dir) in &self.dirs {
            let _ = std::fs::remove_dir(dir.join("ferrod"));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_vm_outlives_ferrod_stopped_by_sigterm_and_by_sigkill_and_the_next_ferrod_adopts_it() {
    let home = Home::new("unit");
    let unit = UnitCgroup::new(&format!("ferrod-test-{}.service", std::process::id()));
    let notify_path = home.path().join("notify");
    let _notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut d = Daemon::spawn(&home, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())], unit.ferrod());
    d.api().expect("POST", "/v1/domains", Some(&guest_toml("keep", "idle")), 201);
    d.api().expect("POST", "/v1/domains/keep/start", None, 200);
    let info = d.api().expect("GET", "/v1/domains/keep", None, 200);
    let (vmm, uuid) = (info["pid"].as_u64().unwrap() as u32, info["uuid"].as_str().unwrap().to_string());
    let born = start_time(vmm);

    // ferrod is in the unit's leaf and alone there; the VMM is beside it, in its run's cgroup.
    for (controller, dir) in &unit.dirs {
        let path = unit.path(controller);
        assert_eq!(cgroup_of(d.child.id(), controller), format!("{path}/ferrod"), "{controller:?} cgroup of ferrod");
        assert_eq!(cgroup_of(vmm, controller), format!("{path}/vm-keep-{uuid}"), "{controller:?} cgroup of the VMM");
        let leaf = std::fs::read_to_string(dir.join("ferrod/cgroup.procs")).unwrap();
        assert_eq!(leaf.split_whitespace().collect::<Vec<_>>(), [d.child.id().to_string()], "{controller:?} leaf holds only ferrod");
    }
    let environ = std::fs::read(format!("/proc/{vmm}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET="), "the VMM inherited ferrod's NOTIFY_SOCKET");

    // What `systemctl stop` does with KillMode=process, then what its timeout does: each time
    // the VMM runs on, and a ferrod started in the leaf again takes it over.
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        // SAFETY: kill(2) on the ferrod this test started; no memory is involved.
        unsafe { libc::kill(d.child.id() as i32, signal) };
        let status = wait_exit(&mut d.child, Duration::from_secs(30)).expect("ferrod did not stop");
        assert!(alive(i64::from(vmm)) && start_time(vmm) == born, "signal {signal} to ferrod ({status}) ended the VMM");
        d = Daemon::spawn(&home, &[], unit.ferrod());
        let info = d.api().expect("GET", "/v1/domains/keep", None, 200);
        assert_eq!((info["state"].as_str(), info["pid"].as_u64()), (Some("running"), Some(u64::from(vmm))), "after signal {signal}: {info}");
        let stats = d.api().expect("GET", "/v1/domains/keep/stats", None, 200);
        let paths = stats["cgroup"]["paths"].as_array().unwrap();
        assert!(paths.iter().all(|p| p.as_str().unwrap().ends_with(&format!("/vm-keep-{uuid}"))), "{stats}");
        assert_eq!(cgroup_of(d.child.id(), ""), format!("{}/ferrod", unit.path("")));
    }
    // The adopted VM is still controlled: destroy ends it and removes its cgroups.
    d.ferro_ok(&["destroy", "keep"]);
    wait_for("the VMM to end", Duration::from_secs(10), || !alive(i64::from(vmm)));
    for (controller, dir) in &unit.dirs {
        assert!(!dir.join(format!("vm-keep-{uuid}")).exists(), "{controller:?} cgroup of the run outlived it");
    }
    drop(d);
}

/// `Key=Value` lines of the `[Service]` section of the unit.
fn unit_service_settings(unit: &str) -> Vec<String> {
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service {
            settings.push(line.to_string());
        }
    }
    settings.sort();
    settings
}

/// The first column of the settings table under "## The systemd unit" in docs/service.md.
fn documented_settings(docs: &str) -> Vec<String> {
    let section = docs.split("\n## The systemd unit\n").nth(1).expect("docs/service.md has a section \"The systemd unit\"");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut settings: Vec<String> =
        section.lines().filter_map(|l| l.strip_prefix("| `")?.split_once("` |").map(|(setting, _)| setting.to_string())).collect();
    settings.sort();
    settings
}

#[test]
fn the_units_settings_are_the_ones_docs_service_md_explains() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("packaging/ferrod.service")).unwrap();
    let docs = std::fs::read_to_string(root.join("docs/service.md")).unwrap();
    let settings = unit_service_settings(&unit);
    assert_eq!(settings, documented_settings(&docs), "packaging/ferrod.service and the table in docs/service.md differ");
    for needed in ["Type=notify", "Delegate=yes", "DelegateSubgroup=ferrod", "KillMode=process", "ExecStart=/usr/bin/ferrod"] {
        assert!(settings.iter().any(|s| s == needed), "the unit lacks {needed}");
    }
    // The leaf systemd starts ferrod in is the one ferrod's cgroup code treats as its own.
    assert_eq!(format!("DelegateSubgroup={}", ferro_jail::cgroup::DAEMON_LEAF), "DelegateSubgroup=ferrod");
}

#[test]
fn the_example_domain_is_a_valid_definition() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("examples/domain.toml")).unwrap();
    let config = ferro_manager::domain::DomainConfig::parse(&text).unwrap_or_else(|e| panic!("examples/domain.toml: {e}"));
    assert_eq!((config.name.as_str(), config.vcpus, config.disks.len(), config.nics.len()), ("web1", 2, 1, 1));
    assert!(config.cloud_init.is_some_and(|c| c.user_data.starts_with("#cloud-config\n")));
}
