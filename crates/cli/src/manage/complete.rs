//! Names of ferrod's domains, pools and networks for shell completion: `ferro completions SHELL`
//! prints a script that runs `ferro` itself to complete each word (clap_complete's dynamic
//! completion), and arguments that name such an object ask the running ferrod for the names. The
//! daemon is the one `$FERRO_CONNECT` (or `$FERRO_HOME`, or the default socket) names, with
//! `$FERRO_CA` and `$FERRO_TOKEN_FILE`; a `--connect` typed on the same line is not seen.

use super::client::Client;
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use std::path::PathBuf;

/// The names of one collection of ferrod's (`domains`, `pools`, `networks`); none when ferrod
/// cannot be reached (a completion never prints errors into the command line).
fn names(collection: &str) -> Vec<CompletionCandidate> {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let connect = env("FERRO_CONNECT").map(|v| v.to_string_lossy().into_owned());
    let ca = env("FERRO_CA").map(PathBuf::from);
    let token_file = env("FERRO_TOKEN_FILE").map(PathBuf::from);
    let Ok(client) = Client::new(connect.as_deref(), ca.as_deref(), token_file.as_deref()) else { return Vec::new() };
    let Ok(list) = client.get(&format!("/v1/{collection}")) else { return Vec::new() };
    list.as_array().into_iter().flatten().filter_map(|item| item["name"].as_str()).map(CompletionCandidate::new).collect()
}

pub fn domains() -> ArgValueCandidates {
    ArgValueCandidates::new(|| names("domains"))
}

pub fn pools() -> ArgValueCandidates {
    ArgValueCandidates::new(|| names("pools"))
}

pub fn networks() -> ArgValueCandidates {
    ArgValueCandidates::new(|| names("networks"))
}
