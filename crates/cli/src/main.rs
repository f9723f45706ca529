//! `ferro`: the one command-line entry point of Ferrovisor.
//!
//! `ferro run` boots a VM in the foreground (no daemon), `ferro host-check` validates the host,
//! `ferro img` works on disk images, and the virsh-like verbs talk to `ferrod`.

mod img;
mod manage;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferro", version, about = "Ferrovisor: run and manage KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on disk images (qemu-img compatible verbs).
    Img(img::ImgArgs),
    #[command(flatten)]
    Manage(manage::ManageCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Img(args) => img::run(args),
        Command::Manage(cmd) => manage::run(cmd),
    }
}
