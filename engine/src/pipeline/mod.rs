//! Sampler, tiling and the restoration pipeline.
//!
//! Everything here is a plain function of (model, noise, conditions, sigmas): no I/O.
//! The model is reached through [`Restorer`] (and its velocity part, [`Denoiser`]), so
//! the same pipeline drives the CPU reference backend and the CUDA backend.

pub mod color;
pub mod cpu;
pub mod rng;
pub mod schedule;
pub mod tiling;

use crate::error::{Error, Result};
use crate::image_io::{crop, reflect_pad, resize_bicubic};
use crate::tensor::Tensor;

pub use color::ColorFix;
use tiling::{Blender, Tile};

/// The MMDiT velocity, with the LQ branch's tokens injected after the first block.
pub trait Denoiser {
    /// `z [B, C, h, w]`, `timestep [B]` (= 1000 σ), `y [B, pooled]`, `context [B, L, ctx]`,
    /// `lq_tokens [B, N, D]` → velocity `[B, C, h, w]`.
    fn velocity(
        &mut self,
        z: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq_tokens: &Tensor,
    ) -> Result<Tensor>;
}

/// Sizes the pipeline needs from a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDims {
    pub latent_channels: usize,
    pub patch: usize,
    pub context_dim: usize,
    pub pooled_dim: usize,
    /// Largest latent tile side the model accepts (`pos_embed_max_size · patch`).
    pub max_tile_latent: usize,
}

/// All stages of DPIR, on some backend.
pub trait Restorer: Denoiser {
    fn dims(&self) -> ModelDims;
    /// Robust VAE encoder: `[1, 3, H, W]` in [-1, 1] → scaled model latent `[1, C, H/8, W/8]`.
    fn encode_lq(&mut self, image: &Tensor) -> Result<Tensor>;
    /// VAE decoder: scaled model latent `[1, C, h, w]` → `[1, 3, 8h, 8w]` in about [-1, 1].
    fn decode(&mut self, z: &Tensor) -> Result<Tensor>;
    /// LQ branch: scaled LQ latent `[1, C, h, w]` → tokens `[1, N, D]`.
    fn lq_tokens(&mut self, z_lq: &Tensor) -> Result<Tensor>;
    /// CLIP vision + local MLP on an image region `[3, h, w]` in [-1, 1] → `[P, ctx]`.
    fn local_prompt(&mut self, region: &Tensor) -> Result<Tensor>;
    /// CLIP vision + global MLP on the whole image `[3, H, W]` in [-1, 1] → `[pooled]`.
    fn global_prompt(&mut self, image: &Tensor) -> Result<Tensor>;
    /// The whole guided Euler loop for an image that is one latent tile, run by the backend
    /// without a host round trip per step: `z0 [C, h, w]`, the schedule from its start,
    /// `y [pooled]`, `context [L, ctx]`, `lq_tokens [1, N, D]` → the final latent.
    /// `Ok(None)`: the backend has no such loop and the pipeline runs its own.
    fn sample_single_tile(
        &mut self,
        _z0: &Tensor,
        _sigmas: &[f32],
        _y: &Tensor,
        _context: &Tensor,
        _lq_tokens: &Tensor,
        _cfg: f32,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The largest square latent tile side (a multiple of the patch, at most the model's)
    /// whose guided sampling fits the backend's free memory, for `context_len` tokens and
    /// `steps` steps; `None`: memory is not the limit (the CPU).
    fn memory_tile_limit(&self, _context_len: usize, _steps: usize) -> Option<usize> {
        None
    }
    /// Bytes of weights held.
    fn weight_bytes(&self) -> u64 {
        0
    }
    /// Estimated peak activation bytes for one sampling call on a latent tile.
    fn plan_bytes(
        &self,
        _tile_h: usize,
        _tile_w: usize,
        _context_len: usize,
        _batch: usize,
    ) -> u64 {
        0
    }
}

/// Knobs of one restoration.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreParams {
    /// Upscaling factor (1, 2 or 4).
    pub scale: usize,
    pub steps: usize,
    pub cfg: f32,
    /// Start noise level σ₀ in (0, 1]; 1 starts from pure noise.
    pub strength: f32,
    pub seed: u64,
    pub color_fix: ColorFix,
    /// Diffusion tile side in pixels (a multiple of 16); `None`: the largest the model takes.
    pub tile: Option<usize>,
    /// VAE tile side in pixels; `None`: 512.
    pub vae_tile: Option<usize>,
    /// SD3 time shift.
    pub shift: f32,
}

impl Default for RestoreParams {
    fn default() -> Self {
        Self {
            scale: 4,
            steps: 20,
            cfg: 4.0,
            strength: 1.0,
            seed: 0,
            color_fix: ColorFix::Wavelet,
            tile: None,
            vae_tile: None,
            shift: schedule::SD3_SHIFT,
        }
    }
}

/// What a restoration will do, decided before it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Output size (input × scale).
    pub out_h: usize,
    pub out_w: usize,
    /// Padded size (multiple of 16).
    pub pad_h: usize,
    pub pad_w: usize,
    /// Latent tile side and overlap.
    pub tile_latent: usize,
    pub overlap_latent: usize,
    pub tiles: Vec<Tile>,
    pub vae_tile_latent: usize,
    pub vae_tiles: Vec<Tile>,
    /// Schedule points that run (start index into `sigmas`).
    pub sigmas: Vec<f32>,
    pub start: usize,
}

/// Pixels per latent position (SD3 VAE).
pub const VAE_FACTOR: usize = 8;
/// Default VAE tile side in pixels.
pub const DEFAULT_VAE_TILE: usize = 512;

/// Decide sizes and tiles for an `in_h × in_w` input.
pub fn plan(dims: &ModelDims, in_h: usize, in_w: usize, p: &RestoreParams) -> Result<Plan> {
    if !matches!(p.scale, 1 | 2 | 4) {
        return Err(Error::Arg(format!(
            "scale must be 1, 2 or 4, got {}",
            p.scale
        )));
    }
    if p.steps == 0 {
        return Err(Error::Arg("steps must be at least 1".into()));
    }
    if !(p.strength > 0.0 && p.strength <= 1.0) {
        return Err(Error::Arg(format!(
            "strength must be in (0, 1], got {}",
            p.strength
        )));
    }
    let (out_h, out_w) = (in_h * p.scale, in_w * p.scale);
    let m = VAE_FACTOR * dims.patch;
    let (pad_h, pad_w) = (out_h.div_ceil(m) * m, out_w.div_ceil(m) * m);
    let (lh, lw) = (pad_h / VAE_FACTOR, pad_w / VAE_FACTOR);
    let patch = dims.patch.max(1);
    let max_tile = (dims.max_tile_latent / patch * patch).max(patch);
    let tile_latent = match p.tile {
        Some(t) => {
            if t < m {
                return Err(Error::Arg(format!(
                    "tile must be at least {m} pixels, got {t}"
                )));
            }
            (t / VAE_FACTOR / patch * patch).min(max_tile)
        }
        None => max_tile,
    };
    let overlap_latent = (tile_latent / 4 / patch * patch).min(tile_latent.saturating_sub(patch));
    let tiles = tiling::grid(lh, lw, tile_latent, overlap_latent, patch);
    if let Some(t) = tiles.iter().find(|t| t.h > max_tile || t.w > max_tile) {
        return Err(Error::Model(format!(
            "tile {}×{} exceeds the model's positional grid ({max_tile})",
            t.h, t.w
        )));
    }
    let vae_tile_latent = match p.vae_tile {
        Some(t) => (t / VAE_FACTOR).max(1),
        // Independent of the diffusion tile: the VAE has no positional grid, and a tile
        // of 512 pixels keeps its activations bounded while re-encoding little overlap.
        None => DEFAULT_VAE_TILE / VAE_FACTOR,
    };
    let vae_overlap = vae_tile_latent / 4;
    let vae_tiles = tiling::grid(lh, lw, vae_tile_latent, vae_overlap, 1);
    let sigmas = schedule::sigmas(p.steps, p.shift);
    let start = schedule::start_index(&sigmas, p.strength);
    Ok(Plan {
        out_h,
        out_w,
        pad_h,
        pad_w,
        tile_latent,
        overlap_latent,
        tiles,
        vae_tile_latent,
        vae_tiles,
        sigmas,
        start,
    })
}

/// Prepend a batch axis of 1.
fn batched(t: &Tensor) -> Tensor {
    let mut shape = vec![1];
    shape.extend_from_slice(&t.shape);
    Tensor {
        shape,
        data: t.data.clone(),
    }
}

/// Drop a leading batch axis of 1.
fn unbatched(t: Tensor) -> Result<Tensor> {
    if t.shape.first() != Some(&1) {
        return Err(Error::Model(format!(
            "expected a batch of 1, got shape {:?}",
            t.shape
        )));
    }
    let shape = t.shape[1..].to_vec();
    t.reshape(&shape)
}

/// Stack equal-shaped tensors along a new batch axis.
fn stack(parts: &[&Tensor]) -> Tensor {
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(&parts[0].shape);
    let data = parts.iter().flat_map(|t| t.data.iter().copied()).collect();
    Tensor { shape, data }
}

/// Where a restoration is, for a progress display: `done` of `total` units of `stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub done: usize,
    pub total: usize,
}

/// The stages of [`restore`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Robust VAE encoder, per VAE tile.
    Encode,
    /// CLIP prompts, per diffusion tile (plus the global one).
    Prompts,
    /// Sampling, per step (each step covers every diffusion tile).
    Sample,
    /// VAE decoder, per VAE tile.
    Decode,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Encode => "encode",
            Stage::Prompts => "prompts",
            Stage::Sample => "sample",
            Stage::Decode => "decode",
        }
    }
}

/// Tiled VAE encode of `[3, H, W]` (in [-1, 1]) → `[C, H/8, W/8]`.
pub fn encode_tiled<R: Restorer + ?Sized>(
    model: &mut R,
    image: &Tensor,
    tiles: &[Tile],
) -> Result<Tensor> {
    encode_tiled_with(model, image, tiles, &mut |_| {})
}

fn encode_tiled_with<R: Restorer + ?Sized>(
    model: &mut R,
    image: &Tensor,
    tiles: &[Tile],
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let c = model.dims().latent_channels;
    let (lh, lw) = (image.shape[1] / VAE_FACTOR, image.shape[2] / VAE_FACTOR);
    let mut blend = Blender::new(c, lh, lw);
    for (i, t) in tiles.iter().enumerate() {
        progress(Progress {
            stage: Stage::Encode,
            done: i,
            total: tiles.len(),
        });
        let px = t.scaled(VAE_FACTOR);
        let region = crop(image, px.y0, px.x0, px.h, px.w);
        let z = unbatched(model.encode_lq(&batched(&region))?)?;
        if z.shape != [c, t.h, t.w] {
            return Err(Error::Model(format!(
                "encoder returned {:?} for a {}×{} tile",
                z.shape, px.h, px.w
            )));
        }
        blend.add(*t, &z);
    }
    Ok(blend.finish())
}

/// Tiled VAE decode of `[C, h, w]` → `[3, 8h, 8w]`.
pub fn decode_tiled<R: Restorer + ?Sized>(
    model: &mut R,
    z: &Tensor,
    tiles: &[Tile],
) -> Result<Tensor> {
    decode_tiled_with(model, z, tiles, &mut |_| {})
}

fn decode_tiled_with<R: Restorer + ?Sized>(
    model: &mut R,
    z: &Tensor,
    tiles: &[Tile],
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let (lh, lw) = (z.shape[1], z.shape[2]);
    let mut blend = Blender::new(3, lh * VAE_FACTOR, lw * VAE_FACTOR);
    for (i, t) in tiles.iter().enumerate() {
        progress(Progress {
            stage: Stage::Decode,
            done: i,
            total: tiles.len(),
        });
        let zt = crop(z, t.y0, t.x0, t.h, t.w);
        let img = unbatched(model.decode(&batched(&zt))?)?;
        let px = t.scaled(VAE_FACTOR);
        if img.shape != [3, px.h, px.w] {
            return Err(Error::Model(format!(
                "decoder returned {:?} for a {}×{} latent tile",
                img.shape, t.h, t.w
            )));
        }
        blend.add(px, &img);
    }
    Ok(blend.finish())
}

/// Per-tile conditions that stay fixed over the sampling loop.
pub struct TileConditions {
    pub tile: Tile,
    /// `[L, ctx]`: local-prompt tokens, then T5 tokens.
    pub context: Tensor,
}

/// The conditions of a classifier-free-guided batch of 2, `[cond ; uncond]`: the uncond
/// half has zero pooled vector and zero context (SD3's null prompts) and the same LQ
/// tokens. `y [pooled]`, `context [L, ctx]`, `lq_tokens [N, D]` or `[1, N, D]` →
/// `([2, pooled], [2, L, ctx], [2, N, D])`. Backends that run the guided loop themselves
/// ([`Restorer::sample_single_tile`]) take their batch from here too.
pub fn cfg_conditions(
    y: &Tensor,
    context: &Tensor,
    lq_tokens: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let lq = if lq_tokens.shape.len() == 3 {
        unbatched(lq_tokens.clone())?
    } else {
        lq_tokens.clone()
    };
    Ok((
        stack(&[y, &Tensor::zeros(&y.shape)]),
        stack(&[context, &Tensor::zeros(&context.shape)]),
        stack(&[&lq, &lq]),
    ))
}

/// Classifier-free-guided velocity for one latent tile `[C, h, w]`: cond and uncond as
/// one batch of 2 ([`cfg_conditions`]); `cfg == 1` runs the conditional branch alone.
pub fn guided_velocity<D: Denoiser + ?Sized>(
    model: &mut D,
    z: &Tensor,
    sigma: f32,
    y: &Tensor,
    context: &Tensor,
    lq_tokens: &Tensor,
    cfg: f32,
) -> Result<Tensor> {
    let t = 1000.0 * sigma;
    if cfg == 1.0 {
        let lq = if lq_tokens.shape.len() == 3 {
            lq_tokens.clone()
        } else {
            batched(lq_tokens)
        };
        let v = model.velocity(&batched(z), &[t], &batched(y), &batched(context), &lq)?;
        return unbatched(v);
    }
    let (y2, ctx2, lq2) = cfg_conditions(y, context, lq_tokens)?;
    let v = model.velocity(&stack(&[z, z]), &[t, t], &y2, &ctx2, &lq2)?;
    let n = z.numel();
    if v.numel() != 2 * n {
        return Err(Error::Model(format!(
            "velocity has shape {:?}, expected a batch of 2 of {:?}",
            v.shape, z.shape
        )));
    }
    let (vc, vu) = v.data.split_at(n);
    let data = vc.iter().zip(vu).map(|(c, u)| u + cfg * (c - u)).collect();
    Tensor::new(&z.shape, data)
}

/// Restore one image: `lq [3, H, W]` in [0, 1] → `[3, s·H, s·W]` in [0, 1].
/// `t5` holds precomputed T5 tokens `[L_t, ctx]` appended to every context.
pub fn restore<R: Restorer + ?Sized>(
    model: &mut R,
    lq: &Tensor,
    p: &RestoreParams,
    t5: Option<&Tensor>,
) -> Result<Tensor> {
    restore_with_progress(model, lq, p, t5, &mut |_| {})
}

/// [`restore`], calling `progress` before each unit of work (a tile, a step) and once at
/// the end of each stage (`done == total`).
pub fn restore_with_progress<R: Restorer + ?Sized>(
    model: &mut R,
    lq: &Tensor,
    p: &RestoreParams,
    t5: Option<&Tensor>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let dims = model.dims();
    if lq.shape.len() != 3 || lq.shape[0] != 3 {
        return Err(Error::Model(format!(
            "expected an image [3, H, W], got {:?}",
            lq.shape
        )));
    }
    if let Some(t) = t5 {
        if t.shape.len() != 2 || t.shape[1] != dims.context_dim {
            return Err(Error::Arg(format!(
                "text embeddings have shape {:?}, the model needs [L, {}]",
                t.shape, dims.context_dim
            )));
        }
    }
    let plan = plan(&dims, lq.shape[1], lq.shape[2], p)?;

    // 1. Upscale, map to [-1, 1], pad by reflection to a multiple of 16.
    let mut up = resize_bicubic(lq, plan.out_h, plan.out_w);
    for v in up.data.iter_mut() {
        *v = v.clamp(0.0, 1.0) * 2.0 - 1.0;
    }
    let padded = reflect_pad(&up, plan.pad_h, plan.pad_w);

    // 2. LQ latent (tiled robust encoder).
    let z_lq = encode_tiled_with(model, &padded, &plan.vae_tiles, progress)?;
    let n_vae = plan.vae_tiles.len();
    let mut report = |stage, done, total| progress(Progress { stage, done, total });
    report(Stage::Encode, n_vae, n_vae);

    // 3. Prompts: one global, one local per diffusion tile.
    let y = model.global_prompt(&up)?;
    if y.numel() != dims.pooled_dim {
        return Err(Error::Model(format!(
            "global prompt has {} values, expected {}",
            y.numel(),
            dims.pooled_dim
        )));
    }
    let y = y.reshape(&[dims.pooled_dim])?;
    let mut conds = Vec::with_capacity(plan.tiles.len());
    let n_tiles = plan.tiles.len();
    for (i, t) in plan.tiles.iter().enumerate() {
        report(Stage::Prompts, i, n_tiles);
        let px = t.scaled(VAE_FACTOR);
        let local = model.local_prompt(&crop(&padded, px.y0, px.x0, px.h, px.w))?;
        let context = match t5 {
            Some(t5) => Tensor {
                shape: vec![local.shape[0] + t5.shape[0], dims.context_dim],
                data: local.data.iter().chain(&t5.data).copied().collect(),
            },
            None => local,
        };
        conds.push(TileConditions { tile: *t, context });
    }
    report(Stage::Prompts, n_tiles, n_tiles);

    // 4. Sample: start from noise, or from the LQ latent noised to σ_start.
    let c = dims.latent_channels;
    let (lh, lw) = (plan.pad_h / VAE_FACTOR, plan.pad_w / VAE_FACTOR);
    let noise = rng::Rng::new(p.seed).normal_vec(c * lh * lw);
    let s0 = plan.sigmas[plan.start];
    let z0 = if plan.start == 0 && s0 >= 1.0 {
        Tensor::new(&[c, lh, lw], noise)?
    } else {
        let data = z_lq
            .data
            .iter()
            .zip(&noise)
            .map(|(l, e)| (1.0 - s0) * l + s0 * e)
            .collect();
        Tensor::new(&[c, lh, lw], data)?
    };
    drop(up);
    let sigmas = &plan.sigmas[plan.start..];
    let n_steps = sigmas.len().saturating_sub(1);
    report(Stage::Sample, 0, n_steps);
    // LQ tokens are recomputed per tile and step (not held for every tile: memory stays
    // bounded by the tile), except for the one-tile loop a backend may run on its own.
    let tile_lq =
        |model: &mut R, t: &Tile| model.lq_tokens(&batched(&crop(&z_lq, t.y0, t.x0, t.h, t.w)));
    let on_device = match &conds[..] {
        [one] if p.cfg != 1.0 => {
            let lq_tokens = tile_lq(model, &one.tile)?;
            model.sample_single_tile(&z0, sigmas, &y, &one.context, &lq_tokens, p.cfg)?
        }
        _ => None,
    };
    let mut step = 0;
    let z = match on_device {
        Some(z) => z,
        None => schedule::euler(z0, sigmas, |z, sigma| {
            if step > 0 {
                report(Stage::Sample, step, n_steps);
            }
            step += 1;
            let mut blend = Blender::new(c, lh, lw);
            for cond in &conds {
                let t = cond.tile;
                let zt = crop(z, t.y0, t.x0, t.h, t.w);
                let lq_tokens = tile_lq(model, &t)?;
                let v = guided_velocity(model, &zt, sigma, &y, &cond.context, &lq_tokens, p.cfg)?;
                blend.add(t, &v);
            }
            Ok(blend.finish())
        })?,
    };
    drop(conds);
    drop(z_lq);

    report(Stage::Sample, n_steps, n_steps);

    // 5. Decode, crop, colour fix against the upscaled input, back to [0, 1].
    let decoded = decode_tiled_with(model, &z, &plan.vae_tiles, progress)?;
    progress(Progress {
        stage: Stage::Decode,
        done: n_vae,
        total: n_vae,
    });
    let out = crop(&decoded, 0, 0, plan.out_h, plan.out_w);
    drop(decoded);
    let reference = crop(&padded, 0, 0, plan.out_h, plan.out_w);
    let mut fixed = color::apply(p.color_fix, &out, &reference);
    for v in fixed.data.iter_mut() {
        *v = ((*v + 1.0) * 0.5).clamp(0.0, 1.0);
    }
    Ok(fixed)
}
