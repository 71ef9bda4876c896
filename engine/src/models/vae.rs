//! The SD3 VAE (LDM `AutoencoderKL`, 16 latent channels, no quant convs) on the CPU.
//!
//! Weight names are the canonical LDM ones, relative to the component:
//! `encoder.conv_in`, `encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}`,
//! `encoder.down.{i}.downsample.conv` (every level but the last), `encoder.mid.block_1`,
//! `encoder.mid.attn_1.{norm,q,k,v,proj_out}`, `encoder.mid.block_2`, `encoder.norm_out`,
//! `encoder.conv_out`; `decoder.conv_in`, `decoder.mid.*`, `decoder.up.{i}.block.{j}`,
//! `decoder.up.{i}.upsample.conv` (i ≥ 1), `decoder.norm_out`, `decoder.conv_out`.
//! LDM's `up[i]` runs from the deepest level (i = n − 1) down to 0.

use dpir_loader::VaeConfig;

use crate::cpu::attention::attention;
use crate::cpu::conv::{group_norm, Conv2d, Padding, Prologue, Scratch};
use crate::cpu::matmul::linear;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{Prefixed, WeightSource};

const NORM_EPS: f32 = 1e-6;

fn sub<'a>(w: &'a dyn WeightSource, prefix: &str) -> Prefixed<'a> {
    Prefixed {
        inner: w,
        prefix: format!("{prefix}."),
    }
}

fn conv(
    w: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    k: usize,
    stride: usize,
    pad: Padding,
) -> Result<Conv2d> {
    let weight = w.tensor_shaped(&format!("{name}.weight"), &[out, inp, k, k])?;
    let bias = w.tensor_shaped(&format!("{name}.bias"), &[out])?;
    Conv2d::new(weight, Some(bias), stride, pad)
}

struct GroupNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
}

impl GroupNorm {
    fn load(w: &dyn WeightSource, name: &str, channels: usize, groups: usize) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Model(format!(
                "`{name}`: {groups} norm groups do not divide {channels} channels"
            )));
        }
        Ok(Self {
            weight: w
                .tensor_shaped(&format!("{name}.weight"), &[channels])?
                .data,
            bias: w.tensor_shaped(&format!("{name}.bias"), &[channels])?.data,
            groups,
        })
    }

    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(x, self.groups, &self.weight, &self.bias, NORM_EPS, silu)
    }

    /// This norm followed by SiLU, as the prologue of the convolution it feeds.
    fn then_silu(&self) -> Prologue<'_> {
        Prologue::GroupNorm {
            groups: self.groups,
            weight: &self.weight,
            bias: &self.bias,
            eps: NORM_EPS,
            silu: true,
        }
    }
}

/// `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shortcut a 1×1 conv when the
/// channel count changes.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(w: &dyn WeightSource, inp: usize, out: usize, groups: usize) -> Result<Self> {
        let p1 = Padding::same(1);
        Ok(Self {
            norm1: GroupNorm::load(w, "norm1", inp, groups)?,
            conv1: conv(w, "conv1", out, inp, 3, 1, p1)?,
            norm2: GroupNorm::load(w, "norm2", out, groups)?,
            conv2: conv(w, "conv2", out, out, 3, 1, p1)?,
            nin_shortcut: if inp != out {
                Some(conv(w, "nin_shortcut", out, inp, 1, 1, Padding::same(0))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor, s: &Scratch) -> Result<Tensor> {
        let h = self
            .conv1
            .forward_with(&x, self.norm1.then_silu(), None, s)?;
        let shortcut = match &self.nin_shortcut {
            Some(c) => {
                let r = c.forward_with(&x, Prologue::None, None, s)?;
                s.give(x.data);
                r
            }
            None => x,
        };
        let y = self
            .conv2
            .forward_with(&h, self.norm2.then_silu(), Some(shortcut), s)?;
        s.give(h.data);
        Ok(y)
    }
}

/// Single-head self-attention over the `H·W` positions, q/k/v/proj_out 1×1 convs.
struct AttnBlock {
    norm: GroupNorm,
    /// `[C, C]` (1×1 conv weights flattened) and biases, in the order q, k, v, proj_out.
    w: [Vec<f32>; 4],
    b: [Vec<f32>; 4],
    channels: usize,
}

impl AttnBlock {
    fn load(w: &dyn WeightSource, c: usize, groups: usize) -> Result<Self> {
        let mut ws: [Vec<f32>; 4] = Default::default();
        let mut bs: [Vec<f32>; 4] = Default::default();
        for (i, name) in ["q", "k", "v", "proj_out"].into_iter().enumerate() {
            let wname = format!("{name}.weight");
            // LDM stores 1×1 convs; accept the equivalent linear shape too.
            ws[i] = if w.shape(&wname)? == [c, c] {
                w.tensor(&wname)?.data
            } else {
                w.tensor_shaped(&wname, &[c, c, 1, 1])?.data
            };
            bs[i] = w.tensor_shaped(&format!("{name}.bias"), &[c])?.data;
        }
        Ok(Self {
            norm: GroupNorm::load(w, "norm", c, groups)?,
            w: ws,
            b: bs,
            channels: c,
        })
    }

    fn forward(&self, x: Tensor) -> Result<Tensor> {
        let [b, c, h, wd] = match x.shape[..] {
            [b, c, h, w] if c == self.channels => [b, c, h, w],
            _ => {
                return Err(Error::Model(format!(
                    "vae attention expects [B, {}, H, W], got {:?}",
                    self.channels, x.shape
                )))
            }
        };
        let n = h * wd;
        let hn = self.norm.forward(&x, false)?;
        let mut x = x;
        for bi in 0..b {
            // Tokens-major [n, C] for the projections and attention.
            let t = transpose(&hn.data[bi * c * n..][..c * n], c, n);
            let q = linear(&t, &self.w[0], Some(&self.b[0]), n, c, c);
            let k = linear(&t, &self.w[1], Some(&self.b[1]), n, c, c);
            let v = linear(&t, &self.w[2], Some(&self.b[2]), n, c, c);
            let mut o = vec![0f32; n * c];
            attention(&q, &k, &v, &mut o, 1, 1, n, n, c, 1.0 / (c as f32).sqrt());
            let p = linear(&o, &self.w[3], Some(&self.b[3]), n, c, c);
            let xb = &mut x.data[bi * c * n..][..c * n];
            for (ci, row) in xb.chunks_exact_mut(n).enumerate() {
                for (ti, v) in row.iter_mut().enumerate() {
                    *v += p[ti * c + ci];
                }
            }
        }
        Ok(x)
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    t[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
    t
}

struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    fn load(w: &dyn WeightSource, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::load(&sub(w, "block_1"), c, c, groups)?,
            attn_1: AttnBlock::load(&sub(w, "attn_1"), c, groups)?,
            block_2: ResnetBlock::load(&sub(w, "block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, x: Tensor, s: &Scratch) -> Result<Tensor> {
        let x = self.block_1.forward(x, s)?;
        let x = self.attn_1.forward(x)?;
        self.block_2.forward(x, s)
    }
}

fn check_config(cfg: &VaeConfig) -> Result<()> {
    if cfg.block_out_channels.is_empty() || cfg.layers_per_block == 0 {
        return Err(Error::Model(
            "vae config needs at least one level and one block per level".into(),
        ));
    }
    Ok(())
}

/// One level of the encoder: ResNet blocks, then (all levels but the last) a stride-2
/// conv after (0, 1, 0, 1) zero padding.
struct Down {
    block: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<Down>,
    mid: MidBlock,
    norm_out: GroupNorm,
    /// Only the posterior-mean half of LDM's `conv_out` (the logvar half is never used).
    conv_out_mean: Conv2d,
    in_channels: usize,
    /// Activation buffers reused across layers and calls (see [`detach`]).
    scratch: Scratch,
}

impl VaeEncoder {
    /// `w` holds the encoder's weights under `encoder.*`.
    pub fn load(cfg: &VaeConfig, w: &dyn WeightSource) -> Result<Self> {
        check_config(cfg)?;
        let w = &sub(w, "encoder");
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_groups;
        let conv_in = conv(w, "conv_in", ch[0], cfg.in_channels, 3, 1, Padding::same(1))?;
        let mut down = Vec::with_capacity(ch.len());
        let mut inp = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let lw = &sub(w, &format!("down.{i}"));
            let mut block = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                block.push(ResnetBlock::load(
                    &sub(lw, &format!("block.{j}")),
                    inp,
                    out,
                    g,
                )?);
                inp = out;
            }
            let downsample = if i + 1 < ch.len() {
                let pad = Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                };
                Some(conv(lw, "downsample.conv", out, out, 3, 2, pad)?)
            } else {
                None
            };
            down.push(Down { block, downsample });
        }
        let mid = MidBlock::load(&sub(w, "mid"), inp, g)?;
        let norm_out = GroupNorm::load(w, "norm_out", inp, g)?;
        let mut conv_out_mean = conv(
            w,
            "conv_out",
            2 * cfg.latent_channels,
            inp,
            3,
            1,
            Padding::same(1),
        )?;
        conv_out_mean.truncate_out(cfg.latent_channels);
        Ok(Self {
            conv_in,
            down,
            mid,
            norm_out,
            conv_out_mean,
            in_channels: cfg.in_channels,
            scratch: Scratch::default(),
        })
    }

    /// `img [B, 3, H, W]` in [-1, 1] → posterior mean `[B, 16, H/8, W/8]`, unscaled.
    pub fn encode(&self, img: &Tensor) -> Result<Tensor> {
        match img.shape[..] {
            [_, c, h, w] if c == self.in_channels && h > 0 && w > 0 => {}
            _ => {
                return Err(Error::Arg(format!(
                    "vae encoder expects an image [B, {}, H, W], got {:?}",
                    self.in_channels, img.shape
                )))
            }
        }
        let s = &self.scratch;
        let mut x = self.conv_in.forward_with(img, Prologue::None, None, s)?;
        for level in &self.down {
            for b in &level.block {
                x = b.forward(x, s)?;
            }
            if let Some(d) = &level.downsample {
                let y = d.forward_with(&x, Prologue::None, None, s)?;
                s.give(std::mem::replace(&mut x, y).data);
            }
        }
        let x = self.mid.forward(x, s)?;
        let z = self
            .conv_out_mean
            .forward_with(&x, self.norm_out.then_silu(), None, s)?;
        s.give(x.data);
        Ok(detach(z, s))
    }
}

/// One level of the decoder: `layers_per_block + 1` ResNet blocks, then (levels ≥ 1)
/// nearest 2× upsampling and a 3×3 conv.
struct Up {
    block: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

pub struct VaeDecoder {
    conv_in: Conv2d,
    mid: MidBlock,
    /// Indexed as LDM's `up[i]`; run from the last entry to the first.
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    latent_channels: usize,
    /// Activation buffers reused across layers and calls (see [`detach`]).
    scratch: Scratch,
}

impl VaeDecoder {
    /// `w` holds the decoder's weights under `decoder.*`.
    pub fn load(cfg: &VaeConfig, w: &dyn WeightSource) -> Result<Self> {
        check_config(cfg)?;
        let w = &sub(w, "decoder");
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_groups;
        let n = ch.len();
        let deepest = ch[n - 1];
        let conv_in = conv(
            w,
            "conv_in",
            deepest,
            cfg.latent_channels,
            3,
            1,
            Padding::same(1),
        )?;
        let mid = MidBlock::load(&sub(w, "mid"), deepest, g)?;
        let mut up: Vec<Up> = Vec::with_capacity(n);
        let mut inp = deepest;
        for i in (0..n).rev() {
            let lw = &sub(w, &format!("up.{i}"));
            let out = ch[i];
            let mut block = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                block.push(ResnetBlock::load(
                    &sub(lw, &format!("block.{j}")),
                    inp,
                    out,
                    g,
                )?);
                inp = out;
            }
            let upsample = if i >= 1 {
                Some(conv(lw, "upsample.conv", out, out, 3, 1, Padding::same(1))?)
            } else {
                None
            };
            up.push(Up { block, upsample });
        }
        up.reverse();
        let norm_out = GroupNorm::load(w, "norm_out", ch[0], g)?;
        let conv_out = conv(
            w,
            "conv_out",
            cfg.in_channels,
            ch[0],
            3,
            1,
            Padding::same(1),
        )?;
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out,
            conv_out,
            latent_channels: cfg.latent_channels,
            scratch: Scratch::default(),
        })
    }

    /// `z [B, 16, h, w]` (unscaled, i.e. after [`from_model_latent`]) → image `[B, 3, 8h, 8w]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match z.shape[..] {
            [_, c, h, w] if c == self.latent_channels && h > 0 && w > 0 => {}
            _ => {
                return Err(Error::Arg(format!(
                    "vae decoder expects a latent [B, {}, h, w], got {:?}",
                    self.latent_channels, z.shape
                )))
            }
        }
        let s = &self.scratch;
        let x = self.conv_in.forward_with(z, Prologue::None, None, s)?;
        let mut x = self.mid.forward(x, s)?;
        for level in self.up.iter().rev() {
            for b in &level.block {
                x = b.forward(x, s)?;
            }
            if let Some(u) = &level.upsample {
                let y = u.forward_with(&x, Prologue::Upsample2x, None, s)?;
                s.give(std::mem::replace(&mut x, y).data);
            }
        }
        let img = self
            .conv_out
            .forward_with(&x, self.norm_out.then_silu(), None, s)?;
        s.give(x.data);
        Ok(detach(img, s))
    }
}

/// `t` in a buffer of its own size, its pooled buffer (which may be far larger: the pool
/// hands out the smallest kept buffer that fits) given back to `s`. The pool is kept across
/// calls, so the next image runs on memory already mapped; it holds at most
/// [`Scratch`]'s few buffers of the largest size a call has needed.
fn detach(t: Tensor, s: &Scratch) -> Tensor {
    let data = t.data.to_vec();
    s.give(t.data);
    Tensor {
        shape: t.shape,
        data,
    }
}

/// VAE latent → model latent: `(z − shift) · scale`.
pub fn to_model_latent(z: &mut Tensor, cfg: &VaeConfig) {
    let (shift, scale) = (cfg.shift_factor, cfg.scaling_factor);
    z.data.iter_mut().for_each(|v| *v = (*v - shift) * scale);
}

/// Model latent → VAE latent: `z / scale + shift`.
pub fn from_model_latent(z: &mut Tensor, cfg: &VaeConfig) {
    let (shift, scale) = (cfg.shift_factor, cfg.scaling_factor);
    z.data.iter_mut().for_each(|v| *v = *v / scale + shift);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_scaling_round_trips() {
        let cfg = VaeConfig::sd3();
        let mut z = Tensor::new(&[1, 2], vec![0.0609, 1.0609]).unwrap();
        to_model_latent(&mut z, &cfg);
        assert!(z.data[0].abs() < 1e-7 && (z.data[1] - 1.5305).abs() < 1e-6);
        from_model_latent(&mut z, &cfg);
        assert!((z.data[0] - 0.0609).abs() < 1e-7 && (z.data[1] - 1.0609).abs() < 1e-6);
    }

    #[test]
    fn transpose_is_exact() {
        let (r, c) = (37, 45);
        let a: Vec<f32> = (0..r * c).map(|v| v as f32).collect();
        let t = transpose(&a, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], a[i * c + j]);
            }
        }
    }

    #[test]
    fn pooled_buffers_do_not_leak_between_calls() {
        // The buffer pool outlives a call: a decode (encode) after calls at other sizes
        // returns bit for bit what the first call did, in a buffer of its own size (the
        // sizes are large enough for the pool to keep their activations).
        use std::collections::HashMap;
        let cfg = VaeConfig {
            in_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            norm_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: 0.0609,
            has_encoder: true,
            has_decoder: true,
        };
        let w: HashMap<String, Tensor> =
            crate::weights::seeded_random_weights(dpir_loader::spec::vae_spec(&cfg), 5)
                .into_iter()
                .collect();
        let dec = VaeDecoder::load(&cfg, &w).unwrap();
        let enc = VaeEncoder::load(&cfg, &w).unwrap();
        let latent = |h: usize, w: usize, k: f32| {
            let n = 16 * h * w;
            Tensor::new(
                &[1, 16, h, w],
                (0..n).map(|i| (i as f32 * k).sin()).collect(),
            )
            .unwrap()
        };
        let z = latent(32, 30, 0.37);
        let first = dec.decode(&z).unwrap();
        assert_eq!(first.data.capacity(), first.data.len());
        for (h, w) in [(40, 36), (3, 2), (32, 30)] {
            dec.decode(&latent(h, w, 0.11)).unwrap();
            let again = dec.decode(&z).unwrap();
            assert_eq!(again.shape, first.shape);
            assert!(
                again.data == first.data,
                "decode changed after a {h}x{w} call"
            );
        }
        let img = |h: usize, w: usize, k: f32| {
            let n = 3 * h * w;
            Tensor::new(
                &[1, 3, h, w],
                (0..n).map(|i| (i as f32 * k).cos()).collect(),
            )
            .unwrap()
        };
        let x = img(64, 60, 0.05);
        let first = enc.encode(&x).unwrap();
        for (h, w) in [(96, 80), (8, 8)] {
            enc.encode(&img(h, w, 0.3)).unwrap();
            assert!(
                enc.encode(&x).unwrap().data == first.data,
                "encode after {h}x{w}"
            );
        }
    }
}
