//! `ferrod`: the management daemon. `ferrod monitor ...` is the per-VM monitor it starts.

use clap::{Parser, Subcommand};
use ferro_manager::access::Peer;
use ferro_manager::daemon::Services;
use ferro_manager::listen::ListenArgs;
use ferro_manager::model::Paths;
use ferro_manager::{DEFAULT_HOME, api, listen, monitor, socket_for_home};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferrod", version, about = "Ferrovisor management daemon")]
struct Cli {
    /// State directory (default: $FERRO_HOME, else /var/lib/ferrovisor).
    #[arg(long, env = "FERRO_HOME")]
    home: Option<PathBuf>,
    /// API socket (default: $FERRO_HOME/ferrod.sock, else /run/ferrovisor/ferrod.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The `ferro` binary that runs VMs (default: $FERRO_BIN, else `ferro` next to ferrod).
    #[arg(long, env = "FERRO_BIN")]
    ferro_bin: Option<PathBuf>,
    /// Do not define the `default` NAT network on the first start (ferrod defines it, set to
    /// autostart, unless told not to, as libvirt does).
    #[arg(long)]
    no_default_network: bool,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one VMM and reports how it ended (started by ferrod, not by hand).
    #[command(hide = true)]
    Monitor {
        #[arg(long)]
        exit_report: PathBuf,
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        stderr: PathBuf,
        /// Socket files the VMM creates, removed before each (re)start.
        #[arg(long)]
        socket: Vec<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Monitor { exit_report, log, stderr, socket, command }) = cli.command {
        return monitor::run(monitor::MonitorArgs { exit_report, log, stderr, sockets: socket, command });
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match serve(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrod: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: Cli) -> Result<(), String> {
    let home_given = cli.home.is_some();
    let home = cli.home.unwrap_or_else(|| PathBuf::from(DEFAULT_HOME));
    let socket = cli.socket.unwrap_or_else(|| socket_for_home(home_given.then_some(home.as_path())));
    let self_exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let ferro_bin = cli.ferro_bin.unwrap_or_else(|| self_exe.with_file_name("ferro"));
    let tcp = cli.listen.plan()?;
    std::fs::create_dir_all(&home).map_err(|e| format!("cannot create {}: {e}", home.display()))?;
    let _lock = lock_home(&home)?;
    let paths = Paths {
        db: home.join("ferrod.db"),
        run: home.join("run"),
        home,
        socket,
        ferro_bin,
        monitor_bin: self_exe,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        // Before the socket exists: a client that sees it may send SIGTERM at once.
        let signals = shutdown_signals()?;
        let services = Services::open(paths.clone())?;
        let tcp_servers = tcp.bind().await?;
        let listener = listen::bind_unix(&paths.socket, cli.listen.socket_group.as_deref())?;
        services.recover(!cli.no_default_network).await;
        tracing::info!(socket = %paths.socket.display(), home = %paths.home.display(), "ferrod ready");
        let app = api::router(services.clone(), tcp.access.clone());
        let tcp_tasks: Vec<_> = tcp_servers.into_iter().map(|server| server.spawn(app.clone())).collect();
        let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let app = app.into_make_service_with_connect_info::<Peer>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal(signals).await;
            signalled.notify_one();
        });
        // Requests in flight get a moment to finish; endless ones (event streams, consoles) do not
        // hold the daemon up.
        let result = tokio::select! {
            r = server.into_future() => r.map_err(|e| format!("serving the API failed: {e}")),
            () = async {
                stopping.notified().await;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            } => Ok(()),
        };
        tcp_tasks.iter().for_each(|task| task.abort());
        let _ = std::fs::remove_file(&paths.socket);
        services.stop().await;
        result
    })
}

/// Takes an exclusive lock on the state directory so that two daemons never share it.
fn lock_home(home: &std::path::Path) -> Result<std::fs::File, String> {
    let path = home.join("ferrod.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!("another ferrod is already using {}", home.display()));
    }
    Ok(file)
}

/// SIGTERM and SIGINT, caught from now on.
fn shutdown_signals() -> Result<[tokio::signal::unix::Signal; 2], String> {
    use tokio::signal::unix::{SignalKind, signal};
    let catch = |kind| signal(kind).map_err(|e| format!("cannot catch signals: {e}"));
    Ok([catch(SignalKind::terminate())?, catch(SignalKind::interrupt())?])
}

async fn shutdown_signal([mut term, mut int]: [tokio::signal::unix::Signal; 2]) {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping; running VMs keep running");
}
