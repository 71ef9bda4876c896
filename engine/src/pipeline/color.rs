//! Colour correction of the restored image against the (upscaled) input, as StableSR
//! and SUPIR do: `wavelet` keeps the output's high frequencies and the input's low
//! frequencies; `adain` matches per-channel mean and standard deviation.

use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorFix {
    Wavelet,
    Adain,
    None,
}

/// Apply `mode` to `out` (`[3, H, W]`) against `reference` of the same shape.
pub fn apply(mode: ColorFix, out: &Tensor, reference: &Tensor) -> Tensor {
    match mode {
        ColorFix::None => out.clone(),
        ColorFix::Adain => adain(out, reference),
        ColorFix::Wavelet => wavelet(out, reference),
    }
}

fn mean_std(plane: &[f32]) -> (f32, f32) {
    let n = plane.len() as f64;
    let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / n;
    // Unbiased, as torch.var in StableSR's adaptive_instance_normalization.
    let var = plane
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    (mean as f32, (var + 1e-5).sqrt() as f32)
}

/// Per-channel `(x − μ_x)/σ_x · σ_r + μ_r`.
pub fn adain(out: &Tensor, reference: &Tensor) -> Tensor {
    let plane = out.shape[1] * out.shape[2];
    let mut res = out.clone();
    for (o, r) in res
        .data
        .chunks_exact_mut(plane)
        .zip(reference.data.chunks_exact(plane))
    {
        let (mo, so) = mean_std(o);
        let (mr, sr) = mean_std(r);
        for v in o.iter_mut() {
            *v = (*v - mo) / so * sr + mr;
        }
    }
    res
}

/// One pass of the dilated 3×3 binomial blur with replicate padding.
fn blur(plane: &[f32], h: usize, w: usize, dilation: usize) -> Vec<f32> {
    const K: [f32; 3] = [0.25, 0.5, 0.25];
    let d = dilation as isize;
    let clampi = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0.0;
            for (k, kv) in K.iter().enumerate() {
                s += kv * plane[y * w + clampi(x as isize + (k as isize - 1) * d, w)];
            }
            tmp[y * w + x] = s;
        }
    }
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0.0;
            for (k, kv) in K.iter().enumerate() {
                s += kv * tmp[clampi(y as isize + (k as isize - 1) * d, h) * w + x];
            }
            out[y * w + x] = s;
        }
    }
    out
}

/// Low-frequency part after five wavelet levels (dilations 1, 2, 4, 8, 16).
fn low_freq(plane: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut low = plane.to_vec();
    for level in 0..5 {
        low = blur(&low, h, w, 1 << level);
    }
    low
}

/// `high(out) + low(reference)`.
pub fn wavelet(out: &Tensor, reference: &Tensor) -> Tensor {
    let (h, w) = (out.shape[1], out.shape[2]);
    let plane = h * w;
    let mut res = out.clone();
    for (o, r) in res
        .data
        .chunks_exact_mut(plane)
        .zip(reference.data.chunks_exact(plane))
    {
        let lo = low_freq(o, h, w);
        let lr = low_freq(r, h, w);
        for ((v, a), b) in o.iter_mut().zip(&lo).zip(&lr) {
            *v = *v - a + b;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(seed: f32, h: usize, w: usize) -> Tensor {
        Tensor {
            shape: vec![3, h, w],
            data: (0..3 * h * w)
                .map(|i| ((i as f32) * 0.37 + seed).sin())
                .collect(),
        }
    }

    #[test]
    fn adain_matches_reference_statistics() {
        let a = field(0.0, 9, 11);
        let mut r = field(1.0, 9, 11);
        for v in r.data.iter_mut() {
            *v = *v * 0.3 + 0.2;
        }
        let o = adain(&a, &r);
        for c in 0..3 {
            let (mo, so) = mean_std(&o.data[c * 99..][..99]);
            let (mr, sr) = mean_std(&r.data[c * 99..][..99]);
            assert!((mo - mr).abs() < 1e-5 && (so - sr).abs() < 1e-4);
        }
    }

    #[test]
    fn wavelet_takes_low_frequencies_from_the_reference() {
        // Output = reference + a constant colour cast: the cast is all low frequency.
        let r = field(0.5, 40, 40);
        let mut a = r.clone();
        for v in a.data.iter_mut() {
            *v += 0.3;
        }
        let o = wavelet(&a, &r);
        assert!(o.max_rel_err(&r) < 1e-5);
    }
}
