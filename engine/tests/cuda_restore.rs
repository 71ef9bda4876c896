//! End to end on the GPU: `dpir restore` of a bundled example with the bundled dpir-tiny on
//! the CUDA backend (bf16) against the CPU reference (f32), same weights, same seed.
//! Acceptance: PSNR >= 45 dB between the two restored images, for the one-tile
//! device-resident sampler and for the tiled path (host blend between steps).
//!
//! Without a CUDA driver the test prints "skipped: no CUDA driver" and passes.

mod cuda_common;

use std::path::PathBuf;

use cuda_common::{device, Report};
use dpir_engine::cuda::CudaRestorer;
use dpir_engine::image_io;
use dpir_engine::pipeline::cpu::CpuRestorer;
use dpir_engine::pipeline::{self, RestoreParams};
use dpir_engine::{Error, Tensor};

/// PSNR >= 45 dB on [0, 1] images  <=>  RMSE <= 10^(-45/20): the floor for restores at the
/// default settings (the acceptance criterion).
const MIN_PSNR_DB: f32 = 45.0;
/// From pure noise at CFG, bf16-vs-f32 differences are amplified by every guided Euler step,
/// so that stress case gets a lower floor; its PSNR is printed either way.
const MIN_PSNR_FROM_NOISE_DB: f32 = 35.0;

/// The repo root: the working directory when run from it (the device check does), else
/// the source tree this test was built from.
fn repo_file(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn rmse(a: &Tensor, b: &Tensor) -> f32 {
    if a.shape != b.shape || a.data.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let s: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    (s / a.data.len().max(1) as f64).sqrt() as f32
}

fn psnr(rmse: f32) -> f32 {
    -20.0 * rmse.max(1e-12).log10()
}

#[test]
fn cuda_restore_matches_cpu() {
    let Some(dev) = device("cuda_restore_matches_cpu") else {
        return;
    };
    let model_dir = repo_file("models/dpir-tiny");
    let example = repo_file("examples/canyon-wren.png");
    let mut report = Report::default();
    // Setup failures are FAIL lines too (the device check counts them), not panics.
    let setup = (|| -> Result<_, Error> {
        let load = || dpir_loader::load(std::slice::from_ref(&model_dir));
        let gpu = CudaRestorer::from_model(dev.clone(), &load()?)?;
        let cpu = CpuRestorer::from_model(load()?)?;
        let img = image_io::decode(&example, image_io::DEFAULT_MAX_PIXELS)?;
        Ok((gpu, cpu, img))
    })();
    let (mut gpu, mut cpu, img) = match setup {
        Ok(s) => s,
        Err(e) => {
            report.case("load the bundled model and example", || Err(e));
            report.finish("cuda_restore_matches_cpu");
            return;
        }
    };
    let on = |gpu: bool| {
        if gpu {
            "GPU"
        } else {
            "CPU (config not covered by the GPU kernels)"
        }
    };
    println!(
        "  VAE on the {}, CLIP vision on the {}",
        on(gpu.gpu_vae()),
        on(gpu.gpu_clip())
    );
    let defaults = RestoreParams {
        strength: 0.2,
        ..RestoreParams::default()
    };
    // dpir-tiny's largest tile is 256 px (pos-embed 16, patch 2): ×2 of the 128-px example
    // is one tile (the device-resident sampler, CUDA graph), ×4 is 9 tiles (host blend).
    let cases = [
        (
            "x2, one tile, device-resident sampler, default settings",
            1,
            MIN_PSNR_DB,
            RestoreParams {
                scale: 2,
                ..defaults.clone()
            },
        ),
        (
            "x2, one tile, from pure noise (strength 1, 8 steps)",
            1,
            MIN_PSNR_FROM_NOISE_DB,
            RestoreParams {
                scale: 2,
                strength: 1.0,
                steps: 8,
                ..defaults.clone()
            },
        ),
        (
            "x4, 256-pixel tiles, host blend per step",
            9,
            MIN_PSNR_DB,
            defaults.clone(),
        ),
    ];
    for (name, tiles, min_db, p) in cases {
        let plan = match pipeline::plan(&pipeline::Restorer::dims(&gpu), img.height, img.width, &p)
        {
            Ok(plan) => plan,
            Err(e) => {
                report.case(&format!("plan {name}"), || Err(e));
                continue;
            }
        };
        report.case(
            &format!("restore {name} ({} tiles)", plan.tiles.len()),
            || {
                if plan.tiles.len() != tiles {
                    return Err(Error::Model(format!(
                        "the case needs {tiles} tile(s), the plan has {}",
                        plan.tiles.len()
                    )));
                }
                let want = pipeline::restore(&mut cpu, &img.rgb, &p, None)?;
                let before = dev.allocations();
                let got = pipeline::restore(&mut gpu, &img.rgb, &p, None)?;
                let again = dev.allocations();
                // A second run at the same shape reuses the plan: no new device memory.
                let got2 = pipeline::restore(&mut gpu, &img.rgb, &p, None)?;
                let allocs = dev.allocations() - again;
                let e = rmse(&got, &want);
                println!(
                    "  PSNR GPU vs CPU {:.2} dB (needs >= {min_db}); first run {} device allocations, second {allocs}",
                    psnr(e),
                    again - before
                );
                if got2.data != got.data {
                    return Err(Error::Model(
                        "two GPU restores with the same seed differ".into(),
                    ));
                }
                // The one-tile sampler plans once; the tiled path re-plans when the tile
                // shape changes (edge tiles), so only the former must allocate nothing.
                if plan.tiles.len() == 1 && allocs != 0 {
                    return Err(Error::Model(format!(
                        "second restore at the same shape made {allocs} device allocations"
                    )));
                }
                Ok((e, 10f32.powf(-min_db / 20.0)))
            },
        );
    }
    report.finish("cuda_restore_matches_cpu");
}
