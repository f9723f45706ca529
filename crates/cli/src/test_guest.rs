//! `ferro test-guest`: list the built-in test guests or write one to a file (for QEMU peers).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct TestGuestArgs {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Print the names of the built-in guests.
    List,
    /// Write guest NAME to FILE.
    Write { name: String, file: PathBuf },
}

pub fn run(args: TestGuestArgs) -> ExitCode {
    match args.cmd {
        Cmd::List => {
            for n in ferro_guests::names() {
                println!("{n}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Write { name, file } => {
            let Some(image) = ferro_guests::get(&name) else {
                eprintln!("ferro: no built-in guest named '{name}'");
                return ExitCode::from(2);
            };
            match std::fs::write(&file, image) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferro: {}: {e}", file.display());
                    ExitCode::from(2)
                }
            }
        }
    }
}
