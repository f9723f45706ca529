//! The migrations service: moving a running domain to another ferrod (docs/migration.md, "Between
//! ferrod hosts"). It owns the source's `migrate` job and the destination's side of it.
//!
//! - Source: the job asks the destination (`peer`, TLS with the destination's CA and token) for
//!   an incoming migration, upgrading that request's connection to carry the stream; then it has
//!   its VMM `migrate_send` to a unix socket in the domain's run directory and relays between the
//!   two. Progress comes from the VMM's `migrate_info`; a cancel of the job is its `migrate_cancel`.
//! - Destination: the incoming request defines the domain (refused if the name is taken), checks
//!   the disks are the source's own (`storage`), starts the domain's VMM with `--incoming` and
//!   relays the upgraded connection to it. When the stream ends the VM has arrived, or the
//!   definition is removed again: a failed migration leaves nothing on the destination.
//!
//! The VMMs enforce "exactly one place" (the destination runs the guest only after `go`, the
//! source resumes on any failure before it) and notice a silent link (30 s timeouts); the relays
//! here only carry bytes, and end when either side ends.

mod peer;
mod storage;

use crate::backups::Backups;
use crate::domains::Domains;
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::jobs::{Job, JobContext, JobError, Jobs, NewJob};
use crate::model::{DomainState, JobInfo, JobState, ProgressUnit};
use crate::snapshots::{Snapshots, SnapshotsOnUndefine};
use crate::vmm;
use ferro_vmm_api::control::{Done, MigrateReply, MigrationInfo, Request};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

pub use storage::DiskClaim;

/// How often the job asks the VMM for progress (and looks for a cancel).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long the source VMM may take to connect to ferrod's relay socket.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a migration may run; the VMMs' link timeouts end a stalled one much sooner.
const SEND_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// One control request to the VMM.
const VMM_TIMEOUT: Duration = Duration::from_secs(3);
/// Once one direction of a relay ended, how long the other may take to finish.
const LINGER: Duration = Duration::from_secs(5);
/// How long the source domain may take to be recorded off once its VMM said the guest moved.
const SOURCE_STOP_WAIT: Duration = Duration::from_secs(10);

/// A migration as the source's API was asked for it (the API checked each field).
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// `tls://HOST:PORT` of the destination ferrod.
    pub destination: String,
    /// CA certificates (PEM) the destination's certificate must be signed by; None: the
    /// system's bundle.
    pub dest_ca: Option<String>,
    /// An admin token of the destination ferrod.
    pub dest_token: String,
    /// Pre-copy while the guest runs; false: the guest is paused for the whole move.
    pub live: bool,
    pub max_downtime_ms: u64,
    pub bandwidth_mib: Option<u64>,
    pub auto_converge: bool,
    /// Remove the source's definition once the guest runs on the destination.
    pub undefine_source: bool,
}

/// The final numbers of a completed migration (`ferro migrate --json`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationResult {
    /// From the source's pause to the destination's word that the guest runs there.
    pub downtime_ms: f64,
    pub total_ms: u64,
    pub transferred_bytes: u64,
    pub iterations: u32,
}

/// A domain's last outgoing migration, as `domjobinfo` shows it (`GET /v1/domains/{name}/migration`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationJobInfo {
    pub domain: String,
    pub destination: String,
    pub live: bool,
    pub job: JobInfo,
    /// What the VMM said last (None before it started sending).
    pub progress: Option<MigrationInfo>,
    pub result: Option<MigrationResult>,
}

struct Outgoing {
    job: Arc<Job>,
    destination: String,
    live: bool,
    progress: Option<MigrationInfo>,
    result: Option<MigrationResult>,
}

pub struct Migrations {
    jobs: Arc<Jobs>,
    domains: Arc<Domains>,
    snapshots: Arc<Snapshots>,
    backups: Arc<Backups>,
    events: Arc<EventHub>,
    /// Each domain's last outgoing migration, by domain name (in memory: a restarted ferrod
    /// keeps the job's record, not the VMM's numbers).
    outgoing: Mutex<HashMap<String, Outgoing>>,
}

fn failed(e: Error) -> JobError {
    JobError::Failed(e.message)
}

impl Migrations {
    pub fn open(jobs: Arc<Jobs>, domains: Arc<Domains>, snapshots: Arc<Snapshots>, backups: Arc<Backups>, events: Arc<EventHub>) -> Arc<Migrations> {
        Arc::new(Migrations { jobs, domains, snapshots, backups, events, outgoing: Mutex::new(HashMap::new()) })
    }

    fn outgoing(&self) -> std::sync::MutexGuard<'_, HashMap<String, Outgoing>> {
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts migrating a running or paused domain (a job). The destination is asked who we are
    /// first, so a wrong CA or token is refused here, before anything moves.
    pub async fn migrate(self: &Arc<Self>, name: &str, req: MigrateRequest) -> Result<Arc<Job>> {
        let info = self.domains.info(name)?;
        if !info.state.is_active() {
            return Err(Error::conflict(format!("domain {name} is {}: only a running or paused domain migrates; start it first", info.state.word())));
        }
        if let Some(o) = self.outgoing().get(name).filter(|o| o.job.info().state == JobState::Running) {
            return Err(Error::conflict(format!("domain {name} is already migrating (job {}); see `ferro domjobinfo {name}`", o.job.info().id)));
        }
        let peer = peer::Peer::new(&req.destination, req.dest_ca.as_deref(), &req.dest_token)?;
        let session = peer.call("GET", "/v1/session", None).await?;
        if session["role"] != "admin" {
            return Err(Error::conflict(format!(
                "the destination ferrod at {} lets this token only read (role {}); a migration needs an admin token",
                peer.shown(),
                session["role"]
            )));
        }
        let new = NewJob {
            kind: "migrate",
            source: name.to_string(),
            target: format!("{}/{name}", req.destination),
            unit: ProgressUnit::Bytes,
            scratch_files: Vec::new(),
            uses: Vec::new(),
        };
        let (this, domain, destination, live) = (self.clone(), name.to_string(), req.destination.clone(), req.live);
        // The record goes in before the work can report progress into it.
        let mut outgoing = self.outgoing();
        let job = self.jobs.start(new, move |ctx| async move { this.send(&ctx, &domain, &req, &peer).await })?;
        outgoing.insert(name.to_string(), Outgoing { job: job.clone(), destination, live, progress: None, result: None });
        Ok(job)
    }

    /// The domain's last outgoing migration: running, or how it ended.
    pub fn last(&self, name: &str) -> Result<MigrationJobInfo> {
        let outgoing = self.outgoing();
        let o = outgoing.get(name).ok_or_else(|| Error::not_found(format!("domain {name} has not been migrated by this ferrod")))?;
        Ok(MigrationJobInfo {
            domain: name.to_string(),
            destination: o.destination.clone(),
            live: o.live,
            job: o.job.info(),
            progress: o.progress.clone(),
            result: o.result.clone(),
        })
    }

    /// The job's work: pauses the guest first when the move is not live, carries the migration,
    /// and takes care of the source domain afterwards.
    async fn send(&self, ctx: &JobContext, name: &str, req: &MigrateRequest, peer: &peer::Peer) -> std::result::Result<(), JobError> {
        let definition = self.domains.definition(name).map_err(failed)?;
        let (config, disks) = self.domains.disk_files(name).map_err(failed)?;
        let disks: Vec<_> = disks.into_iter().take(config.disks.len()).map(|(path, _)| path).collect();
        let markers = storage::Markers::place(&disks).map_err(failed)?;
        let paused_here = !req.live && self.domains.info(name).map_err(failed)?.state == DomainState::Running;
        if paused_here {
            self.domains.suspend(name).await.map_err(failed)?;
        }
        let carried = self.carry(ctx, name, req, peer, &definition, markers).await;
        let reply = match carried {
            Ok(reply) => reply,
            Err(e) => {
                if paused_here && let Err(r) = self.domains.resume(name).await {
                    tracing::warn!(domain = name, "the guest paused for the migration did not resume: {r}");
                }
                return Err(e);
            }
        };
        let mut notes = Vec::new();
        if paused_here && let Err(e) = peer.call("POST", &format!("/v1/domains/{name}/resume"), None).await {
            notes.push(format!("the guest stays paused on the destination: {e}"));
        }
        self.wait_source_off(name).await;
        if req.undefine_source {
            let undefined = self.snapshots.undefine_domain(name, SnapshotsOnUndefine::Refuse).await.and_then(|()| self.backups.forget_domain(name));
            if let Err(e) = undefined {
                notes.push(format!("the source's definition stays: {e}"));
            }
        }
        let result = MigrationResult {
            downtime_ms: reply.downtime_us as f64 / 1000.0,
            total_ms: reply.total_ms,
            transferred_bytes: reply.transferred_bytes,
            iterations: reply.iterations,
        };
        let detail = format!(
            "to {} (downtime {:.3} ms, total {} ms, {} bytes in {} iterations){}",
            req.destination,
            result.downtime_ms,
            result.total_ms,
            result.transferred_bytes,
            result.iterations,
            notes.iter().map(|n| format!("; {n}")).collect::<String>()
        );
        if let Some(o) = self.outgoing().get_mut(name) {
            o.result = Some(result);
        }
        self.events.emit("domain", name, "migrated", detail);
        Ok(())
    }

    /// Asks the destination for the incoming migration and relays the VMM's stream to it while
    /// the VMM's `migrate_send` runs; returns the VMM's numbers once the guest runs there.
    async fn carry(
        &self,
        ctx: &JobContext,
        name: &str,
        req: &MigrateRequest,
        peer: &peer::Peer,
        definition: &str,
        markers: storage::Markers,
    ) -> std::result::Result<MigrateReply, JobError> {
        let files = self.domains.run_files(name).map_err(failed)?;
        let relay_socket = files.outgoing_socket();
        let _ = std::fs::remove_file(&relay_socket);
        let listener = UnixListener::bind(&relay_socket)
            .map_err(|e| JobError::Failed(format!("cannot listen on {}: {e}", relay_socket.display())))?;
        let body = serde_json::json!({ "definition": definition, "disks": markers.claims });
        let link = peer.upgrade("/v1/migrations/incoming", &body).await;
        drop(markers);
        let link = match link {
            Ok(link) => link,
            Err(e) => {
                let _ = std::fs::remove_file(&relay_socket);
                return Err(failed(e));
            }
        };
        let relay = tokio::spawn(async move {
            if let Ok(Ok((vmm, _))) = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()).await {
                relay(vmm, link).await;
            }
        });
        let api = files.api_socket();
        let request = Request::MigrateSend {
            to: format!("unix:{}", relay_socket.display()),
            max_downtime_ms: req.max_downtime_ms,
            bandwidth_mib: req.bandwidth_mib,
            auto_converge: req.auto_converge,
        };
        let send = vmm::call::<MigrateReply>(&api, &request, SEND_TIMEOUT);
        tokio::pin!(send);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut stop = None;
        let sent = loop {
            tokio::select! {
                sent = &mut send => break sent,
                _ = tick.tick() => {
                    if let Ok(progress) = vmm::call::<MigrationInfo>(&api, &Request::MigrateInfo, VMM_TIMEOUT).await {
                        ctx.set_progress(progress.transferred_bytes, progress.transferred_bytes + progress.remaining_bytes);
                        if let Some(o) = self.outgoing().get_mut(name) {
                            o.progress = Some(progress);
                        }
                    }
                    if stop.is_none() && let Err(why) = ctx.check_stop() {
                        if let Err(e) = vmm::call::<Done>(&api, &Request::MigrateCancel, VMM_TIMEOUT).await {
                            tracing::warn!(domain = name, "cannot cancel the migration: {e}");
                        }
                        stop = Some(why);
                    }
                }
            }
        };
        relay.abort();
        let _ = std::fs::remove_file(&relay_socket);
        if let Ok(progress) = vmm::call::<MigrationInfo>(&api, &Request::MigrateInfo, VMM_TIMEOUT).await
            && let Some(o) = self.outgoing().get_mut(name)
        {
            o.progress = Some(progress);
        }
        match (sent, stop) {
            (Ok(reply), _) => {
                ctx.set_progress(reply.transferred_bytes, reply.transferred_bytes);
                Ok(reply)
            }
            (Err(_), Some(why)) => Err(why),
            (Err(e), None) => Err(JobError::Failed(e)),
        }
    }

    /// Waits until the source's monitor recorded its VMM's exit (`migrated`), so that whoever
    /// hears the job completed finds the domain shut off here.
    async fn wait_source_off(&self, name: &str) {
        let deadline = Instant::now() + SOURCE_STOP_WAIT;
        while self.domains.info(name).is_ok_and(|i| i.state.is_active()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The destination's side of a migration request: defines the domain (the name must be
    /// free here), checks its disks are the source's (`disks`, see `storage`), starts its VMM
    /// waiting for the VM and returns the connection to it. On failure nothing is left here.
    pub async fn incoming(&self, definition: &str, disks: &[DiskClaim]) -> Result<(String, UnixStream)> {
        let info = self.domains.define_new(definition).await?;
        let name = info.name;
        match self.prepare_incoming(&name, disks).await {
            Ok(stream) => Ok((name, stream)),
            Err(e) => {
                self.abandon_incoming(&name).await;
                Err(e)
            }
        }
    }

    async fn prepare_incoming(&self, name: &str, claims: &[DiskClaim]) -> Result<UnixStream> {
        let (config, disks) = self.domains.disk_files(name)?;
        let disks: Vec<_> = disks.into_iter().take(config.disks.len()).map(|(path, _)| path).collect();
        let claims = claims.to_vec();
        tokio::task::spawn_blocking(move || storage::check(&disks, &claims))
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("the disk check failed: {e}"))))?;
        let socket = self.domains.start_incoming(name).await?;
        UnixStream::connect(&socket).await.map_err(|e| Error::vmm(format!("domain {name}: cannot connect to the waiting VMM: {e}")))
    }

    /// Relays the migration stream from the source (`link`) to the waiting VMM until it ends;
    /// then the VM has arrived, or the domain is removed again.
    pub async fn carry_incoming<L: AsyncRead + AsyncWrite + Unpin>(&self, name: &str, link: L, vmm: UnixStream) {
        relay(vmm, link).await;
        match self.domains.incoming_arrived(name).await {
            Ok(info) => tracing::info!(domain = name, state = info.state.name(), "migrated in"),
            Err(e) => {
                tracing::warn!(domain = name, "incoming migration failed: {e}");
                self.abandon_incoming(name).await;
            }
        }
    }

    /// Removes a domain whose incoming migration failed: its VMM (if any) and its definition.
    pub async fn abandon_incoming(&self, name: &str) {
        if self.domains.info(name).is_ok_and(|i| i.state.is_active())
            && let Err(e) = self.domains.destroy(name).await
        {
            tracing::warn!(domain = name, "cannot stop the VMM of a failed incoming migration: {e}");
        }
        match self.domains.undefine(name).await {
            Ok(()) => self.events.emit("domain", name, "migration_abandoned", "the incoming migration failed; nothing was kept"),
            Err(e) => tracing::warn!(domain = name, "cannot remove the definition of a failed incoming migration: {e}"),
        }
    }
}

/// Carries bytes both ways between `a` and `b`. Ends when both directions ended, or when one
/// did and the other has not within `LINGER` (a peer that went away without closing).
async fn relay<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, mut aw) = tokio::io::split(a);
    let (br, mut bw) = tokio::io::split(b);
    let mut ar = tokio::io::BufReader::with_capacity(256 << 10, ar);
    let mut br = tokio::io::BufReader::with_capacity(256 << 10, br);
    let there = async {
        let _ = tokio::io::copy_buf(&mut ar, &mut bw).await;
        let _ = bw.shutdown().await;
    };
    let back = async {
        let _ = tokio::io::copy_buf(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
    };
    tokio::pin!(there, back);
    tokio::select! {
        () = &mut there => drop(tokio::time::timeout(LINGER, back).await),
        () = &mut back => drop(tokio::time::timeout(LINGER, there).await),
    }
}
