//! Tests of the degradation pipeline against closed forms and known values.

use dpir_degrade::batch::{degrade_crop, PairOptions};
use dpir_degrade::kernels::{
    bessel_j1, filter2d, gaussian_family, reflect, sinc, BlurKernel, Kernel, KernelKind,
};
use dpir_degrade::noise::{add_gaussian, poisson};
use dpir_degrade::resize::{downscale_rgb8_antialiased, resize, ResizeMode};
use dpir_degrade::{degrade, jpeg, NoiseParams, Params, Planar, Preset, Rng, StageConfig};
use std::f64::consts::PI;

/// A smooth synthetic photo-like image with some texture.
fn synthetic(w: usize, h: usize, seed: u64) -> Planar {
    let mut rng = Rng::new(seed);
    let mut img = Planar::zeros(w, h);
    let n = w * h;
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let tex = 0.15 * ((x as f32 * 0.7).sin() * (y as f32 * 0.4).cos());
            let vals = [
                0.2 + 0.6 * fx + tex,
                0.5 + 0.3 * (fy * 6.0).sin(),
                0.8 - 0.5 * fy + 0.05 * rng.f64() as f32,
            ];
            for (c, v) in vals.iter().enumerate() {
                img.data[c * n + y * w + x] = v.clamp(0.0, 1.0);
            }
        }
    }
    img.round_to_u8_grid();
    img
}

fn sum(k: &Kernel) -> f64 {
    k.weights.iter().map(|&v| f64::from(v)).sum()
}

#[test]
fn kernels_sum_to_one() {
    for size in [7, 9, 13, 17, 21] {
        for kind in KernelKind::ALL {
            for &(sx, sy, theta, beta) in &[
                (0.2, 0.2, 0.0, 0.5),
                (1.0, 3.0, 0.7, 1.0),
                (3.0, 0.4, -2.5, 2.0),
                (2.2, 2.2, PI, 4.0),
            ] {
                let k = gaussian_family(kind, size, sx, sy, theta, beta);
                assert_eq!(k.size, size);
                assert_eq!(k.weights.len(), size * size);
                assert!(k.weights.iter().all(|v| v.is_finite() && *v >= 0.0));
                assert!((sum(&k) - 1.0).abs() < 1e-5, "{kind:?} {size}: {}", sum(&k));
            }
        }
        for omega in [PI / 5.0, PI / 3.0, 2.0, PI] {
            let k = sinc(size, omega);
            assert_eq!(k.weights.len(), size * size);
            assert!(
                (sum(&k) - 1.0).abs() < 1e-5,
                "sinc {size} {omega}: {}",
                sum(&k)
            );
        }
    }
}

#[test]
fn sampled_kernels_sum_to_one() {
    let cfg = Preset::Standard.config();
    let mut rng = Rng::new(7);
    for _ in 0..300 {
        let p = Params::sample(&cfg, &mut rng);
        let mut kernels = vec![p.stage1.blur];
        kernels.extend(p.stage2.blur);
        kernels.extend(p.last.sinc);
        for k in kernels {
            let built = k.build();
            assert_eq!(built.size, k.size());
            assert!((sum(&built) - 1.0).abs() < 1e-5, "{k:?}");
        }
    }
}

#[test]
fn gaussian_kernels_match_closed_form() {
    // Isotropic: w(x, y) / w(0, 0) = exp(-(x^2 + y^2) / (2 sigma^2)).
    let s = 1.7;
    let k = gaussian_family(KernelKind::Iso, 11, s, s, 0.0, 1.0);
    let c = f64::from(k.weights[5 * 11 + 5]);
    for (x, y) in [(1i32, 0i32), (2, 3), (-4, 1), (5, -5)] {
        let got = f64::from(k.weights[((y + 5) * 11 + x + 5) as usize]) / c;
        let want = (-f64::from(x * x + y * y) / (2.0 * s * s)).exp();
        assert!(
            (got - want).abs() < 1e-5 * want.max(1e-3),
            "{x},{y}: {got} vs {want}"
        );
    }
    // Anisotropic with theta = 0: sigma_x along columns; theta = pi/2 swaps the axes.
    let (sx, sy) = (2.5, 0.8);
    let k0 = gaussian_family(KernelKind::Aniso, 9, sx, sy, 0.0, 1.0);
    let k90 = gaussian_family(KernelKind::Aniso, 9, sx, sy, PI / 2.0, 1.0);
    let at = |k: &Kernel, x: i32, y: i32| f64::from(k.weights[((y + 4) * 9 + x + 4) as usize]);
    let want = (-(4.0 / (2.0 * sx * sx)) - 1.0 / (2.0 * sy * sy)).exp();
    let got = at(&k0, 2, 1) / at(&k0, 0, 0);
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!((at(&k90, 1, 2) - at(&k0, 2, 1)).abs() < 1e-7);
    // Generalized with beta = 1 equals the Gaussian; plateau has the closed form 1/(q^b + 1).
    let g = gaussian_family(KernelKind::GeneralizedAniso, 9, sx, sy, 0.3, 1.0);
    let a = gaussian_family(KernelKind::Aniso, 9, sx, sy, 0.3, 1.0);
    for (u, v) in g.weights.iter().zip(&a.weights) {
        assert!((u - v).abs() < 1e-7);
    }
    let p = gaussian_family(KernelKind::PlateauIso, 9, 1.0, 1.0, 0.0, 1.5);
    let got = at(&p, 3, 0) / at(&p, 0, 0);
    let want = 1.0 / (9f64.powf(1.5) + 1.0);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
}

#[test]
fn bessel_j1_matches_tables() {
    // Values from Abramowitz & Stegun / scipy.special.j1.
    for (x, want) in [
        (0.0, 0.0),
        (1.0, 0.440_050_585_744_933_5),
        (2.5, 0.497_094_102_464_274_1),
        (3.831_705_970_207_512, 0.0),
        (10.0, 0.043_472_746_168_861_44),
        (30.0, -0.118_751_062_616_623),
        (20.0, 0.066_833_124_175_850_05),
        (47.0, 0.091_268_764_240_007_89),
    ] {
        let got = bessel_j1(x);
        assert!((got - want).abs() < 1e-9, "J1({x}) = {got}, want {want}");
    }
}

#[test]
fn sinc_kernel_is_radial_low_pass() {
    let k = sinc(15, PI / 3.0);
    let at = |x: i32, y: i32| k.weights[((y + 7) * 15 + x + 7) as usize];
    assert!(
        (at(3, 4) - at(5, 0)).abs() < 1e-7,
        "radius 5 in two directions"
    );
    assert!((at(-3, 4) - at(4, 3)).abs() < 1e-7);
    assert!(at(0, 0) > at(1, 0) && at(1, 0) > at(2, 0));
    // The continuous kernel's first zero is at omega r = 3.8317: r = 3.66 for omega = pi/3.
    assert!(at(3, 0) > 0.0 && at(4, 0) < 0.0);
}

#[test]
fn reflect_indices() {
    assert_eq!(reflect(-1, 5), 1);
    assert_eq!(reflect(-2, 5), 2);
    assert_eq!(reflect(5, 5), 3);
    assert_eq!(reflect(6, 5), 2);
    assert_eq!(reflect(2, 5), 2);
    assert_eq!(reflect(-7, 3), 1);
    assert_eq!(reflect(4, 1), 0);
}

#[test]
fn filter2d_shifts_with_reflection() {
    let img = synthetic(9, 6, 1);
    // Weight 1 on the left neighbour: out(x, y) = in(reflect(x - 1), y).
    let mut w = vec![0.0f32; 9];
    w[3] = 1.0;
    let k = Kernel {
        size: 3,
        weights: w,
    };
    let out = filter2d(&img, &k);
    let n = 9 * 6;
    for c in 0..3 {
        for y in 0..6 {
            for x in 0..9 {
                let sx = reflect(x as isize - 1, 9);
                assert_eq!(out.data[c * n + y * 9 + x], img.data[c * n + y * 9 + sx]);
            }
        }
    }
    // A normalised kernel keeps a constant image constant.
    let mut flat = Planar::zeros(20, 13);
    flat.data.iter_mut().for_each(|v| *v = 0.37);
    let blurred = filter2d(
        &flat,
        &gaussian_family(KernelKind::Aniso, 21, 3.0, 1.0, 0.5, 1.0),
    );
    assert!(blurred.data.iter().all(|v| (v - 0.37).abs() < 1e-5));
}

#[test]
fn separable_filter_equals_direct() {
    use dpir_degrade::kernels::{filter2d_direct, separable_factors};
    let img = synthetic(40, 23, 3);
    let iso = gaussian_family(KernelKind::Iso, 21, 2.3, 2.3, 0.0, 1.0);
    assert!(separable_factors(&iso).is_some());
    let (a, b) = (filter2d(&img, &iso), filter2d_direct(&img, &iso));
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // Rotated anisotropic and generalized kernels are not separable.
    let rot = gaussian_family(KernelKind::Aniso, 13, 2.5, 0.7, 0.6, 1.0);
    assert!(separable_factors(&rot).is_none());
    let gen = gaussian_family(KernelKind::GeneralizedIso, 13, 1.5, 1.5, 0.0, 2.0);
    assert!(separable_factors(&gen).is_none());
}

#[test]
fn resize_semantics() {
    let img = synthetic(16, 12, 2);
    // Exact 2x down: area and bilinear both average 2x2 blocks.
    for mode in [ResizeMode::Area, ResizeMode::Bilinear] {
        let out = resize(&img, 8, 6, mode);
        assert_eq!((out.width, out.height), (8, 6));
        for c in 0..3 {
            for y in 0..6 {
                for x in 0..8 {
                    let p = img.plane(c);
                    let want = (p[2 * y * 16 + 2 * x]
                        + p[2 * y * 16 + 2 * x + 1]
                        + p[(2 * y + 1) * 16 + 2 * x]
                        + p[(2 * y + 1) * 16 + 2 * x + 1])
                        / 4.0;
                    let got = out.plane(c)[y * 8 + x];
                    assert!((got - want).abs() < 1e-6, "{mode:?}");
                }
            }
        }
    }
    // Bicubic (A = -0.75) on a ramp, 2x upscale: output x samples source (x + 0.5) / 2 - 0.5,
    // fractional part t = 1/4 or 3/4, where the four Keys weights give the offsets
    // 0.296875 and 0.703125 (hand-computed: sum_k k * w(t - k)); A = -0.5 would give t exactly.
    let mut ramp = Planar::zeros(10, 4);
    for c in 0..3 {
        for y in 0..4 {
            for x in 0..10 {
                ramp.plane_mut(c)[y * 10 + x] = 0.05 * x as f32;
            }
        }
    }
    let up = resize(&ramp, 20, 8, ResizeMode::Bicubic);
    for x in 4..16 {
        let src = (x as f32 + 0.5) / 2.0 - 0.5;
        let i0 = src.floor();
        let offset = if src - i0 < 0.5 { 0.296875 } else { 0.703125 };
        let want = 0.05 * (i0 + offset);
        let got = up.plane(1)[3 * 20 + x];
        assert!((got - want).abs() < 1e-5, "x {x}: {got} vs {want}");
    }
    // Same size is the identity; odd sizes come out exactly.
    assert_eq!(resize(&img, 16, 12, ResizeMode::Bicubic), img);
    let odd = resize(&img, 7, 5, ResizeMode::Bicubic);
    assert_eq!((odd.width, odd.height, odd.data.len()), (7, 5, 105));
}

#[test]
fn antialiased_downscale() {
    let flat = image::RgbImage::from_pixel(40, 30, image::Rgb([10, 128, 250]));
    let out = downscale_rgb8_antialiased(&flat, 20, 15);
    assert_eq!(out.dimensions(), (20, 15));
    assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    // A one-pixel checkerboard (Nyquist) averages to gray instead of aliasing.
    let checker = image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([if (x + y) % 2 == 0 { 0 } else { 255 }; 3])
    });
    let out = downscale_rgb8_antialiased(&checker, 20, 20);
    for p in out.pixels().skip(21).take(10) {
        assert!((i32::from(p[0]) - 128).abs() <= 2, "{p:?}");
    }
}

#[test]
fn poisson_sampler_moments() {
    let mut rng = Rng::new(11);
    for lambda in [0.5, 3.0, 9.9, 10.0, 40.0, 255.0] {
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| poisson(&mut rng, lambda)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(xs.iter().all(|x| *x >= 0.0 && x.fract() == 0.0));
        let se = (lambda / n as f64).sqrt();
        assert!(
            (mean - lambda).abs() < 5.0 * se,
            "lambda {lambda}: mean {mean}"
        );
        assert!(
            (var / lambda - 1.0).abs() < 0.05,
            "lambda {lambda}: var {var}"
        );
    }
    assert_eq!(poisson(&mut rng, 0.0), 0.0);
}

#[test]
fn gaussian_noise_level_and_gray() {
    let mut rng = Rng::new(3);
    let mut img = Planar::zeros(128, 128);
    img.data.iter_mut().for_each(|v| *v = 0.5);
    let sigma = 12.0;
    add_gaussian(&mut img, sigma, false, &mut rng);
    let n = img.data.len() as f64;
    let var = img
        .data
        .iter()
        .map(|v| (f64::from(*v) - 0.5).powi(2))
        .sum::<f64>()
        / n;
    let got = var.sqrt() * 255.0;
    assert!((got - sigma).abs() < 0.3, "std {got}");
    let mut gray = Planar::zeros(32, 32);
    gray.data.iter_mut().for_each(|v| *v = 0.5);
    add_gaussian(&mut gray, 20.0, true, &mut rng);
    assert_eq!(gray.plane(0), gray.plane(1));
    assert_eq!(gray.plane(1), gray.plane(2));
    assert!(gray.plane(0).iter().any(|v| (v - 0.5).abs() > 0.01));
}

#[test]
fn jpeg_error_grows_as_quality_drops() {
    let img = synthetic(64, 48, 5);
    let mse = |q: u8| {
        let out = jpeg::roundtrip(&img, q).expect("in-memory JPEG round trip");
        assert_eq!((out.width, out.height), (64, 48));
        img.data
            .iter()
            .zip(&out.data)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
    };
    let (m95, m60, m30) = (mse(95), mse(60), mse(30));
    assert!(m95 > 0.0 && m95 < m60 && m60 < m30, "{m95} {m60} {m30}");
}

fn check_stage_ranges(p: &NoiseParams, s: &StageConfig) {
    match *p {
        NoiseParams::Gaussian { sigma, .. } => {
            assert!(
                sigma >= s.noise_sigma.0 && sigma <= s.noise_sigma.1,
                "sigma {sigma}"
            )
        }
        NoiseParams::Poisson { scale, .. } => {
            assert!(
                scale >= s.poisson_scale.0 && scale <= s.poisson_scale.1,
                "poisson {scale}"
            )
        }
    }
}

fn check_kernel(k: &BlurKernel, s: &StageConfig, sizes: &[usize]) {
    assert!(sizes.contains(&k.size()));
    match *k {
        BlurKernel::Gaussian {
            kind,
            sigma_x,
            sigma_y,
            theta,
            beta,
            ..
        } => {
            for sg in [sigma_x, sigma_y] {
                assert!(sg >= s.blur_sigma.0 && sg <= s.blur_sigma.1, "sigma {sg}");
            }
            assert!((-PI..=PI).contains(&theta));
            match kind {
                KernelKind::Iso | KernelKind::Aniso => assert_eq!(beta, 1.0),
                KernelKind::GeneralizedIso | KernelKind::GeneralizedAniso => {
                    assert!(beta >= s.betag.0 && beta <= s.betag.1)
                }
                KernelKind::PlateauIso | KernelKind::PlateauAniso => {
                    assert!(beta >= s.betap.0 && beta <= s.betap.1)
                }
            }
            if kind.is_isotropic() {
                assert_eq!(sigma_x, sigma_y);
            }
        }
        BlurKernel::Sinc { omega, .. } => assert!((PI / 5.0..=PI).contains(&omega)),
    }
}

#[test]
fn sampled_parameters_within_ranges() {
    for (preset, n1, n2, q1, q2, r1) in [
        (
            Preset::Standard,
            30.0,
            25.0,
            (30, 95),
            (30, 95),
            (0.15, 1.5),
        ),
        (Preset::Light, 15.0, 12.0, (60, 95), (60, 100), (0.3, 1.5)),
    ] {
        let cfg = preset.config();
        assert_eq!(cfg.stage1.noise_sigma.1, n1);
        assert_eq!(cfg.stage2.noise_sigma.1, n2);
        assert_eq!(cfg.stage1.resize_range, r1);
        let mut rng = Rng::new(99);
        let (mut q1_seen, mut q2_seen) = (Vec::new(), Vec::new());
        let (mut gray, mut gauss, mut sincs, mut blur2) = (0, 0, 0, 0);
        let runs = 4000;
        for _ in 0..runs {
            let p = Params::sample(&cfg, &mut rng);
            check_kernel(&p.stage1.blur, &cfg.stage1, &cfg.kernel_sizes);
            if let Some(k) = &p.stage2.blur {
                check_kernel(k, &cfg.stage2, &cfg.kernel_sizes);
                blur2 += 1;
            }
            if let Some(k) = &p.last.sinc {
                assert!(matches!(k, BlurKernel::Sinc { omega, .. } if *omega >= PI / 3.0));
                sincs += 1;
            }
            check_stage_ranges(&p.stage1.noise, &cfg.stage1);
            check_stage_ranges(&p.stage2.noise, &cfg.stage2);
            if let NoiseParams::Gaussian { gray: g, .. } = p.stage1.noise {
                gauss += 1;
                gray += usize::from(g);
            }
            let s1 = p.stage1.resize.scale;
            assert!(s1 >= r1.0 && s1 <= r1.1);
            let s2 = p.stage2.resize.scale;
            let r2 = cfg.stage2.resize_range;
            assert!(s2 >= r2.0 && s2 <= r2.1);
            q1_seen.push(p.stage1.jpeg_quality);
            q2_seen.push(p.last.jpeg_quality);
        }
        for (seen, (lo, hi)) in [(&q1_seen, q1), (&q2_seen, q2)] {
            assert!(seen.iter().all(|q| (lo..=hi).contains(q)));
            assert!(
                seen.contains(&lo) && seen.contains(&hi),
                "quality ends {lo} {hi} reached"
            );
        }
        let frac = |k: usize, n: usize| k as f64 / n as f64;
        assert!((frac(gauss, runs) - 0.5).abs() < 0.04);
        assert!((frac(gray, gauss) - 0.4).abs() < 0.05);
        assert!((frac(sincs, runs) - 0.8).abs() < 0.04);
        assert!((frac(blur2, runs) - cfg.stage2.blur_prob).abs() < 0.04);
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different() {
    let hq = synthetic(96, 64, 4);
    let cfg = Preset::Standard.config();
    let run = |seed: u64| {
        let mut rng = Rng::for_stream(seed, 0);
        degrade(&hq, &cfg, 4, &mut rng)
            .expect("degrade")
            .0
            .to_rgb8()
    };
    let a = run(1);
    assert_eq!(a.as_raw(), run(1).as_raw());
    assert_ne!(a.as_raw(), run(2).as_raw());
    assert_eq!(a.dimensions(), (24, 16));
}

#[test]
fn output_sizes_are_exact() {
    let mut rng = Rng::new(5);
    for preset in [Preset::Standard, Preset::Light] {
        let cfg = preset.config();
        for (w, h) in [(64usize, 64usize), (99, 70), (40, 128)] {
            let hq = synthetic(w, h, 9);
            for scale in [1usize, 2, 4] {
                for _ in 0..3 {
                    let (lq, _) = degrade(&hq, &cfg, scale, &mut rng).expect("degrade");
                    assert_eq!((lq.width, lq.height), (w / scale, h / scale));
                    assert_eq!(lq.data.len(), 3 * (w / scale) * (h / scale));
                    // Rounded to 8 bits.
                    assert!(lq
                        .data
                        .iter()
                        .all(|v| ((v * 255.0) - (v * 255.0).round()).abs() < 1e-3));
                }
            }
        }
    }
}

#[test]
fn degraded_image_stays_close_to_the_source() {
    // A degradation must keep the content: the LQ correlates with the bicubic-downscaled HQ.
    let hq = synthetic(128, 128, 8);
    let reference = resize(&hq, 32, 32, ResizeMode::Area);
    let mut rng = Rng::new(21);
    for _ in 0..8 {
        let (lq, _) = degrade(&hq, &Preset::Light.config(), 4, &mut rng).expect("degrade");
        let mae = lq
            .data
            .iter()
            .zip(&reference.data)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / lq.data.len() as f64;
        assert!(mae < 0.15, "mean abs difference {mae}");
    }
}

#[test]
fn crop_pairs_have_exact_sizes() {
    let base = synthetic(300, 200, 6).to_rgb8();
    let opts = PairOptions {
        count: 1,
        crop: 128,
        downscale: 1.0,
        scale: 4,
        seed: 3,
        config: Preset::Standard.config(),
    };
    let mut rng = Rng::for_stream(3, 0);
    let (hq, lq) = degrade_crop(&base, &opts, &mut rng).expect("pair");
    assert_eq!(hq.dimensions(), (128, 128));
    assert_eq!(lq.dimensions(), (32, 32));
    let small = synthetic(100, 200, 6).to_rgb8();
    assert!(degrade_crop(&small, &opts, &mut rng).is_err());
}
