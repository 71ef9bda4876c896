//! `dpir restore INPUT... -o OUTDIR`: restore low-quality images with DPIR.
//!
//! Inputs are files or directories (searched recursively); the sorted list can be split
//! with `--shard i/n`. Each output is written to a temporary file and renamed into place,
//! existing outputs are skipped unless `--overwrite`, and one bad file does not stop the
//! batch: it is reported on one line and counted, and the exit code is non-zero if any
//! image failed. The model is loaded when the first image needs it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use dpir_engine::cuda::{self, CudaDevice, CudaRestorer};
use dpir_engine::image_io::{self, Image, DEFAULT_MAX_PIXELS};
use dpir_engine::pipeline::cpu::{CpuParts, CpuRestorer};
use dpir_engine::pipeline::{self, ColorFix, RestoreParams, Restorer};
use dpir_engine::{Error, Tensor};

use crate::CliResult;

/// Model folder looked for next to the executable when neither `--model` nor `DPIR_MODEL` is given.
const BUNDLED_MODEL: &str = "models/dpir-tiny";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorFixArg {
    Wavelet,
    Adain,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    Png,
    Jpg,
    Webp,
    Tif,
    Bmp,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input images or directories (searched recursively for png, jpg, webp, tif, bmp).
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output directory (created if missing).
    #[arg(short = 'o', long = "output", value_name = "OUTDIR")]
    output: PathBuf,
    /// Model: a directory or safetensors files (repeatable). Default: `DPIR_MODEL`, else
    /// the bundled `models/dpir-tiny` next to the executable.
    #[arg(long, value_name = "PATH")]
    model: Vec<PathBuf>,
    /// Upscaling factor: 1, 2 or 4.
    #[arg(long, default_value = "4", value_parser = parse_scale)]
    scale: usize,
    /// Sampling steps (1 to 1000).
    #[arg(long, default_value = "20", value_parser = parse_steps)]
    steps: usize,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value = "4.0", value_parser = parse_cfg)]
    cfg: f32,
    /// Start noise level in (0, 1]: 1 starts from pure noise, lower keeps more of the input.
    /// Default measured best for the bundled model (docs/RESULTS.md).
    #[arg(long, default_value = "0.2", value_parser = parse_strength)]
    strength: f32,
    /// Noise seed.
    #[arg(long, default_value = "0")]
    seed: u64,
    /// Colour correction against the upscaled input.
    #[arg(long, value_enum, default_value = "wavelet")]
    color_fix: ColorFixArg,
    /// Diffusion tile side in output pixels (multiple of 16); default: the largest the model takes.
    #[arg(long, value_parser = parse_tile)]
    tile: Option<usize>,
    /// VAE tile side in output pixels (multiple of 16); default 512.
    #[arg(long, value_parser = parse_tile)]
    vae_tile: Option<usize>,
    /// Compute device: `auto` takes the GPU when a CUDA driver and cuBLASLt are present.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Compute precision: the CPU backend computes in f32, the CUDA backend in bf16
    /// (f32 accumulation); `auto` picks the device's.
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DTypeArg,
    /// Process only shard i of n (1-based) of the sorted input list: items k with k mod n = i − 1.
    #[arg(long, value_parser = parse_shard, value_name = "I/N")]
    shard: Option<(usize, usize)>,
    /// Replace existing outputs instead of skipping them.
    #[arg(long)]
    overwrite: bool,
    /// Refuse inputs with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS, value_parser = parse_max_pixels)]
    max_pixels: u64,
    /// Precomputed T5 tokens (safetensors: one tensor `[L, ctx]` or `[1, L, ctx]`).
    #[arg(long, value_name = "FILE")]
    text_embeddings: Option<PathBuf>,
    /// Output format; default: the input's.
    #[arg(long, value_enum)]
    format: Option<OutFormat>,
    /// Print the memory plan and per-image details.
    #[arg(short = 'v', long)]
    verbose: bool,
}

fn parse_scale(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v @ (1 | 2 | 4)) => Ok(v),
        _ => Err("must be 1, 2 or 4".into()),
    }
}

fn parse_steps(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if (1..=1000).contains(&v) => Ok(v),
        _ => Err("must be an integer from 1 to 1000".into()),
    }
}

fn parse_cfg(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 to 100".into()),
    }
}

fn parse_strength(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err("must be a number in (0, 1]".into()),
    }
}

fn parse_tile(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if v >= 32 && v % 16 == 0 => Ok(v),
        _ => Err("must be a multiple of 16, at least 32".into()),
    }
}

fn parse_max_pixels(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if v >= 64 => Ok(v),
        _ => Err("must be an integer, at least 64".into()),
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || "must be I/N with 1 <= I <= N".to_string();
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.trim().parse::<usize>().map_err(|_| bad())?,
        n.trim().parse::<usize>().map_err(|_| bad())?,
    );
    if i == 0 || n == 0 || i > n {
        return Err(bad());
    }
    Ok((i, n))
}

/// One unit of work: an input and where its output goes, or why it cannot be processed.
struct Item {
    input: PathBuf,
    output: Result<PathBuf, String>,
}

fn out_extension(input: &Path, format: Option<OutFormat>) -> String {
    match format {
        Some(OutFormat::Png) => "png".into(),
        Some(OutFormat::Jpg) => "jpg".into(),
        Some(OutFormat::Webp) => "webp".into(),
        Some(OutFormat::Tif) => "tif".into(),
        Some(OutFormat::Bmp) => "bmp".into(),
        // The input's extension when we can write it, else PNG.
        None => match input.extension() {
            Some(e) if image_io::is_supported_extension(input) => e.to_string_lossy().into_owned(),
            _ => "png".into(),
        },
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        paths.push(e.path());
    }
    paths.sort();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if image_io::is_supported_extension(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Inputs (files, directories) → sorted work items with their output paths.
fn collect(args: &Args) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for input in &args.inputs {
        if input.is_dir() {
            let mut files = Vec::new();
            walk(input, &mut files)?;
            for f in files {
                let rel = f.strip_prefix(input).unwrap_or(&f).to_path_buf();
                let out = args
                    .output
                    .join(rel)
                    .with_extension(out_extension(&f, args.format));
                items.push(Item {
                    input: f,
                    output: Ok(out),
                });
            }
        } else {
            let output = match (input.file_name(), std::fs::metadata(input)) {
                (_, Err(e)) => Err(format!("{}: {e}", input.display())),
                (None, _) => Err(format!("{}: not a file", input.display())),
                (Some(name), Ok(_)) => Ok(args
                    .output
                    .join(name)
                    .with_extension(out_extension(input, args.format))),
            };
            items.push(Item {
                input: input.clone(),
                output,
            });
        }
    }
    items.sort_by(|a, b| a.input.cmp(&b.input));
    items.dedup_by(|a, b| a.input == b.input);
    // Two inputs must not write the same output (`a/x.png` and `b/x.png` into one folder).
    let mut claimed: std::collections::HashMap<PathBuf, PathBuf> = std::collections::HashMap::new();
    for it in items.iter_mut() {
        if let Ok(out) = &it.output {
            if let Some(first) = claimed.get(out) {
                it.output = Err(format!(
                    "output {} is also the output of {}",
                    out.display(),
                    first.display()
                ));
            } else {
                claimed.insert(out.clone(), it.input.clone());
            }
        }
    }
    if let Some((i, n)) = args.shard {
        items = items
            .into_iter()
            .enumerate()
            .filter(|(k, _)| k % n == i - 1)
            .map(|(_, it)| it)
            .collect();
    }
    Ok(items)
}

/// The model paths: `--model`, else `DPIR_MODEL`, else `models/dpir-tiny` in a folder
/// above the executable (never the working directory).
/// `--model` paths, else `DPIR_MODEL`, else the bundled model next to the executable.
pub(crate) fn model_paths(explicit: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let paths = if !explicit.is_empty() {
        explicit.to_vec()
    } else if let Some(env) = std::env::var_os("DPIR_MODEL").filter(|v| !v.is_empty()) {
        vec![PathBuf::from(env)]
    } else {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot locate the dpir executable: {e}"))?;
        let found = exe
            .ancestors()
            .skip(1)
            .map(|d| d.join(BUNDLED_MODEL))
            .find(|p| p.is_dir());
        match found {
            Some(p) => vec![p],
            None => {
                return Err(format!(
                    "no model found: pass --model PATH or set DPIR_MODEL ({BUNDLED_MODEL} is not next to the dpir executable)"
                ))
            }
        }
    };
    for p in &paths {
        if !p.exists() {
            return Err(format!("{}: model not found", p.display()));
        }
    }
    Ok(paths)
}

/// T5 tokens from a safetensors file: the tensor `t5` or the file's only tensor.
fn load_text_embeddings(path: &Path) -> Result<Tensor, String> {
    let file = dpir_loader::SafetensorsFile::open(path).map_err(|e| e.to_string())?;
    let info = match file.tensors.iter().find(|t| t.name == "t5") {
        Some(t) => t,
        None if file.tensors.len() == 1 => &file.tensors[0],
        None => {
            return Err(format!(
                "{}: expected one tensor (or one named `t5`), found {}",
                path.display(),
                file.tensors.len()
            ))
        }
    };
    let shape = match info.shape[..] {
        [l, c] | [1, l, c] => vec![l, c],
        _ => {
            return Err(format!(
                "{}: tensor `{}` has shape {:?}, expected [L, ctx] or [1, L, ctx]",
                path.display(),
                info.name,
                info.shape
            ))
        }
    };
    let mut data = Vec::new();
    if !info.dtype.decode_into(file.data(info), &mut data) {
        return Err(format!(
            "{}: tensor `{}`: unsupported dtype {}",
            path.display(),
            info.dtype.as_str(),
            info.name
        ));
    }
    Tensor::new(&shape, data).map_err(|e| format!("{}: {e}", path.display()))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Where the model runs.
pub(crate) enum Backend {
    Cpu(Box<CpuRestorer>),
    Cuda(Box<CudaRestorer>),
}

impl Backend {
    pub(crate) fn restorer(&mut self) -> &mut dyn Restorer {
        match self {
            Backend::Cpu(m) => m.as_mut(),
            Backend::Cuda(m) => m.as_mut(),
        }
    }
    fn parts(&self) -> &CpuParts {
        match self {
            Backend::Cpu(m) => &m.parts,
            Backend::Cuda(m) => &m.parts,
        }
    }
}

/// The device a run will use, decided before any image is read.
pub(crate) enum Target {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

/// `--device` and `--dtype` → the target, or a one-line reason why not.
pub(crate) fn choose_target(device: Device, dtype: DTypeArg) -> Result<Target, String> {
    let open_cuda = || -> Result<Arc<CudaDevice>, String> {
        if !cuda::driver_present() {
            return Err(Error::NoCuda.to_string());
        }
        if !cuda::cublaslt_present() {
            return Err("CUDA driver found but not cuBLASLt (libcublasLt): add its folder to LD_LIBRARY_PATH".into());
        }
        CudaDevice::new(0).map(Arc::new).map_err(|e| e.to_string())
    };
    let target = match device {
        Device::Cpu => Target::Cpu,
        Device::Cuda => Target::Cuda(open_cuda().map_err(|e| format!("--device cuda: {e}"))?),
        Device::Auto => match dtype {
            // f32 is the CPU's precision: `--dtype f32` alone means the CPU.
            DTypeArg::F32 => Target::Cpu,
            _ => match open_cuda() {
                Ok(d) => Target::Cuda(d),
                Err(e) if dtype == DTypeArg::Auto => {
                    // No driver is the quiet, common case; a driver that fails is worth a line.
                    if cuda::driver_present() {
                        eprintln!("note: not using the GPU ({e}); running on the CPU");
                    }
                    Target::Cpu
                }
                Err(e) => {
                    return Err(format!(
                        "--dtype {}: needs the CUDA backend: {e}",
                        dtype_name(dtype)
                    ))
                }
            },
        },
    };
    match (&target, dtype) {
        (Target::Cpu, DTypeArg::F16 | DTypeArg::Bf16) => Err(format!(
            "--dtype {}: the CPU backend computes in f32 only (use --dtype f32 or auto)",
            dtype_name(dtype)
        )),
        (Target::Cuda(_), DTypeArg::F32 | DTypeArg::F16) => Err(format!(
            "--dtype {}: the CUDA backend computes in bf16 (use --dtype bf16 or auto)",
            dtype_name(dtype)
        )),
        _ => Ok(target),
    }
}

fn dtype_name(d: DTypeArg) -> &'static str {
    match d {
        DTypeArg::Auto => "auto",
        DTypeArg::F32 => "f32",
        DTypeArg::F16 => "f16",
        DTypeArg::Bf16 => "bf16",
    }
}

/// Loads the model onto the target; prints the device line.
pub(crate) fn load_backend(target: Target, model_paths: &[PathBuf]) -> Result<Backend, String> {
    let loaded = dpir_loader::load(model_paths).map_err(|e| e.to_string())?;
    let in_model = |e: Error| format!("{}: {e}", model_paths[0].display());
    Ok(match target {
        Target::Cuda(dev) => {
            println!("device: {} (CUDA, bf16)", dev.name);
            Backend::Cuda(Box::new(
                CudaRestorer::from_model(dev, &loaded).map_err(in_model)?,
            ))
        }
        Target::Cpu => {
            println!("device: CPU (f32)");
            Backend::Cpu(Box::new(CpuRestorer::from_model(loaded).map_err(in_model)?))
        }
    })
}

/// Whether an error is the GPU running out of memory (worth a retry with smaller tiles).
fn is_oom(e: &Error) -> bool {
    matches!(e, Error::OutOfMemory(_)) || matches!(e, Error::Cuda(m) if m.contains("OUT_OF_MEMORY"))
}

/// Smallest diffusion tile (output pixels) an out-of-memory retry goes down to.
const MIN_RETRY_TILE: usize = 128;

/// [`pipeline::restore`], retrying with half the tile side while the GPU runs out of memory.
fn restore_with_retry(
    model: &mut dyn Restorer,
    lq: &Tensor,
    params: &RestoreParams,
    t5: Option<&Tensor>,
    tag: &str,
) -> Result<Tensor, String> {
    let mut p = params.clone();
    let mut line = ProgressLine::new(tag);
    loop {
        let run = pipeline::restore_with_progress(model, lq, &p, t5, &mut |pr| line.show(pr));
        line.clear();
        match run {
            Ok(t) => return Ok(t),
            Err(e) if is_oom(&e) => {
                // The largest tile that actually ran (a small image's one tile may be
                // smaller than the tile setting).
                let plan = pipeline::plan(&model.dims(), lq.shape[1], lq.shape[2], &p)
                    .map_err(|e| e.to_string())?;
                let largest = plan.tiles.iter().map(|t| t.h.max(t.w)).max().unwrap_or(0);
                let current = largest * pipeline::VAE_FACTOR;
                let next = (current / 2) / 16 * 16;
                if next < MIN_RETRY_TILE {
                    return Err(format!("{e} (even with {current}-pixel tiles)"));
                }
                println!(
                    "{tag} out of GPU memory with {current}-pixel tiles; retrying with {next}"
                );
                p.tile = Some(next);
                p.vae_tile = Some(p.vae_tile.unwrap_or(pipeline::DEFAULT_VAE_TILE).min(next));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A one-line progress display on stderr (only when stderr is a terminal, and only after
/// the first second, so quick runs and logs stay clean).
struct ProgressLine {
    tag: String,
    start: Instant,
    on: bool,
    drawn: bool,
}

impl ProgressLine {
    fn new(tag: &str) -> Self {
        use std::io::IsTerminal;
        Self {
            tag: tag.to_string(),
            start: Instant::now(),
            on: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn show(&mut self, p: pipeline::Progress) {
        if !self.on || self.start.elapsed().as_secs_f64() < 1.0 {
            return;
        }
        eprint!(
            "\r\x1b[2K{} {} {}/{} ({:.0} s)",
            self.tag,
            p.stage.name(),
            p.done,
            p.total,
            self.start.elapsed().as_secs_f64()
        );
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

/// Restore one decoded image and write it to `output` (via a temporary file).
fn restore_one(
    model: &mut dyn Restorer,
    img: Image,
    params: &RestoreParams,
    t5: Option<&Tensor>,
    output: &Path,
    format: image::ImageFormat,
    tag: &str,
) -> Result<(usize, usize), String> {
    let rgb = restore_with_retry(model, &img.rgb, params, t5, tag)?;
    let (h, w) = (rgb.shape[1], rgb.shape[2]);
    let alpha = img.alpha.as_ref().map(|a| {
        let mut a = image_io::resize_bicubic(a, h, w);
        a.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        a
    });
    let out = Image {
        width: w,
        height: h,
        rgb,
        alpha,
        gray: img.gray,
        high_depth: img.high_depth,
    };
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = image_io::temp_path_for(output);
    let written = image_io::encode(&tmp, &out, format)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            std::fs::rename(&tmp, output).map_err(|e| format!("{}: {e}", output.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((w, h))
}

/// The folders `create` made for a path (deepest last); on drop, each one still empty is
/// removed again, deepest first.
struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    fn create(dir: &Path) -> Result<Self, String> {
        let made: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(made))
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        // `made` runs from the deepest folder up; remove_dir leaves non-empty ones alone.
        for d in &self.0 {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (
        std::fs::canonicalize(a),
        b.parent().map(std::fs::canonicalize),
        b.file_name(),
    ) {
        (Ok(ca), Some(Ok(pb)), Some(name)) => ca == pb.join(name),
        _ => false,
    }
}

pub fn run(args: Args) -> CliResult {
    let mut target = Some(choose_target(args.device, args.dtype)?);
    if args.output.exists() && !args.output.is_dir() {
        return Err(format!(
            "{}: output path exists and is not a directory",
            args.output.display()
        )
        .into());
    }
    let model_paths = model_paths(&args.model)?;
    let t5 = match &args.text_embeddings {
        Some(p) => Some(load_text_embeddings(p)?),
        None => None,
    };
    let items = collect(&args)?;
    if items.is_empty() {
        return Err("no input images found".into());
    }
    // Made up front, so that an unwritable output fails before any image is restored; the
    // folders made here are removed again on exit if nothing was written into them, so a run
    // in which every image fails (or the model does not load) leaves nothing behind.
    let _output_dir = MadeDirs::create(&args.output)?;

    let params = RestoreParams {
        scale: args.scale,
        steps: args.steps,
        cfg: args.cfg,
        strength: args.strength,
        seed: args.seed,
        color_fix: match args.color_fix {
            ColorFixArg::Wavelet => ColorFix::Wavelet,
            ColorFixArg::Adain => ColorFix::Adain,
            ColorFixArg::None => ColorFix::None,
        },
        tile: args.tile,
        vae_tile: args.vae_tile,
        ..RestoreParams::default()
    };

    let total = items.len();
    let (mut done, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    let mut model: Option<Backend> = None;
    let started = Instant::now();
    for (k, item) in items.iter().enumerate() {
        let tag = format!("[{}/{total}]", k + 1);
        let input = &item.input;
        let fail = |msg: String| {
            let shown = input.display().to_string();
            if msg.starts_with(&shown) {
                eprintln!("error: {msg}");
            } else {
                eprintln!("error: {shown}: {msg}");
            }
        };
        let output = match &item.output {
            Ok(o) => o,
            Err(e) => {
                fail(e.clone());
                failed += 1;
                continue;
            }
        };
        if same_file(input, output) {
            fail(format!("output {} is the input file", output.display()));
            failed += 1;
            continue;
        }
        if output.exists() && !args.overwrite {
            println!(
                "{tag} {} -> {}: exists, skipped",
                input.display(),
                output.display()
            );
            skipped += 1;
            continue;
        }
        let format = match image_io::format_from_extension(output) {
            Ok(f) => f,
            Err(e) => {
                fail(e.to_string());
                failed += 1;
                continue;
            }
        };
        let t0 = Instant::now();
        let img = match image_io::decode(input, args.max_pixels) {
            Ok(img) => img,
            Err(e) => {
                fail(e.to_string());
                failed += 1;
                continue;
            }
        };
        let m = match model.as_mut() {
            Some(m) => m,
            None => {
                let target = target.take().unwrap_or(Target::Cpu);
                let mut m = load_backend(target, &model_paths)?;
                if let Some(t5) = &t5 {
                    let ctx = m.restorer().dims().context_dim;
                    if t5.shape[1] != ctx {
                        return Err(format!(
                            "--text-embeddings: tokens have width {}, the model's context is {ctx}",
                            t5.shape[1]
                        )
                        .into());
                    }
                }
                if args.verbose {
                    println!("model: weights {:.1} MiB", mib(m.restorer().weight_bytes()));
                }
                model.insert(m)
            }
        };
        let ctx_len = m.parts().local_prompt_len() + t5.as_ref().map_or(0, |t| t.shape[0]);
        let m = m.restorer();
        // Without --tile, the GPU's free memory may cap the tile below the model's largest.
        let mut params = params.clone();
        if params.tile.is_none() {
            let dims = m.dims();
            if let Some(limit) = m.memory_tile_limit(ctx_len, params.steps) {
                if limit < dims.max_tile_latent {
                    params.tile = Some(limit * pipeline::VAE_FACTOR);
                    if args.verbose {
                        println!(
                            "{tag} free GPU memory caps the tile at {} pixels",
                            limit * pipeline::VAE_FACTOR
                        );
                    }
                }
            }
        }
        if args.verbose {
            if let Ok(plan) = pipeline::plan(&m.dims(), img.height, img.width, &params) {
                let batch = if params.cfg == 1.0 { 1 } else { 2 };
                let tile = plan
                    .tiles
                    .iter()
                    .fold((0, 0), |a, t| (a.0.max(t.h), a.1.max(t.w)));
                println!(
                    "{tag} plan: {} tile(s) of up to {}×{} latent, activations {:.1} MiB vs weights {:.1} MiB",
                    plan.tiles.len(),
                    tile.0,
                    tile.1,
                    mib(m.plan_bytes(tile.0, tile.1, ctx_len, batch)),
                    mib(m.weight_bytes())
                );
            }
        }
        let (iw, ih) = (img.width, img.height);
        match restore_one(m, img, &params, t5.as_ref(), output, format, &tag) {
            Ok((w, h)) => {
                println!(
                    "{tag} {} -> {} ({iw}×{ih} -> {w}×{h}, {:.1} s)",
                    input.display(),
                    output.display(),
                    t0.elapsed().as_secs_f64()
                );
                done += 1;
            }
            Err(e) => {
                fail(e);
                failed += 1;
            }
        }
    }
    println!(
        "restored {done}, skipped {skipped}, failed {failed} of {total} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(format!("{failed} of {total} images failed").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpir_engine::pipeline::{Denoiser, ModelDims};

    /// A model whose velocity runs out of memory on latent tiles wider than `limit`, and
    /// records the tile widths it was asked for. Every other stage returns zeros.
    struct OomAbove {
        limit: usize,
        seen: Vec<usize>,
    }

    impl Denoiser for OomAbove {
        fn velocity(
            &mut self,
            z: &Tensor,
            _t: &[f32],
            _y: &Tensor,
            _c: &Tensor,
            _lq: &Tensor,
        ) -> dpir_engine::Result<Tensor> {
            let w = z.shape[3];
            self.seen.push(w);
            if w > self.limit {
                return Err(Error::OutOfMemory(format!("a {w}-wide tile")));
            }
            Ok(Tensor::zeros(&z.shape))
        }
    }

    impl Restorer for OomAbove {
        fn dims(&self) -> ModelDims {
            ModelDims {
                latent_channels: 4,
                patch: 2,
                context_dim: 8,
                pooled_dim: 8,
                max_tile_latent: 64,
            }
        }
        fn encode_lq(&mut self, img: &Tensor) -> dpir_engine::Result<Tensor> {
            Ok(Tensor::zeros(&[1, 4, img.shape[2] / 8, img.shape[3] / 8]))
        }
        fn decode(&mut self, z: &Tensor) -> dpir_engine::Result<Tensor> {
            Ok(Tensor::zeros(&[1, 3, z.shape[2] * 8, z.shape[3] * 8]))
        }
        fn lq_tokens(&mut self, z: &Tensor) -> dpir_engine::Result<Tensor> {
            Ok(Tensor::zeros(&[1, z.shape[2] * z.shape[3] / 4, 1]))
        }
        fn local_prompt(&mut self, _r: &Tensor) -> dpir_engine::Result<Tensor> {
            Ok(Tensor::zeros(&[1, 8]))
        }
        fn global_prompt(&mut self, _i: &Tensor) -> dpir_engine::Result<Tensor> {
            Ok(Tensor::zeros(&[8]))
        }
    }

    fn params() -> RestoreParams {
        RestoreParams {
            scale: 4,
            steps: 2,
            strength: 1.0,
            ..RestoreParams::default()
        }
    }

    #[test]
    fn out_of_memory_retries_with_half_the_tile() {
        // 64² ×4 → 256² → a 32² latent: one 32-wide tile fails, 16-wide tiles fit.
        let mut m = OomAbove {
            limit: 16,
            seen: Vec::new(),
        };
        let lq = Tensor::zeros(&[3, 64, 64]);
        let out = restore_with_retry(&mut m, &lq, &params(), None, "[1/1]").unwrap();
        assert_eq!(out.shape, vec![3, 256, 256]);
        assert_eq!(m.seen[0], 32);
        assert!(m.seen[1..].iter().all(|&w| w <= 16), "{:?}", m.seen);
    }

    #[test]
    fn out_of_memory_gives_up_below_the_smallest_tile() {
        let mut m = OomAbove {
            limit: 4,
            seen: Vec::new(),
        };
        let lq = Tensor::zeros(&[3, 64, 64]);
        let e = restore_with_retry(&mut m, &lq, &params(), None, "[1/1]").unwrap_err();
        assert_eq!(
            e,
            "out of GPU memory: a 16-wide tile (even with 128-pixel tiles)"
        );
    }

    #[test]
    fn other_errors_are_not_retried() {
        assert!(!is_oom(&Error::Arg("x".into())));
        assert!(is_oom(&Error::OutOfMemory("x".into())));
        assert!(is_oom(&Error::Cuda(
            "allocating 8 bytes: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into()
        )));
    }
}
