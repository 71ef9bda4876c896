//! DPIR's own parts (ARCHITECTURE.md, "LQ conditioning branch" and "Dual prompting"):
//! the LQ branch that turns the LQ latent into image-token features, the adaptive
//! feature-alignment gate, and the two visual-prompt MLPs.

use dpir_loader::DpirConfig;

use crate::cpu::conv::{Conv2d, Padding};
use crate::cpu::matmul::linear;
use crate::cpu::ops::{gelu_tanh_inplace, silu_inplace};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::WeightSource;

fn conv(
    w: &dyn WeightSource,
    prefix: &str,
    out: usize,
    inp: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Conv2d> {
    let weight = w.tensor_shaped(&format!("{prefix}.weight"), &[out, inp, k, k])?;
    let bias = w.tensor_shaped(&format!("{prefix}.bias"), &[out])?;
    Conv2d::new(weight, Some(bias), stride, Padding::same(pad))
}

/// `lq_branch.*`: conv3×3 → SiLU → (conv3×3 → SiLU)* → patch conv p×p stride p.
pub struct LqBranch {
    conv_in: Conv2d,
    convs: Vec<Conv2d>,
    proj: Conv2d,
    latent_channels: usize,
    patch: usize,
    hidden: usize,
}

impl LqBranch {
    pub fn load(cfg: &DpirConfig, w: &dyn WeightSource) -> Result<Self> {
        if cfg.lq_convs == 0 || cfg.patch_size == 0 {
            return Err(Error::Model(format!(
                "invalid DPIR config: lq_convs {}, patch {}",
                cfg.lq_convs, cfg.patch_size
            )));
        }
        let c = cfg.lq_channels;
        let conv_in = conv(w, "lq_branch.conv_in", c, cfg.latent_channels, 3, 1, 1)?;
        let convs = (0..cfg.lq_convs - 1)
            .map(|k| conv(w, &format!("lq_branch.convs.{k}"), c, c, 3, 1, 1))
            .collect::<Result<Vec<_>>>()?;
        let p = cfg.patch_size;
        let proj = conv(w, "lq_branch.proj", cfg.hidden, c, p, p, 0)?;
        Ok(Self {
            conv_in,
            convs,
            proj,
            latent_channels: cfg.latent_channels,
            patch: p,
            hidden: cfg.hidden,
        })
    }

    /// `z_lq [B, C, h, w]` (scaled model latent) → tokens `[B, (h/p)(w/p), hidden]`, in
    /// row-major patch order (as `x_embedder`).
    pub fn forward(&self, z_lq: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = z_lq.shape[..] else {
            return Err(Error::Model(format!(
                "LQ branch input: expected [B, C, h, w], found {:?}",
                z_lq.shape
            )));
        };
        let p = self.patch;
        if c != self.latent_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(Error::Model(format!(
                "LQ branch input {:?}: needs {} channels and sides that are multiples of {p}",
                z_lq.shape, self.latent_channels
            )));
        }
        let mut x = self.conv_in.forward(z_lq)?;
        silu_inplace(&mut x.data);
        for cv in &self.convs {
            x = cv.forward(&x)?;
            silu_inplace(&mut x.data);
        }
        let f = self.proj.forward(&x)?; // [B, D, h/p, w/p]
        let d = self.hidden;
        let n = (h / p) * (w / p);
        let mut tokens = vec![0f32; b * n * d];
        for bi in 0..b {
            let src = &f.data[bi * d * n..][..d * n];
            let dst = &mut tokens[bi * n * d..][..n * d];
            for ch in 0..d {
                for t in 0..n {
                    dst[t * d + ch] = src[ch * n + t];
                }
            }
        }
        Tensor::new(&[b, n, d], tokens)
    }
}

struct Mlp {
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
    n_in: usize,
    n_hidden: usize,
    n_out: usize,
}

impl Mlp {
    fn load(
        w: &dyn WeightSource,
        prefix: &str,
        n_in: usize,
        n_hidden: usize,
        n_out: usize,
    ) -> Result<Self> {
        Ok(Self {
            fc1_w: w
                .tensor_shaped(&format!("{prefix}.fc1.weight"), &[n_hidden, n_in])?
                .data,
            fc1_b: w
                .tensor_shaped(&format!("{prefix}.fc1.bias"), &[n_hidden])?
                .data,
            fc2_w: w
                .tensor_shaped(&format!("{prefix}.fc2.weight"), &[n_out, n_hidden])?
                .data,
            fc2_b: w
                .tensor_shaped(&format!("{prefix}.fc2.bias"), &[n_out])?
                .data,
            n_in,
            n_hidden,
            n_out,
        })
    }

    /// Linear → GELU(tanh) → Linear over the rows of `x [rows, n_in]`.
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut h = linear(
            x,
            &self.fc1_w,
            Some(&self.fc1_b),
            rows,
            self.n_in,
            self.n_hidden,
        );
        gelu_tanh_inplace(&mut h);
        linear(
            &h,
            &self.fc2_w,
            Some(&self.fc2_b),
            rows,
            self.n_hidden,
            self.n_out,
        )
    }
}

/// `local_prompt.*` and `global_prompt.*`: the visual-prompt adapters.
pub struct PromptAdapters {
    local: Mlp,
    global: Mlp,
}

impl PromptAdapters {
    pub fn load(cfg: &DpirConfig, w: &dyn WeightSource) -> Result<Self> {
        Ok(Self {
            local: Mlp::load(
                w,
                "local_prompt",
                cfg.clip_dim,
                cfg.local_hidden,
                cfg.context_dim,
            )?,
            global: Mlp::load(
                w,
                "global_prompt",
                cfg.global_in,
                cfg.global_hidden,
                cfg.pooled_dim,
            )?,
        })
    }

    /// CLIP patch tokens `[B, P, clip_dim]` → context tokens `[B, P, ctx]`.
    pub fn local(&self, patch_tokens: &Tensor) -> Result<Tensor> {
        let [b, p, c] = patch_tokens.shape[..] else {
            return Err(Error::Model(format!(
                "local prompt input: expected [B, P, C], found {:?}",
                patch_tokens.shape
            )));
        };
        if c != self.local.n_in {
            return Err(Error::Model(format!(
                "local prompt input has width {c}, the adapter reads {}",
                self.local.n_in
            )));
        }
        Tensor::new(
            &[b, p, self.local.n_out],
            self.local.forward(&patch_tokens.data, b * p),
        )
    }

    /// CLIP class embedding `[B, global_in]` → pooled vector `[B, pooled]`.
    pub fn global(&self, cls: &Tensor) -> Result<Tensor> {
        let [b, c] = cls.shape[..] else {
            return Err(Error::Model(format!(
                "global prompt input: expected [B, C], found {:?}",
                cls.shape
            )));
        };
        if c != self.global.n_in {
            return Err(Error::Model(format!(
                "global prompt input has width {c}, the adapter reads {}",
                self.global.n_in
            )));
        }
        Tensor::new(&[b, self.global.n_out], self.global.forward(&cls.data, b))
    }
}

/// `lq_align.gate` (`[hidden]`).
pub fn load_gate(cfg: &DpirConfig, w: &dyn WeightSource) -> Result<Vec<f32>> {
    Ok(w.tensor_shaped("lq_align.gate", &[cfg.hidden])?.data)
}

/// All of DPIR's own parts.
pub struct Dpir {
    pub cfg: DpirConfig,
    pub lq_branch: LqBranch,
    pub prompts: PromptAdapters,
    /// `lq_align.gate`.
    pub gate: Vec<f32>,
}

impl Dpir {
    pub fn load(cfg: &DpirConfig, w: &dyn WeightSource) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            lq_branch: LqBranch::load(cfg, w)?,
            prompts: PromptAdapters::load(cfg, w)?,
            gate: load_gate(cfg, w)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg() -> DpirConfig {
        DpirConfig {
            lq_channels: 3,
            lq_convs: 2,
            hidden: 5,
            patch_size: 2,
            latent_channels: 2,
            clip_dim: 4,
            local_hidden: 6,
            context_dim: 3,
            global_in: 4,
            global_hidden: 5,
            pooled_dim: 2,
            has_robust_encoder: false,
        }
    }

    fn weights(c: &DpirConfig) -> HashMap<String, Tensor> {
        let spec = dpir_loader::dpir_spec(c);
        spec.into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let data = (0..n)
                    .map(|j| ((i * 31 + j) as f32 * 0.713).sin() * 0.5)
                    .collect();
                (name, Tensor { shape, data })
            })
            .collect()
    }

    fn silu(x: f32) -> f32 {
        x / (1.0 + (-x).exp())
    }

    /// Direct (nested-loop) convolution with zero padding.
    #[allow(clippy::too_many_arguments)]
    fn conv_ref(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        wt: &Tensor,
        b: &Tensor,
        stride: usize,
        pad: usize,
    ) -> (Vec<f32>, usize, usize) {
        let (o, k) = (wt.shape[0], wt.shape[2]);
        let oh = (h + 2 * pad - k) / stride + 1;
        let ow = (w + 2 * pad - k) / stride + 1;
        let mut out = vec![0f32; o * oh * ow];
        for oc in 0..o {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut s = b.data[oc] as f64;
                    for ic in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (y * stride + ky) as isize - pad as isize;
                                let ix = (xx * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                s += (x[(ic * h + iy as usize) * w + ix as usize]
                                    * wt.data[((oc * c + ic) * k + ky) * k + kx])
                                    as f64;
                            }
                        }
                    }
                    out[(oc * oh + y) * ow + xx] = s as f32;
                }
            }
        }
        (out, oh, ow)
    }

    #[test]
    fn lq_branch_matches_direct_convolutions() {
        let c = cfg();
        let w = weights(&c);
        let branch = LqBranch::load(&c, &w).unwrap();
        let (h, wd) = (6, 4);
        let z: Vec<f32> = (0..2 * h * wd).map(|i| (i as f32 * 0.37).cos()).collect();
        let got = branch
            .forward(&Tensor::new(&[1, 2, h, wd], z.clone()).unwrap())
            .unwrap();
        let (mut a, _, _) = conv_ref(
            &z,
            2,
            h,
            wd,
            &w["lq_branch.conv_in.weight"],
            &w["lq_branch.conv_in.bias"],
            1,
            1,
        );
        a.iter_mut().for_each(|v| *v = silu(*v));
        let (mut a, _, _) = conv_ref(
            &a,
            3,
            h,
            wd,
            &w["lq_branch.convs.0.weight"],
            &w["lq_branch.convs.0.bias"],
            1,
            1,
        );
        a.iter_mut().for_each(|v| *v = silu(*v));
        let (f, oh, ow) = conv_ref(
            &a,
            3,
            h,
            wd,
            &w["lq_branch.proj.weight"],
            &w["lq_branch.proj.bias"],
            2,
            0,
        );
        assert_eq!(got.shape, vec![1, oh * ow, 5]);
        for t in 0..oh * ow {
            for d in 0..5 {
                let r = f[d * oh * ow + t];
                assert!((got.data[t * 5 + d] - r).abs() < 1e-4, "token {t} ch {d}");
            }
        }
    }

    #[test]
    fn prompt_mlps_match_reference() {
        let c = cfg();
        let w = weights(&c);
        let pa = PromptAdapters::load(&c, &w).unwrap();
        let x: Vec<f32> = (0..4).map(|i| i as f32 * 0.3 - 0.4).collect();
        let gelu = |v: f32| {
            0.5 * v
                * (1.0
                    + ((2.0f32 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
        };
        let mlp = |p: &str, x: &[f32]| -> Vec<f32> {
            let (w1, b1) = (&w[&format!("{p}.fc1.weight")], &w[&format!("{p}.fc1.bias")]);
            let (w2, b2) = (&w[&format!("{p}.fc2.weight")], &w[&format!("{p}.fc2.bias")]);
            let (nh, ni) = (w1.shape[0], w1.shape[1]);
            let h: Vec<f32> = (0..nh)
                .map(|j| {
                    gelu(b1.data[j] + (0..ni).map(|k| w1.data[j * ni + k] * x[k]).sum::<f32>())
                })
                .collect();
            (0..w2.shape[0])
                .map(|j| b2.data[j] + (0..nh).map(|k| w2.data[j * nh + k] * h[k]).sum::<f32>())
                .collect()
        };
        let g = pa
            .global(&Tensor::new(&[1, 4], x.clone()).unwrap())
            .unwrap();
        let l = pa
            .local(&Tensor::new(&[1, 1, 4], x.clone()).unwrap())
            .unwrap();
        for (a, b) in g.data.iter().zip(mlp("global_prompt", &x)) {
            assert!((a - b).abs() < 1e-4);
        }
        for (a, b) in l.data.iter().zip(mlp("local_prompt", &x)) {
            assert!((a - b).abs() < 1e-4);
        }
        assert_eq!(l.shape, vec![1, 1, 3]);
    }
}
