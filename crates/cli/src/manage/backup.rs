//! Backup verbs (libvirt's names): backup-begin, backup-restore, checkpoint-list, checkpoint-delete, and
//! domjobinfo/domjobabort for the job a domain runs (a backup, a snapshot, a migration).

use super::client::Client;
use super::{absolute, dom_path, follow_job, print_json, seg, show};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum BackupCommand {
    /// Back up a domain's writable disks (a job): DIR/vda.qcow2, DIR/vdb.qcow2, ... (an existing
    /// file is never replaced), making a new checkpoint. Full: the whole disk, sparse.
    /// Incremental: the clusters written since CHECKPOINT, backed by the backup CHECKPOINT made,
    /// so `qemu-img convert` of the newest file gives back the whole disk.
    BackupBegin {
        domain: String,
        /// Directory for the backup files (on ferrod's host; made if missing).
        #[arg(long, value_name = "DIR")]
        target: PathBuf,
        /// Only what changed since this checkpoint.
        #[arg(long, value_name = "CHECKPOINT")]
        incremental: Option<String>,
        /// Name of the new checkpoint (default: the time in seconds since the epoch).
        #[arg(long, value_name = "NAME")]
        checkpoint: Option<String>,
        /// Return once the backup started (follow it with domjobinfo, stop it with domjobabort).
        #[arg(long)]
        detach: bool,
        /// Print {"checkpoint", "files"} as JSON (with --detach, the job too).
        #[arg(long)]
        json: bool,
    },
    /// Write a backup back into a shut-off domain's disk (a job): FILE is the newest file of a
    /// backup chain; the disk is --disk, else the one FILE is named after, else the only one.
    BackupRestore {
        domain: String,
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The disk to restore: vda, vdb, ...
        #[arg(long)]
        disk: Option<String>,
    },
    /// List a domain's checkpoints, oldest first.
    CheckpointList {
        domain: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint: its bitmap is merged into its parent's; its backup files stay.
    CheckpointDelete { domain: String, name: String },
    /// Show the job a domain runs (a backup, a snapshot, a migration), or the last one it ran.
    Domjobinfo {
        domain: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Stop the job a domain runs; what it was making is removed (a migration: the guest runs on
    /// here and nothing stays on the destination).
    Domjobabort { domain: String },
}

pub fn execute(cmd: BackupCommand, c: &Client) -> Result<(), String> {
    use BackupCommand as C;
    match cmd {
        C::BackupBegin { domain, target, incremental, checkpoint, detach, json } => {
            let mut body = json!({ "target": absolute(&target)? });
            if let Some(name) = incremental {
                body["incremental"] = json!(name);
            }
            if let Some(name) = checkpoint {
                body["checkpoint"] = json!(name);
            }
            let started = c.post(&format!("{}/backup", dom_path(&domain)?), Some(&body))?;
            let files: Vec<&str> = started["files"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let name = started["checkpoint"].as_str().unwrap_or("?");
            if detach {
                if json {
                    print_json(&started);
                } else {
                    println!("Backup of {domain} started: job {}, checkpoint {name}", started["job"]["id"]);
                }
                return Ok(());
            }
            follow_job(c, &started["job"])?;
            if json {
                print_json(&json!({ "checkpoint": name, "files": files }));
            } else {
                println!("Backup of {domain} complete: checkpoint {name}");
                for file in files {
                    println!("  {file}");
                }
            }
        }
        C::BackupRestore { domain, from, disk } => {
            let mut body = json!({ "from": absolute(&from)? });
            if let Some(disk) = disk {
                body["disk"] = json!(disk);
            }
            let job = c.post(&format!("{}/restore", dom_path(&domain)?), Some(&body))?;
            follow_job(c, &job)?;
            println!("Domain {domain}: {} restored from {}", job["target"].as_str().unwrap_or("?"), from.display());
        }
        C::CheckpointList { domain, json } => {
            let list = c.get(&format!("{}/checkpoints", dom_path(&domain)?))?;
            if json {
                print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|cp| {
                        let disks: Vec<&str> = cp["disks"].as_array().into_iter().flatten().filter_map(|d| d["target"].as_str()).collect();
                        vec![
                            cp["name"].as_str().unwrap_or("?").to_string(),
                            cp["created"].as_str().unwrap_or("?").to_string(),
                            cp["parent"].as_str().unwrap_or("-").to_string(),
                            disks.join(","),
                        ]
                    })
                    .collect();
                show::table(&["Name", "Creation Time", "Parent", "Disks"], &rows);
            }
        }
        C::CheckpointDelete { domain, name } => {
            c.json("DELETE", &format!("{}/checkpoints/{}", dom_path(&domain)?, seg(&name)?), None)?;
            println!("Domain checkpoint {name} deleted");
        }
        C::Domjobinfo { domain, json } => match domain_job(c, &domain)? {
            Some(mut job) => {
                // A migration's job also has the VMM's progress (or the final numbers).
                let migration = if job["kind"] == "migrate" { Some(c.get(&format!("{}/migration", dom_path(&domain)?))?) } else { None };
                if json {
                    if let Some(m) = migration {
                        job["migration"] = m;
                    }
                    print_json(&job);
                } else {
                    show::job_info(&job);
                    if let Some(m) = migration {
                        super::migrate::print_migration(&m);
                    }
                }
            }
            None if json => print_json(&Value::Null),
            None => println!("Job type: None"),
        },
        C::Domjobabort { domain } => {
            let job = domain_job(c, &domain)?.filter(|j| j["state"] == "running");
            let Some(job) = job else {
                return Err(format!("domain {domain} runs no job"));
            };
            let ended = c.post(&format!("/v1/jobs/{}/cancel", job["id"]), None)?;
            match ended["state"].as_str() {
                Some("cancelled") => println!("Job {} of domain {domain} aborted", job["id"]),
                other => println!("Job {} of domain {domain} {} before it could be aborted", job["id"], other.unwrap_or("ended")),
            }
        }
    }
    Ok(())
}

/// The domain's running job, else the last one it ran (jobs name their domain as source).
fn domain_job(c: &Client, domain: &str) -> Result<Option<Value>, String> {
    seg(domain)?;
    let jobs = c.get("/v1/jobs")?;
    let mine: Vec<&Value> = jobs.as_array().into_iter().flatten().filter(|j| j["source"] == domain).collect();
    let running = mine.iter().rev().find(|j| j["state"] == "running");
    Ok(running.or(mine.last()).map(|j| (*j).clone()))
}
