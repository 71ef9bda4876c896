//! SD3's rectified-flow schedule and the Euler sampler.

use crate::error::Result;
use crate::tensor::Tensor;

/// SD3's time shift.
pub const SD3_SHIFT: f32 = 3.0;

/// `steps + 1` noise levels from 1 to 0: `σ(t) = s·t / (1 + (s − 1)·t)`, `t` uniform from 1 to 0.
pub fn sigmas(steps: usize, shift: f32) -> Vec<f32> {
    (0..=steps)
        .map(|i| {
            let t = 1.0 - i as f64 / steps as f64;
            let s = shift as f64;
            (s * t / (1.0 + (s - 1.0) * t)) as f32
        })
        .collect()
}

/// Index of the first schedule point with `σ ≤ strength` (0 when `strength ≥ 1`).
/// It may be the last point (σ = 0), in which case no step runs.
pub fn start_index(sigmas: &[f32], strength: f32) -> usize {
    if strength >= 1.0 {
        return 0;
    }
    sigmas
        .iter()
        .position(|&s| s <= strength)
        .unwrap_or(sigmas.len().saturating_sub(1))
}

/// Euler integration of `dz/dσ = v(z, σ)` over `sigmas` (from `sigmas[0]` to the last).
/// `velocity(z, σ)` returns a tensor shaped like `z`.
pub fn euler<F>(mut z: Tensor, sigmas: &[f32], mut velocity: F) -> Result<Tensor>
where
    F: FnMut(&Tensor, f32) -> Result<Tensor>,
{
    for pair in sigmas.windows(2) {
        let (s0, s1) = (pair[0], pair[1]);
        let v = velocity(&z, s0)?;
        let dt = s1 - s0;
        for (zv, vv) in z.data.iter_mut().zip(&v.data) {
            *zv += dt * vv;
        }
    }
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_sd3_formula() {
        let s = sigmas(4, 3.0);
        // t = 1, .75, .5, .25, 0 → 1, 2.25/2.5, 1.5/2, .75/1.5, 0
        let expect = [1.0, 0.9, 0.75, 0.5, 0.0];
        for (a, b) in s.iter().zip(expect) {
            assert!((a - b).abs() < 1e-7, "{s:?}");
        }
        assert_eq!(start_index(&s, 1.0), 0);
        assert_eq!(start_index(&s, 0.8), 2);
        assert_eq!(start_index(&s, 0.75), 2);
        assert_eq!(start_index(&s, 0.01), 4);
    }

    #[test]
    fn euler_is_exact_for_straight_flows() {
        // A rectified flow from x0 to noise e has constant velocity e − x0: Euler lands on x0.
        let x0 = [0.3f32, -0.7, 1.2];
        let e = [1.0f32, 0.5, -2.0];
        let z = Tensor::new(&[3], e.to_vec()).unwrap();
        let out = euler(z, &sigmas(7, 3.0), |_, _| {
            Ok(Tensor::new(&[3], e.iter().zip(&x0).map(|(a, b)| a - b).collect()).unwrap())
        })
        .unwrap();
        for (a, b) in out.data.iter().zip(x0) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
