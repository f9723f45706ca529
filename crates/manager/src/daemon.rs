//! ferrod's services wired together: opened over one store, recovered at start, stopped at the
//! end. The dependencies go one way: migrations use snapshots and backups (to undefine a source),
//! snapshots, backups and clones use domains (to save and restore VMs, define clones) and jobs,
//! domains use pools (to resolve volumes), pools use jobs (for copies) and networks (for their
//! NICs); all of them share the store, the event hub and the file claims. Networks are recovered first, so the VMs' networks are up before any VM is re-attached.

use crate::backups::Backups;
use crate::claims::Claims;
use crate::clones::Clones;
use crate::domains::Domains;
use crate::events::EventHub;
use crate::jobs::Jobs;
use crate::migration::Migrations;
use crate::model::{Confinement, Paths};
use crate::networks::Networks;
use crate::ovf::Ovf;
use crate::pools::Pools;
use crate::snapshots::Snapshots;
use crate::store::Store;
use std::sync::Arc;

pub struct Services {
    pub paths: Paths,
    pub events: Arc<EventHub>,
    pub jobs: Arc<Jobs>,
    pub pools: Arc<Pools>,
    pub networks: Arc<Networks>,
    pub domains: Arc<Domains>,
    pub ovf: Arc<Ovf>,
    pub snapshots: Arc<Snapshots>,
    pub backups: Arc<Backups>,
    pub clones: Arc<Clones>,
    pub migrations: Arc<Migrations>,
    store: Arc<Store>,
}

impl Services {
    /// Opens the store and loads every service's records; does not touch running VMs yet (see
    /// `recover`).
    pub fn open(paths: Paths, overcommit_ratio: f64, confinement: Confinement) -> Result<Arc<Services>, String> {
        let store = Arc::new(Store::open(&paths.db)?);
        let events = Arc::new(EventHub::default());
        let claims = Arc::new(Claims::default());
        let jobs = Jobs::open(store.clone(), events.clone(), claims.clone())?;
        let pools = Pools::open(paths.clone(), store.clone(), events.clone(), jobs.clone(), claims.clone())?;
        let networks = Networks::open(&paths.home.join("networks"), store.clone(), events.clone())?;
        let domains = Domains::open(paths.clone(), store.clone(), events.clone(), pools.clone(), networks.clone(), claims, overcommit_ratio, confinement)?;
        let ovf = Ovf::open(jobs.clone(), pools.clone(), domains.clone());
        let snapshots = Snapshots::open(paths.snapshots(), store.clone(), events.clone(), jobs.clone(), domains.clone());
        let backups = Backups::open(store.clone(), events.clone(), jobs.clone(), domains.clone());
        let clones = Clones::open(events.clone(), jobs.clone(), pools.clone(), domains.clone());
        let migrations = Migrations::open(jobs.clone(), domains.clone(), snapshots.clone(), backups.clone(), events.clone());
        Ok(Arc::new(Services { paths, events, jobs, pools, networks, domains, ovf, snapshots, backups, clones, migrations, store }))
    }

    /// Takes back the networks and re-attaches to the VMs that were running when ferrod last
    /// stopped, then, on the first start since the host booted, starts the pools and domains set
    /// to autostart (networks set to autostart start before any VM). With `default_network`, the
    /// first start of ferrod on a state store defines the `default` network (set to autostart).
    pub async fn recover(&self, default_network: bool) {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        let last = self.store.meta("boot_id").ok().flatten();
        let first_since_boot = last.as_deref() != Some(boot_id.as_str());
        let define_default = default_network && self.store.meta("default_network").ok().flatten().is_none();
        let (networks, store) = (self.networks.clone(), self.store.clone());
        let recovered = tokio::task::spawn_blocking(move || {
            if define_default {
                // Once per state store: a user who undefines it does not get it back.
                match networks.define_default().and_then(|()| Ok(store.set_meta("default_network", "defined")?)) {
                    Ok(()) => {}
                    Err(e) => tracing::error!("cannot define the default network: {e}"),
                }
            }
            networks.recover(first_since_boot)
        });
        if let Err(e) = recovered.await {
            tracing::error!("recovering networks failed: {e}");
        }
        self.domains.reattach().await;
        self.backups.recover().await;
        if first_since_boot {
            self.pools.autostart();
            self.domains.autostart().await;
            if let Err(e) = self.store.set_meta("boot_id", &boot_id) {
                tracing::error!("cannot record boot id: {e}");
            }
        }
    }

    /// Stops the work ferrod does itself (jobs); running VMs keep running.
    pub async fn stop(&self) {
        self.jobs.stop_all().await;
    }
}
