//! `ferro migrate DOM tls://HOST:PORT` (virsh's shape): asks the source ferrod (the one the CLI
//! talks to) to move a running domain to the destination ferrod, handing over the destination's
//! CA and token, and follows the job. domjobinfo and domjobabort (in `backup`) see and cancel it.

use super::client::{Client, read_token};
use super::{Connect, dom_path, follow_job, print_json, show};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Domain to move (running or paused; shut off with --offline).
    name: String,
    /// The destination ferrod: tls://HOST:PORT (a ferrod started with --listen).
    dest_uri: String,
    /// Pre-copy while the guest runs (without it the guest is paused for the whole move).
    #[arg(long)]
    live: bool,
    /// Move a shut-off domain: its definition, and its disks where the destination does not see
    /// the same files (copied, holes kept).
    #[arg(long, conflicts_with_all = ["live", "max_downtime", "bandwidth", "auto_converge", "copy_storage_all"])]
    offline: bool,
    /// The longest pause the guest should see at the switch-over, in ms.
    #[arg(long, value_name = "MS")]
    max_downtime: Option<u64>,
    /// Cap the pre-copy rate, MiB/s.
    #[arg(long, value_name = "MIB")]
    bandwidth: Option<u64>,
    /// Throttle the guest's vCPUs step by step while it dirties memory faster than the link
    /// carries it.
    #[arg(long)]
    auto_converge: bool,
    /// Copy the writable disks along while the guest runs, to new files at their paths (pool
    /// volumes: in the destination's pool of the same name), instead of requiring storage both
    /// hosts share. Read-only disks must still be shared.
    #[arg(long)]
    copy_storage_all: bool,
    /// Remove the domain's definition here once it runs on the destination.
    #[arg(long)]
    undefine_source: bool,
    /// CA certificate(s) (PEM) the destination's certificate must be signed by (default: --ca,
    /// else the source ferrod's system bundle).
    #[arg(long, value_name = "FILE")]
    dest_ca: Option<PathBuf>,
    /// File holding an admin token of the destination ferrod (default: --token-file).
    #[arg(long, value_name = "FILE")]
    dest_token_file: Option<PathBuf>,
    /// Print the final numbers as JSON: downtime_ms, total_ms, transferred_bytes, iterations.
    #[arg(long)]
    json: bool,
}

pub fn execute(args: MigrateArgs, c: &Client, connect: &Connect) -> Result<(), String> {
    let token_file = args.dest_token_file.as_ref().or(connect.token_file.as_ref()).ok_or_else(|| {
        format!("{}: give an admin token of the destination ferrod with --dest-token-file FILE", args.dest_uri)
    })?;
    let mut body = json!({
        "destination": args.dest_uri,
        "dest_token": read_token(token_file)?,
        "live": args.live,
        "offline": args.offline,
        "auto_converge": args.auto_converge,
        "copy_storage_all": args.copy_storage_all,
        "undefine_source": args.undefine_source,
    });
    if let Some(ca) = args.dest_ca.as_ref().or(connect.ca.as_ref()) {
        body["dest_ca"] = json!(std::fs::read_to_string(ca).map_err(|e| format!("--dest-ca {}: {e}", ca.display()))?);
    }
    if let Some(ms) = args.max_downtime {
        body["max_downtime_ms"] = json!(ms);
    }
    if let Some(mib) = args.bandwidth {
        body["bandwidth_mib"] = json!(mib);
    }
    let path = dom_path(&args.name)?;
    let job = c.post(&format!("{path}/migrate"), Some(&body))?;
    follow_job(c, &job)?;
    let done = c.get(&format!("{path}/migration"))?;
    let result = &done["result"];
    if args.json {
        print_json(result);
    } else {
        println!("Domain {} migrated to {}", args.name, args.dest_uri);
        print_numbers(result);
    }
    Ok(())
}

/// The final numbers of a completed migration.
fn print_numbers(result: &Value) {
    println!("Downtime:       {:.3} ms", result["downtime_ms"].as_f64().unwrap_or(0.0));
    println!("Total time:     {} ms", result["total_ms"]);
    println!("Transferred:    {}", show::bytes(result["transferred_bytes"].as_u64().unwrap_or(0)));
    println!("Iterations:     {}", result["iterations"]);
}

/// domjobinfo's lines for a migration job: the VMM's progress, or the final numbers.
pub fn print_migration(m: &Value) {
    println!("Destination:    {}", m["destination"].as_str().unwrap_or("?"));
    let p = &m["progress"];
    if !p.is_null() {
        let rate = |key: &str| format!("{}/s", show::bytes(p[key].as_u64().unwrap_or(0)));
        println!("Migration:      {}", p["state"].as_str().unwrap_or("?"));
        println!("Iteration:      {}", p["iteration"]);
        println!("Transferred:    {}", show::bytes(p["transferred_bytes"].as_u64().unwrap_or(0)));
        println!("Remaining:      {}", show::bytes(p["remaining_bytes"].as_u64().unwrap_or(0)));
        println!("Dirty rate:     {}", rate("dirty_rate_bytes_per_s"));
        println!("Transfer rate:  {}", rate("transfer_rate_bytes_per_s"));
        println!("Expected downtime: {} ms", p["expected_downtime_ms"]);
        println!("Throttle:       {} %", p["throttle_percent"]);
    }
    if !m["result"].is_null() {
        print_numbers(&m["result"]);
    }
}
