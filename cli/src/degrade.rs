//! `dpir degrade`: seeded Real-ESRGAN-style degradations of images, or HQ/LQ training pairs.
//!
//! `dpir degrade INPUT... -o OUT` writes `OUT/<stem>.png` for every image (folders are expanded
//! to the images they hold); the result depends only on (seed, file name).
//! `dpir degrade --pairs N PHOTO_DIR... -o OUT` writes `OUT/hq/NNNNNN.png` (crop x crop, cut
//! after an antialiased downscale of the photo) and `OUT/lq/NNNNNN.png` (crop / scale);
//! existing complete pairs are kept, so an interrupted run resumes.

use crate::CliResult;
use dpir_degrade::batch::{degrade_files, generate_pairs, list_images, PairOptions};
use dpir_degrade::Preset;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Images to degrade, or with --pairs the photos (files or folders) to cut pairs from.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output folder (created if missing).
    #[arg(short = 'o', long = "out", value_name = "OUTDIR")]
    out: PathBuf,
    /// Degradation parameters: standard (Real-ESRGAN) or light (SeeSR/DiT4SR).
    #[arg(long, default_value = "standard", value_parser = ["standard", "light"])]
    preset: String,
    /// Downscale factor between HQ and LQ.
    #[arg(long, default_value = "4", value_parser = ["1", "2", "4"])]
    scale: String,
    /// Random seed; the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate this many random HQ/LQ training pairs from the input photos.
    #[arg(long, value_name = "N")]
    pairs: Option<usize>,
    /// HQ crop side in pixels (pair mode).
    #[arg(long, default_value_t = 256, requires = "pairs")]
    crop: usize,
    /// Antialiased downscale of each photo before cropping (pair mode; 1 = none).
    #[arg(long, default_value_t = 2.0, requires = "pairs")]
    downscale: f64,
}

/// How often pair mode reports progress.
const PROGRESS_EVERY: usize = 200;

pub fn run(args: Args) -> CliResult {
    let preset: Preset = args.preset.parse()?;
    let scale: usize = args
        .scale
        .parse()
        .map_err(|_| format!("invalid --scale {}", args.scale))?;
    let cfg = preset.config();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;

    let (files, list_errors) = list_images(&args.inputs);
    for e in &list_errors {
        eprintln!("error: {e}");
    }

    if let Some(count) = args.pairs {
        let opts = PairOptions {
            count,
            crop: args.crop,
            downscale: args.downscale,
            scale,
            seed: args.seed,
            config: cfg,
        };
        let start = Instant::now();
        let progress = |done: usize, total: usize| {
            let s = start.elapsed().as_secs_f64();
            eprintln!("degrade: {done}/{total} pairs ({s:.1} s)");
        };
        let summary = generate_pairs(&files, &args.out, &opts, PROGRESS_EVERY, &progress)?;
        for f in &summary.failures {
            eprintln!("error: {f}");
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{} pairs written, {} already present, from {} photos ({} too small) into {} in {secs:.1} s",
            summary.written,
            summary.already_present,
            summary.photos_used,
            summary.photos_too_small,
            args.out.display()
        );
        let failed = list_errors.len() + summary.failures.len();
        if failed > 0 {
            return Err(format!("{failed} failures while generating pairs (see above)").into());
        }
        return Ok(());
    }

    if files.is_empty() {
        return Err("no input images".into());
    }
    let mut stems = HashSet::new();
    for f in &files {
        let stem = f.file_stem().map(|s| s.to_os_string()).unwrap_or_default();
        if !stems.insert(stem) {
            return Err(format!(
                "{}: another input has the same file stem, outputs would collide",
                f.display()
            )
            .into());
        }
    }
    let results = degrade_files(&files, &args.out, &cfg, scale, args.seed);
    let mut failed = list_errors.len();
    let mut written = 0;
    for (_, r) in &results {
        match r {
            Ok(_) => written += 1,
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    println!("{written} LQ images written into {}", args.out.display());
    if failed > 0 {
        return Err(format!(
            "{failed} of {} inputs failed",
            files.len() + list_errors.len()
        )
        .into());
    }
    Ok(())
}
