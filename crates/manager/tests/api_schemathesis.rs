//! ferrod's REST API under schemathesis (PyPI), the property-based API tester: every operation
//! in openapi.json gets generated requests (its documented examples, boundary values of every
//! parameter and body, random ones) against a real ferrod, and no answer may be a server error
//! (5xx) or differ from what openapi.json documents (status code, content type, headers, body
//! schema), refuse a request that breaks the schema with anything but a 4xx, or let a request
//! without the token in; the stateful phase chains operations through the links in openapi.json.
//! Two of schemathesis's checks are left out, knowingly: `positive_data_acceptance` (ferrod's
//! checks are stricter than the schema says: a name is any string there, a plain name here) and
//! `allow_header_conformance` (a 405's `Allow` lists every method of the route, which a
//! domain's sub-resources share).
//! ferrod runs in a network namespace of its own, so a network a generated request defines and
//! starts makes its bridge and rules there, never on the host. The event stream (NDJSON that
//! never ends) is left out. The seed is fixed so CI repeats the same cases; `scripts/fuzz.sh`'s
//! habits apply for longer runs with other seeds (docs/fuzzing.md).

use ferro_test_support::daemon::{Daemon, Home};
use ferro_test_support::net::Netns;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const TOKEN: &str = "schemathesis-admin-token-0123456789";
const ADDRESS: &str = "127.0.0.1:8080";

/// The schemathesis that scripts/setup.sh --test installs (or $FERRO_SCHEMATHESIS).
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("FERRO_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
        cache.join("ferrovisor/schemathesis/bin/schemathesis")
    });
    assert!(path.exists(), "schemathesis is not at {}: run scripts/setup.sh --test (it installs it from PyPI into that venv)", path.display());
    path
}

#[test]
fn generated_requests_get_no_server_error_and_only_documented_answers() {
    let schemathesis = schemathesis();
    let ns = Netns::new("schema");
    ns.ip(&["link", "set", "lo", "up"]);
    let home = Home::new("schemathesis");
    let tokens = home.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN} admin\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = Daemon::start_in(&home, &ns, &["--no-default-network", "--listen", ADDRESS, "--insecure", "--token-file", tokens.to_str().unwrap()]);

    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = ns
        .command(&schemathesis)
        .arg("run")
        .arg(here.join("openapi.json"))
        .args(["--url", &format!("http://{ADDRESS}")])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance,allow_header_conformance"])
        .args(["--exclude-path", "/v1/events"])
        .args(["--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "50", "--seed", "1", "--workers", "1"])
        .args(["--request-timeout", "20", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", here.join("tests/schemathesis_hooks.py"))
        .current_dir(home.path())
        .output()
        .expect("run schemathesis");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found problems:\n{report}\nferrod's log:\n{}", d.stderr());
    assert!(report.contains("passed") && !report.contains("Tested: 0"), "schemathesis tested nothing:\n{report}");
    eprintln!("{}", report.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));

    // ferrod is still there and answers.
    assert!(d.child.try_wait().unwrap().is_none(), "ferrod died under the generated requests: {}", d.stderr());
    d.api().expect("GET", "/v1/domains", None, 200);
}
