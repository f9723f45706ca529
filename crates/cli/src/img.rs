//! `ferro img`: placeholder until the block layer lands.
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ImgArgs {}

pub fn run(_args: ImgArgs) -> ExitCode {
    eprintln!("ferro img: not built yet");
    ExitCode::FAILURE
}
