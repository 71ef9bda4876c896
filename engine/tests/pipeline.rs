//! The restoration pipeline end to end on the CPU with tiny seeded random models in the
//! canonical layout: reproducibility, tiling, bounded memory, and the zero-gate identity.
//!
//! A counting allocator measures peak live heap bytes, so the tests in this file run one
//! at a time (they take `SERIAL`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dpir_engine::pipeline::cpu::{Configs, CpuRestorer};
use dpir_engine::pipeline::rng::Rng;
use dpir_engine::pipeline::{self, ColorFix, Denoiser, ModelDims, RestoreParams, Restorer};
use dpir_engine::weights::seeded_random_weights;
use dpir_engine::{Result, Tensor};
use dpir_loader::{
    clip_vision_spec, dpir_spec, mmdit_spec, vae_encoder_spec, vae_spec, ClipVisionConfig,
    DpirConfig, MmditConfig, Spec, VaeConfig,
};

// ---------------------------------------------------------------------------------------
// Peak-heap counter

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as `System.alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Tiny model

fn configs(vae_top: usize) -> Configs {
    let mmdit = MmditConfig {
        depth: 2,
        hidden: 32,
        num_heads: 2,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        pos_embed_max_size: 16,
        context_dim: 24,
        pooled_dim: 8,
        frequency_embedding_size: 32,
        mlp_hidden: 64,
        qk_norm: false,
        attn2_blocks: vec![false, false],
    };
    let vae = VaeConfig {
        in_channels: 3,
        latent_channels: 16,
        block_out_channels: vec![vae_top, 8, 16, 16],
        layers_per_block: 1,
        norm_groups: 4,
        scaling_factor: 1.5305,
        shift_factor: 0.0609,
        has_encoder: true,
        has_decoder: true,
    };
    let clip = ClipVisionConfig {
        hidden: 16,
        intermediate: 32,
        layers: 2,
        heads: 2,
        patch_size: 8,
        image_size: 32,
        num_channels: 3,
        projection_dim: Some(12),
        layer_norm_eps: 1e-5,
    };
    let dpir = DpirConfig {
        lq_channels: 8,
        lq_convs: 2,
        hidden: 32,
        patch_size: 2,
        latent_channels: 16,
        clip_dim: 16,
        local_hidden: 16,
        context_dim: 24,
        global_in: 12,
        global_hidden: 16,
        pooled_dim: 8,
        has_robust_encoder: true,
    };
    Configs {
        mmdit,
        vae: vae.clone(),
        clip,
        dpir,
        robust: Some(vae),
    }
}

/// Seeded weights with sensible scales: norms near 1, linear/conv weights ~ 1/√fan_in.
fn random(spec: Spec, seed: u64) -> HashMap<String, Tensor> {
    seeded_random_weights(spec, seed).into_iter().collect()
}

struct Weights {
    mmdit: HashMap<String, Tensor>,
    vae: HashMap<String, Tensor>,
    clip: HashMap<String, Tensor>,
    dpir: HashMap<String, Tensor>,
    robust: HashMap<String, Tensor>,
}

fn weights(c: &Configs) -> Weights {
    Weights {
        mmdit: random(mmdit_spec(&c.mmdit), 1),
        vae: random(vae_spec(&c.vae), 2),
        clip: random(clip_vision_spec(&c.clip), 3),
        dpir: random(dpir_spec(&c.dpir), 4),
        robust: random(
            vae_encoder_spec(c.robust.as_ref().unwrap_or(&c.vae), "encoder"),
            5,
        ),
    }
}

fn model_with(c: &Configs, w: &Weights) -> CpuRestorer {
    CpuRestorer::from_sources(
        c.clone(),
        &w.mmdit,
        &w.vae,
        &w.clip,
        &w.dpir,
        Some(&w.robust),
    )
    .unwrap()
}

fn model(vae_top: usize) -> CpuRestorer {
    let c = configs(vae_top);
    model_with(&c, &weights(&c))
}

/// A smooth test picture `[3, h, w]` in [0, 1].
fn picture(h: usize, w: usize) -> Tensor {
    let mut data = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let v = 0.5
                    + 0.4
                        * ((x as f32 * 0.21 + c as f32).sin() * (y as f32 * 0.13 - c as f32).cos());
                data.push(v);
            }
        }
    }
    Tensor::new(&[3, h, w], data).unwrap()
}

fn params() -> RestoreParams {
    RestoreParams {
        scale: 2,
        steps: 3,
        cfg: 2.0,
        strength: 1.0,
        seed: 11,
        color_fix: ColorFix::Wavelet,
        tile: None,
        vae_tile: None,
        ..RestoreParams::default()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn same_seed_gives_identical_output_and_seeds_differ() {
    let _g = serial();
    let mut m = model(8);
    let lq = picture(24, 40);
    let p = params();
    let a = pipeline::restore(&mut m, &lq, &p, None).unwrap();
    let b = pipeline::restore(&mut m, &lq, &p, None).unwrap();
    assert_eq!(a.shape, vec![3, 48, 80]);
    assert!(a
        .data
        .iter()
        .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    assert!(
        a.data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "same seed differs"
    );
    let c = pipeline::restore(&mut m, &lq, &RestoreParams { seed: 12, ..p }, None).unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-4, "the seed has no effect");
}

#[test]
fn one_covering_tile_equals_untiled() {
    let _g = serial();
    let mut m = model(8);
    let lq = picture(32, 32);
    let untiled = pipeline::restore(
        &mut m,
        &lq,
        &RestoreParams {
            tile: None,
            ..params()
        },
        None,
    )
    .unwrap();
    let tiled = pipeline::restore(
        &mut m,
        &lq,
        &RestoreParams {
            tile: Some(64),
            vae_tile: Some(64),
            ..params()
        },
        None,
    )
    .unwrap();
    let d = max_abs_diff(&tiled, &untiled);
    assert!(d <= 1e-4, "tiled vs untiled: {d}");
}

/// A backend whose every stage is local (8×8 average pooling, nearest upsampling, a
/// pointwise velocity): tiling with any overlap must then reproduce the untiled result,
/// which checks tile placement, cropping and the normalisation of the Gaussian blend.
struct Pointwise;

impl Denoiser for Pointwise {
    fn velocity(
        &mut self,
        z: &Tensor,
        t: &[f32],
        y: &Tensor,
        ctx: &Tensor,
        lq: &Tensor,
    ) -> Result<Tensor> {
        assert_eq!(t.len(), z.shape[0]);
        assert_eq!(
            (y.shape[0], ctx.shape[0], lq.shape[0]),
            (z.shape[0], z.shape[0], z.shape[0])
        );
        let per = z.numel() / z.shape[0];
        let data = z
            .data
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let b = i / per;
                0.5 * v + (v * 3.0).tanh() * (1.0 + y.data[b * y.shape[1]]) - 0.01 * t[b] / 1000.0
            })
            .collect();
        Tensor::new(&z.shape, data)
    }
}

impl Restorer for Pointwise {
    fn dims(&self) -> ModelDims {
        ModelDims {
            latent_channels: 4,
            patch: 2,
            context_dim: 3,
            pooled_dim: 2,
            max_tile_latent: 64,
        }
    }
    fn encode_lq(&mut self, img: &Tensor) -> Result<Tensor> {
        let (h, w) = (img.shape[2], img.shape[3]);
        let (lh, lw) = (h / 8, w / 8);
        let mut out = vec![0f32; 4 * lh * lw];
        for c in 0..4 {
            for y in 0..lh {
                for x in 0..lw {
                    let mut s = 0.0;
                    for dy in 0..8 {
                        for dx in 0..8 {
                            s += img.data[((c % 3) * h + 8 * y + dy) * w + 8 * x + dx];
                        }
                    }
                    out[(c * lh + y) * lw + x] = s / 64.0 * (1.0 + c as f32 * 0.1);
                }
            }
        }
        Tensor::new(&[1, 4, lh, lw], out)
    }
    fn decode(&mut self, z: &Tensor) -> Result<Tensor> {
        let (lh, lw) = (z.shape[2], z.shape[3]);
        let (h, w) = (8 * lh, 8 * lw);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out[(c * h + y) * w + x] = z.data[(c * lh + y / 8) * lw + x / 8]
                        + 0.1 * z.data[(3 * lh + y / 8) * lw + x / 8];
                }
            }
        }
        Tensor::new(&[1, 3, h, w], out)
    }
    fn lq_tokens(&mut self, z: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(&[1, (z.shape[2] / 2) * (z.shape[3] / 2), 5]))
    }
    fn local_prompt(&mut self, _region: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(&[4, 3]))
    }
    fn global_prompt(&mut self, _image: &Tensor) -> Result<Tensor> {
        Ok(Tensor::new(&[2], vec![0.3, -0.2]).unwrap())
    }
}

#[test]
fn overlapping_tiles_blend_to_the_untiled_result() {
    let _g = serial();
    let lq = picture(50, 70); // ×2 → 100×140, padded to 112×144 → latent 14×18
    let p = RestoreParams {
        steps: 4,
        color_fix: ColorFix::None,
        ..params()
    };
    let untiled = pipeline::restore(&mut Pointwise, &lq, &p, None).unwrap();
    for (tile, vae_tile) in [(32, 48), (48, 32), (64, 16)] {
        let plan = pipeline::plan(
            &Pointwise.dims(),
            50,
            70,
            &RestoreParams {
                tile: Some(tile),
                vae_tile: Some(vae_tile),
                ..p.clone()
            },
        )
        .unwrap();
        assert!(
            plan.tiles.len() > 1 && plan.vae_tiles.len() > 1,
            "{tile}: {} tiles",
            plan.tiles.len()
        );
        let tiled = pipeline::restore(
            &mut Pointwise,
            &lq,
            &RestoreParams {
                tile: Some(tile),
                vae_tile: Some(vae_tile),
                ..p.clone()
            },
            None,
        )
        .unwrap();
        let d = max_abs_diff(&tiled, &untiled);
        assert!(d < 1e-5, "tile {tile}/{vae_tile}: {d}");
    }
}

#[test]
fn strength_starts_from_the_noised_lq_latent() {
    let _g = serial();
    let lq = picture(24, 16);
    let p = RestoreParams {
        steps: 4,
        color_fix: ColorFix::None,
        ..params()
    };
    // σ₀ below every non-zero schedule point: no step runs, the output is the LQ latent
    // through the VAE (here: 8×8 means of the bicubic upscale, replicated).
    let kept = pipeline::restore(
        &mut Pointwise,
        &lq,
        &RestoreParams {
            strength: 0.01,
            ..p.clone()
        },
        None,
    )
    .unwrap();
    let up = dpir_engine::image_io::resize_bicubic(&lq, 48, 32);
    for c in 0..3 {
        for by in 0..6 {
            for bx in 0..4 {
                let mut s = 0.0;
                let mut s3 = 0.0;
                for y in 0..8 {
                    for x in 0..8 {
                        let i = (by * 8 + y) * 32 + bx * 8 + x;
                        s += up.data[c * 48 * 32 + i].clamp(0.0, 1.0) * 2.0 - 1.0;
                        s3 += up.data[i].clamp(0.0, 1.0) * 2.0 - 1.0; // latent channel 3 reads red
                    }
                }
                let z = s / 64.0 * (1.0 + c as f32 * 0.1) + 0.1 * s3 / 64.0 * 1.3;
                let expect = ((z + 1.0) * 0.5).clamp(0.0, 1.0);
                let got = kept.data[c * 48 * 32 + (by * 8 + 3) * 32 + bx * 8 + 3];
                assert!(
                    (got - expect).abs() < 1e-5,
                    "{c} {by} {bx}: {got} vs {expect}"
                );
            }
        }
    }
    // A mid strength runs only the steps below σ₀ and lands between the two.
    let plan = pipeline::plan(
        &Pointwise.dims(),
        24,
        16,
        &RestoreParams {
            strength: 0.6,
            ..p.clone()
        },
    )
    .unwrap();
    assert_eq!((plan.start, plan.sigmas[plan.start]), (3, 0.5));
    let full = pipeline::restore(&mut Pointwise, &lq, &p, None).unwrap();
    let mid = pipeline::restore(
        &mut Pointwise,
        &lq,
        &RestoreParams { strength: 0.6, ..p },
        None,
    )
    .unwrap();
    assert!(max_abs_diff(&mid, &kept) > 1e-4 && max_abs_diff(&mid, &full) > 1e-4);
}

#[test]
fn zero_gate_reproduces_plain_mmdit_exactly() {
    let _g = serial();
    let c = configs(8);
    let mut w = weights(&c);
    let gate = w.dpir.get_mut("lq_align.gate").unwrap();
    gate.data.iter_mut().for_each(|v| *v = 0.0);
    let mut m = model_with(&c, &w);
    let img = {
        let mut t = picture(64, 48);
        t.data.iter_mut().for_each(|v| *v = *v * 2.0 - 1.0);
        t
    };
    // The visual prompts in the CLIP slots, LQ tokens from the LQ latent.
    let ctx = m.local_prompt(&img).unwrap();
    let y = m.global_prompt(&img).unwrap();
    let z_lq = m
        .encode_lq(&img.clone().reshape(&[1, 3, 64, 48]).unwrap())
        .unwrap();
    let lq = m.lq_tokens(&z_lq).unwrap();
    let z = Tensor::new(&[1, 16, 8, 6], Rng::new(3).normal_vec(16 * 48)).unwrap();
    let ctx_b = ctx
        .clone()
        .reshape(&[1, ctx.shape[0], ctx.shape[1]])
        .unwrap();
    let y_b = y.clone().reshape(&[1, 8]).unwrap();
    let with_branch = m.velocity(&z, &[700.0], &y_b, &ctx_b, &lq).unwrap();
    let plain = m.mmdit.forward(&z, &[700.0], &y_b, &ctx_b, None).unwrap();
    assert!(with_branch
        .data
        .iter()
        .zip(&plain.data)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // And the branch is live once the gate opens.
    m.parts.dpir.gate.iter_mut().for_each(|g| *g = 0.5);
    let opened = m.velocity(&z, &[700.0], &y_b, &ctx_b, &lq).unwrap();
    assert!(max_abs_diff(&opened, &plain) > 1e-3);
}

#[test]
fn restore_128_at_x4_end_to_end() {
    let _g = serial();
    let mut m = model(8);
    let p = RestoreParams {
        scale: 4,
        steps: 2,
        tile: Some(256),
        ..params()
    };
    let plan = pipeline::plan(&m.dims(), 128, 128, &p).unwrap();
    assert_eq!((plan.out_h, plan.out_w), (512, 512));
    assert!(plan.tiles.len() >= 4);
    let out = pipeline::restore(&mut m, &picture(128, 128), &p, None).unwrap();
    assert_eq!(out.shape, vec![3, 512, 512]);
    assert!(out.data.iter().all(|v| v.is_finite()));
    let t5 = Tensor::new(&[3, 24], Rng::new(9).normal_vec(72)).unwrap();
    let with_t5 = pipeline::restore(
        &mut m,
        &picture(16, 16),
        &RestoreParams {
            scale: 2,
            ..p.clone()
        },
        Some(&t5),
    )
    .unwrap();
    let without = pipeline::restore(
        &mut m,
        &picture(16, 16),
        &RestoreParams { scale: 2, ..p },
        None,
    )
    .unwrap();
    assert!(
        max_abs_diff(&with_t5, &without) > 1e-5,
        "T5 tokens have no effect"
    );
}

/// Peak live heap during a restore, and the baseline (weights) before it.
fn peak_during(m: &mut CpuRestorer, lq: &Tensor, p: &RestoreParams) -> (usize, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = pipeline::restore(m, lq, p, None).unwrap();
    drop(out);
    (base, PEAK.load(Ordering::Relaxed))
}

#[test]
fn tiled_peak_memory_is_bounded_by_the_tile() {
    let _g = serial();
    let mut m = model(64);
    let p = RestoreParams {
        scale: 2,
        steps: 2,
        tile: Some(128),
        vae_tile: Some(128),
        ..params()
    };
    // Warm up thread pools and lazily allocated state.
    pipeline::restore(&mut m, &picture(16, 16), &p, None).unwrap();
    let (base_s, peak_s) = peak_during(&mut m, &picture(64, 64), &p);
    let (base_l, peak_l) = peak_during(&mut m, &picture(128, 128), &p);
    let growth = peak_l as f64 / peak_s as f64;
    let above = (peak_l - base_l) as f64 / (peak_s - base_s) as f64;
    println!(
        "peak heap: 64×64→128×128: {:.2} MiB; 128×128→256×256: {:.2} MiB; growth {growth:.3}× \
         (above the weights: {:.2} → {:.2} MiB, {above:.3}×)",
        peak_s as f64 / 1048576.0,
        peak_l as f64 / 1048576.0,
        (peak_s - base_s) as f64 / 1048576.0,
        (peak_l - base_l) as f64 / 1048576.0,
    );
    assert!(growth < 1.5, "peak grew {growth:.3}× for a 4× larger image");
    // The measurement can tell: one tile over the larger image (VAE included) costs more.
    let one_tile = RestoreParams {
        tile: None,
        vae_tile: Some(512),
        ..p
    };
    let (_, peak_u) = peak_during(&mut m, &picture(128, 128), &one_tile);
    println!(
        "peak heap, 128×128→256×256 as one tile: {:.2} MiB",
        peak_u as f64 / 1048576.0
    );
    assert!(
        peak_u as f64 > 1.5 * peak_s as f64,
        "untiled peak {peak_u} vs tiled {peak_s}"
    );
}

#[test]
fn progress_reports_every_stage_in_order() {
    use dpir_engine::pipeline::{Progress, Stage};
    let _g = serial();
    let mut m = model(8);
    let p = RestoreParams {
        scale: 2,
        steps: 3,
        tile: Some(32),
        vae_tile: Some(32),
        ..params()
    };
    let plan = pipeline::plan(&m.dims(), 24, 24, &p).unwrap();
    let (n_vae, n_tiles) = (plan.vae_tiles.len(), plan.tiles.len());
    assert!(
        n_vae > 1 && n_tiles > 1,
        "{n_vae} VAE tiles, {n_tiles} tiles"
    );
    let mut seen: Vec<Progress> = Vec::new();
    pipeline::restore_with_progress(&mut m, &picture(24, 24), &p, None, &mut |pr| seen.push(pr))
        .unwrap();
    let ends: Vec<(Stage, usize)> = seen
        .iter()
        .filter(|pr| pr.done == pr.total)
        .map(|pr| (pr.stage, pr.total))
        .collect();
    assert_eq!(
        ends,
        vec![
            (Stage::Encode, n_vae),
            (Stage::Prompts, n_tiles),
            (Stage::Sample, 3),
            (Stage::Decode, n_vae)
        ]
    );
    // Within a stage the count never goes back, and every unit is announced.
    for stage in [Stage::Encode, Stage::Prompts, Stage::Sample, Stage::Decode] {
        let done: Vec<usize> = seen
            .iter()
            .filter(|pr| pr.stage == stage)
            .map(|pr| pr.done)
            .collect();
        let total = seen.iter().find(|pr| pr.stage == stage).unwrap().total;
        assert_eq!(done, (0..=total).collect::<Vec<_>>(), "{stage:?}");
    }
}
