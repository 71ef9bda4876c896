//! f32 matrix products for the CPU backend.
//!
//! `linear` is the workhorse: `y[m, n] = x[m, k] · w[n, k]ᵀ + b[n]` (PyTorch `nn.Linear`
//! layout, which is what every checkpoint stores).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k < 64 * 64 * 64 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (+ `c` when `accumulate`). All row-major, contiguous.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the asserts above bound every index the strides below can reach.
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
            1,
            n as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        )
    }
}

/// `c[m, n] = a[m, k] · b[n, k]ᵀ`. Row-major, contiguous.
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    // SAFETY: as above; bᵀ is read with row stride 1 and column stride k.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        )
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
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
    gemm_bt(x, w, y, m, k, n, true, parallelism(m, n, k));
}

/// `c[m, n] (+)= a[m, k] · b[n, k]ᵀ` on the calling thread only (for callers that
/// already run one task per core).
pub fn matmul_bt_serial(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    gemm_bt(a, b, c, m, k, n, false, Parallelism::None);
}

/// `c[m, n] = a[m, k] · b[k, n]` on the calling thread only.
pub fn matmul_serial(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the assert above bounds every index the strides below can reach.
    unsafe {
        gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_bt(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    // SAFETY: the assert above bounds every index; bᵀ is read with row stride 1 and
    // column stride k.
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
            k as isize,
            1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Columns per packed weight panel (two AVX2 registers).
const NR: usize = 16;
/// Rows per micro-tile.
const MR: usize = 6;
/// Depth of one cache block of the reduction.
const KC: usize = 384;
/// Rows and columns of C per parallel task.
const MB: usize = 8 * MR;
const NB: usize = 8 * NR;

/// A Linear weight `w [n, k]` repacked once for [`PackedLinear::forward_into`]: panels of
/// `NR` output columns, each `k × NR` contiguous (the last panel zero-padded), so the
/// micro-kernel streams it with unit stride.
pub struct PackedLinear {
    panels: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedLinear {
    /// Packs `w [n, k]` (PyTorch layout) and an optional bias `[n]`.
    pub fn new(w: &[f32], bias: Option<&[f32]>, k: usize, n: usize) -> Self {
        assert!(w.len() >= n * k);
        let np = n.div_ceil(NR);
        let mut panels = vec![0f32; np * k * NR];
        for (j, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            for c in 0..NR.min(n - j * NR) {
                let row = &w[(j * NR + c) * k..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * NR + c] = v;
                }
            }
        }
        let bias = bias.map_or_else(|| vec![0f32; n], |b| b[..n].to_vec());
        Self { panels, bias, k, n }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `y[m, n] = x[m, k] · wᵀ + bias`, multi-threaded.
    pub fn forward_into(&self, x: &[f32], y: &mut [f32], m: usize) {
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= m * k && y.len() >= m * n);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            for row in y[..m * n].chunks_exact_mut(n) {
                row.copy_from_slice(&self.bias);
            }
            let tiles_m = m.div_ceil(MB);
            let tiles_n = n.div_ceil(NB);
            let yp = SendPtr(y.as_mut_ptr());
            (0..tiles_m * tiles_n).into_par_iter().for_each(|t| {
                let yp = yp;
                let (tm, tn) = (t / tiles_n, t % tiles_n);
                // SAFETY: AVX2 and FMA were detected above; the task owns rows
                // [tm·MB, ..) × columns [tn·NB, ..) of y, disjoint from every other task,
                // and the bounds were asserted above.
                unsafe { self.block_avx2(x, yp.0, m, tm * MB, tn * NB) };
            });
            return;
        }
        linear_into_unpacked(x, &self.unpack(), Some(&self.bias), y, m, k, n);
    }

    fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; n * k];
        for c in 0..n {
            let panel = &self.panels[(c / NR) * k * NR..][..k * NR];
            for p in 0..k {
                w[c * k + p] = panel[p * NR + c % NR];
            }
        }
        w
    }

    /// One MB × NB block of y (clipped to m × n), all of k in KC steps.
    ///
    /// # Safety
    /// Needs AVX2 + FMA; `y` must point to `m × n` floats of which this call alone writes
    /// the block; `x` holds `m × k` floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(&self, x: &[f32], y: *mut f32, m: usize, r0: usize, c0: usize) {
        let (k, n) = (self.k, self.n);
        let r1 = (r0 + MB).min(m);
        let c1 = (c0 + NB).min(n);
        let mut p0 = 0;
        while p0 < k {
            let kc = KC.min(k - p0);
            let mut c = c0;
            while c < c1 {
                let nr = NR.min(c1 - c);
                let panel = self.panels.as_ptr().add((c / NR) * k * NR + p0 * NR);
                let mut r = r0;
                while r < r1 {
                    let mr = MR.min(r1 - r);
                    let a = x.as_ptr().add(r * k + p0);
                    let cp = y.add(r * n + c);
                    match mr {
                        6 => kernel::<6>(a, k, panel, kc, cp, n, nr),
                        5 => kernel::<5>(a, k, panel, kc, cp, n, nr),
                        4 => kernel::<4>(a, k, panel, kc, cp, n, nr),
                        3 => kernel::<3>(a, k, panel, kc, cp, n, nr),
                        2 => kernel::<2>(a, k, panel, kc, cp, n, nr),
                        _ => kernel::<1>(a, k, panel, kc, cp, n, nr),
                    }
                    r += mr;
                }
                c += NR;
            }
            p0 += kc;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks sharing it write disjoint blocks (see `forward_into`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `C[R, nr] += A[R, kc] · P[kc, NR]` for one micro-tile: A rows `lda` apart, P a packed
/// panel, C rows `ldc` apart; only the first `nr` columns of C are touched.
///
/// # Safety
/// Needs AVX2 + FMA; `a` must be readable for R rows × kc, `p` for kc × NR, `c` writable
/// for R rows × nr.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(a: *const f32, lda: usize, p: *const f32, kc: usize, c: *mut f32, ldc: usize, nr: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for q in 0..kc {
        let b0 = _mm256_loadu_ps(p.add(q * NR));
        let b1 = _mm256_loadu_ps(p.add(q * NR + 8));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * lda + q));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
    if nr == NR {
        for (i, row) in acc.iter().enumerate() {
            let cp = c.add(i * ldc);
            _mm256_storeu_ps(cp, _mm256_add_ps(_mm256_loadu_ps(cp), row[0]));
            _mm256_storeu_ps(cp.add(8), _mm256_add_ps(_mm256_loadu_ps(cp.add(8)), row[1]));
        }
    } else {
        let mut tmp = [0f32; NR];
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(tmp.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), row[1]);
            let cp = c.add(i * ldc);
            for (j, &v) in tmp.iter().enumerate().take(nr) {
                *cp.add(j) += v;
            }
        }
    }
}

fn linear_into_unpacked(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) {
    linear_into(x, w, bias, y, m, k, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_matches_gemm() {
        for &(m, k, n) in &[(1, 3, 1), (7, 5, 17), (13, 400, 33), (50, 777, 130), (97, 64, 16)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let want = linear(&x, &w, Some(&b), m, k, n);
            let p = PackedLinear::new(&w, Some(&b), k, n);
            let mut got = vec![f32::NAN; m * n];
            p.forward_into(&x, &mut got, m);
            for (i, (a, r)) in got.iter().zip(&want).enumerate() {
                assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "({m},{k},{n}) [{i}]: {a} vs {r}");
            }
            assert_eq!(p.unpack(), w);
        }
    }

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
                assert!((y[i * n + j] - r).abs() < 1e-5, "{i},{j}: {} vs {r}", y[i * n + j]);
            }
        }
    }
}

#[cfg(test)]
mod timing_scratch {
    fn cpu_s() -> f64 {
        let st = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = st.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        (u + s) / 100.0
    }
    #[test]
    #[ignore]
    fn timing_scratch() {
        for &(m, k, n) in &[(1178usize, 512usize, 1536usize), (1024, 2048, 512), (2048, 2048, 2048)] {
            let x = vec![0.5f32; m * k];
            let w = vec![0.25f32; n * k];
            let mut y = vec![0f32; m * n];
            let reps = 10;
            let c0 = cpu_s();
            for _ in 0..reps {
                super::linear_into(&x, &w, None, &mut y, m, k, n);
            }
            let c = (cpu_s() - c0) / reps as f64;
            let pk = super::PackedLinear::new(&w, None, k, n);
            let c1 = cpu_s();
            for _ in 0..reps {
                pk.forward_into(&x, &mut y, m);
            }
            let cp = (cpu_s() - c1) / reps as f64;
            eprintln!("packed {m}x{k}x{n}: {:.2} cpu-ms, {:.1} GFLOP/cpu-s", cp * 1e3, 2.0 * (m * k * n) as f64 / cp / 1e9);
            eprintln!("linear {m}x{k}x{n}: {:.2} cpu-ms, {:.1} GFLOP/cpu-s", c * 1e3, 2.0 * (m * k * n) as f64 / c / 1e9);
        }
        let (h, l, hd) = (8usize, 1178usize, 64usize);
        let q: Vec<f32> = (0..l * h * hd).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut o = vec![0f32; l * h * hd];
        let reps = 5;
        let c0 = cpu_s();
        for _ in 0..reps {
            crate::cpu::attention::attention(&q, &q, &q, &mut o, 1, h, l, l, hd, 0.125);
        }
        let c = (cpu_s() - c0) / reps as f64;
        eprintln!("attention: {:.2} cpu-ms, {:.1} GFLOP/cpu-s", c * 1e3, 4.0 * (l * l * h * hd) as f64 / c / 1e9);
        let mut g: Vec<f32> = (0..1178 * 2048).map(|i| ((i as f32) * 0.37).sin()).collect();
        let c0 = cpu_s();
        for _ in 0..20 {
            crate::cpu::ops::gelu_tanh_inplace(&mut g);
        }
        eprintln!("gelu 2.4M: {:.2} cpu-ms", (cpu_s() - c0) / 20.0 * 1e3);
    }
}
