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
//! - Offline (a shut-off domain): the same request, but the connection then carries the disks
//!   the destination does not share with the source (`copy`), and no VMM runs.
//!
//! The VMMs enforce "exactly one place" (the destination runs the guest only after `go`, the
//! source resumes on any failure before it) and notice a silent link (30 s timeouts); the relays
//! here only carry bytes, and end when either side ends. The source also cuts a link whose stream
//! has not grown for 20 s, since a write that trickles into socket buffers restarts the VMM's
//! timeout.

mod copy;
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
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
/// How long the migration stream may carry nothing before the source cuts the link.
const LINK_SILENCE: Duration = Duration::from_secs(20);
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
    /// Move a shut-off domain: its definition, and its disks where the destination does not
    /// share them.
    pub offline: bool,
    pub max_downtime_ms: u64,
    pub bandwidth_mib: Option<u64>,
    pub auto_converge: bool,
    /// Copy the writable disks along to new files on the destination (live; virsh's
    /// `--copy-storage-all`) instead of requiring storage both hosts share.
    pub copy_storage: bool,
    /// Remove the source's definition once the guest runs on the destination.
    pub undefine_source: bool,
}

/// The final numbers of a completed migration (`ferro migrate --json`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationResult {
    /// From the source's pause to the destination's word that the guest runs there (0 offline).
    pub downtime_ms: f64,
    pub total_ms: u64,
    /// The VMM's stream, or offline the disks' data copied.
    pub transferred_bytes: u64,
    /// Memory passes (0 offline).
    pub iterations: u32,
}

/// How a domain arrives on the destination.
pub enum Arrival {
    /// Live: the connection to its VMM waiting for the VM, and the disk copies made for it
    /// (removed should it not arrive).
    Live(UnixStream, Vec<PathBuf>),
    /// Offline: the disks to receive, by index in the definition, with where they go and their
    /// size.
    Offline(Vec<(usize, PathBuf, u64)>),
}

/// The longest line the two ferrods exchange on an offline migration's connection.
const MAX_ANSWER: u64 = 64 << 10;

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
        match (info.state.is_active(), req.offline) {
            (false, false) => {
                return Err(Error::conflict(format!(
                    "domain {name} is {}: a live migration moves a running or paused domain (--offline moves a shut-off one)",
                    info.state.word()
                )));
            }
            (true, true) => {
                return Err(Error::conflict(format!("domain {name} is {}: --offline moves a shut-off domain; shut it down first", info.state.word())));
            }
            _ => {}
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
        // Offline, the disks are read while the job runs: nothing may start the domain meanwhile.
        let uses = if req.offline {
            let (config, disks) = self.domains.disk_files(name)?;
            disks.into_iter().take(config.disks.len()).map(|(path, _)| (path, crate::claims::Access::Read)).collect()
        } else {
            Vec::new()
        };
        let new = NewJob {
            kind: "migrate",
            source: name.to_string(),
            target: format!("{}/{name}", req.destination),
            unit: ProgressUnit::Bytes,
            scratch_files: Vec::new(),
            uses,
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

    /// The job's work: the move (live, or offline), then the source domain's end.
    async fn send(&self, ctx: &JobContext, name: &str, req: &MigrateRequest, peer: &peer::Peer) -> std::result::Result<(), JobError> {
        let definition = self.domains.definition(name).map_err(failed)?;
        let (config, disks) = self.domains.disk_files(name).map_err(failed)?;
        let disks: Vec<(PathBuf, ferro_block::Format)> = disks.into_iter().take(config.disks.len()).collect();
        let paths: Vec<PathBuf> = disks.iter().map(|(path, _)| path.clone()).collect();
        let markers = if req.copy_storage {
            let described: Vec<(PathBuf, Option<ferro_block::Format>)> = disks.iter().map(|(path, format)| (path.clone(), Some(*format))).collect();
            storage::Markers::place_described(&described).map_err(failed)?
        } else {
            storage::Markers::place(&paths).map_err(failed)?
        };
        let (result, mut notes) = if req.offline {
            (self.send_offline(ctx, peer, &definition, markers, &disks).await?, Vec::new())
        } else {
            self.send_live(ctx, name, req, peer, &definition, markers).await?
        };
        if req.undefine_source {
            let undefined = self.snapshots.undefine_domain(name, SnapshotsOnUndefine::Refuse).await.and_then(|()| self.backups.forget_domain(name));
            if let Err(e) = undefined {
                notes.push(format!("the source's definition stays: {e}"));
            }
        }
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

    /// A running or paused domain: pauses the guest first when the move is not live, carries the
    /// VMM's stream, and waits for the source domain to be off. Returns the numbers and what did
    /// not go as asked after the guest moved.
    async fn send_live(
        &self,
        ctx: &JobContext,
        name: &str,
        req: &MigrateRequest,
        peer: &peer::Peer,
        definition: &str,
        markers: storage::Markers,
    ) -> std::result::Result<(MigrationResult, Vec<String>), JobError> {
        let paused_here = !req.live && self.domains.info(name).map_err(failed)?.state == DomainState::Running;
        if paused_here {
            self.domains.suspend(name).await.map_err(failed)?;
        }
        let carried = self.carry(ctx, name, req, peer, definition, markers).await;
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
        let result = MigrationResult {
            downtime_ms: reply.downtime_us as f64 / 1000.0,
            total_ms: reply.total_ms,
            transferred_bytes: reply.transferred_bytes,
            iterations: reply.iterations,
        };
        Ok((result, notes))
    }

    /// A shut-off domain: its definition goes over, then the disks the destination asks for.
    async fn send_offline(
        &self,
        ctx: &JobContext,
        peer: &peer::Peer,
        definition: &str,
        markers: storage::Markers,
        disks: &[(PathBuf, ferro_block::Format)],
    ) -> std::result::Result<MigrationResult, JobError> {
        let started = Instant::now();
        let body = serde_json::json!({ "definition": definition, "disks": markers.claims, "offline": true });
        let sizes: Vec<u64> = markers.claims.iter().map(|c| c.size).collect();
        let link = peer.upgrade("/v1/migrations/incoming", &body).await.map_err(failed)?;
        drop(markers);
        let mut link = tokio::io::BufReader::new(link);
        let wanted = read_answer(&mut link).await?;
        let copies: Vec<usize> = wanted["copy"]
            .as_array()
            .map(|list| list.iter().filter_map(|i| i.as_u64().map(|i| i as usize)).filter(|i| *i < disks.len()).collect())
            .ok_or_else(|| JobError::Failed(format!("the destination sent {wanted} where the disks to copy were due")))?;
        ctx.set_total(copies.iter().map(|i| sizes[*i]).sum());
        let sent = std::sync::atomic::AtomicU64::new(0);
        for i in copies {
            let (path, format) = &disks[i];
            let keep_going = |n: u64| {
                sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                ctx.advance(n);
                ctx.check_stop().is_ok()
            };
            if let Err(e) = copy::send_disk(i, path, *format, &mut link, keep_going).await {
                ctx.check_stop()?;
                return Err(failed(e));
            }
        }
        link.flush().await.map_err(|e| JobError::Failed(format!("the link to the destination: {e}")))?;
        read_answer(&mut link).await?;
        Ok(MigrationResult { downtime_ms: 0.0, total_ms: started.elapsed().as_millis() as u64, transferred_bytes: sent.into_inner(), iterations: 0 })
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
            .and_then(|listener| files.give_to_vmm(&relay_socket).map(|()| listener))
            .map_err(|e| JobError::Failed(format!("cannot listen on {}: {e}", relay_socket.display())))?;
        let body = serde_json::json!({ "definition": definition, "disks": markers.claims, "copy_storage": req.copy_storage });
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
            copy_storage: req.copy_storage,
        };
        let send = vmm::call::<MigrateReply>(&api, &request, SEND_TIMEOUT);
        tokio::pin!(send);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut stop = None;
        // The stream's last growth: a link that carries nothing for LINK_SILENCE is cut here, so
        // the VMM fails at once instead of after its socket timeouts (which restart whenever a
        // write moves a few bytes into a buffer).
        let mut moved = (0, Instant::now());
        let mut silent = false;
        let sent = loop {
            tokio::select! {
                sent = &mut send => break sent,
                _ = tick.tick() => {
                    if let Ok(progress) = vmm::call::<MigrationInfo>(&api, &Request::MigrateInfo, VMM_TIMEOUT).await {
                        ctx.set_progress(progress.transferred_bytes, progress.transferred_bytes + progress.remaining_bytes);
                        if progress.transferred_bytes != moved.0 {
                            moved = (progress.transferred_bytes, Instant::now());
                        } else if !silent && moved.1.elapsed() > LINK_SILENCE {
                            tracing::warn!(domain = name, "the migration stream moved nothing for {} s: cutting the link", LINK_SILENCE.as_secs());
                            relay.abort();
                            silent = true;
                        }
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
            (Err(e), None) if silent => Err(JobError::Failed(format!("the link to the destination carried nothing for {} s: {e}", LINK_SILENCE.as_secs()))),
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
    /// free here) and locates its disks against the source's (`disks`, see `storage`). Live: all
    /// must be the source's (with `copy_storage` the writable ones are created here, empty, and
    /// the stream fills them); its VMM is started waiting for the VM. Offline: the disks missing
    /// here are to be received. On failure nothing is left here.
    pub async fn incoming(&self, definition: &str, disks: &[DiskClaim], offline: bool, copy_storage: bool) -> Result<(String, Arrival)> {
        let info = self.domains.define_new(definition).await?;
        let name = info.name;
        match self.prepare_incoming(&name, disks, offline, copy_storage).await {
            Ok(arrival) => Ok((name, arrival)),
            Err(e) => {
                self.abandon_incoming(&name, &[]).await;
                Err(e)
            }
        }
    }

    async fn prepare_incoming(&self, name: &str, claims: &[DiskClaim], offline: bool, copy_storage: bool) -> Result<Arrival> {
        let config = self.domains.info(name)?.config.ok_or_else(|| Error::invalid(format!("domain {name}: the definition is invalid")))?;
        let disks = self.domains.disk_places(&config)?;
        let claims = claims.to_vec();
        if offline {
            let (places, disks) = tokio::task::spawn_blocking(move || storage::locate(&disks, &claims).map(|p| (p, disks, claims)))
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("the disk check failed: {e}"))))
                .map(|(places, disks, claims)| (places, disks.into_iter().zip(claims).collect::<Vec<_>>()))?;
            let mut copies = Vec::new();
            for (i, (place, (path, claim))) in places.into_iter().zip(disks).enumerate() {
                if place == storage::Place::Absent {
                    if !path.parent().is_some_and(Path::is_dir) {
                        return Err(Error::conflict(format!("disk[{i}] {}: its directory does not exist here", path.display())));
                    }
                    copies.push((i, path, claim.size));
                }
            }
            return Ok(Arrival::Offline(copies));
        }
        let readonly: Vec<bool> = config.disks.iter().map(|d| d.readonly).collect();
        let created = tokio::task::spawn_blocking(move || {
            if copy_storage { storage::create_copies(&disks, &readonly, &claims) } else { storage::check(&disks, &claims).map(|()| Vec::new()) }
        })
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("the disk check failed: {e}"))))?;
        match self.start_incoming_vmm(name).await {
            Ok(vmm) => Ok(Arrival::Live(vmm, created)),
            Err(e) => {
                for file in &created {
                    let _ = std::fs::remove_file(file);
                }
                Err(e)
            }
        }
    }

    /// Starts the domain's VMM waiting for the VM and connects to it.
    async fn start_incoming_vmm(&self, name: &str) -> Result<UnixStream> {
        let socket = self.domains.start_incoming(name).await?;
        // The VMM renames the socket into place once it listens, so the first connect normally
        // gets through; a refusal (a VMM still starting over a stale file) is retried for a
        // while (the first connection that gets through is the migration's own; the VMM takes
        // one).
        let deadline = Instant::now() + Duration::from_secs(5);
        let vmm = loop {
            match crate::vmm::connect(&socket).await {
                Ok(vmm) => break vmm,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(Error::vmm(format!("domain {name}: cannot connect to the waiting VMM: {e}"))),
            }
        };
        Ok(vmm)
    }

    /// Carries the arrival over the upgraded connection `link`: relays a live one to its VMM,
    /// receives an offline one's disks.
    pub async fn arrive<L: AsyncRead + AsyncWrite + Unpin>(&self, name: &str, link: L, arrival: Arrival) {
        match arrival {
            Arrival::Live(vmm, copies) => self.carry_incoming(name, link, vmm, &copies).await,
            Arrival::Offline(copies) => self.receive_offline(name, link, copies).await,
        }
    }

    /// Tells the source which disks to send, receives them and answers; on any failure the copies
    /// made and the definition go again.
    async fn receive_offline<L: AsyncRead + AsyncWrite + Unpin>(&self, name: &str, link: L, copies: Vec<(usize, PathBuf, u64)>) {
        let mut link = tokio::io::BufReader::new(link);
        let wanted = serde_json::json!({ "copy": copies.iter().map(|(i, _, _)| i).collect::<Vec<_>>() });
        let mut placed = Vec::new();
        let mut received = write_line(&mut link, &wanted.to_string()).await;
        for (i, path, size) in &copies {
            if received.is_err() {
                break;
            }
            received = copy::receive_disk(*i, &mut link, path, *size).await;
            if received.is_ok() {
                placed.push(path.clone());
            }
        }
        let answer = match &received {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(e) => serde_json::json!({ "ok": false, "error": e.message }),
        };
        let _ = write_line(&mut link, &answer.to_string()).await;
        match received {
            Ok(()) => self.events.emit("domain", name, "migrated_in", format!("offline, {} disk(s) copied", copies.len())),
            Err(e) => {
                tracing::warn!(domain = name, "offline migration failed: {e}");
                self.abandon_incoming(name, &placed).await;
            }
        }
    }

    /// Relays the migration stream from the source (`link`) to the waiting VMM until it ends;
    /// then the VM has arrived, or the domain is removed again (with the disk copies made for it).
    async fn carry_incoming<L: AsyncRead + AsyncWrite + Unpin>(&self, name: &str, link: L, vmm: UnixStream, copies: &[PathBuf]) {
        relay(vmm, link).await;
        match self.domains.incoming_arrived(name).await {
            Ok(info) => tracing::info!(domain = name, state = info.state.name(), "migrated in"),
            Err(e) => {
                tracing::warn!(domain = name, "incoming migration failed: {e}");
                self.abandon_incoming(name, copies).await;
            }
        }
    }

    /// Removes a domain whose incoming migration failed: its VMM (if any), the disks copied for
    /// it (`copied`) and its definition.
    pub async fn abandon_incoming(&self, name: &str, copied: &[PathBuf]) {
        for file in copied {
            let _ = std::fs::remove_file(file);
        }
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

/// Reads one JSON line of the other ferrod: an error answer (`{"ok": false, "error"}`) is the
/// job's failure.
async fn read_answer<R: AsyncBufRead + Unpin>(link: &mut R) -> std::result::Result<serde_json::Value, JobError> {
    let mut line = String::new();
    let read = (&mut *link).take(MAX_ANSWER).read_line(&mut line).await;
    match read {
        Ok(0) => return Err(JobError::Failed("the destination closed the connection without an answer".into())),
        Ok(_) => {}
        Err(e) => return Err(JobError::Failed(format!("the link to the destination: {e}"))),
    }
    let value: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| JobError::Failed(format!("the destination's answer is not JSON ({e})")))?;
    if value["ok"] == false {
        return Err(JobError::Failed(format!("the destination refused: {}", value["error"].as_str().unwrap_or("no reason given"))));
    }
    Ok(value)
}

/// Writes one line to the other ferrod.
async fn write_line<W: AsyncWrite + Unpin>(link: &mut W, line: &str) -> Result<()> {
    let io = |e: std::io::Error| Error::conflict(format!("the link to the source: {e}"));
    link.write_all(line.as_bytes()).await.map_err(io)?;
    link.write_all(b"\n").await.map_err(io)?;
    link.flush().await.map_err(io)
}
