//! Element-wise ops, norms and activations (CPU).
//!
//! Hot element-wise loops (GELU, softmax, the fused LayerNorm + modulation) are written
//! branch-free so the compiler vectorises them, and each is compiled twice: once for the
//! baseline x86-64 target and once with AVX2 + FMA, picked at run time. Reductions
//! accumulate in f32.

/// Runs `$body` (an expression using the given bindings) compiled with AVX2 + FMA when
/// the CPU has them, and for the baseline target otherwise.
macro_rules! dispatch {
    (fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    unsafe { fast($($arg),*) };
                    return;
                }
            }
            body($($arg),*)
        }
    };
}

/// `exp(x)` to ~2 ulp for x in [-87, 88] (clamped outside), branch-free so it
/// vectorises: Cephes' range reduction and degree-6 polynomial.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest via the 1.5·2²³ trick (exact for |v| < 2²²): `t`'s low mantissa
    // bits hold the integer n, so 2ⁿ is built from them without a float → int conversion
    // (which does not vectorise: Rust's `as i32` saturates, one lane at a time).
    let t = x * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [−126, 127] after the clamp, so n + 127 is a normal exponent.
    let bits = t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
    e * f32::from_bits(bits)
}

/// The tanh approximation of GELU, `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`, written as
/// `x · sigmoid(2u)` (the same function).
#[inline(always)]
pub fn gelu_tanh_scalar(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_fast(-2.0 * u))
}

dispatch! {
    fn gelu_tanh_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu_tanh_scalar(*v);
        }
    }
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

dispatch! {
    fn silu_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = silu_scalar(*v);
        }
    }
}

/// SiLU into a new vector.
pub fn silu(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    silu_inplace(&mut y);
    y
}

dispatch! {
    fn shifted_sums_body(x: &[f32], pivot: f32, out: &mut [f64; 2]) {
        // Eight f32 lanes per block of 1024 values, blocks summed in f64.
        let (mut s, mut q) = (0f64, 0f64);
        for blk in x.chunks(1024) {
            let mut s8 = [0f32; 8];
            let mut q8 = [0f32; 8];
            let mut it = blk.chunks_exact(8);
            for c in &mut it {
                // A fixed-size array, so the lanes map onto one 8-wide vector.
                let d: [f32; 8] = std::array::from_fn(|l| c[l] - pivot);
                for l in 0..8 {
                    s8[l] += d[l];
                    q8[l] += d[l] * d[l];
                }
            }
            for (a, b) in s8.iter().zip(&q8) {
                s += *a as f64;
                q += *b as f64;
            }
            for &v in it.remainder() {
                let d = (v - pivot) as f64;
                s += d;
                q += d * d;
            }
        }
        out[0] += s;
        out[1] += q;
    }
}

/// `out += [Σ(x − pivot), Σ(x − pivot)²]`: shifted sums for a one-pass mean and variance
/// (the shift by a sample value keeps the variance free of cancellation).
pub fn shifted_sums(x: &[f32], pivot: f32, out: &mut [f64; 2]) {
    shifted_sums_body(x, pivot, out);
}

dispatch! {
    fn affine_act_body(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, &v) in y.iter_mut().zip(x) {
                *d = silu_scalar(v * a + b);
            }
        } else {
            for (d, &v) in y.iter_mut().zip(x) {
                *d = v * a + b;
            }
        }
    }
}

/// `y = act(a·x + b)`, `act` SiLU or the identity (a normalisation's affine step).
pub fn affine_act(x: &[f32], y: &mut [f32], a: f32, b: f32, silu: bool) {
    assert_eq!(x.len(), y.len());
    affine_act_body(x, y, a, b, silu);
}

dispatch! {
    fn affine_act_inplace_body(y: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            for d in y.iter_mut() {
                *d = silu_scalar(*d * a + b);
            }
        } else {
            for d in y.iter_mut() {
                *d = *d * a + b;
            }
        }
    }
}

/// In-place [`affine_act`].
pub fn affine_act_inplace(y: &mut [f32], a: f32, b: f32, silu: bool) {
    affine_act_inplace_body(y, a, b, silu);
}

dispatch! {
    fn softmax_row_body(row: &mut [f32]) {
        let mut mx = f32::NEG_INFINITY;
        for &v in row.iter() {
            mx = if v > mx { v } else { mx };
        }
        let mut sum = 0f32;
        for v in row.iter_mut() {
            let e = exp_fast(*v - mx);
            *v = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// In-place softmax over each row of `x` (rows of length `n`).
pub fn softmax_rows(x: &mut [f32], n: usize) {
    for row in x.chunks_exact_mut(n) {
        softmax_row_body(row);
    }
}

dispatch! {
    fn exp_sub_rows_body(s: &mut [f32], n: usize, sums: &mut [f32]) {
        // Unnormalised softmax: s ← exp(s − max(row)), sums[r] = Σ row.
        for (row, sum_out) in s.chunks_exact_mut(n).zip(sums.iter_mut()) {
            // Eight partial maxima and sums keep the reductions vectorised.
            let mut m8 = [f32::NEG_INFINITY; 8];
            let mut it = row.chunks_exact(8);
            for c in &mut it {
                for (m, &v) in m8.iter_mut().zip(c) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let mut mx = f32::NEG_INFINITY;
            for &v in m8.iter().chain(it.remainder()) {
                mx = if v > mx { v } else { mx };
            }
            // Partial sums keep the reduction vectorised.
            let mut acc = [0f32; 8];
            let mut chunks = row.chunks_exact_mut(8);
            for c in &mut chunks {
                for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                    let e = exp_fast(*v - mx);
                    *v = e;
                    *a += e;
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for v in chunks.into_remainder() {
                let e = exp_fast(*v - mx);
                *v = e;
                sum += e;
            }
            *sum_out = sum;
        }
    }
}

/// Per row of `s` (length `n`): `s ← exp(s − max)`, and the row sum into `sums`.
pub fn exp_sub_rows(s: &mut [f32], n: usize, sums: &mut [f32]) {
    assert!(sums.len() * n <= s.len());
    exp_sub_rows_body(s, n, sums);
}

dispatch! {
    fn layer_norm_modulate_body(x: &[f32], out: &mut [f32], d: usize, shift: &[f32], scale: &[f32], eps: f32) {
        for (xr, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mut s = 0f32;
            for &v in xr {
                s += v;
            }
            let mean = s / d as f32;
            let mut ss = 0f32;
            for &v in xr {
                let c = v - mean;
                ss += c * c;
            }
            let rstd = 1.0 / (ss / d as f32 + eps).sqrt();
            for (((o, &v), &sh), &sc) in orow.iter_mut().zip(xr).zip(shift).zip(scale) {
                *o = (v - mean) * rstd * (1.0 + sc) + sh;
            }
        }
    }
}

/// LayerNorm without affine parameters over rows of width `d`, then `(1 + scale)·x̂ + shift`
/// (adaLN modulation). `shift`/`scale` are `[d]`; pass zeros for a plain LayerNorm.
pub fn layer_norm_modulate(
    x: &[f32],
    out: &mut [f32],
    d: usize,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
) {
    assert!(
        out.len() == x.len() && shift.len() == d && scale.len() == d && x.len().is_multiple_of(d)
    );
    layer_norm_modulate_body(x, out, d, shift, scale, eps);
}

/// LayerNorm without affine parameters over rows of width `d`.
pub fn layer_norm_no_affine(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let zeros = vec![0f32; d];
    layer_norm_modulate(x, &mut out, d, &zeros, &zeros, eps);
    out
}

/// In-place RMSNorm with a learned weight over consecutive groups of `w.len()` values:
/// `x · w / sqrt(mean(x²) + eps)`.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d));
    for g in x.chunks_exact_mut(d) {
        let ss: f32 = g.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / d as f32 + eps).sqrt();
        for (v, &wv) in g.iter_mut().zip(w) {
            *v = *v * r * wv;
        }
    }
}

dispatch! {
    fn gated_add_body(x: &mut [f32], y: &[f32], gate: &[f32]) {
        let d = gate.len();
        for (xr, yr) in x.chunks_exact_mut(d).zip(y.chunks_exact(d)) {
            for ((a, &b), &g) in xr.iter_mut().zip(yr).zip(gate) {
                *a += g * b;
            }
        }
    }
}

/// `x[r, :] += gate ⊙ y[r, :]` for every row (rows of width `gate.len()`).
pub fn gated_add(x: &mut [f32], y: &[f32], gate: &[f32]) {
    assert!(!gate.is_empty() && x.len() == y.len() && x.len().is_multiple_of(gate.len()));
    gated_add_body(x, y, gate);
}

/// In-place `x += y`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_matches_std() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let r = (exp_fast(x) - x.exp()).abs() / x.exp();
            worst = worst.max(r);
            x += 0.013;
        }
        assert!(worst < 1e-6, "exp_fast rel err {worst}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
    }

    #[test]
    fn gelu_and_silu_match_formulas() {
        let xs: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let mut g = xs.clone();
        gelu_tanh_inplace(&mut g);
        let mut s = xs.clone();
        silu_inplace(&mut s);
        for ((&x, &gv), &sv) in xs.iter().zip(&g).zip(&s) {
            let xd = x as f64;
            let gr = 0.5
                * xd
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            let sr = xd / (1.0 + (-xd).exp());
            assert!(
                (gv as f64 - gr).abs() < 1e-6 * (1.0 + gr.abs()),
                "gelu({x})"
            );
            assert!(
                (sv as f64 - sr).abs() < 1e-6 * (1.0 + sr.abs()),
                "silu({x})"
            );
        }
    }

    #[test]
    fn softmax_and_norms() {
        let mut x = vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 1.0];
        softmax_rows(&mut x, 3);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((x[i] as f64 - e[i] / s).abs() < 1e-6);
            assert!((x[3 + i] as f64 - e[i] / s).abs() < 1e-6);
        }
        let v = [1.0f32, 2.0, 3.0, 6.0];
        let ln = layer_norm_no_affine(&v, 4, 0.0);
        let mean = 3.0f32;
        let std = (((1.0f32 - mean).powi(2) + 1.0 + 0.0 + 9.0) / 4.0).sqrt();
        for (a, b) in ln.iter().zip(v) {
            assert!((a - (b - mean) / std).abs() < 1e-6);
        }
        let mut r = vec![3.0f32, 4.0];
        rms_norm_inplace(&mut r, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((r[0] - 3.0 / rms).abs() < 1e-6 && (r[1] - 8.0 / rms).abs() < 1e-6);
    }
}
