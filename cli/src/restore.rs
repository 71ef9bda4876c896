//! `dpir restore` (placeholder).

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> CliResult {
    Err("`dpir restore` is not implemented yet".into())
}
