//! Additive Gaussian noise and Poisson (shot) noise, colour or gray, as in Real-ESRGAN.

use crate::planar::Planar;
use crate::rng::Rng;

/// ITU-R BT.601 luma weights used for gray noise.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// Add Gaussian noise with standard deviation `sigma / 255`; `gray` draws one value per pixel
/// shared by the three channels. The result is clipped to [0, 1].
pub fn add_gaussian(img: &mut Planar, sigma: f64, gray: bool, rng: &mut Rng) {
    let n = img.width * img.height;
    let s = (sigma / 255.0) as f32;
    if gray {
        for i in 0..n {
            let e = rng.normal() as f32 * s;
            for c in 0..3 {
                let v = &mut img.data[c * n + i];
                *v = (*v + e).clamp(0.0, 1.0);
            }
        }
    } else {
        for v in &mut img.data {
            let e = rng.normal() as f32 * s;
            *v = (*v + e).clamp(0.0, 1.0);
        }
    }
}

/// Number of distinct 8-bit levels in `values` (rounded, out-of-range values counted too),
/// rounded up to a power of two: the photon-count scale of Real-ESRGAN's Poisson noise.
fn poisson_levels(values: impl Iterator<Item = f32>) -> f64 {
    const OFFSET: i64 = 1024;
    let mut seen = vec![false; 4096];
    let mut count = 0usize;
    for v in values {
        let q = ((v * 255.0).round() as i64 + OFFSET).clamp(0, 4095) as usize;
        if !seen[q] {
            seen[q] = true;
            count += 1;
        }
    }
    let count = count.max(1);
    (count.next_power_of_two()) as f64
}

/// Add Poisson noise: `(Poisson(x * L) / L - x) * scale` with `L` the level count above;
/// `gray` computes the noise on the luma and adds it to every channel. Clipped to [0, 1].
pub fn add_poisson(img: &mut Planar, scale: f64, gray: bool, rng: &mut Rng) {
    let n = img.width * img.height;
    let sc = scale as f32;
    if gray {
        let luma: Vec<f32> = (0..n)
            .map(|i| (0..3).map(|c| LUMA[c] * img.data[c * n + i]).sum())
            .collect();
        let levels = poisson_levels(luma.iter().copied());
        for (i, &y) in luma.iter().enumerate() {
            let k = poisson(rng, f64::from(y.max(0.0)) * levels);
            let e = ((k / levels) as f32 - y) * sc;
            for c in 0..3 {
                let v = &mut img.data[c * n + i];
                *v = (*v + e).clamp(0.0, 1.0);
            }
        }
    } else {
        let levels = poisson_levels(img.data.iter().copied());
        for v in &mut img.data {
            let k = poisson(rng, f64::from(v.max(0.0)) * levels);
            let e = ((k / levels) as f32 - *v) * sc;
            *v = (*v + e).clamp(0.0, 1.0);
        }
    }
}

/// `ln(k!)`: exact table below 10, Stirling series above.
fn ln_factorial(k: f64) -> f64 {
    const TABLE: [f64; 10] = [
        0.0,
        0.0,
        std::f64::consts::LN_2,
        1.791_759_469_228_055,
        3.178_053_830_347_945_6,
        4.787_491_742_782_046,
        6.579_251_212_010_101,
        8.525_161_361_065_415,
        10.604_602_902_745_25,
        12.801_827_480_081_469,
    ];
    if k < 10.0 {
        return TABLE[k.max(0.0) as usize];
    }
    let x = k + 1.0;
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    (x - 0.5) * x.ln() - x
        + 0.5 * (2.0 * std::f64::consts::PI).ln()
        + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
}

/// A Poisson(`lambda`) sample: multiplication method for small means, Hörmann's transformed
/// rejection (PTRS) for `lambda >= 10`.
pub fn poisson(rng: &mut Rng, lambda: f64) -> f64 {
    if lambda.is_nan() || lambda <= 0.0 {
        return 0.0;
    }
    if lambda < 10.0 {
        let limit = (-lambda).exp();
        let mut k = 0.0;
        let mut p = rng.f64();
        while p > limit {
            k += 1.0;
            p *= rng.f64();
        }
        return k;
    }
    let slam = lambda.sqrt();
    let b = 0.931 + 2.53 * slam;
    let a = -0.059 + 0.02483 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let vr = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = rng.f64() - 0.5;
        let v = rng.f64();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + lambda + 0.43).floor();
        if us >= 0.07 && v <= vr {
            return k;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        let lhs = v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln();
        let rhs = -lambda + k * lambda.ln() - ln_factorial(k);
        if lhs <= rhs {
            return k;
        }
    }
}
