//! `ferro`: the one command-line entry point of Ferrovisor.
//!
//! `ferro run` boots a VM in the foreground (no daemon), `ferro host-check` validates the host,
//! `ferro img` works on disk images, and the virsh-like verbs talk to `ferrod`.

mod host_check;
mod img;
mod manage;
mod run;
mod test_guest;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferro", version = ferro_version::VERSION, about = "Ferrovisor: run and manage KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connect: manage::Connect,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM in the foreground with its serial console on this terminal (no daemon).
    Run(run::RunArgs),
    /// Run one VM as a supervised process with control and console sockets (used by ferrod).
    #[command(hide = true)]
    Vmm(run::VmmArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout. The script
    /// asks ferro for each completion, so names of domains, pools and networks come from ferrod.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (ferro.1 and ferro-SUBCOMMAND.1 for each subcommand) into DIR.
    #[command(hide = true)]
    Man { dir: std::path::PathBuf },
    /// Check that this host can run VMs, like virt-host-validate.
    HostCheck,
    /// List or export the built-in test guests (PVH ELF files, also bootable by QEMU).
    #[command(hide = true)]
    TestGuest(test_guest::TestGuestArgs),
    /// Work on disk images (qemu-img compatible verbs).
    Img(img::ImgArgs),
    #[command(flatten)]
    Manage(manage::ManageCommand),
}

/// `ferro vmm` alone: ferrod starts one for every VM start, revert and incoming migration, so
/// its arguments are parsed without building the whole CLI (about a millisecond of a restore).
#[derive(Parser)]
#[command(
    name = "vmm",
    bin_name = "ferro vmm",
    version = ferro_version::VERSION,
    about = "Run one VM as a supervised process with control and console sockets (used by ferrod)",
    long_about = None
)]
struct VmmCli {
    #[command(flatten)]
    args: run::VmmArgs,
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "vmm") {
        return run::vmm(VmmCli::parse_from(std::env::args_os().skip(1)).args);
    }
    // A completion request from the script of `ferro completions` (COMPLETE=<shell> in the
    // environment) is answered here and exits.
    clap_complete::CompleteEnv::with_factory(<Cli as clap::CommandFactory>::command).complete();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Vmm(args) => run::vmm(args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            let shells = clap_complete::env::Shells::builtins();
            let Some(completer) = shells.completer(&shell.to_string()) else {
                eprintln!("ferro completions: no dynamic completion for {shell}");
                return ExitCode::FAILURE;
            };
            if let Err(e) = completer.write_registration("COMPLETE", "ferro", "ferro", "ferro", &mut script) {
                eprintln!("ferro completions: {e}");
                return ExitCode::FAILURE;
            }
            // A closed pipe (`| head`) is not an error worth more than the exit status.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Command::Man { dir } => match clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferro man: cannot write the pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        Command::HostCheck => host_check::run(),
        Command::TestGuest(args) => test_guest::run(args),
        Command::Img(args) => img::run(args),
        Command::Manage(cmd) => manage::run(cmd, &cli.connect),
    }
}
