//! Baseline: candle-transformers 0.11.1 MMDiT (`models::mmdit`) forward on CUDA, one guided
//! sampling step (CFG as batch 2) on seeded random F16 weights of the real shapes, timed.
//! Prints one JSON line:
//! `{"baseline":"candle-cuda","config":..,"dtype":"f16","step_ms":..,"device":..,...}`.
//!
//! F16 only: candle's MMDiT casts the timestep embedding to F16 (`TimestepEmbedder`), so any
//! other weight dtype fails its first matmul. Attention is candle's default path
//! (`matmul` + `softmax_last_dim` + `matmul`, the full attention matrix in memory); its
//! flash-attn kernels are not built.
//!
//! Usage: `candle_mmdit_cuda [--config sd3-medium-1024|sd35-medium-1024] [--reps N]
//! [--warmup N] [--latent N] [--context-len N] [--batch N] [--seed N] [--depth N]
//! [--device cuda|cpu] [--json FILE]` (`--json` also writes the JSON object to FILE).
//! Defaults: sd3-medium-1024 (128x128 latent, 154 context tokens, batch 2), 3 warmup, 10 reps,
//! CUDA. `--depth` (a narrower model of the same kind) and `--device cpu` are for checking the
//! program on a machine without a GPU.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::mmdit::model::{Config, MMDiT};

/// Model widths and options, with the input shape of one step.
struct Setup {
    name: &'static str,
    cfg: Config,
    /// SD3.5: RMS q/k norm in every attention.
    qk_norm: bool,
    /// SD3.5 (MMDiT-X): the first N blocks carry a second, image-only attention.
    dual_attention_layers: usize,
}

fn setup(name: &str) -> Result<Setup, String> {
    match name {
        "sd3-medium-1024" => Ok(Setup {
            name: "sd3-medium-1024",
            cfg: Config::sd3_medium(),
            qk_norm: false,
            dual_attention_layers: 0,
        }),
        "sd35-medium-1024" => Ok(Setup {
            name: "sd35-medium-1024",
            cfg: Config::sd3_5_medium(),
            qk_norm: true,
            dual_attention_layers: 13,
        }),
        other => Err(format!(
            "unknown --config `{other}` (sd3-medium-1024, sd35-medium-1024)"
        )),
    }
}

struct Args {
    config: String,
    reps: usize,
    warmup: usize,
    latent: usize,
    context_len: usize,
    batch: usize,
    seed: u64,
    depth: Option<usize>,
    device: String,
    json: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: "sd3-medium-1024".into(),
        reps: 10,
        warmup: 3,
        latent: 128,
        context_len: 154,
        batch: 2,
        seed: 1,
        depth: None,
        device: "cuda".into(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            return Err(
                "usage: candle_mmdit_cuda [--config sd3-medium-1024|sd35-medium-1024] \
                 [--reps N] [--warmup N] [--latent N] [--context-len N] [--batch N] [--seed N] \
                 [--depth N] [--device cuda|cpu] [--json FILE]"
                    .into(),
            );
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = || {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: expected a number, got `{v}`"))
        };
        match k.as_str() {
            "--config" => a.config = v.clone(),
            "--reps" => a.reps = num()?,
            "--warmup" => a.warmup = num()?,
            "--latent" => a.latent = num()?,
            "--context-len" => a.context_len = num()?,
            "--batch" => a.batch = num()?,
            "--seed" => a.seed = num()? as u64,
            "--depth" => a.depth = Some(num()?),
            "--device" => a.device = v.clone(),
            "--json" => a.json = Some(v.clone()),
            _ => return Err(format!("unknown argument `{k}`")),
        }
    }
    if a.reps == 0 || a.batch < 2 || !a.batch.is_multiple_of(2) {
        return Err(
            "--reps must be >= 1, --batch even and >= 2 (CFG: conditional + unconditional)".into(),
        );
    }
    if a.latent < 2 || !a.latent.is_multiple_of(2) || a.context_len == 0 {
        return Err("--latent must be even and >= 2, --context-len >= 1".into());
    }
    Ok(a)
}

/// A VarBuilder backend that makes every weight on request: random (candle's own init for
/// each layer kind: Kaiming-normal linear weights, uniform biases, unit norm weights), drawn
/// in F32 on the device (candle's CUDA RNG has no F16 path) and cast.
struct RandomWeights {
    qk_norm: bool,
    dual_attention_layers: usize,
    params: Arc<AtomicUsize>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.params.fetch_add(s.elem_count(), Ordering::Relaxed);
        h.var(s, DType::F32, dev)?.as_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: `{name}` was asked for without one")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name.ends_with(".ln_q.weight") || name.ends_with(".ln_k.weight") {
            return self.qk_norm;
        }
        (0..self.dual_attention_layers)
            .any(|i| name == format!("joint_blocks.{i}.x_block.attn2.qkv.weight"))
    }
}

/// FLOPs of one forward (multiply-add = 2): the GEMMs and the attention products.
fn step_flops(s: &Setup, batch: usize, latent: usize, ctx: usize) -> f64 {
    let c = &s.cfg;
    let d = (c.head_size * c.depth) as f64;
    let img = ((latent / c.patch_size) * (latent / c.patch_size)) as f64;
    let ctx = ctx as f64;
    let depth = c.depth as f64;
    let dual = s.dual_attention_layers as f64;
    let patch = (c.patch_size * c.patch_size * c.in_channels) as f64;
    let out = (c.patch_size * c.patch_size * c.out_channels) as f64;
    // Per token: qkv 3d², proj d², MLP 8d²; the last block's context stream has qkv only.
    let linear = (depth - 1.0) * 12.0 * d * d * (img + ctx)
        + 12.0 * d * d * img
        + 3.0 * d * d * ctx
        + dual * 4.0 * d * d * img
        + c.context_embed_size as f64 * d * ctx
        + (patch + out) * d * img;
    let l = img + ctx;
    let attention = depth * 2.0 * l * l * d + dual * 2.0 * img * img * d;
    2.0 * batch as f64 * (linear + attention)
}

/// candle's message without the backtrace it attaches when RUST_BACKTRACE is set.
fn one_line(e: candle_core::Error) -> String {
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    };
    let msg = e.to_string();
    msg.lines()
        .next()
        .unwrap_or("unknown error")
        .trim()
        .to_string()
}

fn device_name(dev: &Device) -> String {
    match dev {
        Device::Cuda(d) => {
            let ctx = d.cuda_stream();
            let ctx = ctx.context();
            let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
            match ctx.compute_capability() {
                Ok((major, minor)) => format!("{name} (sm_{major}{minor})"),
                Err(_) => name,
            }
        }
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

fn run() -> Result<String, String> {
    let a = parse()?;
    let mut s = setup(&a.config)?;
    if let Some(depth) = a.depth {
        // A narrower model of the same kind (hidden = 64 * depth), for quick checks.
        if depth < 2 {
            return Err("--depth must be >= 2".into());
        }
        s.cfg.depth = depth;
        s.dual_attention_layers = s.dual_attention_layers.min(depth - 1);
    }
    let max_latent = s.cfg.pos_embed_max_size * s.cfg.patch_size;
    if a.latent > max_latent {
        return Err(format!(
            "--latent {} exceeds the position table of {} ({max_latent})",
            a.latent, s.name
        ));
    }
    let dev = match a.device.as_str() {
        "cuda" => {
            let dev = Device::new_cuda(0)
                .map_err(|e| format!("no usable CUDA device: {}", one_line(e)))?;
            dev.set_seed(a.seed)
                .map_err(|e| format!("seeding the CUDA RNG: {}", one_line(e)))?;
            dev
        }
        // The same code path on the CPU (unseeded: candle's CPU RNG takes no seed).
        "cpu" => Device::Cpu,
        other => return Err(format!("unknown --device `{other}` (cuda, cpu)")),
    };
    let dt = DType::F16;
    let ce = |what: &'static str| move |e: candle_core::Error| format!("{what}: {}", one_line(e));

    let t0 = Instant::now();
    let params = Arc::new(AtomicUsize::new(0));
    let backend = RandomWeights {
        qk_norm: s.qk_norm,
        dual_attention_layers: s.dual_attention_layers,
        params: Arc::clone(&params),
    };
    let backend: Box<dyn SimpleBackend> = Box::new(backend);
    let vb = VarBuilder::from_backend(backend, dt, dev.clone());
    let model = MMDiT::new(&s.cfg, false, vb).map_err(ce("building candle's MMDiT"))?;
    dev.synchronize().map_err(ce("building candle's MMDiT"))?;
    let build_s = t0.elapsed().as_secs_f64();

    let (b, lat) = (a.batch, a.latent);
    let rand =
        |shape: &[usize]| Tensor::randn(0f32, 1f32, shape, &dev).and_then(|t| t.to_dtype(dt));
    let x = rand(&[b, s.cfg.in_channels, lat, lat]).map_err(ce("inputs"))?;
    let y = rand(&[b, s.cfg.adm_in_channels]).map_err(ce("inputs"))?;
    let ctx = rand(&[b, a.context_len, s.cfg.context_embed_size]).map_err(ce("inputs"))?;
    // The timestep embedding takes F32 (it casts to F16 itself).
    let t = Tensor::full(500f32, b, &dev).map_err(ce("inputs"))?;
    let half = b / 2;

    // One guided Euler step: v = model(x, t); x' = x_c + dt (v_u + s (v_c - v_u)).
    let step = || -> candle_core::Result<Tensor> {
        let v = model.forward(&x, &t, &y, &ctx, None)?;
        let vc = v.narrow(0, 0, half)?;
        let vu = v.narrow(0, half, b - half)?;
        let guided = (&vu + ((&vc - &vu)? * 4.5)?)?;
        x.narrow(0, 0, half)? + (guided * -0.01)?
    };

    for _ in 0..a.warmup {
        step().map_err(ce("candle forward"))?;
    }
    dev.synchronize().map_err(ce("candle forward"))?;
    let mut times = Vec::with_capacity(a.reps);
    for _ in 0..a.reps {
        let st = Instant::now();
        let out = step().map_err(ce("candle forward"))?;
        dev.synchronize().map_err(ce("candle forward"))?;
        times.push(st.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let flops = step_flops(&s, b, lat, a.context_len);
    let json = serde_json::json!({
        "baseline": "candle-cuda",
        "impl": "candle-transformers 0.11.1 models::mmdit, default attention (no flash-attn)",
        "config": s.name,
        "depth": s.cfg.depth,
        "dtype": "f16",
        "device": device_name(&dev),
        "weights": "random",
        "params": params.load(Ordering::Relaxed),
        "batch": b,
        "latent": lat,
        "context_len": a.context_len,
        "warmup": a.warmup,
        "reps": a.reps,
        "step_ms": median,
        "mean_ms": mean,
        "min_ms": sorted[0],
        "times_ms": times,
        "build_s": build_s,
        "tflop": flops / 1e12,
        "tflops": flops / 1e9 / median,
    });
    let line = json.to_string();
    if let Some(path) = &a.json {
        std::fs::write(path, format!("{line}\n")).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(line)
}

fn main() -> ExitCode {
    match run() {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("candle_mmdit_cuda: {e}");
            ExitCode::FAILURE
        }
    }
}
