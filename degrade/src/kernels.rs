//! Blur kernels of the Real-ESRGAN degradation model and the 2-D filter that applies them.
//!
//! Gaussian family (iso/aniso), generalized Gaussian (`exp(-0.5 q^beta)`), plateau
//! (`1 / (q^beta + 1)`), where `q = p^T Sigma^-1 p` over the pixel offsets `p` from the kernel
//! centre and `Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T`; and the circular low-pass (2-D sinc)
//! kernel `omega J1(omega r) / (2 pi r)`. Every kernel is normalised to sum to 1.

use crate::planar::Planar;
use std::f64::consts::PI;

/// Shape family of a Gaussian-like kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Iso,
    Aniso,
    GeneralizedIso,
    GeneralizedAniso,
    PlateauIso,
    PlateauAniso,
}

impl KernelKind {
    /// In the order of the probabilities in [`crate::StageConfig::kernel_prob`].
    pub const ALL: [KernelKind; 6] = [
        KernelKind::Iso,
        KernelKind::Aniso,
        KernelKind::GeneralizedIso,
        KernelKind::GeneralizedAniso,
        KernelKind::PlateauIso,
        KernelKind::PlateauAniso,
    ];

    pub fn is_isotropic(self) -> bool {
        matches!(
            self,
            KernelKind::Iso | KernelKind::GeneralizedIso | KernelKind::PlateauIso
        )
    }
}

/// The sampled description of one blur kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BlurKernel {
    /// Gaussian-like kernel; `beta` is 1 for the plain Gaussian kinds.
    Gaussian {
        kind: KernelKind,
        size: usize,
        sigma_x: f64,
        sigma_y: f64,
        theta: f64,
        beta: f64,
    },
    /// Circular low-pass kernel with cutoff `omega` (radians per pixel).
    Sinc { size: usize, omega: f64 },
}

impl BlurKernel {
    pub fn size(&self) -> usize {
        match *self {
            BlurKernel::Gaussian { size, .. } | BlurKernel::Sinc { size, .. } => size,
        }
    }

    /// The normalised weights.
    pub fn build(&self) -> Kernel {
        match *self {
            BlurKernel::Gaussian {
                kind,
                size,
                sigma_x,
                sigma_y,
                theta,
                beta,
            } => gaussian_family(kind, size, sigma_x, sigma_y, theta, beta),
            BlurKernel::Sinc { size, omega } => sinc(size, omega),
        }
    }
}

/// A square kernel, row-major, `size` odd.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub size: usize,
    pub weights: Vec<f32>,
}

impl Kernel {
    /// The identity (a single 1 in the centre).
    pub fn identity() -> Self {
        Kernel {
            size: 1,
            weights: vec![1.0],
        }
    }

    fn from_f64(size: usize, w: Vec<f64>) -> Self {
        let sum: f64 = w.iter().sum();
        if !(sum.is_finite() && sum.abs() > 1e-12) {
            return Kernel::identity();
        }
        Kernel {
            size,
            weights: w.iter().map(|v| (v / sum) as f32).collect(),
        }
    }
}

/// Gaussian-family kernel of odd `size`.
pub fn gaussian_family(
    kind: KernelKind,
    size: usize,
    sigma_x: f64,
    sigma_y: f64,
    theta: f64,
    beta: f64,
) -> Kernel {
    let size = size.max(1) | 1;
    let (sx2, sy2) = (sigma_x * sigma_x, sigma_y * sigma_y);
    let (s, c) = theta.sin_cos();
    // Sigma = R diag(sx2, sy2) R^T with R = [[c, -s], [s, c]].
    let a = c * c * sx2 + s * s * sy2;
    let b = c * s * (sx2 - sy2);
    let d = s * s * sx2 + c * c * sy2;
    let det = a * d - b * b;
    let (ia, ib, id) = if det.abs() > 0.0 {
        (d / det, -b / det, a / det)
    } else {
        (0.0, 0.0, 0.0)
    };
    let half = (size / 2) as f64;
    let mut w = Vec::with_capacity(size * size);
    for row in 0..size {
        let y = row as f64 - half;
        for col in 0..size {
            let x = col as f64 - half;
            let q = ia * x * x + 2.0 * ib * x * y + id * y * y;
            let v = match kind {
                KernelKind::Iso | KernelKind::Aniso => (-0.5 * q).exp(),
                KernelKind::GeneralizedIso | KernelKind::GeneralizedAniso => {
                    (-0.5 * q.max(0.0).powf(beta)).exp()
                }
                KernelKind::PlateauIso | KernelKind::PlateauAniso => {
                    1.0 / (q.max(0.0).powf(beta) + 1.0)
                }
            };
            w.push(v);
        }
    }
    Kernel::from_f64(size, w)
}

/// Circular low-pass (2-D sinc) kernel of odd `size` with cutoff `omega`.
pub fn sinc(size: usize, omega: f64) -> Kernel {
    let size = size.max(1) | 1;
    let half = (size / 2) as f64;
    let mut w = Vec::with_capacity(size * size);
    for row in 0..size {
        let y = row as f64 - half;
        for col in 0..size {
            let x = col as f64 - half;
            let r = (x * x + y * y).sqrt();
            let v = if r == 0.0 {
                omega * omega / (4.0 * PI)
            } else {
                omega * bessel_j1(omega * r) / (2.0 * PI * r)
            };
            w.push(v);
        }
    }
    Kernel::from_f64(size, w)
}

/// Bessel function of the first kind, order 1, from its integral representation
/// `J1(x) = 1/pi * int_0^pi cos(t - x sin t) dt`. The integrand extends to a smooth periodic
/// function, so the trapezoidal rule converges exponentially; 256 nodes give double precision
/// for |x| up to ~150 (kernels here need x <= pi * 15).
pub fn bessel_j1(x: f64) -> f64 {
    const N: usize = 256;
    // Over the full period [-pi, pi) the trapezoid rule is a plain mean.
    let mut acc = 0.0;
    for k in 0..N {
        let t = -PI + 2.0 * PI * (k as f64) / (N as f64);
        acc += (t - x * t.sin()).cos();
    }
    acc / N as f64
}

/// Index into [0, n) with reflection at the borders (`-1 → 1`, `n → n - 2`), as torch's
/// `reflect` padding; folds repeatedly for offsets larger than the image.
pub fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let mut m = i.rem_euclid(period);
    if m >= n as isize {
        m = period - m;
    }
    m as usize
}

/// If `kernel` is (numerically) an outer product `u v^T`, the factors: `u` along rows (vertical),
/// `v` along columns (horizontal). Isotropic Gaussians are; rotated or generalized ones are not.
pub fn separable_factors(kernel: &Kernel) -> Option<(Vec<f32>, Vec<f32>)> {
    let k = kernel.size;
    let m = k / 2;
    let w = |i: usize, j: usize| f64::from(kernel.weights[i * k + j]);
    let centre = w(m, m);
    if k <= 1 || centre <= 0.0 {
        return None;
    }
    let max = kernel
        .weights
        .iter()
        .fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
    for i in 0..k {
        for j in 0..k {
            if (w(i, j) * centre - w(i, m) * w(m, j)).abs() > 1e-6 * max * centre {
                return None;
            }
        }
    }
    let u = (0..k).map(|i| (w(i, m) / centre) as f32).collect();
    let v = (0..k).map(|j| w(m, j) as f32).collect();
    Some((u, v))
}

/// Correlate every channel with `kernel` (reflect padding), output the same size. Separable
/// kernels run as two 1-D passes (same result up to float rounding).
pub fn filter2d(img: &Planar, kernel: &Kernel) -> Planar {
    match separable_factors(kernel) {
        Some((u, v)) => filter_separable(img, &u, &v),
        None => filter2d_direct(img, kernel),
    }
}

/// Horizontal pass with `v`, vertical pass with `u`, both with reflect padding.
fn filter_separable(img: &Planar, u: &[f32], v: &[f32]) -> Planar {
    let (w, h) = (img.width, img.height);
    let k = v.len();
    let p = (k / 2) as isize;
    let xs: Vec<usize> = (0..w + k - 1).map(|x| reflect(x as isize - p, w)).collect();
    let mut out = Planar::zeros(w, h);
    let mut tmp = vec![0.0f32; w * h];
    let mut row = vec![0.0f32; w + k - 1];
    for c in 0..3 {
        let src = img.plane(c);
        for y in 0..h {
            let srow = &src[y * w..(y + 1) * w];
            for (r, &sx) in row.iter_mut().zip(&xs) {
                *r = srow[sx];
            }
            let trow = &mut tmp[y * w..(y + 1) * w];
            trow.iter_mut().for_each(|t| *t = 0.0);
            for (j, &kv) in v.iter().enumerate() {
                for (t, &s) in trow.iter_mut().zip(&row[j..j + w]) {
                    *t += kv * s;
                }
            }
        }
        let dst = out.plane_mut(c);
        for y in 0..h {
            let orow = &mut dst[y * w..(y + 1) * w];
            for (i, &kv) in u.iter().enumerate() {
                let sy = reflect(y as isize + i as isize - p, h);
                for (o, &s) in orow.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                    *o += kv * s;
                }
            }
        }
    }
    out
}

/// Correlate every channel with the full 2-D `kernel` (reflect padding).
pub fn filter2d_direct(img: &Planar, kernel: &Kernel) -> Planar {
    let k = kernel.size;
    if k <= 1 {
        let mut out = img.clone();
        let w0 = kernel.weights.first().copied().unwrap_or(1.0);
        out.data.iter_mut().for_each(|v| *v *= w0);
        return out;
    }
    let (w, h) = (img.width, img.height);
    let p = k / 2;
    let pw = w + 2 * p;
    let ph = h + 2 * p;
    let xs: Vec<usize> = (0..pw)
        .map(|x| reflect(x as isize - p as isize, w))
        .collect();
    let mut out = Planar::zeros(w, h);
    let mut padded = vec![0.0f32; pw * ph];
    for c in 0..3 {
        let src = img.plane(c);
        for py in 0..ph {
            let sy = reflect(py as isize - p as isize, h);
            let srow = &src[sy * w..(sy + 1) * w];
            let drow = &mut padded[py * pw..(py + 1) * pw];
            for (d, &sx) in drow.iter_mut().zip(&xs) {
                *d = srow[sx];
            }
        }
        let dst = out.plane_mut(c);
        for y in 0..h {
            let orow = &mut dst[y * w..(y + 1) * w];
            for i in 0..k {
                let prow = &padded[(y + i) * pw..(y + i) * pw + pw];
                let krow = &kernel.weights[i * k..(i + 1) * k];
                for (j, &kv) in krow.iter().enumerate() {
                    if kv == 0.0 {
                        continue;
                    }
                    let s = &prow[j..j + w];
                    for (o, &v) in orow.iter_mut().zip(s) {
                        *o += kv * v;
                    }
                }
            }
        }
    }
    out
}
