//! `dpir bench --config dpir-tiny-512|dpir-tiny-1024`: a full DPIR ×4 restore with the bundled
//! model (or `--model`), on the CPU or the GPU, timed per stage.
//!
//! Stages are timed by wrapping the model: every call the pipeline makes into the backend
//! (robust encoder, CLIP prompts, LQ branch, MMDiT velocity or the device-resident sampling
//! loop, VAE decoder) is timed on the wall clock; what remains of the total is the
//! pipeline's own host work (bicubic upscale, tile blending, colour fix). Backends return
//! host tensors, so every timed call ends with the device synchronised.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use dpir_engine::image_io::{self, resize_bicubic};
use dpir_engine::pipeline::{self, Denoiser, ModelDims, RestoreParams, Restorer};
use dpir_engine::{Result, Tensor};
use serde_json::{json, Value};

/// A restorer that times every call into `inner`.
struct Timed<'a> {
    inner: &'a mut dyn Restorer,
    ms: BTreeMap<&'static str, (f64, usize)>,
}

impl Timed<'_> {
    fn time<T>(&mut self, stage: &'static str, f: impl FnOnce(&mut dyn Restorer) -> T) -> T {
        let t0 = Instant::now();
        let out = f(&mut *self.inner);
        let e = self.ms.entry(stage).or_insert((0.0, 0));
        e.0 += t0.elapsed().as_secs_f64() * 1e3;
        e.1 += 1;
        out
    }
}

impl Denoiser for Timed<'_> {
    fn velocity(
        &mut self,
        z: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq_tokens: &Tensor,
    ) -> Result<Tensor> {
        self.time("MMDiT velocity (per tile and step)", |m| {
            m.velocity(z, timestep, y, context, lq_tokens)
        })
    }
}

impl Restorer for Timed<'_> {
    fn dims(&self) -> ModelDims {
        self.inner.dims()
    }
    fn encode_lq(&mut self, image: &Tensor) -> Result<Tensor> {
        self.time("robust VAE encoder", |m| m.encode_lq(image))
    }
    fn decode(&mut self, z: &Tensor) -> Result<Tensor> {
        self.time("VAE decoder", |m| m.decode(z))
    }
    fn lq_tokens(&mut self, z_lq: &Tensor) -> Result<Tensor> {
        self.time("LQ branch", |m| m.lq_tokens(z_lq))
    }
    fn local_prompt(&mut self, region: &Tensor) -> Result<Tensor> {
        self.time("CLIP + local prompt", |m| m.local_prompt(region))
    }
    fn global_prompt(&mut self, image: &Tensor) -> Result<Tensor> {
        self.time("CLIP + global prompt", |m| m.global_prompt(image))
    }
    fn sample_single_tile(
        &mut self,
        z0: &Tensor,
        sigmas: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq_tokens: &Tensor,
        cfg: f32,
    ) -> Result<Option<Tensor>> {
        self.time("sampling loop (on device)", |m| {
            m.sample_single_tile(z0, sigmas, y, context, lq_tokens, cfg)
        })
    }
    fn weight_bytes(&self) -> u64 {
        self.inner.weight_bytes()
    }
    fn plan_bytes(&self, h: usize, w: usize, l: usize, b: usize) -> u64 {
        self.inner.plan_bytes(h, w, l, b)
    }
}

/// The restore configurations: name → LQ input side (output is ×4).
pub fn input_side(config: &str) -> Option<usize> {
    match config {
        "dpir-tiny-512" | "dpir-sd3-512" => Some(128),
        "dpir-tiny-1024" | "dpir-sd3-1024" => Some(256),
        _ => None,
    }
}

/// Whether a restore configuration is DPIR at SD3-medium size with random weights (else the
/// bundled or given model).
pub fn is_sd3(config: &str) -> bool {
    config.starts_with("dpir-sd3-")
}

/// The sampler settings a configuration runs: the CLI's defaults for the bundled model;
/// a full 20-step restore from noise for the SD3-size model (what DPIR's paper runs).
fn params_for(config: &str) -> RestoreParams {
    if is_sd3(config) {
        RestoreParams {
            strength: 1.0,
            ..RestoreParams::default()
        }
    } else {
        RestoreParams {
            strength: 0.2,
            ..RestoreParams::default()
        }
    }
}

/// DPIR at SD3-medium size: SD3-medium MMDiT, SD3 VAE (and a robust encoder of the same
/// architecture), CLIP ViT-L/14, the DPIR adapter for them (LQ branch of 3 convs × 320).
/// Random weights of the real shapes, made on demand.
pub fn sd3_random_gpu(
    dev: std::sync::Arc<dpir_engine::cuda::CudaDevice>,
) -> std::result::Result<dpir_engine::cuda::CudaRestorer, Box<dyn std::error::Error>> {
    use dpir_engine::pipeline::cpu::Configs;
    use dpir_engine::weights::RandomWeights;
    use dpir_loader::{
        clip_vision_spec, dpir_spec, mmdit_spec, vae_encoder_spec, vae_spec, ClipVisionConfig,
        DpirConfig, MmditConfig, VaeConfig,
    };
    let (m, v, c) = (
        MmditConfig::sd3_medium(),
        VaeConfig::sd3(),
        ClipVisionConfig::vit_l14(),
    );
    let d = DpirConfig::for_backbone(&m, &v, &c, 320, 3);
    let t0 = Instant::now();
    let sources = (
        RandomWeights::new(mmdit_spec(&m), 1),
        RandomWeights::new(vae_spec(&v), 2),
        RandomWeights::new(clip_vision_spec(&c), 3),
        RandomWeights::new(dpir_spec(&d), 4),
        RandomWeights::new(vae_encoder_spec(&v, "encoder"), 5),
    );
    let cfgs = Configs {
        mmdit: m,
        vae: v.clone(),
        clip: c,
        dpir: d,
        robust: Some(v),
    };
    let r = dpir_engine::cuda::CudaRestorer::from_sources(
        dev,
        cfgs,
        &sources.0,
        &sources.1,
        &sources.2,
        &sources.3,
        Some(&sources.4),
    )?;
    println!(
        "DPIR at SD3-medium size, random weights of the real shapes: {:.2} GB on the device, built in {:.1} s; VAE on the GPU: {}, CLIP on the GPU: {}",
        Restorer::weight_bytes(&r) as f64 / 1e9,
        t0.elapsed().as_secs_f64(),
        r.gpu_vae(),
        r.gpu_clip()
    );
    Ok(r)
}

/// The bench input: the first bundled example, bicubic-resized to `side`² when needed.
fn bench_input(side: usize) -> std::result::Result<(Tensor, PathBuf), String> {
    let candidates = [
        PathBuf::from("examples/canyon-wren.png"),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.join("../../examples/canyon-wren.png")))
            .unwrap_or_default(),
    ];
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or("bench input examples/canyon-wren.png not found (run from the repo root)")?;
    let img = image_io::decode(&path, image_io::DEFAULT_MAX_PIXELS).map_err(|e| e.to_string())?;
    let rgb = if img.height == side && img.width == side {
        img.rgb
    } else {
        resize_bicubic(&img.rgb, side, side)
    };
    Ok((rgb, path))
}

/// Times `reps` restores (after one warm-up) and prints the per-stage table.
pub fn bench(
    model: &mut dyn Restorer,
    device: &str,
    config: &str,
    reps: usize,
) -> std::result::Result<Value, Box<dyn std::error::Error>> {
    let side = input_side(config).ok_or_else(|| format!("unknown restore config `{config}`"))?;
    let (lq, path) = bench_input(side)?;
    let p = params_for(config);
    let plan = pipeline::plan(&model.dims(), side, side, &p)?;
    let run_steps = plan.sigmas.len() - 1 - plan.start;
    let out_side = side * 4;
    println!(
        "dpir bench --device {device}, config {config}: restore {side}×{side} -> {out_side}×{out_side} of {} \
         ({} tile(s), {run_steps} of {} steps at strength {}, cfg {})",
        path.display(),
        plan.tiles.len(),
        p.steps,
        p.strength,
        p.cfg
    );
    pipeline::restore(model, &lq, &p, None)?;
    let mut timed = Timed {
        inner: model,
        ms: BTreeMap::new(),
    };
    let t0 = Instant::now();
    for _ in 0..reps {
        pipeline::restore(&mut timed, &lq, &p, None)?;
    }
    let total = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let mut stages: Vec<(String, f64, f64)> = timed
        .ms
        .iter()
        .map(|(k, (ms, n))| (k.to_string(), ms / reps as f64, *n as f64 / reps as f64))
        .collect();
    let inside: f64 = stages.iter().map(|s| s.1).sum();
    stages.push((
        "pipeline host work (resize, blend, colour fix)".into(),
        total - inside,
        1.0,
    ));
    stages.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, ms, calls) in &stages {
        println!(
            "  {name:<48} {ms:>10.1} ms  {:>5.1}%  ({calls} calls)",
            100.0 * ms / total
        );
    }
    println!("  {:<48} {total:>10.1} ms per image", "total restore");
    Ok(json!({
        "device": device, "config": config, "input": [side, side], "output": [4 * side, 4 * side],
        "tiles": plan.tiles.len(), "steps_run": run_steps, "total_ms": total,
        "stages": stages.iter().map(|(n, ms, c)| json!({"stage": n, "ms": ms, "calls": c})).collect::<Vec<_>>(),
    }))
}
