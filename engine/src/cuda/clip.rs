//! CLIP vision (Hugging Face `CLIPVisionModel` + optional `visual_projection`) on the GPU,
//! mirroring `models::clip` (the CPU f32 reference): same `ClipVisionConfig`, same HF weight
//! names, same host contract ([`CudaClipVision::forward`] = `ClipVision::forward`, returning
//! the same [`ClipOutput`]). bf16 storage with f32 accumulation; LayerNorm parameters f32.
//!
//! The graph per forward at batch `B`, `L = 1 + P` tokens, width `D`:
//! - **Embedding as one GEMM.** The host writes one row per token (im2col): a patch row holds
//!   the patch's pixels in the conv weight's `(c, ky, kx)` order, and every row (the class
//!   token's too) holds a one-hot column selecting its token index. The weight `[D, K']` is
//!   `[patch_embedding | (position_embedding + class_embedding at token 0)ᵀ]`, `K'` padded to
//!   a multiple of 8 with zero columns. One bf16 GEMM then gives
//!   `[class; conv(patches)] + position_embedding` for all `B·L` rows, with one rounding
//!   (plus the bf16 rounding of the stored `class + position[0]`).
//!   The image is small (224² at patch 14: 257 rows of 845 → 848 columns per image), so the
//!   host im2col and its upload cost little; no new kernel is needed.
//! - `pre_layrnorm`, then per layer: `layernorm_affine` → fused qkv GEMM (q/k/v weights
//!   concatenated at load into `[3D, D]`, bias epilogue) → self-attention → `out_proj` GEMM →
//!   residual add → `layernorm_affine` → `fc1` GEMM → `quick_gelu` → `fc2` GEMM → residual add.
//! - Attention: head_dim 64 (and the kernel loaded, and not `DPIR_ATTENTION=unfused`): the
//!   fused flash kernel reading the qkv buffer directly, with an empty first stream (La = 0).
//!   Other head dims: `split_heads` → `Gemm::batched_qkt_f32` (f32 scores) →
//!   `softmax_rows_f32` (bf16 probabilities) → `Gemm::batched_pv` → `merge_heads`.
//! - The hidden state entering the last layer is `penultimate`. The last layer runs LN1, qkv
//!   and attention on all tokens (its keys and values need them), then only the class rows
//!   (gathered by device copies) go through `out_proj`, the MLP and `post_layernorm`
//!   (→ `visual_projection`, a bias-free GEMM): `pooled`.
//!
//! Memory: the weights take one allocation; the activations one arena per batch size
//! ([`plan_bytes_for`]), poisoned with NaN when created; the two most recently used plans
//! are kept, so repeated calls at one batch (or alternating between two) make no device
//! allocation.

use std::sync::Arc;

use dpir_loader::ClipVisionConfig;

use super::device::{arena_bytes, bf16_bits, Arena, Bf16, CudaDevice, DView, DeviceBuffer};
use super::gemm::Gemm;
use super::mmdit::Options;
use super::ops::AttnVariant;
use crate::error::{Error, Result};
use crate::models::clip::ClipOutput;
use crate::tensor::Tensor;
use crate::weights::{Prefixed, WeightSource};

/// Activation plans kept (by batch and attention path): a caller alternating between two
/// batch sizes re-plans nothing.
const PLANS_CACHED: usize = 2;

/// Head dim of the fused attention kernel.
const FUSED_HEAD_DIM: usize = 64;

/// Tokens per image: the class token and the patches.
pub fn tokens(cfg: &ClipVisionConfig) -> usize {
    cfg.num_patches() + 1
}

/// Pixels per patch (`C · p · p`): the conv part of an embedding row.
fn patch_cols(cfg: &ClipVisionConfig) -> usize {
    cfg.num_channels * cfg.patch_size * cfg.patch_size
}

/// Columns of the embedding GEMM: the patch pixels, one one-hot column per token, padded to
/// a multiple of 8 (16-byte rows).
pub fn embed_cols(cfg: &ClipVisionConfig) -> usize {
    (patch_cols(cfg) + tokens(cfg)).div_ceil(8) * 8
}

/// The checks the GPU model needs beyond the CPU model's: width a multiple of 8 (the
/// LayerNorm kernel's 16-byte rows).
pub fn check_config(cfg: &ClipVisionConfig) -> Result<()> {
    let (d, p, s) = (cfg.hidden, cfg.patch_size, cfg.image_size);
    if cfg.layers == 0
        || cfg.heads == 0
        || d % cfg.heads != 0
        || p == 0
        || s % p != 0
        || cfg.num_channels == 0
        || cfg.intermediate == 0
        || cfg.projection_dim == Some(0)
    {
        return Err(Error::Model(format!(
            "clip vision config: hidden {d} / heads {}, image {s} / patch {p}, layers {}, \
             channels {}, intermediate {}, projection {:?}",
            cfg.heads, cfg.layers, cfg.num_channels, cfg.intermediate, cfg.projection_dim
        )));
    }
    if d % 8 != 0 {
        return Err(Error::Model(format!(
            "CUDA CLIP vision: unsupported config (hidden {d} is not a multiple of 8)"
        )));
    }
    Ok(())
}

/// The embedding GEMM's weight `[D, K']` (row-major, PyTorch Linear layout) from
/// `patch_w [D, C, p, p]`, `class [D]` and `pos [L, D]`: columns `[0, C·p·p)` the conv
/// weight, column `C·p·p + t` the position embedding of token `t` (plus the class embedding
/// for `t = 0`), the rest zero.
fn embed_weight(cfg: &ClipVisionConfig, patch_w: &[f32], class: &[f32], pos: &[f32]) -> Vec<f32> {
    let (d, pc, l, k) = (cfg.hidden, patch_cols(cfg), tokens(cfg), embed_cols(cfg));
    let mut w = vec![0f32; d * k];
    for (c, row) in w.chunks_exact_mut(k).enumerate() {
        row[..pc].copy_from_slice(&patch_w[c * pc..][..pc]);
        for t in 0..l {
            row[pc + t] = pos[t * d + c] + if t == 0 { class[c] } else { 0.0 };
        }
    }
    w
}

/// Host im2col of `px [B, C, S, S]` into the embedding rows `[B·L, K']`: row `(b, 0)` (the
/// class token) holds only its one-hot column; row `(b, 1 + gy·g + gx)` holds the patch's
/// pixels in `(c, ky, kx)` order and its one-hot column.
fn embed_rows(cfg: &ClipVisionConfig, px: &[f32], b: usize) -> Vec<f32> {
    let (c, p, s) = (cfg.num_channels, cfg.patch_size, cfg.image_size);
    let (pc, l, k, g) = (patch_cols(cfg), tokens(cfg), embed_cols(cfg), s / p);
    let mut out = vec![0f32; b * l * k];
    for bi in 0..b {
        let img = &px[bi * c * s * s..][..c * s * s];
        for t in 0..l {
            let row = &mut out[(bi * l + t) * k..][..k];
            row[pc + t] = 1.0;
            if t == 0 {
                continue;
            }
            let (gy, gx) = ((t - 1) / g, (t - 1) % g);
            for ch in 0..c {
                for ky in 0..p {
                    let src = &img[(ch * s + gy * p + ky) * s + gx * p..][..p];
                    row[(ch * p + ky) * p..][..p].copy_from_slice(src);
                }
            }
        }
    }
    out
}

/// `[q; k; v]`: the fused qkv weight `[3D, D]` (or bias `[3D]`) in the order the attention
/// kernel and `split_heads` read a qkv row (q of all heads, then k, then v).
fn fuse_qkv(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    [q, k, v].concat()
}

/// Bytes of the weight allocation (every tensor aligned as the arena carves it).
pub fn weight_bytes_for(cfg: &ClipVisionConfig) -> usize {
    let (d, i) = (cfg.hidden, cfg.intermediate);
    let bf = arena_bytes::<Bf16>;
    let ln = 2 * arena_bytes::<f32>(d);
    let layer = ln
        + bf(3 * d * d)
        + bf(3 * d)
        + bf(d * d)
        + bf(d)
        + ln
        + bf(i * d)
        + bf(i)
        + bf(d * i)
        + bf(d);
    bf(d * embed_cols(cfg))
        + ln
        + cfg.layers * layer
        + ln
        + cfg.projection_dim.map_or(0, |pd| bf(pd * d))
}

/// Bytes of the activation arena of one forward at batch `b` (`unfused`: with the scratch
/// of the unfused attention). With `R = b·L`, `bf(n)` / `f4(n)` the 256-byte-aligned bytes
/// of `n` bf16 / f32:
/// `bf(R·K') + 4·bf(R·D) + bf(R·3D) + bf(R·I) + 5·bf(b·D) + bf(b·I) + bf(b·pd)`
/// (+ `4·bf(R·D) + f4(b·H·L²) + bf(b·H·L²)` unfused; `pd` = 0 without a projection).
pub fn plan_bytes_for(cfg: &ClipVisionConfig, b: usize, unfused: bool) -> usize {
    let (d, i, l) = (cfg.hidden, cfg.intermediate, tokens(cfg));
    let r = b * l;
    let bf = arena_bytes::<Bf16>;
    let mut total = bf(r * embed_cols(cfg)) + 4 * bf(r * d) + bf(r * 3 * d) + bf(r * i);
    total += 5 * bf(b * d) + bf(b * i) + bf(b * cfg.projection_dim.unwrap_or(0));
    if unfused {
        let s = b * cfg.heads * l * l;
        total += 4 * bf(r * d) + arena_bytes::<f32>(s) + bf(s);
    }
    total
}

#[derive(Clone, Copy)]
struct Lin {
    w: DView<Bf16>,
    b: Option<DView<Bf16>>,
    n_in: usize,
    n_out: usize,
}

#[derive(Clone, Copy)]
struct Ln {
    g: DView<f32>,
    b: DView<f32>,
}

struct Layer {
    ln1: Ln,
    qkv: Lin,
    out_proj: Lin,
    ln2: Ln,
    fc1: Lin,
    fc2: Lin,
}

/// Uploads host tensors into the weight arena.
struct Uploader<'a> {
    dev: &'a CudaDevice,
    arena: Arena,
}

impl Uploader<'_> {
    fn bf16(&mut self, data: &[f32]) -> Result<DView<Bf16>> {
        let v = self.arena.carve::<Bf16>(data.len())?;
        self.dev.upload_bf16(v, &bf16_bits(data))?;
        Ok(v)
    }
    fn f32(&mut self, data: &[f32]) -> Result<DView<f32>> {
        let v = self.arena.carve::<f32>(data.len())?;
        self.dev.upload_f32(v, data)?;
        Ok(v)
    }
    fn ln(&mut self, w: &dyn WeightSource, name: &str, d: usize) -> Result<Ln> {
        Ok(Ln {
            g: self.f32(&w.tensor_shaped(&format!("{name}.weight"), &[d])?.data)?,
            b: self.f32(&w.tensor_shaped(&format!("{name}.bias"), &[d])?.data)?,
        })
    }
    fn lin(&mut self, w: &dyn WeightSource, name: &str, n_in: usize, n_out: usize) -> Result<Lin> {
        let wt = w.tensor_shaped(&format!("{name}.weight"), &[n_out, n_in])?;
        let b = w.tensor_shaped(&format!("{name}.bias"), &[n_out])?;
        Ok(Lin {
            w: self.bf16(&wt.data)?,
            b: Some(self.bf16(&b.data)?),
            n_in,
            n_out,
        })
    }
}

/// CLIP vision with its weights resident on the GPU.
pub struct CudaClipVision {
    pub dev: Arc<CudaDevice>,
    pub gemm: Gemm,
    pub cfg: ClipVisionConfig,
    fused_attention: bool,
    attn_variant: AttnVariant,
    weight_bytes: usize,
    embed: Lin,
    pre_ln: Ln,
    layers: Vec<Layer>,
    post_ln: Ln,
    projection: Option<Lin>,
    /// Activation plans by (batch, unfused), least recently used first.
    plans: Vec<ClipPlan>,
    _weights: DeviceBuffer,
}

impl CudaClipVision {
    /// Uploads the weights (HF names, as `ClipVision::load` reads them), q/k/v fused, cast
    /// to bf16 on the host (LayerNorm parameters f32). Reads one tensor at a time, so the
    /// host holds at most one layer's weights in f32.
    pub fn load(
        dev: Arc<CudaDevice>,
        cfg: &ClipVisionConfig,
        w: &dyn WeightSource,
    ) -> Result<Self> {
        check_config(cfg)?;
        let (d, p, i) = (cfg.hidden, cfg.patch_size, cfg.intermediate);
        let total = weight_bytes_for(cfg);
        let mut up = Uploader {
            dev: &dev,
            arena: Arena::new(dev.alloc(total)?),
        };
        let vm = &Prefixed {
            inner: w,
            prefix: "vision_model.".into(),
        };
        let embed = {
            let patch_w = vm.tensor_shaped(
                "embeddings.patch_embedding.weight",
                &[d, cfg.num_channels, p, p],
            )?;
            let class = vm.tensor_shaped("embeddings.class_embedding", &[d])?;
            let pos =
                vm.tensor_shaped("embeddings.position_embedding.weight", &[tokens(cfg), d])?;
            let ew = embed_weight(cfg, &patch_w.data, &class.data, &pos.data);
            Lin {
                w: up.bf16(&ew)?,
                b: None,
                n_in: embed_cols(cfg),
                n_out: d,
            }
        };
        let pre_ln = up.ln(vm, "pre_layrnorm", d)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for li in 0..cfg.layers {
            let lw = &Prefixed {
                inner: vm,
                prefix: format!("encoder.layers.{li}."),
            };
            let ln1 = up.ln(lw, "layer_norm1", d)?;
            let qkv = {
                let get = |n: &str, shape: &[usize]| {
                    lw.tensor_shaped(&format!("self_attn.{n}"), shape)
                        .map(|t| t.data)
                };
                let ww = fuse_qkv(
                    &get("q_proj.weight", &[d, d])?,
                    &get("k_proj.weight", &[d, d])?,
                    &get("v_proj.weight", &[d, d])?,
                );
                let bb = fuse_qkv(
                    &get("q_proj.bias", &[d])?,
                    &get("k_proj.bias", &[d])?,
                    &get("v_proj.bias", &[d])?,
                );
                Lin {
                    w: up.bf16(&ww)?,
                    b: Some(up.bf16(&bb)?),
                    n_in: d,
                    n_out: 3 * d,
                }
            };
            let out_proj = up.lin(lw, "self_attn.out_proj", d, d)?;
            let ln2 = up.ln(lw, "layer_norm2", d)?;
            let fc1 = up.lin(lw, "mlp.fc1", d, i)?;
            let fc2 = up.lin(lw, "mlp.fc2", i, d)?;
            layers.push(Layer {
                ln1,
                qkv,
                out_proj,
                ln2,
                fc1,
                fc2,
            });
        }
        let post_ln = up.ln(vm, "post_layernorm", d)?;
        let projection = match cfg.projection_dim {
            Some(pd) => Some(Lin {
                w: up.bf16(&w.tensor_shaped("visual_projection.weight", &[pd, d])?.data)?,
                b: None,
                n_in: d,
                n_out: pd,
            }),
            None => None,
        };
        if up.arena.used() != total {
            return Err(Error::Cuda(format!(
                "CLIP weights: carved {} B of a {total} B allocation",
                up.arena.used()
            )));
        }
        let gemm = Gemm::new(&dev)?;
        let opts = Options::from_env().for_device(&dev);
        Ok(Self {
            gemm,
            cfg: cfg.clone(),
            fused_attention: opts.fused_attention,
            attn_variant: opts.attn_variant,
            weight_bytes: total,
            embed,
            pre_ln,
            layers,
            post_ln,
            projection,
            plans: Vec::new(),
            _weights: up.arena.buffer,
            dev,
        })
    }

    /// Bytes of device memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the activation arena a forward at `batch` allocates (once while it stays
    /// cached).
    pub fn plan_bytes(&self, batch: usize) -> usize {
        plan_bytes_for(&self.cfg, batch, !self.uses_fused_attention())
    }

    /// Whether the fused flash-attention kernel runs (head_dim 64, kernel loaded, not
    /// disabled); otherwise the unfused QKᵀ / softmax / PV path.
    pub fn uses_fused_attention(&self) -> bool {
        self.fused_attention
            && self.cfg.hidden / self.cfg.heads == FUSED_HEAD_DIM
            && self.dev.has_func(self.attn_variant.kernel(false))
    }

    /// Enables or disables the fused attention kernel (default: on unless
    /// `DPIR_ATTENTION=unfused`); validates the unfused path on head_dim 64 models. Takes
    /// effect at the next forward (re-plans when the scratch changes).
    pub fn set_fused_attention(&mut self, on: bool) {
        self.fused_attention = on;
    }

    /// `pixels [B, C, S, S]`, normalised (see `models::clip::preprocess`) → the same
    /// [`ClipOutput`] as `ClipVision::forward`: `penultimate [B, 1 + P, D]`, `pooled
    /// [B, proj_dim]` (or `[B, D]` without a projection).
    pub fn forward(&mut self, pixels: &Tensor) -> Result<ClipOutput> {
        let (d, s, c) = (self.cfg.hidden, self.cfg.image_size, self.cfg.num_channels);
        let b = match pixels.shape[..] {
            [b, pc, h, w] if pc == c && h == s && w == s && b > 0 => b,
            _ => {
                return Err(Error::Arg(format!(
                    "clip vision expects pixels [B, {c}, {s}, {s}], got {:?}",
                    pixels.shape
                )))
            }
        };
        if pixels.data.len() != b * c * s * s {
            return Err(Error::Arg(format!(
                "clip vision pixels: {} values for shape {:?}",
                pixels.data.len(),
                pixels.shape
            )));
        }
        let unfused = !self.uses_fused_attention();
        // Most recently used last; a miss evicts the least recently used plan (freeing its
        // arena) before allocating.
        let plan = match self
            .plans
            .iter()
            .position(|p| p.batch == b && p.unfused == unfused)
        {
            Some(i) => self.plans.remove(i),
            None => {
                if self.plans.len() >= PLANS_CACHED {
                    self.plans.remove(0);
                }
                ClipPlan::new(&self.dev, &self.cfg, b, unfused)?
            }
        };
        let run = self.run(&plan, pixels);
        self.plans.push(plan);
        let (penultimate, pooled) = run?;
        let l = tokens(&self.cfg);
        let pd = self.projection.map_or(d, |p| p.n_out);
        Ok(ClipOutput {
            penultimate: Tensor::new(&[b, l, d], penultimate)?,
            pooled: Tensor::new(&[b, pd], pooled)?,
        })
    }

    fn lin(&self, x: DView<Bf16>, l: &Lin, y: DView<Bf16>, rows: usize) -> Result<()> {
        self.gemm
            .linear(x, l.w, l.b, y, rows, l.n_in, l.n_out, false)
    }

    fn ln(&self, x: DView<Bf16>, n: &Ln, y: DView<Bf16>, rows: usize) -> Result<()> {
        self.dev.layernorm_affine(
            x,
            y,
            n.g,
            n.b,
            rows,
            self.cfg.hidden,
            self.cfg.layer_norm_eps,
        )
    }

    /// Self-attention of `qkv [B·L, 3D]` into `out [B·L, D]`.
    fn attention(&self, p: &ClipPlan, qkv: DView<Bf16>, out: DView<Bf16>) -> Result<()> {
        let (b, l, heads) = (p.batch, p.tokens, self.cfg.heads);
        let hd = self.cfg.hidden / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (none_in, none_out) = (qkv.sub(0, 0)?, out.sub(0, 0)?);
        match &p.scratch {
            None => self.dev.joint_attention_fused_with(
                self.attn_variant,
                none_in,
                qkv,
                none_out,
                out,
                b,
                0,
                l,
                heads,
                scale,
                None,
            ),
            Some(s) => {
                self.dev
                    .split_heads(none_in, qkv, s.q, s.k, s.v, b, 0, l, heads, hd)?;
                self.gemm
                    .batched_qkt_f32(s.q, s.k, s.s, b * heads, l, l, hd)?;
                self.dev
                    .softmax_rows_f32(s.s, s.p, b * heads * l, l, scale)?;
                self.gemm.batched_pv(s.p, s.v, s.o, b * heads, l, l, hd)?;
                self.dev.merge_heads(s.o, none_out, out, b, 0, l, heads, hd)
            }
        }
    }

    /// One whole encoder layer in place on `p.x`.
    fn layer(&self, p: &ClipPlan, ly: &Layer) -> Result<()> {
        let r = p.batch * p.tokens;
        let d = self.cfg.hidden;
        self.ln(p.x, &ly.ln1, p.h, r)?;
        self.lin(p.h, &ly.qkv, p.qkv, r)?;
        self.attention(p, p.qkv, p.att)?;
        self.lin(p.att, &ly.out_proj, p.tmp, r)?;
        self.dev.add(p.x, p.tmp, p.x, r * d)?;
        self.ln(p.x, &ly.ln2, p.h, r)?;
        self.lin(p.h, &ly.fc1, p.mlp, r)?;
        self.dev.quick_gelu(p.mlp, r * self.cfg.intermediate)?;
        self.lin(p.mlp, &ly.fc2, p.tmp, r)?;
        self.dev.add(p.x, p.tmp, p.x, r * d)
    }

    /// The last layer for the class tokens only, then `post_layernorm` (→ projection):
    /// writes `p.pooled`. Leaves `p.x` (the penultimate hidden state) untouched.
    fn last_layer_cls(&self, p: &ClipPlan, ly: &Layer) -> Result<()> {
        let (b, l, d) = (p.batch, p.tokens, self.cfg.hidden);
        let r = b * l;
        self.ln(p.x, &ly.ln1, p.h, r)?;
        self.lin(p.h, &ly.qkv, p.qkv, r)?;
        self.attention(p, p.qkv, p.att)?;
        for bi in 0..b {
            let row = bi * l * d;
            self.dev
                .copy(p.cls_a.sub(bi * d, d)?, p.att.sub(row, d)?, d)?;
            self.dev
                .copy(p.cls_x.sub(bi * d, d)?, p.x.sub(row, d)?, d)?;
        }
        self.lin(p.cls_a, &ly.out_proj, p.cls_t, b)?;
        self.dev.add(p.cls_x, p.cls_t, p.cls_x, b * d)?;
        self.ln(p.cls_x, &ly.ln2, p.cls_h, b)?;
        self.lin(p.cls_h, &ly.fc1, p.cls_m, b)?;
        self.dev.quick_gelu(p.cls_m, b * self.cfg.intermediate)?;
        self.lin(p.cls_m, &ly.fc2, p.cls_t, b)?;
        self.dev.add(p.cls_x, p.cls_t, p.cls_x, b * d)?;
        self.ln(p.cls_x, &self.post_ln, p.post, b)?;
        match &self.projection {
            Some(proj) => self.lin(p.post, proj, p.proj, b),
            None => Ok(()),
        }
    }

    /// The forward on the plan's buffers; returns (penultimate, pooled) on the host.
    fn run(&self, p: &ClipPlan, pixels: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let r = p.batch * p.tokens;
        let rows = embed_rows(&self.cfg, &pixels.data, p.batch);
        self.dev.upload_bf16(p.cols, &bf16_bits(&rows))?;
        // Embedding GEMM into h, pre_layrnorm into x.
        self.lin(p.cols, &self.embed, p.h, r)?;
        self.ln(p.h, &self.pre_ln, p.x, r)?;
        let (last, body) = self
            .layers
            .split_last()
            .ok_or_else(|| Error::Model("clip vision without layers".into()))?;
        for ly in body {
            self.layer(p, ly)?;
        }
        self.last_layer_cls(p, last)?;
        let pooled = match self.projection {
            Some(_) => self.dev.download_bf16(p.proj)?,
            None => self.dev.download_bf16(p.post)?,
        };
        let penultimate = self.dev.download_bf16(p.x)?;
        Ok((penultimate, pooled))
    }
}

/// Scratch of the unfused attention: q, k, v, o `[B, H, L, hd]` bf16, scores `[B·H, L, L]`
/// f32, probabilities bf16.
struct AttnScratch {
    q: DView<Bf16>,
    k: DView<Bf16>,
    v: DView<Bf16>,
    o: DView<Bf16>,
    s: DView<f32>,
    p: DView<Bf16>,
}

/// Every activation of one forward at batch `batch`, carved from one arena (sized by
/// [`plan_bytes_for`], carved in the same order).
struct ClipPlan {
    batch: usize,
    tokens: usize,
    unfused: bool,
    /// Embedding rows `[B·L, K']`.
    cols: DView<Bf16>,
    /// LayerNorm output / scratch `[B·L, D]`.
    h: DView<Bf16>,
    /// The residual stream `[B·L, D]` (the penultimate hidden state at the end).
    x: DView<Bf16>,
    qkv: DView<Bf16>,
    att: DView<Bf16>,
    tmp: DView<Bf16>,
    mlp: DView<Bf16>,
    cls_x: DView<Bf16>,
    cls_a: DView<Bf16>,
    cls_t: DView<Bf16>,
    cls_h: DView<Bf16>,
    cls_m: DView<Bf16>,
    /// `post_layernorm(cls)` `[B, D]`: the pooled output without a projection.
    post: DView<Bf16>,
    /// `post · visual_projectionᵀ` `[B, pd]` (empty without a projection).
    proj: DView<Bf16>,
    scratch: Option<AttnScratch>,
    _arena: DeviceBuffer,
}

impl ClipPlan {
    fn new(dev: &CudaDevice, cfg: &ClipVisionConfig, b: usize, unfused: bool) -> Result<Self> {
        let (d, i, l) = (cfg.hidden, cfg.intermediate, tokens(cfg));
        let r = b * l;
        let total = plan_bytes_for(cfg, b, unfused);
        let buf = dev.alloc(total)?;
        // Poison: anything the forward forgets to write reads as NaN.
        dev.fill_bytes(buf.view::<Bf16>(), 0xFF)?;
        let mut a = Arena::new(buf);
        let cols = a.carve(r * embed_cols(cfg))?;
        let h = a.carve(r * d)?;
        let x = a.carve(r * d)?;
        let qkv = a.carve(r * 3 * d)?;
        let att = a.carve(r * d)?;
        let tmp = a.carve(r * d)?;
        let mlp = a.carve(r * i)?;
        let cls_x = a.carve(b * d)?;
        let cls_a = a.carve(b * d)?;
        let cls_t = a.carve(b * d)?;
        let cls_h = a.carve(b * d)?;
        let post = a.carve(b * d)?;
        let cls_m = a.carve(b * i)?;
        let proj = a.carve(b * cfg.projection_dim.unwrap_or(0))?;
        let scratch = if unfused {
            let s = b * cfg.heads * l * l;
            Some(AttnScratch {
                q: a.carve(r * d)?,
                k: a.carve(r * d)?,
                v: a.carve(r * d)?,
                o: a.carve(r * d)?,
                s: a.carve::<f32>(s)?,
                p: a.carve(s)?,
            })
        } else {
            None
        };
        if a.used() != total {
            return Err(Error::Cuda(format!(
                "CLIP plan: carved {} B of {total} B",
                a.used()
            )));
        }
        Ok(Self {
            batch: b,
            tokens: l,
            unfused,
            cols,
            h,
            x,
            qkv,
            att,
            tmp,
            mlp,
            cls_x,
            cls_a,
            cls_t,
            cls_h,
            cls_m,
            post,
            proj,
            scratch,
            _arena: a.buffer,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::cuda::metrics::{cosine, rel_err};
    use std::collections::HashMap;

    use dpir_loader::clip_vision_spec;

    use super::*;
    use crate::cpu::matmul::linear;
    use crate::models::clip::ClipVision;
    use crate::weights::seeded_random_weights;

    fn round(mut v: Vec<f32>, on: bool) -> Vec<f32> {
        if on {
            v.iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        v
    }

    /// Row LayerNorm in f32 (the kernel's statistics precision).
    fn ln(x: &[f32], g: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let d = g.len();
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (i, o) in out.iter_mut().enumerate() {
                *o = (row[i] - mean) * rstd * g[i] + b[i];
            }
        }
        y
    }

    /// Attention of the query rows `qrows` of each sample over all `l` tokens of
    /// `qkv [B·L, 3D]`: f32 scores, probabilities rounded to bf16 with `bf`, as the unfused
    /// path stores them; output `[B·|qrows|, D]`.
    fn attn(qkv: &[f32], b: usize, l: usize, heads: usize, qrows: usize, bf: bool) -> Vec<f32> {
        let d = qkv.len() / (3 * b * l);
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; b * qrows * d];
        for bi in 0..b {
            let row = |t: usize| &qkv[(bi * l + t) * 3 * d..][..3 * d];
            for h in 0..heads {
                for i in 0..qrows {
                    let q = &row(i)[h * hd..][..hd];
                    let s: Vec<f32> = (0..l)
                        .map(|j| {
                            let k = &row(j)[d + h * hd..][..hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                        })
                        .collect();
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let p = round(e.iter().map(|v| v / sum).collect(), bf);
                    let out = &mut o[(bi * qrows + i) * d + h * hd..][..hd];
                    for (j, pj) in p.iter().enumerate() {
                        let v = &row(j)[2 * d + h * hd..][..hd];
                        out.iter_mut().zip(v).for_each(|(a, vv)| *a += pj * vv);
                    }
                }
            }
        }
        o
    }

    fn add(x: &[f32], y: &[f32]) -> Vec<f32> {
        x.iter().zip(y).map(|(a, b)| a + b).collect()
    }

    /// The GPU graph on the CPU, from the same host-side weight preparation (embedding
    /// weight, fused qkv) and im2col; with `bf` every tensor the GPU stores in bf16 is
    /// rounded where the GPU rounds it. Returns (penultimate, pooled).
    fn emulate(
        cfg: &ClipVisionConfig,
        w: &dyn WeightSource,
        px: &Tensor,
        bf: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let (d, i, heads) = (cfg.hidden, cfg.intermediate, cfg.heads);
        let (b, l, k, eps) = (
            px.shape[0],
            tokens(cfg),
            embed_cols(cfg),
            cfg.layer_norm_eps,
        );
        let r = b * l;
        let get = |n: &str| w.tensor(&format!("vision_model.{n}")).unwrap().data;
        let getr = |n: &str| round(get(n), bf);
        let ew = embed_weight(
            cfg,
            &get("embeddings.patch_embedding.weight"),
            &get("embeddings.class_embedding"),
            &get("embeddings.position_embedding.weight"),
        );
        assert_eq!(ew.len(), d * k);
        let cols = round(embed_rows(cfg, &px.data, b), bf);
        let h = round(linear(&cols, &round(ew, bf), None, r, k, d), bf);
        let mut x = round(
            ln(
                &h,
                &get("pre_layrnorm.weight"),
                &get("pre_layrnorm.bias"),
                eps,
            ),
            bf,
        );
        let lin = |x: &[f32], name: &str, rows: usize, n_in: usize, n_out: usize| {
            let wt = getr(&format!("{name}.weight"));
            let bias = getr(&format!("{name}.bias"));
            round(linear(x, &wt, Some(&bias), rows, n_in, n_out), bf)
        };
        let norm = |x: &[f32], name: &str| {
            round(
                ln(
                    x,
                    &get(&format!("{name}.weight")),
                    &get(&format!("{name}.bias")),
                    eps,
                ),
                bf,
            )
        };
        let qgelu = |v: Vec<f32>| {
            round(
                v.iter().map(|x| x / (1.0 + (-1.702 * x).exp())).collect(),
                bf,
            )
        };
        let mut pooled = Vec::new();
        for li in 0..cfg.layers {
            let pf = format!("encoder.layers.{li}");
            let a = |n: &str| format!("{pf}.self_attn.{n}_proj");
            let qkv_w = round(
                fuse_qkv(
                    &get(&format!("{}.weight", a("q"))),
                    &get(&format!("{}.weight", a("k"))),
                    &get(&format!("{}.weight", a("v"))),
                ),
                bf,
            );
            let qkv_b = round(
                fuse_qkv(
                    &get(&format!("{}.bias", a("q"))),
                    &get(&format!("{}.bias", a("k"))),
                    &get(&format!("{}.bias", a("v"))),
                ),
                bf,
            );
            let h = norm(&x, &format!("{pf}.layer_norm1"));
            let qkv = round(linear(&h, &qkv_w, Some(&qkv_b), r, d, 3 * d), bf);
            let last = li + 1 == cfg.layers;
            let (rows, mut xs, att) = if last {
                let cls: Vec<f32> = (0..b)
                    .flat_map(|bi| x[bi * l * d..][..d].to_vec())
                    .collect();
                (b, cls, round(attn(&qkv, b, l, heads, 1, bf), bf))
            } else {
                (r, x.clone(), round(attn(&qkv, b, l, heads, l, bf), bf))
            };
            let t = lin(&att, &a("out"), rows, d, d);
            xs = round(add(&xs, &t), bf);
            let h = norm(&xs, &format!("{pf}.layer_norm2"));
            let m = qgelu(lin(&h, &format!("{pf}.mlp.fc1"), rows, d, i));
            let t = lin(&m, &format!("{pf}.mlp.fc2"), rows, i, d);
            xs = round(add(&xs, &t), bf);
            if last {
                let post = norm(&xs, "post_layernorm");
                pooled = match cfg.projection_dim {
                    Some(pd) => {
                        let pw = round(w.tensor("visual_projection.weight").unwrap().data, bf);
                        round(linear(&post, &pw, None, b, d, pd), bf)
                    }
                    None => post,
                };
            } else {
                x = xs;
            }
        }
        (x, pooled)
    }

    /// Seeded weights in the HF layout, rounded to bf16 (what the GPU stores).
    fn weights(cfg: &ClipVisionConfig, seed: u64) -> HashMap<String, Tensor> {
        seeded_random_weights(clip_vision_spec(cfg), seed)
            .into_iter()
            .map(|(n, t)| {
                let data = round(t.data, true);
                (
                    n,
                    Tensor {
                        shape: t.shape,
                        data,
                    },
                )
            })
            .collect()
    }

    /// Normalised-pixel-like inputs in [-2, 2], rounded to bf16.
    fn pixels(cfg: &ClipVisionConfig, b: usize, seed: u64) -> Tensor {
        let s = cfg.image_size;
        let n = b * cfg.num_channels * s * s;
        let mut rng = crate::pipeline::rng::Rng::new(seed);
        let data = rng
            .normal_vec(n)
            .iter()
            .map(|v| v.clamp(-2.0, 2.0))
            .collect();
        Tensor {
            shape: vec![b, cfg.num_channels, s, s],
            data: round(data, true),
        }
    }

    /// (f32-emulation error, bf16-emulation error, bf16 cosine) of (penultimate, pooled)
    /// against the CPU model.
    fn emulation_errors(cfg: &ClipVisionConfig, b: usize) -> [(f32, f32, f32); 2] {
        let w = weights(cfg, 11);
        let px = pixels(cfg, b, 5);
        let want = ClipVision::load(cfg, &w).unwrap().forward(&px).unwrap();
        let (pf, qf) = emulate(cfg, &w, &px, false);
        let (pb, qb) = emulate(cfg, &w, &px, true);
        let out = [
            (
                rel_err(&pf, &want.penultimate.data),
                rel_err(&pb, &want.penultimate.data),
                cosine(&pb, &want.penultimate.data),
            ),
            (
                rel_err(&qf, &want.pooled.data),
                rel_err(&qb, &want.pooled.data),
                cosine(&qb, &want.pooled.data),
            ),
        ];
        for (name, (f, e, c)) in ["penultimate", "pooled"].iter().zip(out) {
            println!(
                "hidden {} layers {} heads {} batch {b}: {name}: f32 graph rel err {f:.2e}, \
                 bf16-emulated {e:.2e} (cosine {c:.6})",
                cfg.hidden, cfg.layers, cfg.heads
            );
        }
        out
    }

    fn dpir_tiny() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden: 256,
            intermediate: 1024,
            layers: 4,
            heads: 4,
            patch_size: 16,
            image_size: 112,
            num_channels: 3,
            projection_dim: None,
            layer_norm_eps: 1e-5,
        }
    }

    /// Projection and head_dim 48 (the unfused attention path on the GPU), 65 tokens.
    fn hd48() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden: 192,
            intermediate: 384,
            layers: 3,
            heads: 4,
            patch_size: 8,
            image_size: 64,
            num_channels: 3,
            projection_dim: Some(96),
            layer_norm_eps: 1e-5,
        }
    }

    #[test]
    fn gpu_graph_reproduces_the_cpu_model() {
        // The GPU's graph (embedding GEMM with one-hot token columns, fused qkv, class-only
        // last layer) run on the CPU in f32 is the CPU model: this checks the host-side
        // preparation and the wiring without a GPU. The bf16-emulated run bounds what bf16
        // storage alone costs.
        let one_layer = ClipVisionConfig {
            layers: 1,
            projection_dim: None,
            ..ClipVisionConfig::tiny()
        };
        for (cfg, b) in [
            (ClipVisionConfig::tiny(), 2),
            (dpir_tiny(), 1),
            (hd48(), 2),
            (one_layer, 2),
        ] {
            for (f32_err, bf16_err, cos) in emulation_errors(&cfg, b) {
                assert!(f32_err < 1e-5, "{f32_err}");
                assert!(bf16_err < 5e-2, "{bf16_err}");
                assert!(cos > 0.999, "{cos}");
            }
        }
    }

    /// The bf16-emulated error at CLIP ViT-L/14 shapes (the GPU test's case (c); slow):
    /// `cargo test --release -p dpir-engine --lib vit_l14_bf16_emulation -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn vit_l14_bf16_emulation() {
        emulation_errors(&ClipVisionConfig::vit_l14(), 1);
    }

    #[test]
    fn embedding_rows_and_weight_layout() {
        // 2 channels, patch 2, image 4: 4 patches, 5 tokens, 8 + 5 = 13 → 16 columns.
        let cfg = ClipVisionConfig {
            hidden: 8,
            intermediate: 8,
            layers: 1,
            heads: 1,
            patch_size: 2,
            image_size: 4,
            num_channels: 2,
            projection_dim: None,
            layer_norm_eps: 1e-5,
        };
        assert_eq!((tokens(&cfg), embed_cols(&cfg)), (5, 16));
        let px: Vec<f32> = (0..2 * 16).map(|v| v as f32).collect();
        let rows = embed_rows(&cfg, &px, 1);
        assert_eq!(rows.len(), 5 * 16);
        // Class row: only its one-hot column.
        let mut want = [0f32; 16];
        want[8] = 1.0;
        assert_eq!(&rows[..16], &want[..]);
        // Token 4 = patch (gy 1, gx 1): channel 0 pixels (2,2) (2,3) (3,2) (3,3) = 10 11 14 15,
        // channel 1 the same + 16; one-hot column 8 + 4.
        let mut want = vec![10., 11., 14., 15., 26., 27., 30., 31., 0., 0., 0., 0., 1.];
        want.resize(16, 0.0);
        assert_eq!(&rows[4 * 16..], &want[..]);
        // Weight: conv columns, then pos (+ class at token 0), then zeros.
        let patch_w: Vec<f32> = (0..8 * 8).map(|v| v as f32).collect();
        let class = vec![100f32; 8];
        let pos: Vec<f32> = (0..5 * 8).map(|v| 1000.0 + v as f32).collect();
        let ew = embed_weight(&cfg, &patch_w, &class, &pos);
        let row3 = &ew[3 * 16..][..16];
        assert_eq!(&row3[..8], &patch_w[24..32]);
        assert_eq!(row3[8], 1000.0 + 3.0 + 100.0);
        assert_eq!(row3[9], 1000.0 + 8.0 + 3.0);
        assert_eq!(row3[12], 1000.0 + 32.0 + 3.0);
        assert!(row3[13..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn qkv_fusion_order() {
        let (q, k, v) = (
            vec![1f32, 2., 3., 4.],
            vec![5f32, 6., 7., 8.],
            vec![9f32; 4],
        );
        // [2, 2] weights → [6, 2]: rows q0 q1 k0 k1 v0 v1.
        assert_eq!(
            fuse_qkv(&q, &k, &v),
            vec![1., 2., 3., 4., 5., 6., 7., 8., 9., 9., 9., 9.]
        );
    }

    #[test]
    fn plan_and_weight_bytes() {
        let cfg = dpir_tiny();
        // 768 patch pixels + 50 tokens = 818 → 824 columns; ViT-L/14: 588 + 257 → 848.
        assert_eq!(embed_cols(&cfg), 824);
        assert_eq!(embed_cols(&ClipVisionConfig::vit_l14()), 848);
        // Batch 1, fused: cols 82432 + 4 × 25600 + qkv 76800 + mlp 102400 + 5 × 512
        // + cls mlp 2048 (no projection).
        assert_eq!(plan_bytes_for(&cfg, 1, false), 368_640);
        // Batch 2, unfused: 164864 + 4 × 51200 + 153600 + 204800 + 5 × 1024 + 4096
        // + scratch 4 × 51200 + scores 80128 (f32) + probabilities 40192.
        assert_eq!(plan_bytes_for(&cfg, 2, true), 1_062_400);
        // Weights: embed 256 × 824 bf16 (421888), 4 LN pairs of 2 × 1024 B outside layers
        // and per layer, qkv 393216 + 1536, out 131072 + 512, fc1 524288 + 2048,
        // fc2 524288 + 512.
        let layer = 2 * 2048 + 393_216 + 1536 + 131_072 + 512 + 524_288 + 2048 + 524_288 + 512;
        assert_eq!(weight_bytes_for(&cfg), 421_888 + 2 * 2048 + 4 * layer);
    }

    #[test]
    fn config_checks() {
        assert!(check_config(&ClipVisionConfig::vit_l14()).is_ok());
        assert!(check_config(&dpir_tiny()).is_ok());
        let odd = ClipVisionConfig {
            hidden: 20,
            heads: 2,
            ..ClipVisionConfig::tiny()
        };
        assert!(check_config(&odd).is_err());
        let bad_patch = ClipVisionConfig {
            patch_size: 5,
            ..ClipVisionConfig::tiny()
        };
        assert!(check_config(&bad_patch).is_err());
    }
}
