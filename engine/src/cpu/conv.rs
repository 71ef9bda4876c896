//! Convolutions, GroupNorm and resampling (CPU).
//!
//! Layout everywhere is NCHW, row-major f32. A convolution is im2col followed by one
//! sgemm per (image, tile of output rows): `out[O, n] += W[O, C·kh·kw] · col[C·kh·kw, n]`,
//! with the output pre-filled with the bias (and, for residual blocks, the shortcut) so
//! the gemm accumulates into it. The column buffer is tiled over output rows so its size
//! stays bounded for large images. 1×1 stride-1 unpadded convolutions skip im2col.

use rayon::prelude::*;

use crate::cpu::matmul::matmul;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Largest im2col buffer, in f32 elements, built for one gemm (32 MiB).
const COL_BUDGET: usize = 8 << 20;

/// Zero padding on each side of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on all four sides.
    pub const fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// A 2-D convolution with its weights: `weight [O, C, kh, kw]`, optional `bias [O]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Vec<f32>>,
    stride: usize,
    pad: Padding,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, pad: Padding) -> Result<Self> {
        if weight.shape.len() != 4 {
            return Err(Error::Model(format!(
                "conv weight must be [O, C, kh, kw], found {:?}",
                weight.shape
            )));
        }
        if stride == 0 {
            return Err(Error::Model("conv stride must be at least 1".into()));
        }
        if let Some(b) = &bias {
            if b.shape != [weight.shape[0]] {
                return Err(Error::Model(format!(
                    "conv bias {:?} does not match weight {:?}",
                    b.shape, weight.shape
                )));
            }
        }
        Ok(Self {
            weight,
            bias: bias.map(|b| b.data),
            stride,
            pad,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.shape[1]
    }

    /// Keep only the first `n` output channels (e.g. the posterior mean of a VAE encoder).
    pub fn truncate_out(&mut self, n: usize) {
        let o = self.out_channels();
        if n >= o {
            return;
        }
        let per = self.weight.numel() / o;
        self.weight.data.truncate(n * per);
        self.weight.shape[0] = n;
        if let Some(b) = &mut self.bias {
            b.truncate(n);
        }
    }

    /// `conv(x)` for `x [B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }

    /// `conv(x) + residual`, the residual added for free by accumulating into it.
    pub fn forward_add(&self, x: &Tensor, residual: Tensor) -> Result<Tensor> {
        self.run(x, Some(residual))
    }

    fn run(&self, x: &Tensor, residual: Option<Tensor>) -> Result<Tensor> {
        let (o, c, kh, kw) = (
            self.weight.shape[0],
            self.weight.shape[1],
            self.weight.shape[2],
            self.weight.shape[3],
        );
        let [b, xc, h, w] = dims4(x)?;
        if xc != c {
            return Err(Error::Model(format!(
                "conv expects {c} input channels, got input {:?}",
                x.shape
            )));
        }
        let (ph, pw) = (
            h + self.pad.top + self.pad.bottom,
            w + self.pad.left + self.pad.right,
        );
        if ph < kh || pw < kw {
            return Err(Error::Model(format!(
                "conv kernel {kh}x{kw} larger than padded input {ph}x{pw}"
            )));
        }
        let ho = (ph - kh) / self.stride + 1;
        let wo = (pw - kw) / self.stride + 1;
        let n = ho * wo;
        let shape = [b, o, ho, wo];
        let mut out = match residual {
            Some(r) => {
                if r.shape != shape {
                    return Err(Error::Model(format!(
                        "conv residual {:?} does not match output {shape:?}",
                        r.shape
                    )));
                }
                r
            }
            None => Tensor::zeros(&shape),
        };
        if let Some(bias) = &self.bias {
            out.data
                .par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, plane)| plane.iter_mut().for_each(|v| *v += bias[i % o]));
        }
        let kdim = c * kh * kw;
        let direct = kh == 1 && kw == 1 && self.stride == 1 && self.pad == Padding::same(0);
        let rows_per_tile = (COL_BUDGET / (kdim * wo).max(1)).clamp(1, ho);
        let mut col = if direct {
            Vec::new()
        } else {
            vec![0f32; kdim * rows_per_tile * wo]
        };
        let mut tile = Vec::new();
        for bi in 0..b {
            let xb = &x.data[bi * c * h * w..][..c * h * w];
            let ob = &mut out.data[bi * o * n..][..o * n];
            if direct {
                matmul(&self.weight.data, xb, ob, o, c, n, true);
                continue;
            }
            let mut oy0 = 0;
            while oy0 < ho {
                let rows = rows_per_tile.min(ho - oy0);
                let nt = rows * wo;
                let col = &mut col[..kdim * nt];
                self.im2col(xb, [c, h, w], [kh, kw], oy0, rows, wo, col);
                if rows == ho {
                    matmul(&self.weight.data, col, ob, o, kdim, n, true);
                } else {
                    tile.resize(o * nt, 0f32);
                    for (t, src) in tile.chunks_exact_mut(nt).zip(ob.chunks_exact(n)) {
                        t.copy_from_slice(&src[oy0 * wo..][..nt]);
                    }
                    matmul(&self.weight.data, col, &mut tile, o, kdim, nt, true);
                    for (t, dst) in tile.chunks_exact(nt).zip(ob.chunks_exact_mut(n)) {
                        dst[oy0 * wo..][..nt].copy_from_slice(t);
                    }
                }
                oy0 += rows;
            }
        }
        Ok(out)
    }

    /// Fill `col [C·kh·kw, rows·wo]` for output rows `oy0 .. oy0 + rows` of one image.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        x: &[f32],
        [_, h, w]: [usize; 3],
        [kh, kw]: [usize; 2],
        oy0: usize,
        rows: usize,
        wo: usize,
        col: &mut [f32],
    ) {
        let (s, pt, pl) = (self.stride, self.pad.top, self.pad.left);
        let nt = rows * wo;
        col.par_chunks_mut(kh * kw * nt)
            .enumerate()
            .for_each(|(ci, cc)| {
                let plane = &x[ci * h * w..][..h * w];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let dst = &mut cc[(ky * kw + kx) * nt..][..nt];
                        // Output columns whose input column lies inside the image.
                        let lo = pl.saturating_sub(kx).div_ceil(s).min(wo);
                        let hi = if w + pl > kx {
                            ((w + pl - kx - 1) / s + 1).min(wo)
                        } else {
                            0
                        }
                        .max(lo);
                        for (r, drow) in dst.chunks_exact_mut(wo).enumerate() {
                            let iy = (oy0 + r) * s + ky;
                            if iy < pt || iy - pt >= h {
                                drow.fill(0.0);
                                continue;
                            }
                            let src = &plane[(iy - pt) * w..][..w];
                            drow[..lo].fill(0.0);
                            drow[hi..].fill(0.0);
                            let ix0 = lo * s + kx - pl;
                            if s == 1 {
                                drow[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
                            } else {
                                for (j, d) in drow[lo..hi].iter_mut().enumerate() {
                                    *d = src[ix0 + j * s];
                                }
                            }
                        }
                    }
                }
            });
    }
}

fn dims4(x: &Tensor) -> Result<[usize; 4]> {
    match x.shape[..] {
        [b, c, h, w] => Ok([b, c, h, w]),
        _ => Err(Error::Model(format!(
            "expected a [B, C, H, W] tensor, got {:?}",
            x.shape
        ))),
    }
}

/// GroupNorm over `x [B, C, H, W]` (per sample, `groups` groups of consecutive channels),
/// affine with `weight`/`bias [C]`, followed by SiLU when `silu`. Statistics in f64.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let mut y = x.clone();
    group_norm_inplace(&mut y, groups, weight, bias, eps, silu)?;
    Ok(y)
}

/// [`group_norm`] in place.
pub fn group_norm_inplace(
    x: &mut Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Result<()> {
    let [_, c, h, w] = dims4(x)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::Model(format!(
            "group norm: {groups} groups do not divide {c} channels"
        )));
    }
    if weight.len() != c || bias.len() != c {
        return Err(Error::Model(format!(
            "group norm: affine of length {}/{} for {c} channels",
            weight.len(),
            bias.len()
        )));
    }
    let cpg = c / groups;
    let hw = h * w;
    let glen = cpg * hw;
    if glen == 0 {
        return Ok(());
    }
    x.data.par_chunks_mut(glen).enumerate().for_each(|(i, g)| {
        let c0 = (i % groups) * cpg;
        let mean = g.iter().map(|&v| v as f64).sum::<f64>() / glen as f64;
        let var = g
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / glen as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (j, ch) in g.chunks_exact_mut(hw).enumerate() {
            let a = (inv * weight[c0 + j] as f64) as f32;
            let b = (bias[c0 + j] as f64 - mean * inv * weight[c0 + j] as f64) as f32;
            if silu {
                for v in ch {
                    let t = *v * a + b;
                    *v = t / (1.0 + (-t).exp());
                }
            } else {
                for v in ch {
                    *v = *v * a + b;
                }
            }
        }
    });
    Ok(())
}

/// Nearest-neighbour 2× upsampling of `x [B, C, H, W]` → `[B, C, 2H, 2W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = dims4(x)?;
    let mut y = Tensor::zeros(&[b, c, 2 * h, 2 * w]);
    if h * w == 0 {
        return Ok(y);
    }
    y.data
        .par_chunks_mut(4 * h * w)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (iy, srow) in src.chunks_exact(w).enumerate() {
                let (r0, r1) = dst[2 * iy * 2 * w..][..4 * w].split_at_mut(2 * w);
                for (ix, &v) in srow.iter().enumerate() {
                    r0[2 * ix] = v;
                    r0[2 * ix + 1] = v;
                }
                r1.copy_from_slice(r0);
            }
        });
    Ok(y)
}

/// PIL's bicubic kernel (a = −0.5).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index and normalised weights (PIL's separable resampling:
/// the kernel is widened by the scale factor when downsampling, i.e. antialiased).
fn resample_weights(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f64 / out as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    (0..out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize)
                .min(inp)
                .max(lo + 1);
            let ws: Vec<f64> = (lo..hi)
                .map(|j| cubic((j as f64 - center + 0.5) / fscale))
                .collect();
            let sum: f64 = ws.iter().sum();
            let norm = if sum != 0.0 { 1.0 / sum } else { 0.0 };
            (lo, ws.iter().map(|v| (v * norm) as f32).collect())
        })
        .collect()
}

/// Bicubic resize of `x [C, H, W]` to `[C, oh, ow]`, as PIL's `Image.resize(BICUBIC)`
/// does it (separable, horizontal pass first, antialiased when shrinking), in float.
pub fn resize_bicubic(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (c, h, w) = match x.shape[..] {
        [c, h, w] => (c, h, w),
        _ => {
            return Err(Error::Model(format!(
                "bicubic resize expects [C, H, W], got {:?}",
                x.shape
            )))
        }
    };
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::Arg(format!(
            "bicubic resize from {h}x{w} to {oh}x{ow}: sizes must be positive"
        )));
    }
    let wx = resample_weights(w, ow);
    let wy = resample_weights(h, oh);
    let mut y = Tensor::zeros(&[c, oh, ow]);
    y.data
        .par_chunks_mut(oh * ow)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            let mut tmp = vec![0f32; h * ow];
            for (srow, trow) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(ow)) {
                for (t, (lo, ws)) in trow.iter_mut().zip(&wx) {
                    *t = ws.iter().zip(&srow[*lo..]).map(|(a, b)| a * b).sum();
                }
            }
            for (drow, (lo, ws)) in dst.chunks_exact_mut(ow).zip(&wy) {
                for (k, wk) in ws.iter().enumerate() {
                    let trow = &tmp[(lo + k) * ow..][..ow];
                    for (d, t) in drow.iter_mut().zip(trow) {
                        *d += wk * t;
                    }
                }
            }
        });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Direct convolution, the definition, in f64.
    // Index loops mirror the textbook formula on purpose.
    #[allow(clippy::needless_range_loop)]
    fn naive(x: &Tensor, w: &Tensor, b: &[f32], s: usize, p: Padding) -> Tensor {
        let [bn, c, h, wd] = dims4(x).unwrap();
        let (o, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
        let ho = (h + p.top + p.bottom - kh) / s + 1;
        let wo = (wd + p.left + p.right - kw) / s + 1;
        let mut y = Tensor::zeros(&[bn, o, ho, wo]);
        for bi in 0..bn {
            for oc in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b[oc] as f64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * s + ky) as isize - p.top as isize;
                                    let ix = (ox * s + kx) as isize - p.left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xv = x.data
                                        [((bi * c + ci) * h + iy as usize) * wd + ix as usize];
                                    let wv = w.data[((oc * c + ci) * kh + ky) * kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y.data[((bi * o + oc) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    /// (b, c, o, h, w, k, stride, pad)
    type Case = (usize, usize, usize, usize, usize, usize, usize, Padding);

    #[test]
    fn conv2d_matches_direct_convolution() {
        let cases: &[Case] = &[
            // (b, c, o, h, w, k, stride, pad)
            (2, 3, 5, 9, 7, 3, 1, Padding::same(1)),
            (
                1,
                4,
                6,
                8,
                8,
                3,
                2,
                Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
            ),
            (2, 5, 3, 6, 5, 1, 1, Padding::same(0)),
            (1, 3, 8, 16, 16, 8, 8, Padding::same(0)),
            (1, 2, 3, 5, 6, 3, 2, Padding::same(2)),
        ];
        for (i, &(b, c, o, h, w, k, s, p)) in cases.iter().enumerate() {
            let x = Tensor::new(&[b, c, h, w], rand(b * c * h * w, i as u64 + 1)).unwrap();
            let wt = Tensor::new(&[o, c, k, k], rand(o * c * k * k, i as u64 + 100)).unwrap();
            let bias = rand(o, i as u64 + 200);
            let conv = Conv2d::new(
                wt.clone(),
                Some(Tensor::new(&[o], bias.clone()).unwrap()),
                s,
                p,
            )
            .unwrap();
            let got = conv.forward(&x).unwrap();
            let want = naive(&x, &wt, &bias, s, p);
            assert_eq!(got.shape, want.shape, "case {i}");
            let err = got.max_rel_err(&want);
            assert!(err < 1e-5, "case {i}: rel err {err}");
            // forward_add adds the residual.
            let res = Tensor::new(&want.shape, rand(want.numel(), 7)).unwrap();
            let got = conv.forward_add(&x, res.clone()).unwrap();
            let mut want2 = want.clone();
            want2
                .data
                .iter_mut()
                .zip(&res.data)
                .for_each(|(a, r)| *a += r);
            assert!(got.max_rel_err(&want2) < 1e-5, "case {i} (residual)");
        }
    }

    #[test]
    fn conv2d_tiled_matches_untiled() {
        // Large enough that the column buffer is split into several row tiles.
        let (c, o, h, w) = (64, 4, 160, 130);
        let x = Tensor::new(&[1, c, h, w], rand(c * h * w, 3)).unwrap();
        let wt = Tensor::new(&[o, c, 3, 3], rand(o * c * 9, 4)).unwrap();
        assert!(
            c * 9 * w > 0 && c * 9 * h * w > COL_BUDGET,
            "test must tile"
        );
        let bias = rand(o, 5);
        let conv = Conv2d::new(
            wt.clone(),
            Some(Tensor::new(&[o], bias.clone()).unwrap()),
            1,
            Padding::same(1),
        )
        .unwrap();
        let got = conv.forward(&x).unwrap();
        let want = naive(&x, &wt, &bias, 1, Padding::same(1));
        assert!(got.max_rel_err(&want) < 1e-5);
    }

    #[test]
    fn group_norm_matches_formula() {
        let (b, c, h, w, g) = (2, 6, 3, 4, 3);
        let x = Tensor::new(&[b, c, h, w], rand(b * c * h * w, 11)).unwrap();
        let gamma = rand(c, 12);
        let beta = rand(c, 13);
        for silu in [false, true] {
            let y = group_norm(&x, g, &gamma, &beta, 1e-6, silu).unwrap();
            let cpg = c / g;
            for bi in 0..b {
                for gi in 0..g {
                    let vals: Vec<f64> = (0..cpg * h * w)
                        .map(|j| x.data[(bi * c + gi * cpg) * h * w + j] as f64)
                        .collect();
                    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                    let var =
                        vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                    for (j, v) in vals.iter().enumerate() {
                        let ch = gi * cpg + j / (h * w);
                        let mut r =
                            (v - mean) / (var + 1e-6).sqrt() * gamma[ch] as f64 + beta[ch] as f64;
                        if silu {
                            r /= 1.0 + (-r).exp();
                        }
                        let got = y.data[(bi * c + gi * cpg) * h * w + j] as f64;
                        assert!(
                            (got - r).abs() < 1e-5,
                            "silu={silu} {bi} {gi} {j}: {got} vs {r}"
                        );
                    }
                }
            }
        }
        assert!(group_norm(&x, 4, &gamma, &beta, 1e-6, false).is_err());
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Tensor::new(&[1, 2, 2, 3], (0..12).map(|v| v as f32).collect()).unwrap();
        let y = upsample_nearest2x(&x).unwrap();
        assert_eq!(y.shape, [1, 2, 4, 6]);
        for c in 0..2 {
            for yy in 0..4 {
                for xx in 0..6 {
                    assert_eq!(
                        y.data[(c * 4 + yy) * 6 + xx],
                        x.data[(c * 2 + yy / 2) * 3 + xx / 2]
                    );
                }
            }
        }
    }

    #[test]
    fn bicubic_identity_and_known_values() {
        let x = Tensor::new(&[2, 5, 7], rand(70, 21)).unwrap();
        let y = resize_bicubic(&x, 5, 7).unwrap();
        assert!(y.max_rel_err(&x) < 1e-6, "same-size resize is the identity");
        // Constant images stay constant in both directions.
        let k = Tensor::new(&[1, 6, 9], vec![0.25; 54]).unwrap();
        for (oh, ow) in [(3, 4), (13, 20)] {
            let y = resize_bicubic(&k, oh, ow).unwrap();
            assert!(y.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        }
        // 1-D upsampling 2 → 4 of [0, 1], worked by hand: output centres 0.25, 0.75 (and
        // mirrored); tap weights cubic(0.25) = 0.8671875, cubic(1.25) = -0.0703125,
        // cubic(0.75) = 0.2265625, renormalised over the two taps inside the image.
        let x = Tensor::new(&[1, 1, 2], vec![0.0, 1.0]).unwrap();
        let y = resize_bicubic(&x, 1, 4).unwrap();
        let y0 = -0.0703125 / (0.8671875 - 0.0703125);
        let y1 = 0.2265625 / (0.8671875 + 0.2265625);
        for (i, want) in [y0, y1, 1.0 - y1, 1.0 - y0].into_iter().enumerate() {
            assert!(
                (y.data[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                y.data[i]
            );
        }
    }
}
