//! `dpir compare`: PSNR and SSIM of images against a reference, on the Y channel.
//!
//! The measure is the one of the super-resolution literature (BasicSR's `calculate_psnr` /
//! `calculate_ssim` with `test_y_channel`): RGB in [0, 1] → BT.601 luma on the 0–255 scale,
//! `Y = 16 + 65.481 R + 128.553 G + 24.966 B` (not rounded); `--border` pixels cut from every
//! side; PSNR with peak 255; SSIM with an 11×11 Gaussian window (σ 1.5), K1 0.01, K2 0.03,
//! L 255, over the windows that fit inside the image ("valid"), averaged.
//!
//! `dpir compare REF IMAGE...` compares each IMAGE with REF. When REF is a folder, every IMAGE
//! must be a folder too, and each of REF's images is compared with the image of the same file
//! stem in every IMAGE folder (one mean line per folder). `--bicubic N` treats the IMAGEs as
//! low-resolution inputs and upscales them ×N with the engine's bicubic resize (the one
//! `dpir restore` starts from, output rounded to 8 bits as a saved file would be) before
//! comparing: the bicubic baseline.

use crate::CliResult;
use dpir_engine::image_io::{self, DEFAULT_MAX_PIXELS};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The reference (ground-truth) image, or a folder of them.
    #[arg(value_name = "REFERENCE")]
    reference: PathBuf,
    /// Images to compare with the reference (folders when REFERENCE is a folder).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Pixels cut from every side before measuring.
    #[arg(long, default_value_t = 4)]
    border: usize,
    /// Bicubic-upscale each IMAGE by this factor before comparing (the bicubic baseline).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    bicubic: Option<u32>,
    /// Print one JSON object instead of text lines (PSNR `null` means identical: infinite).
    #[arg(long)]
    json: bool,
}

/// Gaussian window side and σ of the standard SSIM.
const WIN: usize = 11;
const SIGMA: f64 = 1.5;
const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);

/// A luma plane on the 0–255 scale.
pub struct Luma {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f64>,
}

/// BT.601 luma (0–255 scale) of a planar `[3, H, W]` image in [0, 1].
pub fn luma(img: &image_io::Image) -> Luma {
    let n = img.width * img.height;
    let d = &img.rgb.data;
    let data = (0..n)
        .map(|i| {
            let (r, g, b) = (d[i] as f64, d[n + i] as f64, d[2 * n + i] as f64);
            16.0 + 65.481 * r + 128.553 * g + 24.966 * b
        })
        .collect();
    Luma {
        width: img.width,
        height: img.height,
        data,
    }
}

/// The plane without `border` pixels on every side.
fn crop_border(p: &Luma, border: usize) -> Option<Luma> {
    let (w, h) = (
        p.width.checked_sub(2 * border)?,
        p.height.checked_sub(2 * border)?,
    );
    if w == 0 || h == 0 {
        return None;
    }
    let mut data = Vec::with_capacity(w * h);
    for y in 0..h {
        data.extend_from_slice(&p.data[(y + border) * p.width + border..][..w]);
    }
    Some(Luma {
        width: w,
        height: h,
        data,
    })
}

/// PSNR in dB with peak 255; infinite for identical planes.
pub fn psnr(a: &Luma, b: &Luma) -> f64 {
    let mse = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        / a.data.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

/// The normalised 1-D Gaussian whose outer product is the SSIM window.
fn gaussian_1d() -> [f64; WIN] {
    let mut g = [0.0; WIN];
    let c = (WIN / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - c;
        *v = (-x * x / (2.0 * SIGMA * SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    g
}

/// Separable "valid" Gaussian filtering: `[h - 10, w - 10]`.
fn filter_valid(data: &[f64], w: usize, h: usize, g: &[f64; WIN]) -> Vec<f64> {
    let (ow, oh) = (w + 1 - WIN, h + 1 - WIN);
    let mut tmp = vec![0.0; h * ow];
    for y in 0..h {
        let row = &data[y * w..][..w];
        for x in 0..ow {
            tmp[y * ow + x] = g.iter().zip(&row[x..]).map(|(k, v)| k * v).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for (k, gv) in g.iter().enumerate() {
            let src = &tmp[(y + k) * ow..][..ow];
            for (o, s) in out[y * ow..][..ow].iter_mut().zip(src) {
                *o += gv * s;
            }
        }
    }
    out
}

/// Mean SSIM over the valid 11×11 Gaussian windows; `None` if the plane is smaller than one.
pub fn ssim(a: &Luma, b: &Luma) -> Option<f64> {
    let (w, h) = (a.width, a.height);
    if w < WIN || h < WIN {
        return None;
    }
    let g = gaussian_1d();
    let prod = |f: fn(f64, f64) -> f64| -> Vec<f64> {
        a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect()
    };
    let mu_a = filter_valid(&a.data, w, h, &g);
    let mu_b = filter_valid(&b.data, w, h, &g);
    let aa = filter_valid(&prod(|x, _| x * x), w, h, &g);
    let bb = filter_valid(&prod(|_, y| y * y), w, h, &g);
    let ab = filter_valid(&prod(|x, y| x * y), w, h, &g);
    let n = mu_a.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let va = aa[i] - ma * ma;
            let vb = bb[i] - mb * mb;
            let cov = ab[i] - ma * mb;
            ((2.0 * ma * mb + C1) * (2.0 * cov + C2)) / ((ma * ma + mb * mb + C1) * (va + vb + C2))
        })
        .sum();
    Some(total / n as f64)
}

/// One measured image.
struct Score {
    image: PathBuf,
    reference: PathBuf,
    psnr: f64,
    ssim: f64,
}

fn load(path: &Path, bicubic: Option<u32>) -> Result<image_io::Image, String> {
    let mut img = image_io::decode(path, DEFAULT_MAX_PIXELS).map_err(|e| e.to_string())?;
    if let Some(s) = bicubic.filter(|s| *s > 1) {
        let (h, w) = (img.height * s as usize, img.width * s as usize);
        let mut up = image_io::resize_bicubic(&img.rgb, h, w);
        // Round to 8 bits, as the saved upscale would be.
        up.data
            .iter_mut()
            .for_each(|v| *v = (v.clamp(0.0, 1.0) * 255.0).round() / 255.0);
        img.rgb = up;
        img.height = h;
        img.width = w;
    }
    Ok(img)
}

fn measure(reference: &Path, ref_luma: &Luma, image: &Path, args: &Args) -> Result<Score, String> {
    let img = load(image, args.bicubic)?;
    if img.width != ref_luma.width || img.height != ref_luma.height {
        let up = match args.bicubic {
            Some(s) if s > 1 => format!(" after ×{s} bicubic"),
            _ => String::new(),
        };
        return Err(format!(
            "{}: size {}x{}{up} differs from the reference {} ({}x{})",
            image.display(),
            img.width,
            img.height,
            reference.display(),
            ref_luma.width,
            ref_luma.height
        ));
    }
    let too_small = || {
        format!(
            "{}: {}x{} is too small for a {}-px border and an {WIN}x{WIN} SSIM window",
            image.display(),
            img.width,
            img.height,
            args.border
        )
    };
    let a = crop_border(ref_luma, args.border).ok_or_else(too_small)?;
    let b = crop_border(&luma(&img), args.border).ok_or_else(too_small)?;
    let ssim = ssim(&a, &b).ok_or_else(too_small)?;
    Ok(Score {
        image: image.to_path_buf(),
        reference: reference.to_path_buf(),
        psnr: psnr(&a, &b),
        ssim,
    })
}

/// The images in a folder (not recursive), sorted by name.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && image_io::is_supported_extension(p))
        .collect();
    files.sort();
    Ok(files)
}

fn fmt_psnr(p: f64) -> String {
    if p.is_finite() {
        format!("{p:.3}")
    } else {
        "inf".into()
    }
}

fn json_psnr(p: f64) -> serde_json::Value {
    if p.is_finite() {
        serde_json::json!(p)
    } else {
        serde_json::Value::Null
    }
}

pub fn run(args: Args) -> CliResult {
    // (reference, image) pairs, grouped by IMAGE argument.
    let mut groups: Vec<(PathBuf, Vec<(PathBuf, PathBuf)>)> = Vec::new();
    if args.reference.is_dir() {
        let refs = list_dir(&args.reference)?;
        if refs.is_empty() {
            return Err(format!(
                "{}: no images in the reference folder",
                args.reference.display()
            )
            .into());
        }
        for dir in &args.images {
            if !dir.is_dir() {
                return Err(format!(
                    "{}: not a folder (REFERENCE {} is a folder)",
                    dir.display(),
                    args.reference.display()
                )
                .into());
            }
            let candidates = list_dir(dir)?;
            let mut pairs = Vec::new();
            for r in &refs {
                let stem = r.file_stem();
                let found = candidates.iter().find(|c| c.file_stem() == stem);
                match found {
                    Some(c) => pairs.push((r.clone(), c.clone())),
                    None => {
                        return Err(format!(
                            "{}: no image named like {} in this folder",
                            dir.display(),
                            r.display()
                        )
                        .into())
                    }
                }
            }
            groups.push((dir.clone(), pairs));
        }
    } else {
        let pairs = args
            .images
            .iter()
            .map(|i| (args.reference.clone(), i.clone()))
            .collect();
        groups.push((args.reference.clone(), pairs));
    }

    let mut json_groups = Vec::new();
    let mut cached: Option<(PathBuf, Luma)> = None;
    for (group, pairs) in &groups {
        let mut scores = Vec::new();
        for (r, i) in pairs {
            if cached.as_ref().map(|(p, _)| p != r).unwrap_or(true) {
                let img = load(r, None)?;
                cached = Some((r.clone(), luma(&img)));
            }
            let Some((_, ref_luma)) = cached.as_ref() else {
                return Err("internal: reference not loaded".into());
            };
            let s = measure(r, ref_luma, i, &args)?;
            if !args.json {
                println!(
                    "{}  PSNR {} dB  SSIM {:.4}",
                    s.image.display(),
                    fmt_psnr(s.psnr),
                    s.ssim
                );
            }
            scores.push(s);
        }
        let n = scores.len() as f64;
        let mean_psnr = scores.iter().map(|s| s.psnr).sum::<f64>() / n;
        let mean_ssim = scores.iter().map(|s| s.ssim).sum::<f64>() / n;
        if args.json {
            let images: Vec<serde_json::Value> = scores
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "image": s.image.display().to_string(),
                        "reference": s.reference.display().to_string(),
                        "psnr": json_psnr(s.psnr),
                        "ssim": s.ssim,
                    })
                })
                .collect();
            json_groups.push(serde_json::json!({
                "source": group.display().to_string(),
                "images": images,
                "mean_psnr": json_psnr(mean_psnr),
                "mean_ssim": mean_ssim,
            }));
        } else if scores.len() > 1 {
            println!(
                "mean of {} images in {}  PSNR {} dB  SSIM {:.4}",
                scores.len(),
                group.display(),
                fmt_psnr(mean_psnr),
                mean_ssim
            );
        }
    }
    if args.json {
        let out = serde_json::json!({
            "reference": args.reference.display().to_string(),
            "border": args.border,
            "bicubic": args.bicubic,
            "channel": "Y (BT.601, 0-255)",
            "groups": json_groups,
        });
        println!("{out}");
    }
    Ok(())
}
