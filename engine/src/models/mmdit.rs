//! SD3 / SD3.5 MMDiT (and MMDiT-X) forward on the CPU backend, mirroring SD3's `mmdit.py`
//! module paths (`joint_blocks.{i}.x_block.attn.qkv`, ...). See docs/ARCHITECTURE.md.
//!
//! Data layout: tokens row-major, `[B·T, D]`. Every Linear runs through
//! [`cpu::matmul::linear_into`]; activations live in a handful of buffers sized once per
//! forward and reused by every block.

use dpir_loader::config::MmditConfig;
use rayon::prelude::*;

use crate::cpu::attention::{attention_strided, Rows};
use crate::cpu::matmul::linear_into;
use crate::cpu::ops::{gated_add, gelu_tanh_inplace, layer_norm_modulate, rms_norm_inplace, silu};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::WeightSource;

const LN_EPS: f32 = 1e-6;
const RMS_EPS: f32 = 1e-6;
/// ε of the adaptive feature alignment (ARCHITECTURE.md).
const ALIGN_EPS: f32 = 1e-6;

/// A Linear layer in PyTorch layout: `w [out, in]`, `b [out]`.
struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

impl Linear {
    fn load(w: &dyn WeightSource, name: &str, n_out: usize, n_in: usize) -> Result<Self> {
        let weight = w.tensor_shaped(&format!("{name}.weight"), &[n_out, n_in])?;
        let bias = w.tensor_shaped(&format!("{name}.bias"), &[n_out])?;
        Ok(Self {
            w: weight.data,
            b: bias.data,
            n_in,
            n_out,
        })
    }

    /// `y[m, n_out] = x[m, n_in] · wᵀ + b`.
    fn forward_into(&self, x: &[f32], y: &mut [f32], m: usize) {
        linear_into(x, &self.w, Some(&self.b), y, m, self.n_in, self.n_out);
    }

    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.n_out];
        self.forward_into(x, &mut y, m);
        y
    }
}

/// `attn` / `attn2`: fused qkv, optional per-head RMSNorm on q and k, output projection.
struct Attention {
    qkv: Linear,
    ln_q: Option<Vec<f32>>,
    ln_k: Option<Vec<f32>>,
    proj: Option<Linear>,
}

impl Attention {
    fn load(w: &dyn WeightSource, p: &str, cfg: &MmditConfig, pre_only: bool) -> Result<Self> {
        let d = cfg.hidden;
        let hd = cfg.head_dim();
        let qkv = Linear::load(w, &format!("{p}.qkv"), 3 * d, d)?;
        // qk-norm weights are required where the config says so, except on the last
        // block's qkv-only context stream, where we take them when present (SD3.5 has
        // them; candle's MMDiT never reads them).
        let norm = |n: &str| -> Result<Option<Vec<f32>>> {
            let name = format!("{p}.{n}.weight");
            if cfg.qk_norm && (!pre_only || w.contains(&name)) {
                Ok(Some(w.tensor_shaped(&name, &[hd])?.data))
            } else {
                Ok(None)
            }
        };
        let proj = if pre_only {
            None
        } else {
            Some(Linear::load(w, &format!("{p}.proj"), d, d)?)
        };
        Ok(Self {
            qkv,
            ln_q: norm("ln_q")?,
            ln_k: norm("ln_k")?,
            proj,
        })
    }

    /// Per-head RMSNorm of the q and k parts of qkv rows `[rows, 3D]`.
    fn norm_qk(&self, qkv: &mut [f32], d: usize) {
        if self.ln_q.is_none() && self.ln_k.is_none() {
            return;
        }
        qkv.par_chunks_mut(3 * d).for_each(|row| {
            if let Some(w) = &self.ln_q {
                rms_norm_inplace(&mut row[..d], w, RMS_EPS);
            }
            if let Some(w) = &self.ln_k {
                rms_norm_inplace(&mut row[d..2 * d], w, RMS_EPS);
            }
        });
    }
}

/// One stream of a joint block (`x_block` or `context_block`).
struct DitBlock {
    ada: Linear,
    n_mods: usize,
    attn: Attention,
    attn2: Option<Attention>,
    mlp: Option<(Linear, Linear)>,
}

impl DitBlock {
    fn load(
        w: &dyn WeightSource,
        p: &str,
        cfg: &MmditConfig,
        pre_only: bool,
        attn2: bool,
    ) -> Result<Self> {
        let d = cfg.hidden;
        let n_mods = if pre_only {
            2
        } else if attn2 {
            9
        } else {
            6
        };
        let ada = Linear::load(w, &format!("{p}.adaLN_modulation.1"), n_mods * d, d)?;
        let attn = Attention::load(w, &format!("{p}.attn"), cfg, pre_only)?;
        let attn2 = if attn2 {
            Some(Attention::load(w, &format!("{p}.attn2"), cfg, false)?)
        } else {
            None
        };
        let mlp = if pre_only {
            None
        } else {
            Some((
                Linear::load(w, &format!("{p}.mlp.fc1"), cfg.mlp_hidden, d)?,
                Linear::load(w, &format!("{p}.mlp.fc2"), d, cfg.mlp_hidden)?,
            ))
        };
        Ok(Self {
            ada,
            n_mods,
            attn,
            attn2,
            mlp,
        })
    }
}

struct JointBlock {
    x_block: DitBlock,
    context_block: DitBlock,
}

/// LQ features injected after joint block 0 (adaptive feature alignment).
pub struct LqInject<'a> {
    /// `[B, N, hidden]`, N = image tokens.
    pub tokens: &'a Tensor,
    /// `[hidden]` (`lq_align.gate`).
    pub gate: &'a [f32],
}

/// Outputs of one joint block, for per-block checks.
pub struct BlockOutput {
    /// `[B, L, hidden]`; `None` for the last block (its context stream is qkv-only).
    pub context: Option<Tensor>,
    /// `[B, N, hidden]`.
    pub x: Tensor,
}

pub struct Mmdit {
    pub cfg: MmditConfig,
    x_embedder: Linear,
    pos_embed: Vec<f32>,
    t_embedder: (Linear, Linear),
    y_embedder: (Linear, Linear),
    context_embedder: Linear,
    joint_blocks: Vec<JointBlock>,
    final_ada: Linear,
    final_linear: Linear,
}

/// Activation buffers for one forward, sized once from (batch, image tokens, context tokens).
struct Work {
    xmod: Vec<f32>,
    cmod: Vec<f32>,
    qkv_x: Vec<f32>,
    qkv_c: Vec<f32>,
    joint: Vec<f32>,
    attn: Vec<f32>,
    attn_x: Vec<f32>,
    attn_c: Vec<f32>,
    tmp: Vec<f32>,
    hidden: Vec<f32>,
    /// MMDiT-X only (grown on first use): attn2's qkv and output.
    qkv2: Vec<f32>,
    attn2: Vec<f32>,
}

/// The structural checks every MMDiT backend needs before sizing anything from `cfg`.
pub(crate) fn check_config(cfg: &MmditConfig) -> Result<()> {
    let (d, p) = (cfg.hidden, cfg.patch_size);
    if cfg.depth == 0 || cfg.num_heads == 0 || !d.is_multiple_of(cfg.num_heads) || p == 0 {
        return Err(Error::Model(format!(
            "invalid MMDiT config: depth {}, hidden {d}, heads {}, patch {p}",
            cfg.depth, cfg.num_heads
        )));
    }
    if cfg
        .attn2_blocks
        .get(cfg.depth - 1)
        .copied()
        .unwrap_or(false)
    {
        return Err(Error::Model(
            "MMDiT: the last joint block cannot have attn2".into(),
        ));
    }
    Ok(())
}

impl Mmdit {
    pub fn load(cfg: &MmditConfig, w: &dyn WeightSource) -> Result<Self> {
        check_config(cfg)?;
        let d = cfg.hidden;
        let p = cfg.patch_size;
        let pe = w.tensor_shaped("x_embedder.proj.weight", &[d, cfg.in_channels, p, p])?;
        let pb = w.tensor_shaped("x_embedder.proj.bias", &[d])?;
        let x_embedder = Linear {
            w: pe.data,
            b: pb.data,
            n_in: cfg.in_channels * p * p,
            n_out: d,
        };
        let m = cfg.pos_embed_max_size;
        let pos_embed = w.tensor_shaped("pos_embed", &[1, m * m, d])?.data;
        let f = cfg.frequency_embedding_size;
        let t_embedder = (
            Linear::load(w, "t_embedder.mlp.0", d, f)?,
            Linear::load(w, "t_embedder.mlp.2", d, d)?,
        );
        let y_embedder = (
            Linear::load(w, "y_embedder.mlp.0", d, cfg.pooled_dim)?,
            Linear::load(w, "y_embedder.mlp.2", d, d)?,
        );
        let context_embedder = Linear::load(w, "context_embedder", d, cfg.context_dim)?;
        let mut joint_blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let last = i + 1 == cfg.depth;
            let attn2 = cfg.attn2_blocks.get(i).copied().unwrap_or(false);
            joint_blocks.push(JointBlock {
                x_block: DitBlock::load(
                    w,
                    &format!("joint_blocks.{i}.x_block"),
                    cfg,
                    false,
                    attn2,
                )?,
                context_block: DitBlock::load(
                    w,
                    &format!("joint_blocks.{i}.context_block"),
                    cfg,
                    last,
                    false,
                )?,
            });
        }
        let final_ada = Linear::load(w, "final_layer.adaLN_modulation.1", 2 * d, d)?;
        let final_linear = Linear::load(w, "final_layer.linear", p * p * cfg.out_channels, d)?;
        Ok(Self {
            cfg: cfg.clone(),
            x_embedder,
            pos_embed,
            t_embedder,
            y_embedder,
            context_embedder,
            joint_blocks,
            final_ada,
            final_linear,
        })
    }

    /// x `[B, C, H, W]` latent, timestep `[B]` (= 1000·σ), y `[B, pooled]`,
    /// context `[B, L, ctx]` (L may be 0). Returns `[B, out_channels, H, W]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq: Option<LqInject<'_>>,
    ) -> Result<Tensor> {
        self.run(x, timestep, y, context, lq, None)
    }

    /// [`Mmdit::forward`] without LQ injection, also returning every joint block's outputs.
    pub fn forward_with_block_outputs(
        &self,
        x: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<BlockOutput>)> {
        let mut trace = Vec::with_capacity(self.cfg.depth);
        let out = self.run(x, timestep, y, context, None, Some(&mut trace))?;
        Ok((out, trace))
    }

    fn run(
        &self,
        x: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq: Option<LqInject<'_>>,
        mut trace: Option<&mut Vec<BlockOutput>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let d = cfg.hidden;
        let p = cfg.patch_size;
        let [b, c, h, w] = x.shape[..] else {
            return Err(Error::Model(format!(
                "MMDiT input x: expected [B, C, H, W], found {:?}",
                x.shape
            )));
        };
        if c != cfg.in_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(Error::Model(format!(
                "MMDiT input x {:?}: needs {} channels and H, W multiples of {p}",
                x.shape, cfg.in_channels
            )));
        }
        let (hp, wp) = (h / p, w / p);
        let m = cfg.pos_embed_max_size;
        if hp > m || wp > m {
            return Err(Error::Model(format!(
                "MMDiT input {h}×{w} exceeds the positional embedding ({m}×{m} patches)"
            )));
        }
        if timestep.len() != b {
            return Err(Error::Model(format!(
                "MMDiT: {} timesteps for batch {b}",
                timestep.len()
            )));
        }
        if y.shape != [b, cfg.pooled_dim] {
            return Err(Error::Model(format!(
                "MMDiT pooled y: expected {:?}, found {:?}",
                [b, cfg.pooled_dim],
                y.shape
            )));
        }
        let l = match context.shape[..] {
            [cb, l, cd] if cb == b && cd == cfg.context_dim => l,
            _ => {
                return Err(Error::Model(format!(
                    "MMDiT context: expected [{b}, L, {}], found {:?}",
                    cfg.context_dim, context.shape
                )))
            }
        };
        let n = hp * wp;
        if let Some(inj) = &lq {
            if inj.tokens.shape != [b, n, d] || inj.gate.len() != d {
                return Err(Error::Model(format!(
                    "LQ injection: expected tokens [{b}, {n}, {d}] and gate [{d}], found {:?} and [{}]",
                    inj.tokens.shape,
                    inj.gate.len()
                )));
            }
        }

        // Patch embedding (conv p×p stride p as im2col + Linear) plus the cropped pos-embed.
        let kin = c * p * p;
        let mut patches = vec![0f32; b * n * kin];
        for bi in 0..b {
            for r in 0..hp {
                for col in 0..wp {
                    let row = &mut patches[((bi * hp + r) * wp + col) * kin..][..kin];
                    for ci in 0..c {
                        for i in 0..p {
                            for j in 0..p {
                                row[(ci * p + i) * p + j] =
                                    x.data[((bi * c + ci) * h + r * p + i) * w + col * p + j];
                            }
                        }
                    }
                }
            }
        }
        let mut xs = self.x_embedder.forward(&patches, b * n);
        let (top, left) = ((m - hp) / 2, (m - wp) / 2);
        for bi in 0..b {
            for r in 0..hp {
                for col in 0..wp {
                    let pe = &self.pos_embed[((top + r) * m + left + col) * d..][..d];
                    let xr = &mut xs[((bi * hp + r) * wp + col) * d..][..d];
                    for (a, &v) in xr.iter_mut().zip(pe) {
                        *a += v;
                    }
                }
            }
        }

        // c = t_embedder(t) + y_embedder(y); every adaLN reads SiLU(c).
        let f = cfg.frequency_embedding_size;
        let t_freq = timestep_embedding(timestep, f);
        let te = self
            .t_embedder
            .1
            .forward(&silu(&self.t_embedder.0.forward(&t_freq, b)), b);
        let ye = self
            .y_embedder
            .1
            .forward(&silu(&self.y_embedder.0.forward(&y.data, b)), b);
        let cvec: Vec<f32> = te.iter().zip(&ye).map(|(a, c)| a + c).collect();
        let silu_c = silu(&cvec);

        let mut cs = self.context_embedder.forward(&context.data, b * l);

        let lt = l + n;
        let mut wk = Work {
            xmod: vec![0f32; b * n * d],
            cmod: vec![0f32; b * l * d],
            qkv_x: vec![0f32; b * n * 3 * d],
            qkv_c: vec![0f32; b * l * 3 * d],
            joint: vec![0f32; b * lt * 3 * d],
            attn: vec![0f32; b * lt * d],
            attn_x: vec![0f32; b * n * d],
            attn_c: vec![0f32; b * l * d],
            tmp: vec![0f32; b * n.max(l) * d],
            hidden: vec![0f32; b * n.max(l) * cfg.mlp_hidden],
            qkv2: Vec::new(),
            attn2: Vec::new(),
        };
        for (i, blk) in self.joint_blocks.iter().enumerate() {
            self.joint_block(blk, &mut xs, &mut cs, &silu_c, b, n, l, &mut wk);
            if i == 0 {
                if let Some(inj) = &lq {
                    align_and_add(&mut xs, &inj.tokens.data, inj.gate, b, n, d);
                }
            }
            if let Some(t) = trace.as_deref_mut() {
                let last = i + 1 == self.joint_blocks.len();
                t.push(BlockOutput {
                    context: if last {
                        None
                    } else {
                        Some(Tensor::new(&[b, l, d], cs.clone())?)
                    },
                    x: Tensor::new(&[b, n, d], xs.clone())?,
                });
            }
        }

        // Final layer: adaLN (shift, scale) → LayerNorm → modulate → Linear → unpatchify.
        let fmod = self.final_ada.forward(&silu_c, b);
        for bi in 0..b {
            let md = &fmod[bi * 2 * d..][..2 * d];
            layer_norm_modulate(
                &xs[bi * n * d..][..n * d],
                &mut wk.xmod[bi * n * d..][..n * d],
                d,
                &md[..d],
                &md[d..],
                LN_EPS,
            );
        }
        let oc = cfg.out_channels;
        let yv = self.final_linear.forward(&wk.xmod, b * n);
        let mut out = vec![0f32; b * oc * h * w];
        for bi in 0..b {
            for r in 0..hp {
                for col in 0..wp {
                    let tok = &yv[((bi * hp + r) * wp + col) * p * p * oc..][..p * p * oc];
                    for i in 0..p {
                        for j in 0..p {
                            for ch in 0..oc {
                                out[((bi * oc + ch) * h + r * p + i) * w + col * p + j] =
                                    tok[(i * p + j) * oc + ch];
                            }
                        }
                    }
                }
            }
        }
        Tensor::new(&[b, oc, h, w], out)
    }

    #[allow(clippy::too_many_arguments)]
    fn joint_block(
        &self,
        blk: &JointBlock,
        xs: &mut [f32],
        cs: &mut [f32],
        silu_c: &[f32],
        b: usize,
        n: usize,
        l: usize,
        wk: &mut Work,
    ) {
        let d = self.cfg.hidden;
        let heads = self.cfg.num_heads;
        let hd = self.cfg.head_dim();
        let scale = 1.0 / (hd as f32).sqrt();
        let lt = l + n;
        let xmods = blk.x_block.ada.forward(silu_c, b);
        let cmods = blk.context_block.ada.forward(silu_c, b);
        let xm = |bi: usize, k: usize| &xmods[(bi * blk.x_block.n_mods + k) * d..][..d];
        let cm = |bi: usize, k: usize| &cmods[(bi * blk.context_block.n_mods + k) * d..][..d];

        // Pre-attention: LayerNorm + modulate, qkv, qk-norm.
        for bi in 0..b {
            layer_norm_modulate(
                &xs[bi * n * d..][..n * d],
                &mut wk.xmod[bi * n * d..][..n * d],
                d,
                xm(bi, 0),
                xm(bi, 1),
                LN_EPS,
            );
            layer_norm_modulate(
                &cs[bi * l * d..][..l * d],
                &mut wk.cmod[bi * l * d..][..l * d],
                d,
                cm(bi, 0),
                cm(bi, 1),
                LN_EPS,
            );
        }
        blk.x_block
            .attn
            .qkv
            .forward_into(&wk.xmod, &mut wk.qkv_x, b * n);
        blk.context_block
            .attn
            .qkv
            .forward_into(&wk.cmod, &mut wk.qkv_c, b * l);
        blk.x_block.attn.norm_qk(&mut wk.qkv_x, d);
        blk.context_block.attn.norm_qk(&mut wk.qkv_c, d);

        // MMDiT-X: self-attention over image tokens on LN(x) with its own modulation
        // (chunks 6, 7), computed before any residual touches x.
        if let Some(a2) = &blk.x_block.attn2 {
            let xmod2 = &mut wk.tmp[..b * n * d];
            for bi in 0..b {
                layer_norm_modulate(
                    &xs[bi * n * d..][..n * d],
                    &mut xmod2[bi * n * d..][..n * d],
                    d,
                    xm(bi, 6),
                    xm(bi, 7),
                    LN_EPS,
                );
            }
            wk.qkv2.resize(b * n * 3 * d, 0.0);
            wk.attn2.resize(b * n * d, 0.0);
            a2.qkv.forward_into(xmod2, &mut wk.qkv2, b * n);
            a2.norm_qk(&mut wk.qkv2, d);
            let rows = |off: usize| Rows {
                data: &wk.qkv2[off..],
                stride: 3 * d,
            };
            attention_strided(
                rows(0),
                rows(d),
                rows(2 * d),
                &mut wk.attn2,
                b,
                heads,
                n,
                n,
                hd,
                scale,
            );
        }

        // Joint attention over [context; image] tokens.
        for bi in 0..b {
            let dst = &mut wk.joint[bi * lt * 3 * d..][..lt * 3 * d];
            dst[..l * 3 * d].copy_from_slice(&wk.qkv_c[bi * l * 3 * d..][..l * 3 * d]);
            dst[l * 3 * d..].copy_from_slice(&wk.qkv_x[bi * n * 3 * d..][..n * 3 * d]);
        }
        let rows = |off: usize| Rows {
            data: &wk.joint[off..],
            stride: 3 * d,
        };
        attention_strided(
            rows(0),
            rows(d),
            rows(2 * d),
            &mut wk.attn,
            b,
            heads,
            lt,
            lt,
            hd,
            scale,
        );
        for bi in 0..b {
            let src = &wk.attn[bi * lt * d..][..lt * d];
            wk.attn_c[bi * l * d..][..l * d].copy_from_slice(&src[..l * d]);
            wk.attn_x[bi * n * d..][..n * d].copy_from_slice(&src[l * d..]);
        }

        // Context stream: gated attention and MLP residuals (absent in the last block).
        if let (Some(proj), Some((fc1, fc2))) =
            (&blk.context_block.attn.proj, &blk.context_block.mlp)
        {
            let tmp = &mut wk.tmp[..b * l * d];
            proj.forward_into(&wk.attn_c, tmp, b * l);
            for bi in 0..b {
                gated_add(
                    &mut cs[bi * l * d..][..l * d],
                    &tmp[bi * l * d..][..l * d],
                    cm(bi, 2),
                );
            }
            mlp_residual(
                cs,
                &mut wk.cmod,
                &mut wk.hidden,
                &mut wk.tmp,
                fc1,
                fc2,
                b,
                l,
                d,
                &|bi, k| cm(bi, k),
            );
        }

        // Image stream (attn2 for MMDiT-X blocks), then its MLP.
        if let Some(proj) = &blk.x_block.attn.proj {
            let tmp = &mut wk.tmp[..b * n * d];
            proj.forward_into(&wk.attn_x, tmp, b * n);
            for bi in 0..b {
                gated_add(
                    &mut xs[bi * n * d..][..n * d],
                    &tmp[bi * n * d..][..n * d],
                    xm(bi, 2),
                );
            }
        }
        if let Some(a2p) = blk.x_block.attn2.as_ref().and_then(|a| a.proj.as_ref()) {
            let tmp = &mut wk.tmp[..b * n * d];
            a2p.forward_into(&wk.attn2, tmp, b * n);
            for bi in 0..b {
                gated_add(
                    &mut xs[bi * n * d..][..n * d],
                    &tmp[bi * n * d..][..n * d],
                    xm(bi, 8),
                );
            }
        }
        if let Some((fc1, fc2)) = &blk.x_block.mlp {
            mlp_residual(
                xs,
                &mut wk.xmod,
                &mut wk.hidden,
                &mut wk.tmp,
                fc1,
                fc2,
                b,
                n,
                d,
                &|bi, k| xm(bi, k),
            );
        }
    }
}

/// `x += gate_mlp · fc2(GELU_tanh(fc1((1 + scale_mlp)·LN(x) + shift_mlp)))`; modulation
/// chunks 3, 4, 5 of `mods(batch, chunk)`.
#[allow(clippy::too_many_arguments)]
fn mlp_residual<'m>(
    x: &mut [f32],
    xmod: &mut [f32],
    hidden: &mut [f32],
    tmp: &mut [f32],
    fc1: &Linear,
    fc2: &Linear,
    b: usize,
    t: usize,
    d: usize,
    mods: &dyn Fn(usize, usize) -> &'m [f32],
) {
    if b * t == 0 {
        return;
    }
    for bi in 0..b {
        layer_norm_modulate(
            &x[bi * t * d..][..t * d],
            &mut xmod[bi * t * d..][..t * d],
            d,
            mods(bi, 3),
            mods(bi, 4),
            LN_EPS,
        );
    }
    let hsz = fc1.n_out;
    let hidden = &mut hidden[..b * t * hsz];
    fc1.forward_into(&xmod[..b * t * d], hidden, b * t);
    hidden.par_chunks_mut(64 * hsz).for_each(gelu_tanh_inplace);
    let tmp = &mut tmp[..b * t * d];
    fc2.forward_into(hidden, tmp, b * t);
    for bi in 0..b {
        gated_add(
            &mut x[bi * t * d..][..t * d],
            &tmp[bi * t * d..][..t * d],
            mods(bi, 5),
        );
    }
}

/// Sinusoidal timestep embedding, `cos` half first (SD3), max period 10000.
fn timestep_embedding(t: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0f32; t.len() * dim];
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for i in 0..half {
            let freq = (-(10000f64.ln()) * i as f64 / half as f64).exp();
            let arg = tv as f64 * freq;
            row[i] = arg.cos() as f32;
            row[half + i] = arg.sin() as f32;
        }
    }
    out
}

/// Adaptive feature alignment (ARCHITECTURE.md): for each sample and channel, renormalise
/// `f` to the token mean/std of `x` and add `gate ⊙ f̂` to `x`. `x`, `f` are
/// `[batch, tokens, hidden]`; `gate` is `[hidden]`. Channels whose gate is exactly zero
/// are left untouched, so a zero gate reproduces plain SD3 bit for bit.
pub fn align_and_add(
    x: &mut [f32],
    f: &[f32],
    gate: &[f32],
    batch: usize,
    tokens: usize,
    hidden: usize,
) {
    assert!(
        x.len() >= batch * tokens * hidden
            && f.len() >= batch * tokens * hidden
            && gate.len() == hidden
    );
    if tokens == 0 || gate.iter().all(|&g| g == 0.0) {
        return;
    }
    let stats = |a: &[f32]| -> (Vec<f32>, Vec<f32>) {
        let mut mean = vec![0f64; hidden];
        for row in a.chunks_exact(hidden) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= tokens as f64);
        let mut var = vec![0f64; hidden];
        for row in a.chunks_exact(hidden) {
            for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
                let c = v as f64 - m;
                *s += c * c;
            }
        }
        (
            mean.iter().map(|&m| m as f32).collect(),
            var.iter()
                .map(|&s| (s / tokens as f64).sqrt() as f32)
                .collect(),
        )
    };
    for bi in 0..batch {
        let xb = &mut x[bi * tokens * hidden..][..tokens * hidden];
        let fb = &f[bi * tokens * hidden..][..tokens * hidden];
        let (mx, sx) = stats(xb);
        let (mf, sf) = stats(fb);
        for (xr, fr) in xb.chunks_exact_mut(hidden).zip(fb.chunks_exact(hidden)) {
            for ch in 0..hidden {
                let g = gate[ch];
                if g != 0.0 {
                    let fhat = (fr[ch] - mf[ch]) / (sf[ch] + ALIGN_EPS) * sx[ch] + mx[ch];
                    xr[ch] += g * fhat;
                }
            }
        }
    }
}
