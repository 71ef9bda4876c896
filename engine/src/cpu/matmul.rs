//! f32 matrix products for the CPU backend.
//!
//! `linear` is the workhorse: `y[m, n] = x[m, k] · w[n, k]ᵀ + b[n]` (PyTorch `nn.Linear`
//! layout, which is what every checkpoint stores).

use gemm::{gemm, Parallelism};

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (+ `c` when `accumulate`). All row-major, contiguous.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    gemm_f32(a, b, c, m, k, n, false, accumulate, parallelism(m, n, k));
}

/// `c[m, n] = a[m, k] · b[n, k]ᵀ`. Row-major, contiguous.
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    gemm_f32(a, b, c, m, k, n, true, false, parallelism(m, n, k));
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    linear_into(x, w, bias, &mut y, m, k, n);
    y
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`, written into `y` (no allocation).
pub fn linear_into(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    match bias {
        Some(b) => {
            assert!(b.len() >= n);
            for row in y[..m * n].chunks_exact_mut(n) {
                row.copy_from_slice(&b[..n]);
            }
        }
        None => y[..m * n].fill(0.0),
    }
    gemm_f32(x, w, y, m, k, n, true, true, parallelism(m, n, k));
}

/// `c[m, n] = a[m, k] · b[n, k]ᵀ` on the calling thread only (for callers that
/// already run one task per core).
pub fn matmul_bt_serial(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    gemm_f32(a, b, c, m, k, n, true, false, Parallelism::None);
}

/// `c[m, n] = a[m, k] · b[k, n]` on the calling thread only.
pub fn matmul_serial(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    gemm_f32(a, b, c, m, k, n, false, false, Parallelism::None);
}

/// The one call into the `gemm` crate: `c[m, n] (+)= a[m, k] · B`, where B is `b[k, n]`
/// or, when `b_transposed`, `b[n, k]ᵀ`. All row-major, contiguous.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // B's (column, row) strides: b[k, n] is read along rows, b[n, k]ᵀ along columns.
    let (b_cs, b_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the assert above bounds every index the strides can reach (both layouts of B
    // hold k·n elements).
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let y = linear(&x, &w, Some(&b), m, k, n);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f32>() + b[j];
                assert!(
                    (y[i * n + j] - r).abs() < 1e-5,
                    "{i},{j}: {} vs {r}",
                    y[i * n + j]
                );
            }
        }
    }
}
