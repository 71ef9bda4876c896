//! CLIP vision (Hugging Face `CLIPVisionModel` + optional `visual_projection`) on the CPU.
//!
//! Pre-LN ViT: patch conv (no bias) → `[cls; patches] + position_embedding` →
//! `pre_layrnorm` → layers of `x += out_proj(attn(LN1 x))`, `x += fc2(quick_gelu(fc1(LN2 x)))`
//! → `post_layernorm(cls)` (→ `visual_projection`). Weight names are HF's, unchanged:
//! `vision_model.embeddings.{class_embedding, patch_embedding.weight,
//! position_embedding.weight}`, `vision_model.pre_layrnorm`,
//! `vision_model.encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
//! mlp.fc1, mlp.fc2}`, `vision_model.post_layernorm`, `visual_projection.weight`.

use dpir_loader::ClipVisionConfig;

use crate::cpu::attention::attention;
use crate::cpu::conv::{resize_bicubic, Conv2d, Padding};
use crate::cpu::matmul::linear;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{Prefixed, WeightSource};

/// CLIP's image normalisation (OpenAI's published values, digit for digit).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &dyn WeightSource, name: &str, d: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: w.tensor_shaped(&format!("{name}.weight"), &[d])?.data,
            bias: w.tensor_shaped(&format!("{name}.bias"), &[d])?.data,
            eps,
        })
    }

    /// Row-wise over `x [rows, d]`; statistics in f64.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        for (row, out) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row
                .iter()
                .map(|&v| {
                    let t = v as f64 - mean;
                    t * t
                })
                .sum::<f64>()
                / d as f64;
            let inv = 1.0 / (var + self.eps as f64).sqrt();
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                *o = ((v as f64 - mean) * inv) as f32 * self.weight[i] + self.bias[i];
            }
        }
        y
    }
}

struct Linear {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    n_in: usize,
    n_out: usize,
}

impl Linear {
    fn load(
        w: &dyn WeightSource,
        name: &str,
        n_in: usize,
        n_out: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: w
                .tensor_shaped(&format!("{name}.weight"), &[n_out, n_in])?
                .data,
            bias: if bias {
                Some(w.tensor_shaped(&format!("{name}.bias"), &[n_out])?.data)
            } else {
                None
            },
            n_in,
            n_out,
        })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        linear(
            x,
            &self.weight,
            self.bias.as_deref(),
            rows,
            self.n_in,
            self.n_out,
        )
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(w: &dyn WeightSource, cfg: &ClipVisionConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::load(w, "layer_norm1", d, eps)?,
            q_proj: Linear::load(w, "self_attn.q_proj", d, d, true)?,
            k_proj: Linear::load(w, "self_attn.k_proj", d, d, true)?,
            v_proj: Linear::load(w, "self_attn.v_proj", d, d, true)?,
            out_proj: Linear::load(w, "self_attn.out_proj", d, d, true)?,
            layer_norm2: LayerNorm::load(w, "layer_norm2", d, eps)?,
            fc1: Linear::load(w, "mlp.fc1", d, cfg.intermediate, true)?,
            fc2: Linear::load(w, "mlp.fc2", cfg.intermediate, d, true)?,
        })
    }

    /// `x [B, L, D]` → `[B, lq, D]`, where `lq = L` or, with `cls_only`, 1: the class
    /// token attends over all tokens but nothing else is computed.
    fn forward(&self, x: &[f32], b: usize, l: usize, heads: usize, cls_only: bool) -> Vec<f32> {
        let d = self.q_proj.n_in;
        let hd = d / heads;
        let h = self.layer_norm1.forward(x);
        let k = self.k_proj.forward(&h, b * l);
        let v = self.v_proj.forward(&h, b * l);
        let (lq, mut xq, hq) = if cls_only {
            let pick = |t: &[f32]| -> Vec<f32> {
                (0..b)
                    .flat_map(|bi| t[bi * l * d..][..d].to_vec())
                    .collect()
            };
            (1, pick(x), pick(&h))
        } else {
            (l, x.to_vec(), h)
        };
        let q = self.q_proj.forward(&hq, b * lq);
        let mut o = vec![0f32; b * lq * d];
        attention(
            &q,
            &k,
            &v,
            &mut o,
            b,
            heads,
            lq,
            l,
            hd,
            1.0 / (hd as f32).sqrt(),
        );
        add(&mut xq, &self.out_proj.forward(&o, b * lq));
        let h = self.layer_norm2.forward(&xq);
        let mut m = self.fc1.forward(&h, b * lq);
        // quick-GELU: x · σ(1.702 x)
        m.iter_mut().for_each(|v| *v /= 1.0 + (-1.702 * *v).exp());
        add(&mut xq, &self.fc2.forward(&m, b * lq));
        xq
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// What the DPIR prompts read from CLIP.
pub struct ClipOutput {
    /// `[B, 1 + P, hidden]`: the hidden state entering the last layer (class token first).
    pub penultimate: Tensor,
    /// `[B, proj_dim]` (or `[B, hidden]` without a projection):
    /// `post_layernorm(cls of the last layer)`, times `visual_projection` when present.
    pub pooled: Tensor,
}

pub struct ClipVision {
    patch_embedding: Conv2d,
    class_embedding: Vec<f32>,
    position_embedding: Vec<f32>,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    cfg: ClipVisionConfig,
}

impl ClipVision {
    pub fn load(cfg: &ClipVisionConfig, w: &dyn WeightSource) -> Result<Self> {
        let (d, p, s) = (cfg.hidden, cfg.patch_size, cfg.image_size);
        if cfg.layers == 0
            || cfg.heads == 0
            || !d.is_multiple_of(cfg.heads)
            || p == 0
            || !s.is_multiple_of(p)
        {
            return Err(Error::Model(format!(
                "clip vision config: hidden {d} / heads {}, image {s} / patch {p}, layers {}",
                cfg.heads, cfg.layers
            )));
        }
        let vm = &Prefixed {
            inner: w,
            prefix: "vision_model.".into(),
        };
        let positions = (s / p) * (s / p) + 1;
        let patch_w = vm.tensor_shaped(
            "embeddings.patch_embedding.weight",
            &[d, cfg.num_channels, p, p],
        )?;
        let layers = (0..cfg.layers)
            .map(|i| {
                EncoderLayer::load(
                    &Prefixed {
                        inner: vm,
                        prefix: format!("encoder.layers.{i}."),
                    },
                    cfg,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let visual_projection = match cfg.projection_dim {
            Some(pd) => Some(Linear::load(w, "visual_projection", d, pd, false)?),
            None => None,
        };
        Ok(Self {
            patch_embedding: Conv2d::new(patch_w, None, p, Padding::same(0))?,
            class_embedding: vm.tensor_shaped("embeddings.class_embedding", &[d])?.data,
            position_embedding: vm
                .tensor_shaped("embeddings.position_embedding.weight", &[positions, d])?
                .data,
            pre_layrnorm: LayerNorm::load(vm, "pre_layrnorm", d, cfg.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(vm, "post_layernorm", d, cfg.layer_norm_eps)?,
            visual_projection,
            cfg: cfg.clone(),
        })
    }

    /// `pixels [B, 3, S, S]`, normalised (see [`preprocess`]).
    pub fn forward(&self, pixels: &Tensor) -> Result<ClipOutput> {
        let (d, s) = (self.cfg.hidden, self.cfg.image_size);
        let b = match pixels.shape[..] {
            [b, c, h, w] if c == self.cfg.num_channels && h == s && w == s && b > 0 => b,
            _ => {
                return Err(Error::Arg(format!(
                    "clip vision expects pixels [B, {}, {s}, {s}], got {:?}",
                    self.cfg.num_channels, pixels.shape
                )))
            }
        };
        let pe = self.patch_embedding.forward(pixels)?; // [B, D, g, g]
        let np = pe.shape[2] * pe.shape[3];
        let l = np + 1;
        let mut x = vec![0f32; b * l * d];
        for bi in 0..b {
            let tok = &mut x[bi * l * d..][..l * d];
            tok[..d].copy_from_slice(&self.class_embedding);
            let src = &pe.data[bi * d * np..][..d * np];
            for (c, plane) in src.chunks_exact(np).enumerate() {
                for (t, &v) in plane.iter().enumerate() {
                    tok[(t + 1) * d + c] = v;
                }
            }
            add(tok, &self.position_embedding);
        }
        let mut x = self.pre_layrnorm.forward(&x);
        let last = self.layers.len() - 1;
        for layer in &self.layers[..last] {
            x = layer.forward(&x, b, l, self.cfg.heads, false);
        }
        let penultimate = Tensor::new(&[b, l, d], x)?;
        let cls = self.layers[last].forward(&penultimate.data, b, l, self.cfg.heads, true);
        let cls = self.post_layernorm.forward(&cls);
        let pooled = match &self.visual_projection {
            Some(p) => Tensor::new(&[b, p.n_out], p.forward(&cls, b))?,
            None => Tensor::new(&[b, d], cls)?,
        };
        Ok(ClipOutput {
            penultimate,
            pooled,
        })
    }
}

/// `img [3, H, W]` in [-1, 1] → `[3, size, size]`: bicubic resize (PIL-style, whole image,
/// aspect not kept), clamped to [-1, 1], mapped to [0, 1] and normalised with CLIP's
/// mean and std.
pub fn preprocess(img: &Tensor, size: usize) -> Result<Tensor> {
    if !matches!(img.shape[..], [3, _, _]) {
        return Err(Error::Arg(format!(
            "clip preprocessing expects an RGB image [3, H, W], got {:?}",
            img.shape
        )));
    }
    let mut t = resize_bicubic(img, size, size)?;
    for (c, plane) in t.data.chunks_exact_mut(size * size).enumerate() {
        let (m, s) = (CLIP_MEAN[c], CLIP_STD[c]);
        for v in plane {
            *v = ((v.clamp(-1.0, 1.0) + 1.0) * 0.5 - m) / s;
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_normalises_and_checks_shape() {
        // A constant image stays constant through the resize; -1 → 0 → -mean/std.
        let img = Tensor::new(&[3, 5, 9], vec![-1.0; 135]).unwrap();
        let t = preprocess(&img, 4).unwrap();
        assert_eq!(t.shape, [3, 4, 4]);
        for c in 0..3 {
            let want = -CLIP_MEAN[c] / CLIP_STD[c];
            assert!(t.data[c * 16..][..16]
                .iter()
                .all(|v| (v - want).abs() < 1e-5));
        }
        assert!(preprocess(&Tensor::zeros(&[1, 4, 4]), 4).is_err());
        assert!(preprocess(&img, 0).is_err());
    }
}
