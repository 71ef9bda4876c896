//! `dpir bench` and `dpir profile` (placeholder).

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {}

#[derive(clap::Args)]
pub struct ProfileArgs {}

pub fn run(_args: Args) -> CliResult {
    Err("`dpir bench` is not implemented yet".into())
}

pub fn profile(_args: ProfileArgs) -> CliResult {
    Err("`dpir profile` is not implemented yet".into())
}
