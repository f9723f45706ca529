//! virsh-like verbs that talk to `ferrod`: placeholder until the daemon lands.
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ManageCommand {
    /// List domains.
    List,
}

pub fn run(_cmd: ManageCommand) -> ExitCode {
    eprintln!("ferro: the management daemon is not built yet");
    ExitCode::FAILURE
}
