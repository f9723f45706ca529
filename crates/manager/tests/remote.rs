//! ferrod over the network (docs/remote.md) against a real daemon: TLS listeners with certificates
//! made by openssl as the docs say, tokens and roles on every route of openapi.json, the CLI and
//! its console over TLS, browser sessions and their CSRF rules, refusals at startup, and the unix
//! socket's mode, group and peer credentials.

use ferro_test_support::daemon::pki::{ADMIN, Pki, READER, write_private};
use ferro_test_support::daemon::{Api, Daemon, Home, RawResponse, guest_toml, openapi};
use ferro_test_support::{ferro_bin, ferrod_bin, wait_for};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// `ferro ARGS` with no FERRO_HOME, so nothing reaches the unix socket by default.
fn ferro(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(ferro_bin()).args(args).envs(env.iter().copied()).env_remove("FERRO_HOME").stdin(Stdio::null()).output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ferro failed: {stderr}");
    stdout
}

fn failed(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "ferro should have failed: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

/// Everything a change through the API would show: definitions, volumes, jobs and the event log
/// (not the pools' free space, which the rest of the host changes).
fn snapshot(api: &Api) -> Value {
    let mut all = serde_json::Map::new();
    for path in ["/v1/domains", "/v1/pools", "/v1/pools/p1/volumes", "/v1/jobs", "/v1/events"] {
        let mut value = api.expect("GET", path, None, 200);
        if path == "/v1/pools" {
            for pool in value.as_array_mut().unwrap() {
                let pool = pool.as_object_mut().unwrap();
                pool.remove("allocation");
                pool.remove("available");
            }
        }
        all.insert(path.to_string(), value);
    }
    Value::Object(all)
}

/// Every operation of openapi.json with its path filled in with objects that exist, and a body
/// that the operation would accept if the caller were allowed.
fn operations(domain: &str, pool_dir: &Path) -> Vec<(String, String, Option<String>)> {
    let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let path = template.replace("{name}", domain).replace("{pool}", "p1").replace("{vol}", "v1").replace("{id}", "1");
        for method in item.as_object().unwrap().keys().filter(|m| *m != "parameters") {
            let body = match (method.as_str(), template.as_str()) {
                ("post", "/v1/domains") => Some(guest_toml("intruder", "idle")),
                ("post", "/v1/pools") => Some(format!(r#"{{"name":"p2","type":"dir","target":"{}/p2"}}"#, pool_dir.display())),
                ("post", "/v1/pools/{pool}/volumes") => Some(r#"{"name":"v2","capacity":"1M","format":"raw"}"#.to_string()),
                ("post", t) if t.ends_with("/clone") => Some(r#"{"name":"v3"}"#.to_string()),
                ("post", t) if t.ends_with("/convert") => Some(r#"{"name":"v3","format":"qcow2"}"#.to_string()),
                ("post", t) if t.ends_with("/setmem") => Some(r#"{"memory":"32M"}"#.to_string()),
                ("post", "/v1/session") => Some(format!(r#"{{"token":"{READER}"}}"#)),
                ("put", _) => Some("new contents".to_string()),
                _ => None,
            };
            ops.push((method.to_ascii_uppercase(), path.clone(), body));
        }
    }
    ops
}

/// A domain, a pool with a volume, and a finished job, defined through the unix socket.
fn populate(d: &Daemon, pool_dir: &Path) {
    let local = d.api();
    local.expect("POST", "/v1/domains", Some(&guest_toml("d1", "idle")), 201);
    let pool = format!(r#"{{"name":"p1","type":"dir","target":"{}"}}"#, pool_dir.display());
    local.expect("POST", "/v1/pools", Some(&pool), 201);
    local.expect("POST", "/v1/pools/p1/build", None, 200);
    local.expect("POST", "/v1/pools/p1/start", None, 200);
    local.expect("POST", "/v1/pools/p1/volumes", Some(r#"{"name":"v1","capacity":"1M","format":"raw"}"#), 201);
    local.expect("POST", "/v1/pools/p1/volumes/v1/clone?wait=true", Some(r#"{"name":"v0"}"#), 200);
}

fn dir_listing(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn no_token_a_wrong_token_and_a_readonly_token_change_nothing_on_any_route() {
    let pki = Pki::new();
    let home = Home::new("roles");
    let (d, addr) = pki.daemon(&home);
    let pool_dir = home.path().join("pool");
    populate(&d, &pool_dir);
    let local = d.api();
    let before = snapshot(&local);
    let files = dir_listing(&pool_dir);
    let anonymous = pki.api(addr);
    let wrong = anonymous.with_header("Authorization", "Bearer not-a-token-of-this-daemon");
    let basic = anonymous.with_header("Authorization", &format!("Basic {ADMIN}"));
    let reader = anonymous.with_header("Authorization", &format!("Bearer {READER}"));
    let ops = operations("d1", home.path());
    assert!(ops.len() > 30, "openapi.json lists every operation: {}", ops.len());

    for (method, path, body) in &ops {
        let is_session_change = path == "/v1/session" && method != "GET";
        for (who, api) in [("no token", &anonymous), ("a wrong token", &wrong), ("a Basic header", &basic)] {
            let (status, v) = api.call(method, path, body.as_deref());
            if is_session_change {
                // Signing in and out authenticate themselves: the body's token, the cookie.
                assert!(matches!(status, 200 | 204), "{method} {path} with {who}: {status} {v}");
                continue;
            }
            assert_eq!(status, 401, "{method} {path} with {who}: {v}");
            assert_eq!(v["code"], "unauthorized");
        }
        let (status, v) = reader.call(method, path, body.as_deref());
        match method.as_str() {
            "GET" if path.ends_with("/console") => {
                // A console attach is a change even on GET.
                let upgrade = reader.with_header("Upgrade", "ferro-console");
                let (status, v) = upgrade.call(method, path, None);
                assert_eq!((status, v["code"].as_str()), (403, Some("forbidden")), "console upgrade by a reader: {v}");
            }
            "GET" => assert!(status != 401 && status != 403, "{method} {path} by a reader: {status} {v}"),
            _ if is_session_change => assert!(matches!(status, 200 | 204), "{method} {path}: {status} {v}"),
            _ => {
                assert_eq!(status, 403, "{method} {path} by a reader: {v}");
                assert_eq!(v["code"], "forbidden");
                assert!(v["message"].as_str().unwrap().contains("readonly"), "{v}");
            }
        }
    }
    // Nothing changed: same definitions, volumes, jobs, events, files.
    assert_eq!(snapshot(&local), before, "a refused request changed something");
    assert_eq!(dir_listing(&pool_dir), files);

    // Readers read; who they are is visible; an unknown path is 401 too, not 404.
    let list = reader.expect("GET", "/v1/domains", None, 200);
    assert_eq!(list[0]["name"], "d1");
    let me = reader.expect("GET", "/v1/session", None, 200);
    assert_eq!((me["role"].as_str(), me["via"].as_str()), (Some("readonly"), Some("token")));
    assert_eq!(anonymous.call("GET", "/v1/nothing-here", None).0, 401);
    // The admin token does change things on the same listener.
    let admin = anonymous.with_header("Authorization", &format!("Bearer {ADMIN}"));
    assert_eq!(admin.expect("GET", "/v1/session", None, 200)["role"], "admin");
    admin.expect("POST", "/v1/domains", Some(&guest_toml("d2", "idle")), 201);
    admin.expect("DELETE", "/v1/domains/d2", None, 204);
    // The refusals are in the log with the peer's address.
    let log = d.stderr();
    assert!(log.lines().any(|l| l.contains("peer=127.0.0.1:") && l.contains("status=403")), "{log}");
}

#[test]
fn the_cli_over_tls_defines_starts_attaches_copies_and_destroys() {
    let pki = Pki::new();
    let home = Home::new("remote-cli");
    let (d, addr) = pki.daemon(&home);
    let uri = format!("tls://127.0.0.1:{}", addr.port());
    let (ca, tokens) = (pki.arg("ca.pem"), pki.arg("tokens"));
    // The connection as options after the verb, before it, and from the environment.
    let after = |verb: &[&str]| -> Output {
        ferro(&[verb, &["--connect", &uri, "--ca", &ca, "--token-file", &tokens]].concat(), &[])
    };
    let before = |verb: &[&str]| -> Output {
        ferro(&[&["--connect", &uri, "--ca", &ca, "--token-file", &tokens], verb].concat(), &[])
    };
    let env = [("FERRO_CONNECT", uri.as_str()), ("FERRO_CA", ca.as_str()), ("FERRO_TOKEN_FILE", tokens.as_str())];
    let by_env = |verb: &[&str]| -> Output { ferro(verb, &env) };

    let file = home.path().join("r1.toml");
    std::fs::write(&file, guest_toml("r1", "idle")).unwrap();
    assert!(ok(after(&["define", file.to_str().unwrap()])).contains("Domain 'r1' defined"));
    assert!(ok(before(&["start", "r1"])).contains("Domain 'r1' started"));
    let list = ok(by_env(&["list"]));
    assert!(list.contains("r1") && list.contains("running"), "{list}");
    let info: Value = serde_json::from_str(&ok(by_env(&["dominfo", "r1", "--json"]))).unwrap();
    openapi::validate(&serde_json::json!({"$ref": "#/components/schemas/Domain"}), &info, "$").unwrap();
    assert_eq!(info["state"], "running");
    let pid = info["pid"].as_i64().unwrap();

    // The console through the same upgrade, encrypted: what we type reaches the guest and its
    // echo comes back; the console ends when the domain is destroyed.
    let mut console = Command::new(ferro_bin())
        .args(["console", "r1"])
        .envs(env)
        .env_remove("FERRO_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = console.stdin.take().unwrap();
    let mut stdout = console.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    stdin.write_all(b"t").unwrap();
    stdin.flush().unwrap();
    // The idle guest echoes each byte on its console; give it time before pulling the plug.
    let events = || ok(by_env(&["events", "--no-follow", "--json"]));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ok(after(&["destroy", "r1"])).contains("destroyed"));
    wait_for("the VMM to exit", Duration::from_secs(10), || !ferro_test_support::alive(pid));
    wait_for("`ferro console` to end", Duration::from_secs(10), || console.try_wait().unwrap().is_some());
    drop(stdin);
    let shown = reader.join().unwrap();
    assert!(shown.contains("echo: t"), "console over TLS showed: {shown:?}");
    assert!(console.wait().unwrap().success());
    let kinds: Vec<String> =
        events().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    assert!(kinds.ends_with(&["defined".into(), "started".into(), "stopped".into()]), "{kinds:?}");

    // Volumes stream both ways over TLS, byte for byte.
    let pool_dir = home.path().join("pool");
    ok(by_env(&["pool-define-as", "p1", "dir", "--target", pool_dir.to_str().unwrap()]));
    ok(by_env(&["pool-build", "p1"]));
    ok(by_env(&["pool-start", "p1"]));
    ok(by_env(&["vol-create-as", "p1", "v1", "4M"]));
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let upload = home.path().join("upload.raw");
    std::fs::write(&upload, &data).unwrap();
    ok(by_env(&["vol-upload", "v1", "--pool", "p1", upload.to_str().unwrap()]));
    assert_eq!(std::fs::read(pool_dir.join("v1")).unwrap(), data, "the pool holds what was uploaded");
    let download = home.path().join("download.raw");
    ok(by_env(&["vol-download", "v1", "--pool", "p1", download.to_str().unwrap()]));
    assert_eq!(std::fs::read(&download).unwrap(), data, "the download is what was uploaded");
    ok(by_env(&["vol-delete", "v1", "--pool", "p1"]));
    assert!(ok(by_env(&["undefine", "r1"])).contains("undefined"));
    assert!(!ok(by_env(&["list", "--all"])).contains("r1"));

    // A readonly token file lists but cannot change.
    let reader_env = [("FERRO_CONNECT", uri.as_str()), ("FERRO_CA", ca.as_str()), ("FERRO_TOKEN_FILE", &pki.arg("reader-token"))];
    ok(ferro(&["pool-list", "--all"], &reader_env));
    let err = failed(ferro(&["define", file.to_str().unwrap()], &reader_env));
    assert!(err.contains("readonly"), "{err}");

    // Refusals the user can act on: no token, a wrong one, a CA that did not sign the
    // certificate, a name the certificate is not for, plain text to a remote address.
    let err = failed(ferro(&["list", "--connect", &uri, "--ca", &ca], &[]));
    assert!(err.contains("no token sent") && err.contains("--token-file"), "{err}");
    let err = failed(ferro(&["list", "--connect", &uri, "--ca", &ca, "--token-file", &pki.arg("wrong-token")], &[]));
    assert!(err.contains("wrong token"), "{err}");
    let err = failed(ferro(&["list", "--connect", &uri, "--ca", &pki.arg("other-ca.pem"), "--token-file", &tokens], &[]));
    assert!(err.contains("not signed by a CA in") && err.contains("other-ca.pem") && err.contains("--ca"), "{err}");
    let elsewhere = format!("tls://{}", d.listening()[1]);
    let err = failed(ferro(&["list", "--connect", &elsewhere, "--ca", &ca, "--token-file", &tokens], &[]));
    assert!(err.contains("not made out to 127.0.0.2"), "{err}");
    let err = failed(ferro(&["list", "--connect", "tcp://192.0.2.1:8443", "--token-file", &tokens], &[]));
    assert!(err.contains("only for a loopback address"), "{err}");
    let err = failed(ferro(&["list", "--connect", "ftp://127.0.0.1:21"], &[]));
    assert!(err.contains("tls://HOST:PORT"), "{err}");
    assert!(d.api().expect("GET", "/v1/domains", None, 200).as_array().unwrap().is_empty());
}

/// The attributes of a Set-Cookie value, lower-cased, beside its name=value.
fn cookie_parts(set_cookie: &str) -> (String, Vec<String>) {
    let mut parts = set_cookie.split(';').map(str::trim);
    let pair = parts.next().unwrap().to_string();
    (pair, parts.map(|a| a.to_ascii_lowercase()).collect())
}

fn set_cookie(r: &RawResponse) -> String {
    let values = r.header_values("set-cookie");
    assert_eq!(values.len(), 1, "one Set-Cookie: {:?}", r.headers);
    values[0].to_string()
}

fn sign_in(api: &Api, ctype: &str, body: &str) -> (RawResponse, String) {
    let r = api.raw("POST", "/v1/session", ctype, Some(body.as_bytes()));
    assert_eq!(r.status, 200, "sign-in: {}", String::from_utf8_lossy(&r.body));
    let (pair, _) = cookie_parts(&set_cookie(&r));
    (r, pair)
}

#[test]
fn browser_sessions_need_a_token_once_and_a_same_origin_for_changes() {
    let pki = Pki::new();
    let home = Home::new("sessions");
    let (d, addr) = pki.daemon(&home);
    let local = d.api();
    let api = pki.api(addr);
    let own = format!("https://{addr}");

    // A wrong token signs nobody in and sets nothing.
    let r = api.raw("POST", "/v1/session", "application/json", Some(br#"{"token":"not-a-token-of-this-daemon"}"#));
    assert_eq!(r.status, 401);
    assert!(r.header_values("set-cookie").is_empty());
    api.expect("POST", "/v1/session", Some(r#"{"tok":"x"}"#), 400);

    // The admin token as JSON: a cookie with every attribute a browser needs to keep it safe.
    let (r, cookie) = sign_in(&api, "application/json", &format!(r#"{{"token":"{ADMIN}"}}"#));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((body["role"].as_str(), body["via"].as_str()), (Some("admin"), Some("session")));
    let (_, attributes) = cookie_parts(&set_cookie(&r));
    let (name, id) = cookie.split_once('=').unwrap();
    assert_eq!(name, "ferro_session");
    assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    for wanted in ["httponly", "samesite=strict", "secure", "path=/", "max-age=43200"] {
        assert!(attributes.iter().any(|a| a == wanted), "{wanted} missing from {attributes:?}");
    }
    let browser = api.with_header("Cookie", &format!("theme=dark; {cookie}"));
    assert_eq!(browser.expect("GET", "/v1/session", None, 200)["via"], "session");
    browser.expect("GET", "/v1/domains", None, 200);

    // Changes by cookie: refused without Origin or the CSRF header, refused from another origin,
    // accepted from our own origin or with the header. Nothing is defined by the refusals.
    let toml = guest_toml("s1", "idle");
    let v = browser.expect("POST", "/v1/domains", Some(&toml), 403);
    assert_eq!(v["code"], "csrf");
    for origin in ["https://evil.example", "null", &format!("http://{addr}"), "https://127.0.0.1"] {
        let v = browser.with_header("Origin", origin).expect("POST", "/v1/domains", Some(&toml), 403);
        assert_eq!(v["code"], "csrf", "{origin}");
        // Another origin is refused even for a read, and even with a token.
        let v = api.with_header("Authorization", &format!("Bearer {ADMIN}")).with_header("Origin", origin).expect("GET", "/v1/domains", None, 403);
        assert_eq!(v["code"], "csrf");
    }
    assert!(local.expect("GET", "/v1/domains", None, 200).as_array().unwrap().is_empty(), "a refused change was made");
    browser.with_header("Origin", &own.to_uppercase().replace("HTTPS", "https")).expect("POST", "/v1/domains", Some(&toml), 201);
    browser.with_header("X-Ferro-CSRF", "1").expect("DELETE", "/v1/domains/s1", None, 204);
    // The console upgrade is a change too.
    let v = browser.with_header("Upgrade", "ferro-console").expect("GET", "/v1/domains/s1/console", None, 403);
    assert_eq!(v["code"], "csrf");

    // A readonly token as a form field (what a plain HTML form posts): reads only.
    let (r, reader_cookie) = sign_in(&api, "application/x-www-form-urlencoded", &format!("token={READER}&go=Sign+in"));
    assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap()["role"], "readonly");
    let reading = api.with_header("Cookie", &reader_cookie).with_header("Origin", &own);
    reading.expect("GET", "/v1/domains", None, 200);
    assert_eq!(reading.expect("POST", "/v1/domains", Some(&toml), 403)["code"], "forbidden");

    // Signing in from another origin is refused (login CSRF).
    let r = api.with_header("Origin", "https://evil.example").raw("POST", "/v1/session", "application/json", Some(format!(r#"{{"token":"{ADMIN}"}}"#).as_bytes()));
    assert_eq!(r.status, 403);
    assert!(r.header_values("set-cookie").is_empty());

    // Signing out ends the session (a readonly one may too) and clears the cookie.
    for (session, pair) in [(&browser, &cookie), (&reading, &reader_cookie)] {
        let r = session.with_header("Origin", &own).raw("DELETE", "/v1/session", "", None);
        assert_eq!(r.status, 204);
        let (cleared, attributes) = cookie_parts(&set_cookie(&r));
        assert_eq!(cleared, "ferro_session=");
        assert!(attributes.contains(&"max-age=0".to_string()), "{attributes:?}");
        let v = api.with_header("Cookie", pair).expect("GET", "/v1/domains", None, 401);
        assert!(v["message"].as_str().unwrap().contains("sign in again"), "{v}");
    }
    // Sessions are for TCP listeners.
    local.expect("POST", "/v1/session", Some(&format!(r#"{{"token":"{ADMIN}"}}"#)), 400);
    assert_eq!(local.expect("GET", "/v1/session", None, 200)["via"], "unix");
}

#[test]
fn loopback_insecure_listeners_with_tokens_and_without() {
    let pki = Pki::new();
    // Tokens over plain HTTP on loopback: the same sign-in, a cookie without Secure.
    let home = Home::new("insecure");
    let d = Daemon::start_args(
        &home,
        &["--listen", "127.0.0.1:0", "--insecure", "--token-file", &pki.arg("tokens")],
        &[("RUST_LOG", "info")],
    );
    let addr = d.listening()[0];
    let api = Api::tcp(addr);
    api.expect("GET", "/v1/domains", None, 401);
    let (r, cookie) = sign_in(&api, "application/json", &format!(r#"{{"token":"{ADMIN}"}}"#));
    let (_, attributes) = cookie_parts(&set_cookie(&r));
    assert!(attributes.contains(&"httponly".to_string()) && !attributes.contains(&"secure".to_string()), "{attributes:?}");
    let browser = api.with_header("Cookie", &cookie).with_header("Origin", &format!("http://{addr}"));
    browser.expect("POST", "/v1/domains", Some(&guest_toml("i1", "idle")), 201);
    // https is not this listener's origin.
    let v = api.with_header("Cookie", &cookie).with_header("Origin", &format!("https://{addr}")).expect("DELETE", "/v1/domains/i1", None, 403);
    assert_eq!(v["code"], "csrf");
    // The CLI over tcp:// with the token file.
    let list = ok(ferro(&["list", "--all", "--connect", &format!("tcp://{addr}"), "--token-file", &pki.arg("tokens")], &[]));
    assert!(list.contains("i1"), "{list}");
    drop(d);

    // --no-auth: everyone is an admin, no sign-in.
    let home = Home::new("open");
    let d = Daemon::start_args(&home, &["--listen", "127.0.0.1:0", "--insecure", "--no-auth"], &[("RUST_LOG", "info")]);
    let api = Api::tcp(d.listening()[0]);
    let me = api.expect("GET", "/v1/session", None, 200);
    assert_eq!((me["role"].as_str(), me["via"].as_str()), (Some("admin"), Some("open")));
    api.expect("POST", "/v1/domains", Some(&guest_toml("o1", "idle")), 201);
    api.expect("POST", "/v1/session", Some(&format!(r#"{{"token":"{ADMIN}"}}"#)), 400);
    let list = ok(ferro(&["list", "--all", "--connect", &format!("tcp://{}", d.listening()[0])], &[]));
    assert!(list.contains("o1"), "{list}");
}

/// `ferrod ARGS` that must stop at once with one line naming the problem, binding nothing.
fn refused_start(args: &[&str], wanted: &str) {
    let home = Home::new("refused");
    let out = Command::new(ferrod_bin()).args(args).env("FERRO_HOME", home.path()).stdin(Stdio::null()).output().unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "ferrod {args:?} started");
    assert!(stderr.contains(wanted), "ferrod {args:?}: {stderr}");
    assert!(!home.socket().exists(), "ferrod {args:?} made its socket");
}

#[test]
fn ferrod_refuses_unsafe_or_incomplete_listener_setups() {
    let pki = Pki::new();
    let (cert, key, tokens) = (pki.arg("ferrod.pem"), pki.arg("ferrod.key"), pki.arg("tokens"));
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    refused_start(&["--listen", "0.0.0.0:0", "--insecure", "--token-file", &tokens], "plain TCP is allowed only on loopback");
    refused_start(&["--listen", "192.0.2.1:8443", "--insecure", "--no-auth"], "plain TCP is allowed only on loopback");
    refused_start(&["--listen", "127.0.0.1:0", "--token-file", &tokens], "serves TLS: give --tls-cert and --tls-key");
    refused_start(&[&["--listen", "127.0.0.1:0"], &tls[..]].concat(), "--listen needs --token-file");
    refused_start(&["--listen", "127.0.0.1:0", "--no-auth"], "--insecure");
    refused_start(&["--listen", "127.0.0.1:0", "--insecure", "--no-auth", "--token-file", &tokens], "--no-auth lets everyone in");
    refused_start(&[&["--listen", "127.0.0.1:0", "--insecure", "--token-file", &tokens], &tls[..]].concat(), "--insecure serves plain HTTP");
    refused_start(&["--listen", "localhost", "--insecure", "--no-auth"], "expected ADDR:PORT");
    refused_start(&["--token-file", &tokens], "--listen");

    let loose = pki.path("loose-tokens");
    std::fs::write(&loose, format!("{ADMIN}\n")).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).unwrap();
    let loose = loose.to_str().unwrap();
    refused_start(&[&["--listen", "127.0.0.1:0", "--token-file", loose], &tls[..]].concat(), "readable by group or others (mode 640); run: chmod 600");
    let short = pki.path("short-tokens");
    write_private(&short, "# nothing but\nshort admin\n");
    refused_start(&[&["--listen", "127.0.0.1:0", "--token-file", short.to_str().unwrap()], &tls[..]].concat(), "line 2: a token is 16");

    let open_key = pki.path("open.key");
    std::fs::copy(pki.path("ferrod.key"), &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_key = open_key.to_str().unwrap();
    refused_start(&["--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", open_key, "--token-file", &tokens], "readable by everyone");
    refused_start(&["--listen", "127.0.0.1:0", "--tls-cert", &tokens, "--tls-key", &key, "--token-file", &tokens], "no PEM certificate");
    refused_start(&["--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &tokens, "--token-file", &tokens], "--tls-key");
    refused_start(&["--socket-group", "no-such-group-ferro"], "--socket-group no-such-group-ferro: no such group");
}

/// Runs `ferro ARGS` as nobody:nogroup against a socket.
fn ferro_as_nobody(socket: &Path, args: &[&str]) -> (std::process::ExitStatus, u32, String) {
    let child = Command::new(ferro_bin())
        .args(args)
        .args(["--connect", socket.to_str().unwrap()])
        .env_remove("FERRO_HOME")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    (out.status, pid, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_unix_socket_belongs_to_its_group_and_the_log_names_each_client() {
    // Members of --socket-group may use the socket; each request is logged with who sent it.
    let home = Home::new("sockgroup");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_args(&home, &["--socket-group", "nogroup"], &[("RUST_LOG", "info")]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOBODY), "socket mode and group");
    let pool = home.path().join("pool");
    let (status, pid, stderr) = ferro_as_nobody(&d.socket, &["pool-define-as", "p1", "dir", "--target", pool.to_str().unwrap()]);
    assert!(status.success(), "nobody in nogroup: {stderr}");
    let log = d.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("path=/v1/pools") && l.contains("method=POST"))
        .unwrap_or_else(|| panic!("no log line for the request: {log}"));
    for field in [format!("pid={pid}"), format!("uid={NOBODY}"), format!("gid={NOBODY}"), "status=201".to_string()] {
        assert!(line.contains(&field), "{field} missing from {line:?}");
    }
    drop(d);

    // Without --socket-group: group `ferro` if the host has one, else the owner only.
    let home = Home::new("sockowner");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_args(&home, &[], &[("RUST_LOG", "info")]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    let ferro_group = std::fs::read_to_string("/etc/group").unwrap().lines().find_map(|l| {
        let fields: Vec<&str> = l.split(':').collect();
        (fields[0] == "ferro").then(|| fields[2].parse::<u32>().unwrap())
    });
    match ferro_group {
        Some(gid) => assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid)),
        None => {
            assert_eq!(meta.mode() & 0o777, 0o600);
            assert!(d.stderr().contains("for its owner only"), "{}", d.stderr());
            let (status, _, stderr) = ferro_as_nobody(&d.socket, &["list"]);
            assert!(!status.success() && stderr.contains("Permission denied"), "nobody reached a 0600 socket: {stderr}");
        }
    }
}
