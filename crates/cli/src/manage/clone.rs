//! Clone verbs: clone (virt-clone) and template (Proxmox's convert to template).

use super::client::Client;
use super::{dom_path, follow_job, print_json};
use serde_json::json;

#[derive(clap::Subcommand, Debug)]
pub enum CloneCommand {
    /// Clone a shut-off domain: a new uuid, new MACs, new disk files (volumes NEW-vda.FORMAT, ...
    /// in the source volume's pool or --pool, or beside a disk's file). A full clone copies every
    /// disk (a job); --linked makes qcow2 overlays of a template's disks at once.
    Clone {
        /// The domain to clone.
        source: String,
        /// The new domain's name.
        #[arg(long)]
        name: String,
        /// qcow2 overlays backed by the source's disks (the source must be a template).
        #[arg(long)]
        linked: bool,
        /// Pool for the new volumes.
        #[arg(long)]
        pool: Option<String>,
        /// Print the new domain as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn a shut-off domain into a template: it never starts again, its disks become read-only,
    /// and linked clones can be made of it (`ferro clone DOM --name NEW --linked`).
    Template { domain: String },
}

pub fn execute(cmd: CloneCommand, c: &Client) -> Result<(), String> {
    match cmd {
        CloneCommand::Clone { source, name, linked, pool, json } => {
            let mut body = json!({ "name": name, "linked": linked });
            if let Some(pool) = pool {
                body["pool"] = json!(pool);
            }
            let started = c.post(&format!("{}/clone", dom_path(&source)?), Some(&body))?;
            // A full clone answers with its job, a linked one with the new domain.
            if started.get("uuid").is_none() {
                follow_job(c, &started)?;
            }
            let info = c.get(&dom_path(&name)?)?;
            if json {
                print_json(&info);
            } else {
                let kind = if linked { "linked clone" } else { "clone" };
                println!("Domain '{name}' created as a {kind} of '{source}' (uuid {})", info["uuid"].as_str().unwrap_or("?"));
            }
        }
        CloneCommand::Template { domain } => {
            c.post(&format!("{}/template", dom_path(&domain)?), None)?;
            println!("Domain '{domain}' is now a template");
        }
    }
    Ok(())
}
