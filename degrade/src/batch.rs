//! File-level work: degrade image files, and cut seeded HQ/LQ training pairs from photos.
//!
//! Pair `i` uses its own random stream `Rng::for_stream(seed, i)`: it picks the photo, the crop
//! position and then every degradation parameter, so the output of a pair depends only on the
//! seed, its index, the options and the sorted photo list, never on the thread count or on which
//! pairs already exist (runs are resumable).

use crate::error::{Error, Result};
use crate::pipeline::{degrade, Config};
use crate::planar::Planar;
use crate::resize::downscale_rgb8_antialiased;
use crate::rng::{fnv1a64, Rng};
use image::{ImageFormat, ImageReader, RgbImage};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Image file extensions picked up when a directory is given.
const EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp"];

/// Decode any supported image file to 8-bit RGB (alpha dropped).
pub fn read_rgb8(path: &Path) -> Result<RgbImage> {
    let img = ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .decode()
        .map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(img.to_rgb8())
}

fn read_dimensions(path: &Path) -> Result<(u32, u32)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    ImageReader::open(path)
        .map_err(io)?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .into_dimensions()
        .map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })
}

/// Write a PNG atomically: to a hidden temporary name in the same folder, then rename.
pub fn write_png_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.png".to_string());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    img.save_with_format(&tmp, ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: tmp.clone(),
            source,
        })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The random stream of one input file: `(seed, file name)`.
pub fn file_stream(seed: u64, path: &Path) -> Rng {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Rng::for_stream(seed, fnv1a64(name.as_bytes()))
}

/// Degrade one image file into `out_path` (PNG). Returns the LQ size.
pub fn degrade_file(
    input: &Path,
    out_path: &Path,
    cfg: &Config,
    scale: usize,
    seed: u64,
) -> Result<(usize, usize)> {
    let hq = Planar::from_rgb8(&read_rgb8(input)?);
    if hq.width < scale || hq.height < scale {
        return Err(Error::Invalid(format!(
            "{}: {}x{} is smaller than the scale factor {scale}",
            input.display(),
            hq.width,
            hq.height
        )));
    }
    let mut rng = file_stream(seed, input);
    let (lq, _) = degrade(&hq, cfg, scale, &mut rng)?;
    write_png_atomic(&lq.to_rgb8(), out_path)?;
    Ok((lq.width, lq.height))
}

/// Expand directories (non-recursively, image extensions only) and keep files as given;
/// sorted and deduplicated. Unreadable directories are returned as errors.
pub fn list_images(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<Error>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for input in inputs {
        if input.is_dir() {
            match std::fs::read_dir(input) {
                Ok(entries) => {
                    for entry in entries.flatten() {
                        let p = entry.path();
                        let ok = p.is_file()
                            && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                                EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                            });
                        if ok {
                            files.push(p);
                        }
                    }
                }
                Err(source) => errors.push(Error::Io {
                    path: input.clone(),
                    source,
                }),
            }
        } else {
            files.push(input.clone());
        }
    }
    files.sort();
    files.dedup();
    (files, errors)
}

/// Options of pair generation.
#[derive(Clone, Debug)]
pub struct PairOptions {
    pub count: usize,
    /// HQ crop side in pixels (a multiple of `scale`).
    pub crop: usize,
    /// Antialiased downscale of each photo before cropping (1 = none).
    pub downscale: f64,
    pub scale: usize,
    pub seed: u64,
    pub config: Config,
}

/// What a pair-generation run did.
#[derive(Debug, Default)]
pub struct PairSummary {
    pub written: usize,
    pub already_present: usize,
    /// Photos used (large enough after the downscale).
    pub photos_used: usize,
    /// Readable photos skipped as smaller than the crop after the downscale.
    pub photos_too_small: usize,
    /// One line per failure (unreadable photo, failed pair).
    pub failures: Vec<String>,
}

/// File name of pair `i` (same in `hq/` and `lq/`).
pub fn pair_name(i: usize) -> String {
    format!("{i:06}.png")
}

fn downscaled_dims(w: u32, h: u32, d: f64) -> (usize, usize) {
    if d <= 1.0 {
        return (w as usize, h as usize);
    }
    (
        (f64::from(w) / d).floor() as usize,
        (f64::from(h) / d).floor() as usize,
    )
}

struct Photo {
    path: PathBuf,
    /// Size after the downscale.
    dims: (usize, usize),
}

/// Generate `opts.count` pairs from `photos` into `out/hq` and `out/lq`, skipping pairs whose
/// two files exist. `progress(done, total)` is called every `every` finished pairs and at the
/// end.
pub fn generate_pairs(
    photos: &[PathBuf],
    out: &Path,
    opts: &PairOptions,
    every: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<PairSummary> {
    if opts.scale == 0 || opts.crop == 0 || !opts.crop.is_multiple_of(opts.scale) {
        return Err(Error::Invalid(format!(
            "--crop {} must be a positive multiple of --scale {}",
            opts.crop, opts.scale
        )));
    }
    if !(opts.downscale.is_finite() && opts.downscale >= 1.0) {
        return Err(Error::Invalid(format!(
            "--downscale {} must be a number >= 1",
            opts.downscale
        )));
    }
    let hq_dir = out.join("hq");
    let lq_dir = out.join("lq");
    for d in [&hq_dir, &lq_dir] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }

    let mut summary = PairSummary::default();
    let mut usable = Vec::new();
    for p in photos {
        match read_dimensions(p) {
            Ok((w, h)) => {
                let dims = downscaled_dims(w, h, opts.downscale);
                if dims.0 >= opts.crop && dims.1 >= opts.crop {
                    usable.push(Photo {
                        path: p.clone(),
                        dims,
                    });
                } else {
                    summary.photos_too_small += 1;
                }
            }
            Err(e) => summary.failures.push(e.to_string()),
        }
    }
    if usable.is_empty() {
        return Err(Error::Invalid(format!(
            "no readable photo is at least {0}x{0} after a {1}x downscale",
            opts.crop, opts.downscale
        )));
    }
    summary.photos_used = usable.len();

    // Assign every pending pair to its photo.
    let mut pending: Vec<Vec<usize>> = vec![Vec::new(); usable.len()];
    for i in 0..opts.count {
        let name = pair_name(i);
        if hq_dir.join(&name).is_file() && lq_dir.join(&name).is_file() {
            summary.already_present += 1;
            continue;
        }
        let mut rng = Rng::for_stream(opts.seed, i as u64);
        pending[rng.below(usable.len())].push(i);
    }

    let done = AtomicUsize::new(summary.already_present);
    let written = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let record = |msg: String| {
        if let Ok(mut f) = failures.lock() {
            f.push(msg);
        }
    };
    let every = every.max(1);
    let tick = || {
        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
        if d.is_multiple_of(every) {
            progress(d, opts.count);
        }
    };

    usable
        .par_iter()
        .zip(pending.par_iter())
        .filter(|(_, pairs)| !pairs.is_empty())
        .for_each(|(photo, pairs)| {
            let src = match read_rgb8(&photo.path) {
                Ok(img) => img,
                Err(e) => {
                    record(format!("{e} ({} pairs not written)", pairs.len()));
                    pairs.iter().for_each(|_| tick());
                    return;
                }
            };
            let (dw, dh) = downscaled_dims(src.width(), src.height(), opts.downscale);
            if (dw, dh) != photo.dims {
                record(format!(
                    "{}: decoded size differs from its header ({} pairs not written)",
                    photo.path.display(),
                    pairs.len()
                ));
                pairs.iter().for_each(|_| tick());
                return;
            }
            let base = downscale_rgb8_antialiased(&src, dw, dh);
            drop(src);
            pairs.par_iter().for_each(|&i| {
                match make_pair(&base, i, usable.len(), &hq_dir, &lq_dir, opts) {
                    Ok(()) => {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => record(format!("pair {i} from {}: {e}", photo.path.display())),
                }
                tick();
            });
        });
    progress(done.load(Ordering::Relaxed), opts.count);
    summary.written = written.into_inner();
    summary
        .failures
        .extend(failures.into_inner().unwrap_or_default());
    Ok(summary)
}

/// Cut, degrade and write pair `i` from the (downscaled) photo `base`.
fn make_pair(
    base: &RgbImage,
    i: usize,
    n_photos: usize,
    hq_dir: &Path,
    lq_dir: &Path,
    opts: &PairOptions,
) -> Result<()> {
    let mut rng = Rng::for_stream(opts.seed, i as u64);
    let _photo = rng.below(n_photos);
    let (hq, lq) = degrade_crop(base, opts, &mut rng)?;
    let name = pair_name(i);
    write_png_atomic(&hq, &hq_dir.join(&name))?;
    write_png_atomic(&lq, &lq_dir.join(&name))
}

/// Draw a crop position from `rng`, cut the HQ crop and degrade it with the same stream.
pub fn degrade_crop(
    base: &RgbImage,
    opts: &PairOptions,
    rng: &mut Rng,
) -> Result<(RgbImage, RgbImage)> {
    let (w, h) = (base.width() as usize, base.height() as usize);
    if w < opts.crop || h < opts.crop {
        return Err(Error::Invalid(format!(
            "image {w}x{h} is smaller than the crop {0}x{0}",
            opts.crop
        )));
    }
    let x = rng.below(w - opts.crop + 1) as u32;
    let y = rng.below(h - opts.crop + 1) as u32;
    let c = opts.crop as u32;
    let hq = image::imageops::crop_imm(base, x, y, c, c).to_image();
    let (lq, _) = degrade(&Planar::from_rgb8(&hq), &opts.config, opts.scale, rng)?;
    Ok((hq, lq.to_rgb8()))
}

/// Degrade each input file into `out/<stem>.png`, in parallel over files. Returns, per input in
/// order, the output path and the LQ size or the error.
pub fn degrade_files(
    inputs: &[PathBuf],
    out: &Path,
    cfg: &Config,
    scale: usize,
    seed: u64,
) -> Vec<(PathBuf, Result<(usize, usize)>)> {
    inputs
        .par_iter()
        .map(|input| {
            let stem = input
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".to_string());
            let out_path = out.join(format!("{stem}.png"));
            let r = degrade_file(input, &out_path, cfg, scale, seed);
            (out_path, r)
        })
        .collect()
}
