//! The web UI against a real ferrod with real VMMs: what the listener serves without signing in
//! (the page and its files, nothing else), and `ui/tests/browser.mjs` driving Debian's Chromium
//! headless through Playwright (sign-in, the list, Force off and Start seen by `ferro domstate`,
//! the console both ways, a pause made with the CLI showing by itself, volumes made, uploaded
//! (bytes compared) and deleted, a finished copy job at 100 %, the create form seen by `ferro list`, graphs with data points, a
//! readonly session that can press nothing, a phone-sized viewport, no browser console errors).
//! Screenshots land in `target/tmp/ui-screenshots/`.

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::{TempDir, ferro_bin};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const ADMIN: &str = "ui-admin-0c9e7a5b3d1f2e4a6c8b";
const READER: &str = "ui-readonly-5e3c1a9f7d2b4e6c";
const CHROMIUM: &str = "/usr/bin/chromium";

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui")
}

/// ferrod on a loopback `--insecure` listener with an admin and a readonly token.
fn daemon(home: &Home, tokens: &TempDir) -> (Daemon, SocketAddr) {
    let file = tokens.join("tokens");
    std::fs::write(&file, format!("{ADMIN} admin\n{READER} readonly\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = ["--listen", "127.0.0.1:0", "--insecure", "--token-file", file.to_str().unwrap()];
    let d = Daemon::start_args(home, &args, &[("RUST_LOG", "info")]);
    let addr = d.listening()[0];
    (d, addr)
}

/// One HTTP/1.1 GET on the listener: the status line and headers, and the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    (String::from_utf8_lossy(&answer[..split]).to_lowercase(), answer[split + 4..].to_vec())
}

#[test]
fn the_page_is_public_and_nothing_else_is() {
    let home = Home::new("ui-public");
    let tokens = TempDir::new("ui-public-tokens");
    let (_d, addr) = daemon(&home, &tokens);
    let (head, body) = get(addr, "/", None);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'self'"), "{head}");
    let page = String::from_utf8(body).unwrap();
    let script = page.split("src=\"").nth(1).and_then(|s| s.split('"').next()).expect("the page names its script");
    assert!(script.starts_with("/assets/") && script.ends_with(".js"), "{script}");
    let (head, body) = get(addr, script, None);
    assert!(head.starts_with("http/1.1 200") && head.contains("content-type: text/javascript"), "{head}");
    assert!(body.len() > 10_000, "the script is the built bundle ({} bytes)", body.len());
    assert!(get(addr, "/assets/no-such-file.js", None).0.starts_with("http/1.1 404"));
    for path in ["/v1/host", "/v1/domains", "/index.html", "/metrics"] {
        let (head, _) = get(addr, path, None);
        assert!(head.starts_with("http/1.1 401"), "{path} without a token: {head}");
    }
    let (head, body) = get(addr, "/v1/host", Some(READER));
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let host: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(host["version"], env!("CARGO_PKG_VERSION"));
    assert!(host["cpus"].as_u64().unwrap() >= 1 && host["memory_total_bytes"].as_u64().unwrap() > 0, "{host}");
    assert_eq!(host["domains"]["total"], 0, "{host}");
}

#[test]
fn the_ui_in_chromium() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing: the browser test runs ui/tests/browser.mjs with Node.js (scripts/setup.sh installs it)"
    );
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium for the browser tests");
    assert!(
        ui_dir().join("node_modules/playwright-core").exists(),
        "ui/node_modules/playwright-core is missing: building ferro-manager runs npm ci in ui/"
    );
    let home = Home::new("ui-browser");
    let tokens = TempDir::new("ui-browser-tokens");
    let (d, addr) = daemon(&home, &tokens);
    let api = d.api();
    api.expect("POST", "/v1/domains", Some(&guest_toml("web1", "idle")), 201);
    api.expect("POST", "/v1/domains/web1/start", None, 200);
    let pool_dir = tokens.join("pool");
    let pool = format!(r#"{{"name":"p1","type":"dir","target":"{}"}}"#, pool_dir.display());
    api.expect("POST", "/v1/pools", Some(&pool), 201);
    api.expect("POST", "/v1/pools/p1/build", None, 200);
    api.expect("POST", "/v1/pools/p1/start", None, 200);
    api.expect("POST", "/v1/pools/p1/volumes", Some(r#"{"name": "base.raw", "capacity": "8M"}"#), 201);
    let job = api.expect("POST", "/v1/pools/p1/volumes/base.raw/clone", Some(r#"{"name": "copy.raw"}"#), 202);
    let job = api.wait_job(job["id"].as_u64().expect("a job id"));
    assert_eq!(job["state"], "completed", "{job}");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let out = Command::new("node")
        .arg(ui_dir().join("tests/browser.mjs"))
        .current_dir(ui_dir())
        .env("FERRO_UI_URL", format!("http://{addr}/"))
        .env("FERRO_ADMIN_TOKEN", ADMIN)
        .env("FERRO_READONLY_TOKEN", READER)
        .env("FERRO_CLI", ferro_bin())
        .env("FERRO_HOME", home.path())
        .env("FERRO_DOMAIN", "web1")
        .env("FERRO_POOL", "p1")
        .env("FERRO_JOB", job["id"].to_string())
        .env("FERRO_POOL_DIR", &pool_dir)
        .env("FERRO_SHOTS", &shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "the browser test failed:\n{stdout}\n{stderr}\nferrod's log:\n{}", d.stderr());
    assert!(stdout.contains("all browser checks passed"), "{stdout}");
    for shot in ["overview.png", "domain.png", "snapshots.png", "domain-phone-readonly.png"] {
        assert!(shots.join(shot).metadata().is_ok_and(|m| m.len() > 1000), "screenshot {shot} missing");
    }
}
