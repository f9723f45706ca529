//! `ferro completions`: the bash script it prints, loaded into a real bash, completes verbs from
//! ferro's clap definition and the names of domains, pools and networks from the running ferrod.

use ferro_test_support::daemon::{Daemon, Home, guest_toml};
use ferro_test_support::ferro_bin;
use std::process::Command;

/// What bash's completion offers for the words of `line` (the last word is being completed),
/// apart from flags, sorted.
fn complete(home: &Home, line: &[&str]) -> Vec<String> {
    let script = String::from_utf8(Command::new(ferro_bin()).args(["completions", "bash"]).output().unwrap().stdout).unwrap();
    let words: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let current = line.last().unwrap();
    let previous = line.get(line.len().saturating_sub(2)).unwrap();
    let program = format!(
        "{script}\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_TYPE=9\n_clap_complete_ferro ferro '{current}' '{previous}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        words.join(" "),
        line.len() - 1
    );
    let bin_dir = ferro_bin().parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .env("PATH", path)
        .env("FERRO_HOME", home.path())
        .env_remove("FERRO_CONNECT")
        .output()
        .expect("bash runs (scripts/setup.sh)");
    assert!(out.status.success(), "bash: {}", String::from_utf8_lossy(&out.stderr));
    let mut offered: Vec<String> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty() && !l.starts_with('-')).collect();
    offered.sort();
    offered
}

#[test]
fn bash_completes_verbs_and_the_daemons_domain_pool_and_network_names() {
    let home = Home::new("completion");
    // Without a daemon, names complete to nothing, without an error on the terminal.
    assert_eq!(complete(&home, &["ferro", "start", ""]), Vec::<String>::new());

    let d = Daemon::start(&home);
    let api = d.api();
    for name in ["web-a", "web-b", "db"] {
        api.expect("POST", "/v1/domains", Some(&guest_toml(name, "idle")), 201);
    }
    let images = home.path().join("images");
    d.ferro_ok(&["pool-define-as", "images", "dir", "--target", images.to_str().unwrap()]);
    let network = "name = \"lab\"\nmode = \"isolated\"\nbridge = \"fvcompl\"\nip = \"10.81.0.1/24\"\n";
    api.expect("POST", "/v1/networks", Some(network), 201);

    let verbs = complete(&home, &["ferro", "net-st"]);
    assert_eq!(verbs, ["net-start"], "verbs come from the clap definition");
    assert_eq!(complete(&home, &["ferro", "start", ""]), ["db", "web-a", "web-b"]);
    assert_eq!(complete(&home, &["ferro", "dominfo", "web"]), ["web-a", "web-b"]);
    assert_eq!(complete(&home, &["ferro", "vol-list", ""]), ["images"]);
    assert_eq!(complete(&home, &["ferro", "vol-info", "x", "--pool", "im"]), ["images"]);
    assert_eq!(complete(&home, &["ferro", "net-start", ""]), ["lab"]);
}
