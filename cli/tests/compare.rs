//! `dpir compare` through the real binary: PSNR/SSIM on the Y channel against values worked
//! out here independently (closed forms, and a direct 2-D evaluation of one SSIM window).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{Rgb, RgbImage};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dpir"))
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("compare")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small deterministic generator (LCG), so the tests do not depend on the engine's RNG.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, lo: u8, hi: u8) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (lo as u64 + (self.0 >> 33) % (hi as u64 - lo as u64 + 1)) as u8
    }
}

fn save(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y)))
        .save(path)
        .unwrap();
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn first(v: &serde_json::Value) -> &serde_json::Value {
    &v["groups"][0]["images"][0]
}

#[test]
fn identical_images_give_infinite_psnr_and_ssim_one() {
    let d = scratch("identical");
    let mut rng = Lcg(1);
    let px: Vec<[u8; 3]> = (0..40 * 30)
        .map(|_| [rng.next(0, 255), rng.next(0, 255), rng.next(0, 255)])
        .collect();
    let a = d.join("a.png");
    save(&a, 40, 30, |x, y| px[(y * 40 + x) as usize]);
    let a = a.to_str().unwrap();
    let out = run(&["compare", a, a]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PSNR inf dB"), "{text}");
    assert!(text.contains("SSIM 1.0000"), "{text}");
    let v = json(&["compare", "--json", a, a]);
    assert!(first(&v)["psnr"].is_null());
    assert!((first(&v)["ssim"].as_f64().unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn constant_offset_gives_the_analytic_psnr() {
    // Every channel +d (no clipping) moves Y by d·219/255 exactly, everywhere.
    let d = scratch("offset");
    let mut rng = Lcg(2);
    let px: Vec<[u8; 3]> = (0..48 * 48)
        .map(|_| [rng.next(20, 200), rng.next(20, 200), rng.next(20, 200)])
        .collect();
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    let off = 10u8;
    save(&a, 48, 48, |x, y| px[(y * 48 + x) as usize]);
    save(&b, 48, 48, |x, y| {
        px[(y * 48 + x) as usize].map(|c| c + off)
    });
    let v = json(&[
        "compare",
        "--json",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    let dy = off as f64 * (65.481 + 128.553 + 24.966) / 255.0;
    let want = 20.0 * (255.0 / dy).log10();
    let got = first(&v)["psnr"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "psnr {got}, analytic {want}");
    // A different border crops a region with the same error: same PSNR.
    let v0 = json(&[
        "compare",
        "--json",
        "--border",
        "0",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!((first(&v0)["psnr"].as_f64().unwrap() - want).abs() < 1e-4);
}

#[test]
fn ssim_of_constant_images_is_the_luminance_term() {
    // Flat images: every window has σ = 0, so SSIM = (2·ya·yb + C1) / (ya² + yb² + C1).
    let d = scratch("flat");
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    let (ca, cb) = ([30u8, 60, 90], [200u8, 150, 100]);
    save(&a, 32, 32, |_, _| ca);
    save(&b, 32, 32, |_, _| cb);
    let y = |c: [u8; 3]| {
        16.0 + (65.481 * c[0] as f64 + 128.553 * c[1] as f64 + 24.966 * c[2] as f64) / 255.0
    };
    let (ya, yb) = (y(ca), y(cb));
    let c1 = (0.01f64 * 255.0).powi(2);
    let want = (2.0 * ya * yb + c1) / (ya * ya + yb * yb + c1);
    let v = json(&[
        "compare",
        "--json",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    let got = first(&v)["ssim"].as_f64().unwrap();
    // Pixels travel as f32 in [0, 1]: agreement to ~1e-8.
    assert!((got - want).abs() < 1e-6, "ssim {got}, closed form {want}");
}

#[test]
fn ssim_of_one_window_matches_a_direct_evaluation() {
    // 11×11 gray images with no border: exactly one Gaussian window, evaluated here directly
    // in 2-D (the binary filters separably).
    let d = scratch("window");
    let mut rng = Lcg(3);
    let ga: Vec<u8> = (0..121).map(|_| rng.next(0, 255)).collect();
    let gb: Vec<u8> = ga.iter().map(|&v| v / 2 + rng.next(0, 127)).collect();
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    save(&a, 11, 11, |x, y| [ga[(y * 11 + x) as usize]; 3]);
    save(&b, 11, 11, |x, y| [gb[(y * 11 + x) as usize]; 3]);
    let y = |v: u8| 16.0 + 219.0 * v as f64 / 255.0;
    let mut w = [[0f64; 11]; 11];
    let mut sum = 0.0;
    for (i, row) in w.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let (di, dj) = (i as f64 - 5.0, j as f64 - 5.0);
            *v = (-(di * di + dj * dj) / (2.0 * 1.5 * 1.5)).exp();
            sum += *v;
        }
    }
    let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..11 {
        for j in 0..11 {
            let k = w[i][j] / sum;
            let (va, vb) = (y(ga[i * 11 + j]), y(gb[i * 11 + j]));
            ma += k * va;
            mb += k * vb;
            saa += k * va * va;
            sbb += k * vb * vb;
            sab += k * va * vb;
        }
    }
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
    let want =
        ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
    let v = json(&[
        "compare",
        "--json",
        "--border",
        "0",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    let got = first(&v)["ssim"].as_f64().unwrap();
    assert!(
        want < 0.95,
        "the test case should not be near-identical: {want}"
    );
    assert!((got - want).abs() < 1e-6, "ssim {got}, direct {want}");
}

#[test]
fn size_mismatch_is_a_one_line_error() {
    let d = scratch("mismatch");
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    save(&a, 32, 32, |_, _| [10, 20, 30]);
    save(&b, 32, 24, |_, _| [10, 20, 30]);
    let out = run(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("b.png") && err.contains("32x24"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bicubic_mode_upscales_before_comparing() {
    // A flat 16×16 LQ upscaled ×4 stays flat: identical to the flat 64×64 reference, and a
    // ×2 upscale has the wrong size.
    let d = scratch("bicubic");
    let (hq, lq) = (d.join("hq"), d.join("lq"));
    std::fs::create_dir_all(&hq).unwrap();
    std::fs::create_dir_all(&lq).unwrap();
    save(&hq.join("0.png"), 64, 64, |_, _| [90, 120, 150]);
    save(&lq.join("0.png"), 16, 16, |_, _| [90, 120, 150]);
    let (h, l) = (hq.to_str().unwrap(), lq.to_str().unwrap());
    let v = json(&["compare", "--json", "--bicubic", "4", h, l]);
    assert!(first(&v)["psnr"].is_null(), "{v}");
    let out = run(&["compare", "--bicubic", "2", h, l]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32x32") && err.contains("64x64"), "{err}");
}
