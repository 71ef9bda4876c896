//! Resampling.
//!
//! [`resize`] follows the semantics of `torch.nn.functional.interpolate` without antialiasing
//! (`align_corners=False`): `area` is adaptive average pooling, `bilinear` clamps negative
//! source coordinates to 0, `bicubic` uses the cubic convolution kernel with `A = -0.75` and
//! replicates border pixels. Downscaling with `bilinear`/`bicubic` therefore aliases, which is
//! part of the degradation model.
//!
//! [`downscale_rgb8_antialiased`] is the clean resampler used to prepare HQ crops: a bicubic
//! (`a = -0.5`) filter stretched by the scale factor, the same scheme as PIL's antialiased
//! resize.

use crate::planar::Planar;
use image::RgbImage;

/// Interpolation used by the random resizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    Area,
    Bilinear,
    Bicubic,
}

impl ResizeMode {
    pub const ALL: [ResizeMode; 3] = [ResizeMode::Area, ResizeMode::Bilinear, ResizeMode::Bicubic];
}

/// For one output index: first source index and the weights of consecutive source indices.
#[derive(Clone, Debug)]
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Gather explicit (index, weight) pairs into consecutive taps, merging clamped duplicates.
fn gather(pairs: &[(usize, f64)]) -> Taps {
    let lo = pairs.iter().map(|p| p.0).min().unwrap_or(0);
    let hi = pairs.iter().map(|p| p.0).max().unwrap_or(0);
    let mut weights = vec![0.0f32; hi - lo + 1];
    for &(i, w) in pairs {
        weights[i - lo] += w as f32;
    }
    Taps { start: lo, weights }
}

fn torch_taps(n_in: usize, n_out: usize, mode: ResizeMode) -> Vec<Taps> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as isize - 1;
    let clampi = |i: isize| i.clamp(0, last) as usize;
    (0..n_out)
        .map(|o| match mode {
            ResizeMode::Area => {
                let start = (o * n_in) / n_out;
                let end = ((o + 1) * n_in).div_ceil(n_out).max(start + 1);
                let w = 1.0 / (end - start) as f32;
                Taps {
                    start,
                    weights: vec![w; end - start],
                }
            }
            ResizeMode::Bilinear => {
                let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as isize).min(last);
                let t = src - i0 as f64;
                let i1 = (i0 + 1).min(last);
                gather(&[(clampi(i0), 1.0 - t), (clampi(i1), t)])
            }
            ResizeMode::Bicubic => {
                let src = (o as f64 + 0.5) * scale - 0.5;
                let i0 = src.floor() as isize;
                let t = src - i0 as f64;
                let pairs: Vec<(usize, f64)> = (-1..=2)
                    .map(|k| (clampi(i0 + k), cubic(t - k as f64, -0.75)))
                    .collect();
                gather(&pairs)
            }
        })
        .collect()
}

/// PIL-style antialiased bicubic taps (support stretched by the downscale factor).
fn antialias_taps(n_in: usize, n_out: usize) -> Vec<Taps> {
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize)
                .min(n_in)
                .max(lo + 1);
            let mut w: Vec<f64> = (lo..hi)
                .map(|i| cubic((i as f64 - center + 0.5) / fscale, -0.5))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum.abs() > 1e-12 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            Taps {
                start: lo,
                weights: w.into_iter().map(|v| v as f32).collect(),
            }
        })
        .collect()
}

/// Resize to `out_w` x `out_h` (each at least 1) with torch `interpolate` semantics.
pub fn resize(img: &Planar, out_w: usize, out_h: usize, mode: ResizeMode) -> Planar {
    let out_w = out_w.max(1);
    let out_h = out_h.max(1);
    if out_w == img.width && out_h == img.height {
        return img.clone();
    }
    let xt = torch_taps(img.width, out_w, mode);
    let yt = torch_taps(img.height, out_h, mode);
    separable(img, out_w, out_h, &xt, &yt)
}

fn separable(img: &Planar, out_w: usize, out_h: usize, xt: &[Taps], yt: &[Taps]) -> Planar {
    let (w, h) = (img.width, img.height);
    let mut out = Planar::zeros(out_w, out_h);
    let mut tmp = vec![0.0f32; out_w * h];
    for c in 0..3 {
        let src = img.plane(c);
        // Horizontal pass: h rows of out_w.
        for y in 0..h {
            let srow = &src[y * w..(y + 1) * w];
            let trow = &mut tmp[y * out_w..(y + 1) * out_w];
            for (t, taps) in trow.iter_mut().zip(xt) {
                let s = &srow[taps.start..taps.start + taps.weights.len()];
                *t = s.iter().zip(&taps.weights).map(|(a, b)| a * b).sum();
            }
        }
        // Vertical pass.
        let dst = out.plane_mut(c);
        for (oy, taps) in yt.iter().enumerate() {
            let drow = &mut dst[oy * out_w..(oy + 1) * out_w];
            for (k, &wt) in taps.weights.iter().enumerate() {
                let sy = taps.start + k;
                let trow = &tmp[sy * out_w..(sy + 1) * out_w];
                for (d, &v) in drow.iter_mut().zip(trow) {
                    *d += wt * v;
                }
            }
        }
    }
    out
}

/// Antialiased downscale of an 8-bit RGB image to `out_w` x `out_h`, streaming one output row
/// at a time (memory: one f32 row of the source width).
pub fn downscale_rgb8_antialiased(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let out_w = out_w.max(1);
    let out_h = out_h.max(1);
    if out_w == w && out_h == h {
        return img.clone();
    }
    let xt = antialias_taps(w, out_w);
    let yt = antialias_taps(h, out_h);
    let src = img.as_raw();
    let mut row = vec![0.0f32; 3 * w];
    let mut out = Vec::with_capacity(3 * out_w * out_h);
    for taps in &yt {
        row.iter_mut().for_each(|v| *v = 0.0);
        for (k, &wt) in taps.weights.iter().enumerate() {
            let sy = taps.start + k;
            let srow = &src[sy * 3 * w..(sy + 1) * 3 * w];
            for (r, &v) in row.iter_mut().zip(srow) {
                *r += wt * f32::from(v);
            }
        }
        for taps in &xt {
            let mut acc = [0.0f32; 3];
            for (k, &wt) in taps.weights.iter().enumerate() {
                let sx = taps.start + k;
                for c in 0..3 {
                    acc[c] += wt * row[3 * sx + c];
                }
            }
            for a in acc {
                out.push(a.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, out).unwrap_or_default()
}
