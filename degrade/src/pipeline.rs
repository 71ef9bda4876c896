//! The second-order degradation: configuration, sampled parameters, and their application.
//!
//! Order of operations (Real-ESRGAN):
//! 1. stage 1: blur, random resize, Gaussian or Poisson noise, JPEG;
//! 2. stage 2: blur (with probability), random resize relative to the final size, noise;
//! 3. final: either [resize to 1/scale, sinc filter] then JPEG, or JPEG then
//!    [resize to 1/scale, sinc filter], chosen 50/50; round to 8 bits.
//!
//! Unlike Real-ESRGAN the HQ image is not unsharp-masked before degradation: our HQ is the
//! training target as it is.

use crate::error::Result;
use crate::jpeg;
use crate::kernels::{filter2d, BlurKernel, KernelKind};
use crate::noise;
use crate::planar::Planar;
use crate::resize::{resize, ResizeMode};
use crate::rng::Rng;
use std::f64::consts::PI;

/// A closed range `[lo, hi]` of a uniformly drawn parameter.
pub type Range = (f64, f64);

/// The random choices of one degradation stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageConfig {
    /// Probability of blurring at all (1 in stage 1).
    pub blur_prob: f64,
    /// Probabilities of [`KernelKind::ALL`].
    pub kernel_prob: [f64; 6],
    /// Probability of a sinc kernel instead of a Gaussian-family one.
    pub sinc_prob: f64,
    pub blur_sigma: Range,
    /// Generalized-Gaussian shape `beta`.
    pub betag: Range,
    /// Plateau shape `beta`.
    pub betap: Range,
    /// Probabilities of resizing up / down / keeping the size.
    pub resize_prob: [f64; 3],
    pub resize_range: Range,
    /// Probability of Gaussian noise (Poisson noise otherwise).
    pub gaussian_noise_prob: f64,
    /// Gaussian noise sigma on the 0–255 scale.
    pub noise_sigma: Range,
    pub poisson_scale: Range,
    pub gray_noise_prob: f64,
    /// JPEG quality (stage 2's is the final JPEG).
    pub jpeg_quality: Range,
}

/// Full degradation configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub stage1: StageConfig,
    pub stage2: StageConfig,
    /// Probability of the sinc filter after the final resize.
    pub final_sinc_prob: f64,
    /// Candidate (odd) blur kernel sizes, drawn uniformly.
    pub kernel_sizes: Vec<usize>,
}

/// The two offered parameter sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Real-ESRGAN's x4 setting.
    Standard,
    /// The lighter setting SeeSR and DiT4SR train with.
    Light,
}

impl Preset {
    pub fn config(self) -> Config {
        let kernel_prob = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03];
        let stage1 = StageConfig {
            blur_prob: 1.0,
            kernel_prob,
            sinc_prob: 0.1,
            blur_sigma: (0.2, 3.0),
            betag: (0.5, 4.0),
            betap: (1.0, 2.0),
            resize_prob: [0.2, 0.7, 0.1],
            resize_range: (0.15, 1.5),
            gaussian_noise_prob: 0.5,
            noise_sigma: (1.0, 30.0),
            poisson_scale: (0.05, 3.0),
            gray_noise_prob: 0.4,
            jpeg_quality: (30.0, 95.0),
        };
        let stage2 = StageConfig {
            blur_prob: 0.8,
            blur_sigma: (0.2, 1.5),
            resize_prob: [0.3, 0.4, 0.3],
            resize_range: (0.3, 1.2),
            noise_sigma: (1.0, 25.0),
            poisson_scale: (0.05, 2.5),
            ..stage1.clone()
        };
        let mut cfg = Config {
            stage1,
            stage2,
            final_sinc_prob: 0.8,
            kernel_sizes: (3..=10).map(|v| 2 * v + 1).collect(),
        };
        if self == Preset::Light {
            cfg.stage1.resize_range = (0.3, 1.5);
            cfg.stage1.noise_sigma = (1.0, 15.0);
            cfg.stage1.poisson_scale = (0.05, 2.0);
            cfg.stage1.jpeg_quality = (60.0, 95.0);
            cfg.stage2.blur_prob = 0.5;
            cfg.stage2.resize_range = (0.6, 1.2);
            cfg.stage2.noise_sigma = (1.0, 12.0);
            cfg.stage2.poisson_scale = (0.05, 1.0);
            cfg.stage2.jpeg_quality = (60.0, 100.0);
        }
        cfg
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "standard" => Ok(Preset::Standard),
            "light" => Ok(Preset::Light),
            _ => Err(format!("unknown preset `{s}` (expected standard or light)")),
        }
    }
}

/// A sampled random resize.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResizeParams {
    /// Scale factor (1 when the size is kept).
    pub scale: f64,
    pub mode: ResizeMode,
}

/// A sampled noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseParams {
    /// `sigma` on the 0–255 scale.
    Gaussian {
        sigma: f64,
        gray: bool,
    },
    Poisson {
        scale: f64,
        gray: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage1Params {
    pub blur: BlurKernel,
    pub resize: ResizeParams,
    pub noise: NoiseParams,
    pub jpeg_quality: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage2Params {
    pub blur: Option<BlurKernel>,
    /// Relative to the final LQ size (HQ size / scale).
    pub resize: ResizeParams,
    pub noise: NoiseParams,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FinalParams {
    /// `true`: [resize + sinc] then JPEG; `false`: JPEG then [resize + sinc].
    pub resize_first: bool,
    pub mode: ResizeMode,
    pub sinc: Option<BlurKernel>,
    pub jpeg_quality: u8,
}

/// Every random choice of one degradation except the per-pixel noise values.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub stage1: Stage1Params,
    pub stage2: Stage2Params,
    pub last: FinalParams,
}

/// `lo..hi` split at 1 with equal odds, as Real-ESRGAN draws the generalized/plateau `beta`.
fn split_beta(rng: &mut Rng, r: Range) -> f64 {
    if rng.f64() < 0.5 {
        rng.uniform(r.0, r.1.min(1.0))
    } else {
        rng.uniform(r.0.max(1.0), r.1)
    }
}

fn sample_kernel(cfg: &StageConfig, sizes: &[usize], rng: &mut Rng) -> BlurKernel {
    let size = sizes.get(rng.below(sizes.len())).copied().unwrap_or(21);
    if rng.f64() < cfg.sinc_prob {
        let lo = if size < 13 { PI / 3.0 } else { PI / 5.0 };
        return BlurKernel::Sinc {
            size,
            omega: rng.uniform(lo, PI),
        };
    }
    let kind = KernelKind::ALL[rng.weighted(&cfg.kernel_prob)];
    let sigma_x = rng.uniform(cfg.blur_sigma.0, cfg.blur_sigma.1);
    let (sigma_y, theta) = if kind.is_isotropic() {
        (sigma_x, 0.0)
    } else {
        (
            rng.uniform(cfg.blur_sigma.0, cfg.blur_sigma.1),
            rng.uniform(-PI, PI),
        )
    };
    let beta = match kind {
        KernelKind::Iso | KernelKind::Aniso => 1.0,
        KernelKind::GeneralizedIso | KernelKind::GeneralizedAniso => split_beta(rng, cfg.betag),
        KernelKind::PlateauIso | KernelKind::PlateauAniso => split_beta(rng, cfg.betap),
    };
    BlurKernel::Gaussian {
        kind,
        size,
        sigma_x,
        sigma_y,
        theta,
        beta,
    }
}

fn sample_mode(rng: &mut Rng) -> ResizeMode {
    ResizeMode::ALL[rng.below(3)]
}

fn sample_resize(cfg: &StageConfig, rng: &mut Rng) -> ResizeParams {
    let scale = match rng.weighted(&cfg.resize_prob) {
        0 => rng.uniform(1.0, cfg.resize_range.1),
        1 => rng.uniform(cfg.resize_range.0, 1.0),
        _ => 1.0,
    };
    ResizeParams {
        scale,
        mode: sample_mode(rng),
    }
}

fn sample_noise(cfg: &StageConfig, rng: &mut Rng) -> NoiseParams {
    let gaussian = rng.f64() < cfg.gaussian_noise_prob;
    let level = if gaussian {
        rng.uniform(cfg.noise_sigma.0, cfg.noise_sigma.1)
    } else {
        rng.uniform(cfg.poisson_scale.0, cfg.poisson_scale.1)
    };
    let gray = rng.f64() < cfg.gray_noise_prob;
    if gaussian {
        NoiseParams::Gaussian { sigma: level, gray }
    } else {
        NoiseParams::Poisson { scale: level, gray }
    }
}

/// Integer JPEG quality drawn uniformly over the integers of `r`.
fn sample_quality(r: Range, rng: &mut Rng) -> u8 {
    let lo = r.0.ceil().clamp(1.0, 100.0) as usize;
    let hi = r.1.floor().clamp(lo as f64, 100.0) as usize;
    (lo + rng.below(hi - lo + 1)) as u8
}

impl Params {
    /// Draw every parameter of one degradation.
    pub fn sample(cfg: &Config, rng: &mut Rng) -> Params {
        let s1 = &cfg.stage1;
        let stage1 = Stage1Params {
            blur: sample_kernel(s1, &cfg.kernel_sizes, rng),
            resize: sample_resize(s1, rng),
            noise: sample_noise(s1, rng),
            jpeg_quality: sample_quality(s1.jpeg_quality, rng),
        };
        let s2 = &cfg.stage2;
        let blur2 = rng.f64() < s2.blur_prob;
        let kernel2 = sample_kernel(s2, &cfg.kernel_sizes, rng);
        let stage2 = Stage2Params {
            blur: blur2.then_some(kernel2),
            resize: sample_resize(s2, rng),
            noise: sample_noise(s2, rng),
        };
        let resize_first = rng.f64() < 0.5;
        let mode = sample_mode(rng);
        let use_sinc = rng.f64() < cfg.final_sinc_prob;
        let size = cfg
            .kernel_sizes
            .get(rng.below(cfg.kernel_sizes.len()))
            .copied()
            .unwrap_or(21);
        let omega = rng.uniform(PI / 3.0, PI);
        let last = FinalParams {
            resize_first,
            mode,
            sinc: use_sinc.then_some(BlurKernel::Sinc { size, omega }),
            jpeg_quality: sample_quality(s2.jpeg_quality, rng),
        };
        Params {
            stage1,
            stage2,
            last,
        }
    }
}

fn add_noise(img: &mut Planar, noise: NoiseParams, rng: &mut Rng) {
    match noise {
        NoiseParams::Gaussian { sigma, gray } => noise::add_gaussian(img, sigma, gray, rng),
        NoiseParams::Poisson { scale, gray } => noise::add_poisson(img, scale, gray, rng),
    }
}

fn scaled(n: usize, s: f64) -> usize {
    ((n as f64 * s).floor() as usize).max(1)
}

/// Apply sampled `params` to `hq`, producing an LQ of `floor(size / scale)` (at least 1 px).
/// `rng` supplies the per-pixel noise.
pub fn apply(hq: &Planar, params: &Params, scale: usize, rng: &mut Rng) -> Result<Planar> {
    let scale = scale.max(1);
    let (w, h) = (hq.width, hq.height);
    let (lw, lh) = ((w / scale).max(1), (h / scale).max(1));

    // Stage 1.
    let p1 = &params.stage1;
    let mut x = filter2d(hq, &p1.blur.build());
    x = resize(
        &x,
        scaled(w, p1.resize.scale),
        scaled(h, p1.resize.scale),
        p1.resize.mode,
    );
    add_noise(&mut x, p1.noise, rng);
    x = jpeg::roundtrip(&x, p1.jpeg_quality)?;

    // Stage 2.
    let p2 = &params.stage2;
    if let Some(k) = &p2.blur {
        x = filter2d(&x, &k.build());
    }
    x = resize(
        &x,
        scaled(lw, p2.resize.scale),
        scaled(lh, p2.resize.scale),
        p2.resize.mode,
    );
    add_noise(&mut x, p2.noise, rng);

    // Final: [resize + sinc] and JPEG in the sampled order.
    let last = &params.last;
    let resize_sinc = |img: &Planar| {
        let r = resize(img, lw, lh, last.mode);
        match &last.sinc {
            Some(k) => filter2d(&r, &k.build()),
            None => r,
        }
    };
    if last.resize_first {
        x = resize_sinc(&x);
        x = jpeg::roundtrip(&x, last.jpeg_quality)?;
    } else {
        x = jpeg::roundtrip(&x, last.jpeg_quality)?;
        x = resize_sinc(&x);
    }
    x.round_to_u8_grid();
    Ok(x)
}

/// Degrade `hq` with parameters and noise drawn from `rng`; returns the LQ and the parameters.
pub fn degrade(hq: &Planar, cfg: &Config, scale: usize, rng: &mut Rng) -> Result<(Planar, Params)> {
    let params = Params::sample(cfg, rng);
    let lq = apply(hq, &params, scale, rng)?;
    Ok((lq, params))
}
