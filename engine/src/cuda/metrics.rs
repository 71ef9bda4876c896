//! Error metrics the GPU checks share (unit tests here, integration tests under
//! `engine/tests/`): a GPU output against the CPU f32 reference.

/// Max |got − want| / max |want|; a NaN/Inf in `got` or a length mismatch gives infinity.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Cosine similarity (f64 accumulation); 0 for a length mismatch.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-300)) as f32
}

/// `20 log10((max − min of want) / rmse)`: PSNR over the reference's dynamic range;
/// minus infinity for a length mismatch or a non-finite value in `got`.
pub fn psnr_range(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f32::NEG_INFINITY;
    }
    let (lo, hi) = want
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let mse = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / want.len().max(1) as f64;
    (20.0 * ((hi - lo) as f64 / mse.sqrt().max(1e-30)).log10()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_known_values() {
        assert_eq!(rel_err(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f32::INFINITY);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f32.sqrt()).abs() < 1e-7);
        // Range 2, rmse 0.02 → 40 dB.
        let p = psnr_range(&[-1.02, 1.02], &[-1.0, 1.0]);
        assert!((p - 40.0).abs() < 1e-3, "{p}");
        assert_eq!(
            psnr_range(&[f32::NAN, 0.0], &[-1.0, 1.0]),
            f32::NEG_INFINITY
        );
    }
}
