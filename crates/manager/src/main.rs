//! `ferrod`: the management daemon. `ferrod monitor ...` is the per-VM monitor it starts.

use clap::{Parser, Subcommand};
use ferro_manager::access::Peer;
use ferro_manager::config::{FileConfig, check_log_filter};
use ferro_manager::daemon::Services;
use ferro_manager::domains::DEFAULT_OVERCOMMIT_RATIO;
use ferro_manager::listen::ListenArgs;
use ferro_manager::model::{Confinement, Jailer, Paths};
use ferro_manager::notify::Notifier;
use ferro_manager::{DEFAULT_HOME, DEFAULT_JAIL_USER, api, listen, monitor, socket_for_home};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ferrod",
    version = ferro_version::VERSION,
    about = "Ferrovisor management daemon",
    long_about = "Ferrovisor management daemon: keeps domain, pool and network definitions, runs one supervised \
                  VMM process per running domain and serves the REST API that `ferro` uses, on a unix socket \
                  and optionally on TLS listeners. Settings come from /etc/ferrovisor/ferrod.toml (or --config); \
                  flags given here win over the file. Running VMs keep running when ferrod stops or restarts; \
                  the next ferrod takes them over."
)]
struct Cli {
    /// Configuration file (default: /etc/ferrovisor/ferrod.toml if it exists); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration (file and flags: certificates, tokens, socket group) and exit.
    #[arg(long)]
    check_config: bool,
    /// Log filter: error, warn, info, debug, trace, or target=level lists (default: $RUST_LOG,
    /// else the file's log_level, else info).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
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
    /// Refuse to start a domain when the memory committed to running domains (guest RAM minus
    /// balloon targets, plus VMM overhead) would pass this many times the host's RAM.
    /// [default: 1.5, or overcommit_ratio in the configuration file]
    #[arg(long, value_name = "RATIO", value_parser = overcommit_ratio)]
    overcommit_ratio: Option<f64>,
    /// Run VMMs without their seccomp filters (to tell whether a VMM that dies of SIGSYS needs a
    /// call its allowlist lacks; docs/isolation.md). By default every VMM runs under them.
    #[arg(long)]
    no_seccomp: bool,
    /// Run VMMs unjailed: as root, in the host's namespaces and file system (docs/isolation.md).
    /// By default each VMM runs in a jail of its own as the VMM user.
    #[arg(long)]
    no_jail: bool,
    /// The unprivileged user jailed VMMs run as (default: jail_user in the file, else ferro-vmm).
    #[arg(long, value_name = "USER")]
    jail_user: Option<String>,
    /// Files named by domain definitions (disks, kernel, initrd) must lie under DIR or a pool's
    /// directory (repeatable; default: allowed_image_paths in the file, else anywhere).
    #[arg(long = "allow-path", value_name = "DIR", value_parser = absolute_dir)]
    allow_paths: Vec<PathBuf>,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write the man page ferrod.8 into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
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
        /// Arguments for the VMM's first run only (a snapshot restore: a guest reset later
        /// boots the VM afresh). Repeatable.
        #[arg(long, allow_hyphen_values = true)]
        first_run_arg: Vec<String>,
        /// The jail to run the VMM in (a `ferro_jail::jail::JailSpec` as JSON).
        #[arg(long)]
        jail: Option<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Monitor { exit_report, log, stderr, socket, first_run_arg, jail, command }) => {
            let args = monitor::MonitorArgs { exit_report, log, stderr, sockets: socket, command, first_run_args: first_run_arg, jail };
            return monitor::run(args);
        }
        Some(Command::Man { dir }) => return write_man_page(&dir),
        None => {}
    }
    // SAFETY: no thread has been started yet.
    let notifier = unsafe { Notifier::from_env() };
    let started = notifier.and_then(|notifier| {
        let settings = Settings::new(cli)?;
        if settings.check_only {
            settings.check()?;
            println!("ferrod: the configuration is valid ({})", settings.source);
            return Ok(());
        }
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log_filter))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
        serve(settings, notifier)
    });
    match started {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrod: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What ferrod runs with: the flags, over the configuration file, over the defaults.
struct Settings {
    home: PathBuf,
    socket: PathBuf,
    ferro_bin: Option<PathBuf>,
    default_network: bool,
    overcommit_ratio: f64,
    confinement: Confinement,
    /// The user VMMs run as in their jails; None: unjailed.
    jail_user: Option<String>,
    log_filter: String,
    listen: ListenArgs,
    check_only: bool,
    /// Where the settings came from, for messages.
    source: String,
}

impl Settings {
    fn new(cli: Cli) -> Result<Settings, String> {
        let (file, path) = FileConfig::load(cli.config.as_deref())?;
        let source = match &path {
            Some(path) => format!("file {} and flags", path.display()),
            None => format!("no file at {}: flags and defaults", ferro_manager::config::DEFAULT_CONFIG),
        };
        // The socket is in a home named by flag or $FERRO_HOME (where `ferro` looks with the same
        // $FERRO_HOME), else at its system-wide place, where `ferro` looks by default.
        let socket = cli.socket.or(file.socket).unwrap_or_else(|| socket_for_home(cli.home.as_deref()));
        let home = cli.home.or(file.home);
        let log_filter = match (cli.log_level, std::env::var("RUST_LOG")) {
            (Some(level), _) => level,
            (None, Ok(level)) if !level.is_empty() => level,
            _ => file.log_level.unwrap_or_else(|| "info".into()),
        };
        check_log_filter(&log_filter)?;
        let mut listen = cli.listen;
        if listen.listen.is_empty() {
            listen.listen = file.listen.addresses;
        }
        listen.tls_cert = listen.tls_cert.or(file.listen.tls_cert);
        listen.tls_key = listen.tls_key.or(file.listen.tls_key);
        listen.token_file = listen.token_file.or(file.listen.token_file);
        listen.insecure |= file.listen.insecure;
        listen.no_auth |= file.listen.no_auth;
        listen.socket_group = listen.socket_group.or(file.socket_group);
        Ok(Settings {
            home: home.unwrap_or_else(|| PathBuf::from(DEFAULT_HOME)),
            socket,
            ferro_bin: cli.ferro_bin.or(file.ferro_bin),
            default_network: !cli.no_default_network && file.default_network.unwrap_or(true),
            overcommit_ratio: cli.overcommit_ratio.or(file.overcommit_ratio).unwrap_or(DEFAULT_OVERCOMMIT_RATIO),
            confinement: Confinement {
                seccomp: !cli.no_seccomp && file.seccomp.unwrap_or(true),
                // Known once the VMM program is (`serve`).
                jail: None,
                allowed_paths: if cli.allow_paths.is_empty() { file.allowed_image_paths.unwrap_or_default() } else { cli.allow_paths },
            },
            jail_user: (!cli.no_jail && file.jail.unwrap_or(true))
                .then(|| cli.jail_user.or(file.jail_user).unwrap_or_else(|| DEFAULT_JAIL_USER.to_string())),
            log_filter,
            listen,
            check_only: cli.check_config,
            source,
        })
    }

    /// What `--check-config` checks beyond the file's syntax: the listeners with their
    /// certificate, key and tokens, and the socket's group.
    fn check(&self) -> Result<(), String> {
        self.listen.plan()?;
        listen::socket_group(self.listen.socket_group.as_deref()).map(drop)
    }
}

fn serve(settings: Settings, notifier: Notifier) -> Result<(), String> {
    let Settings { home, socket, ferro_bin, default_network, overcommit_ratio, mut confinement, jail_user, listen: listen_args, .. } = settings;
    if !confinement.seccomp {
        tracing::warn!("VMMs run without seccomp filters (--no-seccomp or seccomp = false)");
    }
    let self_exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let ferro_bin = ferro_bin.unwrap_or_else(|| self_exe.with_file_name("ferro"));
    confinement.jail = jail_user.map(|user| Jailer::new(&user, &ferro_bin)).transpose()?;
    if confinement.jail.is_none() {
        tracing::warn!("VMMs run unjailed, as root in the host's file system (--no-jail or jail = false)");
    }
    let tcp = listen_args.plan()?;
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
        let services = Services::open(paths.clone(), overcommit_ratio, confinement)?;
        let tcp_servers = tcp.bind().await?;
        let listener = listen::bind_unix(&paths.socket, listen_args.socket_group.as_deref())?;
        services.recover(default_network).await;
        tracing::info!(socket = %paths.socket.display(), home = %paths.home.display(), "ferrod ready");
        notifier.send("READY=1");
        ferro_manager::crashpoint::arm();
        let app = api::router(services.clone(), tcp.access.clone());
        let tcp_tasks: Vec<_> = tcp_servers.into_iter().map(|server| server.spawn(app.clone())).collect();
        let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let stopping_notifier = notifier.clone();
        let app = app.into_make_service_with_connect_info::<Peer>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal(signals).await;
            stopping_notifier.send("STOPPING=1");
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

fn write_man_page(dir: &std::path::Path) -> ExitCode {
    let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
    match page.generate_to(dir) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrod man: cannot write the page into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// `--allow-path`: an absolute directory (ferrod runs from `/` as a service).
fn absolute_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.is_absolute() { Ok(path) } else { Err(format!("{text} is a relative path; give an absolute one")) }
}

/// `--overcommit-ratio`: a positive number such as 1.5.
fn overcommit_ratio(text: &str) -> Result<f64, String> {
    text.parse::<f64>().map_err(|_| format!("'{text}' is not a number such as 1.5")).and_then(ferro_manager::config::check_overcommit_ratio)
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
