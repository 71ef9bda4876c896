//! `dpir`: restore images with DPIR, inspect checkpoints, make degraded pairs, benchmark.
//!
//! Every failure prints one line (`error: …`) and exits non-zero; nothing panics on user input.

mod bench;
mod bench_restore;
mod degrade;
mod inspect;
mod metrics;
mod restore;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "dpir",
    version,
    about = "DPIR image restoration on one GPU or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the components, layouts, dtypes and sizes of checkpoints.
    Inspect(inspect::Args),
    /// Restore low-quality images.
    Restore(restore::Args),
    /// Make seeded degraded (LQ) versions of images.
    Degrade(degrade::Args),
    /// Benchmark ops, a sampling step and a full restore.
    Bench(bench::Args),
    /// Per-kernel breakdown of one sampling step.
    Profile(bench::ProfileArgs),
    /// PSNR and SSIM (Y channel) of images against a reference.
    Compare(metrics::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() {
                // clap's rendering spans several lines; keep the one that names the problem.
                let text = e.render().to_string();
                let line = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("error");
                eprintln!("{}", line.trim_end());
                return ExitCode::from(2);
            }
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.cmd {
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Restore(a) => restore::run(a),
        Cmd::Degrade(a) => degrade::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Profile(a) => bench::profile(a),
        Cmd::Compare(a) => metrics::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.to_string();
            eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
            ExitCode::FAILURE
        }
    }
}
