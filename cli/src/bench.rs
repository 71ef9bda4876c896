//! `dpir bench` and `dpir profile`.
//!
//! `dpir bench --device cuda` first measures the device's ceilings (a large bf16 GEMM through
//! cuBLASLt; a large device-to-device copy), then times each op at the configuration's real
//! shapes (achieved TFLOP/s or GB/s beside the ceiling), then one full sampling step, and
//! reports peak memory. Weights are seeded random values of the real shapes (said in the
//! output). `dpir profile` breaks one step down per op with CUDA events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use dpir_engine::cuda::mmdit::Profile;
use dpir_engine::cuda::ops::AttnVariant;
use dpir_engine::cuda::{Bf16, CudaDevice, CudaMmdit, DView, Gemm, Timer};
use dpir_engine::models::mmdit::Mmdit;
use dpir_engine::{Error, Tensor};
use dpir_loader::config::MmditConfig;
use serde_json::{json, Value};

use crate::CliResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
pub struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Configuration: sd3-medium-1024, sd35-medium-1024, mid, tiny (one MMDiT forward or
    /// sampling step, random weights); dpir-tiny-512, dpir-tiny-1024 (a full ×4 restore of
    /// a bundled example with the model); dpir-sd3-512, dpir-sd3-1024 (the same restore
    /// with DPIR at SD3-medium size, random weights, GPU only). Default: sd3-medium-1024 on
    /// cuda, mid on cpu.
    #[arg(long)]
    config: Option<String>,
    /// Model for the restore configurations (default: as `dpir restore`).
    #[arg(long, value_name = "PATH")]
    model: Vec<std::path::PathBuf>,
    /// Timed repetitions per measurement.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Configuration: sd3-medium-1024, sd35-medium-1024, mid, tiny.
    #[arg(long, default_value = "sd3-medium-1024")]
    config: String,
    /// Write the breakdown as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A benchmark configuration: model, batch (CFG = 2), latent size, context tokens.
struct BenchConfig {
    name: &'static str,
    model: MmditConfig,
    batch: usize,
    latent: usize,
    ctx: usize,
}

fn bench_config(name: &str) -> Result<BenchConfig, Error> {
    let (model, latent, ctx, name) = match name {
        "sd3-medium-1024" => (MmditConfig::sd3_medium(), 128, 154, "sd3-medium-1024"),
        "sd35-medium-1024" => (MmditConfig::sd35_medium(), 128, 154, "sd35-medium-1024"),
        // Issue 3's "mid": depth 8, hidden 512, SD3 context/pooled widths, 64×64 latent
        // (1024 image tokens) + 154 context tokens, batch 1.
        "mid" => (
            MmditConfig {
                depth: 8,
                hidden: 512,
                num_heads: 8,
                mlp_hidden: 2048,
                attn2_blocks: vec![false; 8],
                ..MmditConfig::sd3_medium()
            },
            64,
            154,
            "mid",
        ),
        "tiny" => (MmditConfig::tiny(), 8, 5, "tiny"),
        other => {
            return Err(Error::Arg(format!(
                "unknown bench config `{other}` (sd3-medium-1024, sd35-medium-1024, mid, tiny)"
            )))
        }
    };
    Ok(BenchConfig {
        name,
        model,
        batch: if name == "mid" { 1 } else { 2 },
        latent,
        ctx,
    })
}

/// Analytic FLOPs of one forward (GEMMs, attention) at the config's shapes.
fn step_flops(c: &BenchConfig) -> (f64, f64) {
    let m = &c.model;
    let (b, d, mlp) = (c.batch as f64, m.hidden as f64, m.mlp_hidden as f64);
    let n = ((c.latent / m.patch_size) * (c.latent / m.patch_size)) as f64;
    let l = c.ctx as f64;
    let hd = m.head_dim() as f64;
    let h = m.num_heads as f64;
    let mut gemm = 0.0;
    let mut attn = 0.0;
    for i in 0..m.depth {
        let last = i + 1 == m.depth;
        let a2 = m.attn2_blocks.get(i).copied().unwrap_or(false);
        let per_tok_full = 2.0 * (3.0 * d * d + d * d + 2.0 * d * mlp);
        gemm += b * n * per_tok_full;
        gemm += b
            * l
            * if last {
                2.0 * 3.0 * d * d
            } else {
                per_tok_full
            };
        attn += 4.0 * b * h * (n + l) * (n + l) * hd;
        if a2 {
            gemm += b * n * 2.0 * 4.0 * d * d;
            attn += 4.0 * b * h * n * n * hd;
        }
    }
    gemm += b * n * 2.0 * d * (m.patch_size * m.patch_size * m.out_channels) as f64;
    gemm += b * l * 2.0 * d * m.context_dim as f64;
    (gemm, attn)
}

/// GPU 0, or `no_driver` as the one-line error when no CUDA driver is present.
fn open_device(no_driver: &str) -> Result<Arc<CudaDevice>, Box<dyn std::error::Error>> {
    match CudaDevice::new(0) {
        Ok(d) => Ok(Arc::new(d)),
        Err(Error::NoCuda) => Err(no_driver.into()),
        Err(e) => Err(e.into()),
    }
}

/// Steps per sampler call in the eager-vs-graph comparison.
const SAMPLE_STEPS: usize = 8;

fn fmt_row(name: &str, ms: f64, metric: &str) -> String {
    format!("  {name:<44} {ms:>9.3} ms   {metric}")
}

pub fn run(args: Args) -> CliResult {
    let cfg_name = args.config.clone().unwrap_or_else(|| match args.device {
        Device::Cuda => "sd3-medium-1024".into(),
        Device::Cpu => "mid".into(),
    });
    if crate::bench_restore::is_sd3(&cfg_name) {
        if args.device != Device::Cuda {
            return Err(format!(
                "--config {cfg_name}: DPIR at SD3-medium size runs on --device cuda only"
            )
            .into());
        }
        if crate::bench_restore::input_side(&cfg_name).is_none() {
            return Err(format!("unknown bench config `{cfg_name}`").into());
        }
        let dev = open_device("no CUDA driver found: use --device cpu")?;
        let mut model = crate::bench_restore::sd3_random_gpu(dev)?;
        let out = crate::bench_restore::bench(&mut model, "cuda", &cfg_name, args.reps.max(1))?;
        return write_json(&args, &out);
    }
    if crate::bench_restore::input_side(&cfg_name).is_some() {
        use crate::restore::{choose_target, load_backend, DTypeArg, Device as RDevice};
        let device = match args.device {
            Device::Cuda => RDevice::Cuda,
            Device::Cpu => RDevice::Cpu,
        };
        let target = choose_target(device, DTypeArg::Auto)?;
        let paths = crate::restore::model_paths(&args.model)?;
        let mut backend = load_backend(target, &paths)?;
        let name = match args.device {
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        };
        let out =
            crate::bench_restore::bench(backend.restorer(), name, &cfg_name, args.reps.max(1))?;
        return write_json(&args, &out);
    }
    let bc = bench_config(&cfg_name)?;
    let out = match args.device {
        Device::Cuda => bench_cuda(&bc, args.reps.max(1))?,
        Device::Cpu => bench_cpu(&bc, args.reps.max(1))?,
    };
    write_json(&args, &out)
}

fn write_json(args: &Args, out: &Value) -> CliResult {
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(out)?)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn bench_cpu(bc: &BenchConfig, reps: usize) -> Result<Value, Box<dyn std::error::Error>> {
    println!(
        "dpir bench --device cpu, config {} (random weights of the real shapes)",
        bc.name
    );
    let m = &bc.model;
    let w = random_weights(m, 1);
    let model = Mmdit::load(m, &w)?;
    let (b, s) = (bc.batch, bc.latent);
    let x = Tensor::zeros(&[b, m.in_channels, s, s]);
    let y = Tensor::zeros(&[b, m.pooled_dim]);
    let ctx = Tensor::zeros(&[b, bc.ctx, m.context_dim]);
    let t = vec![500.0; b];
    model.forward(&x, &t, &y, &ctx, None)?;
    let start = Instant::now();
    for _ in 0..reps {
        model.forward(&x, &t, &y, &ctx, None)?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let (g, a) = step_flops(bc);
    println!(
        "{}",
        fmt_row(
            &format!("dpir MMDiT forward (f32, batch {})", bc.batch),
            ms,
            &format!("{:.1} GFLOP/s", (g + a) / ms / 1e6)
        )
    );
    let candle = candle_baseline(bc);
    if let Some(c_ms) = candle
        .as_ref()
        .and_then(|c| c["median_s"].as_f64())
        .map(|s| s * 1e3)
    {
        println!(
            "{}",
            fmt_row(
                "candle 0.11.1 MMDiT forward (F16)",
                c_ms,
                &format!("{:.1} GFLOP/s", (g + a) / c_ms / 1e6)
            )
        );
        println!("  speed-up over candle: {:.2}x", c_ms / ms);
    }
    Ok(json!({
        "device": "cpu", "config": bc.name, "weights": "random", "step_ms": ms,
        "step_gflop": (g + a) / 1e9, "candle": candle,
    }))
}

/// Runs candle's MMDiT on the same shapes through the `candle_mmdit` baseline binary
/// (built by `cargo build --release -p dpir-benches`; candle is never linked into `dpir`),
/// looked up next to this executable. Returns its JSON report, or None (with a note) when
/// the binary is absent or the config is not one candle's MMDiT can express.
fn candle_baseline(bc: &BenchConfig) -> Option<Value> {
    let m = &bc.model;
    if m.qk_norm || m.attn2_blocks.iter().any(|&a| a) || m.num_heads != m.depth {
        println!(
            "  candle baseline: skipped (config {} is not a plain SD3 MMDiT)",
            bc.name
        );
        return None;
    }
    let exe = std::env::current_exe().ok()?.with_file_name("candle_mmdit");
    if !exe.is_file() {
        println!(
            "  candle baseline: {} not found (cargo build --release -p dpir-benches)",
            exe.display()
        );
        return None;
    }
    let args = [
        ("--depth", m.depth),
        ("--head-dim", m.head_dim()),
        ("--context-dim", m.context_dim),
        ("--pooled-dim", m.pooled_dim),
        ("--latent", bc.latent),
        ("--context-len", bc.ctx),
        ("--batch", bc.batch),
        ("--runs", 3),
    ];
    let mut cmd = std::process::Command::new(&exe);
    for (k, v) in args {
        cmd.arg(k).arg(v.to_string());
    }
    match cmd.output() {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(o.stdout.trim_ascii())
                .ok()
                .or_else(|| {
                    println!("  candle baseline: unreadable output");
                    None
                })
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            println!(
                "  candle baseline failed: {}",
                err.lines().next().unwrap_or("")
            );
            None
        }
        Err(e) => {
            println!("  candle baseline: cannot run {}: {e}", exe.display());
            None
        }
    }
}

fn random_weights(m: &MmditConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut out = HashMap::new();
    for spec in dpir_engine::cuda::mmdit::weight_specs(m, &|_| true) {
        let n: usize = spec.shape.iter().product();
        let fan_in = if spec.shape.len() >= 2 {
            spec.shape[1..].iter().product::<usize>()
        } else {
            1
        };
        let a = 0.5 / (fan_in as f32).sqrt();
        let data = (0..n)
            .map(|_| {
                if spec.f32 {
                    1.0 + 0.1 * next()
                } else {
                    a * next()
                }
            })
            .collect();
        out.insert(
            spec.name,
            Tensor {
                shape: spec.shape,
                data,
            },
        );
    }
    out
}

struct Bench<'a> {
    dev: &'a CudaDevice,
    timer: Timer,
    flush: DView<Bf16>,
    reps: usize,
}

impl Bench<'_> {
    /// Mean milliseconds of `f` over `reps` runs after one warm-up, L2 flushed before each.
    fn time(&self, mut f: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
        f()?;
        let mut total = 0.0;
        for _ in 0..self.reps {
            self.dev.fill_bytes(self.flush, 0)?;
            self.timer.start(self.dev)?;
            f()?;
            total += self.timer.stop_ms(self.dev)? as f64;
        }
        Ok(total / self.reps as f64)
    }
}

/// The device's ceilings, measured: a bf16 GEMM 8192³ through cuBLASLt and a 1 GiB
/// device-to-device copy. Returns (GEMM ms, TFLOP/s, copy ms, GB/s read + write).
fn measure_ceilings(
    dev: &CudaDevice,
    gemm: &Gemm,
    b: &Bench,
) -> Result<(f64, f64, f64, f64), Error> {
    println!("ceilings (measured here):");
    let g = 8192usize;
    let gbuf = dev.alloc(3 * g * g * 2)?;
    let gv = gbuf.view::<Bf16>();
    let (ga, gb, gc) = (
        gv.sub(0, g * g)?,
        gv.sub(g * g, g * g)?,
        gv.sub(2 * g * g, g * g)?,
    );
    dev.fill_bytes(gbuf.view::<Bf16>(), 0x3c)?; // 0x3c3c bf16 ≈ 0.0115: finite, non-zero data
    let gemm_ms = b.time(|| gemm.linear(ga, gb, None, gc, g, g, g, false))?;
    let gemm_tflops = 2.0 * (g as f64).powi(3) / gemm_ms / 1e9;
    println!(
        "{}",
        fmt_row(
            "bf16 GEMM 8192^3 (cuBLASLt)",
            gemm_ms,
            &format!("{gemm_tflops:.0} TFLOP/s")
        )
    );
    drop(gbuf);
    let cbytes = 1usize << 30;
    let cbuf = dev.alloc(2 * cbytes)?;
    let cv = cbuf.view::<Bf16>();
    let (csrc, cdst) = (cv.sub(0, cbytes / 2)?, cv.sub(cbytes / 2, cbytes / 2)?);
    let copy_ms = b.time(|| dev.copy(cdst, csrc, cbytes / 2))?;
    let copy_gbs = 2.0 * cbytes as f64 / copy_ms / 1e6;
    println!(
        "{}",
        fmt_row(
            "device-to-device copy 1 GiB",
            copy_ms,
            &format!("{copy_gbs:.0} GB/s (read + write)")
        )
    );
    Ok((gemm_ms, gemm_tflops, copy_ms, copy_gbs))
}

fn bench_cuda(bc: &BenchConfig, reps: usize) -> Result<Value, Box<dyn std::error::Error>> {
    let dev = open_device("no CUDA driver found: use --device cpu")?;
    let (free0, total_mem) = dev.mem_info()?;
    println!(
        "dpir bench --device cuda, config {} on {} (sm_{}{})",
        bc.name, dev.name, dev.cc.0, dev.cc.1
    );
    for (m, how) in &dev.module_report {
        println!("  module {}: {how}", m.name());
    }
    let gemm = Gemm::new(&dev)?;
    let flush_buf = dev.alloc(256 << 20)?;
    let b = Bench {
        dev: &dev,
        timer: Timer::new(&dev)?,
        flush: flush_buf.view::<Bf16>(),
        reps,
    };
    let mut results = Vec::new();

    let (gemm_ms, gemm_tflops, copy_ms, copy_gbs) = measure_ceilings(&dev, &gemm, &b)?;
    results.push(json!({"op": "ceiling gemm 8192^3", "ms": gemm_ms, "tflops": gemm_tflops}));
    results.push(json!({"op": "ceiling copy 1GiB", "ms": copy_ms, "gbs": copy_gbs}));

    // Per-op at the config's shapes.
    let m = &bc.model;
    let (bs, d, mlp) = (bc.batch, m.hidden, m.mlp_hidden);
    let n = (bc.latent / m.patch_size).pow(2);
    let rows = bs * n;
    let heads = m.num_heads;
    let l = n + bc.ctx;
    println!(
        "ops at {} shapes (batch {bs}, {n} image + {} context tokens, hidden {d}):",
        bc.name, bc.ctx
    );
    let opbuf = dev.alloc(
        (rows * mlp * 2 + rows * 3 * d * 2 + rows * d * 2 * 3 + bs * 9 * d * 2 + 4 * mlp * d * 2)
            + (1 << 20),
    )?;
    let mut off = 0usize;
    let mut carve = |k: usize| -> Result<DView<Bf16>, Error> {
        let v = opbuf.view::<Bf16>().sub(off, k)?;
        off += k.div_ceil(128) * 128;
        Ok(v)
    };
    let (hid, qkv, xa, xb, modv, w1, w2) = (
        carve(rows * mlp)?,
        carve(rows * 3 * d)?,
        carve(rows * d)?,
        carve(rows * d)?,
        carve(bs * 9 * d)?,
        carve(mlp * d)?,
        carve(3 * d * d)?,
    );
    dev.fill_bytes(opbuf.view::<Bf16>(), 0x3c)?;
    let mut op = |name: &str, ms: f64, flops: f64, bytes: f64| {
        let metric = if flops > 0.0 {
            let t = flops / ms / 1e9;
            format!(
                "{t:.0} TFLOP/s ({:.0}% of GEMM ceiling)",
                100.0 * t / gemm_tflops
            )
        } else {
            let gbs = bytes / ms / 1e6;
            format!(
                "{gbs:.0} GB/s ({:.0}% of copy ceiling)",
                100.0 * gbs / copy_gbs
            )
        };
        println!("{}", fmt_row(name, ms, &metric));
        results.push(json!({"op": name, "ms": ms, "tflops": if flops > 0.0 { flops / ms / 1e9 } else { 0.0 }, "gbs": if bytes > 0.0 { bytes / ms / 1e6 } else { 0.0 }}));
    };
    let f = |m_: usize, k: usize, n_: usize| 2.0 * (m_ * k * n_) as f64;
    let t = b.time(|| gemm.linear(xa, w2, None, qkv, rows, d, 3 * d, false))?;
    op(
        &format!("qkv GEMM {rows}x{d}x{}", 3 * d),
        t,
        f(rows, d, 3 * d),
        0.0,
    );
    let t = b.time(|| gemm.linear(xa, w2.sub(0, d * d)?, None, xb, rows, d, d, false))?;
    op(&format!("proj GEMM {rows}x{d}x{d}"), t, f(rows, d, d), 0.0);
    let t = b.time(|| gemm.linear(xa, w1, None, hid, rows, d, mlp, false))?;
    op(
        &format!("fc1 GEMM {rows}x{d}x{mlp}"),
        t,
        f(rows, d, mlp),
        0.0,
    );
    let t = b.time(|| gemm.linear(xa, w1, Some(w2.sub(0, mlp)?), hid, rows, d, mlp, true))?;
    op(
        &format!("fc1 GEMM+bias+GELU epilogue {rows}x{d}x{mlp}"),
        t,
        f(rows, d, mlp),
        0.0,
    );
    let t = b.time(|| gemm.linear(hid, w1, None, xa, rows, mlp, d, false))?;
    op(
        &format!("fc2 GEMM {rows}x{mlp}x{d}"),
        t,
        f(rows, mlp, d),
        0.0,
    );
    let t = b.time(|| dev.gelu_tanh(hid, rows * mlp))?;
    op(
        "tanh-GELU (separate kernel)",
        t,
        0.0,
        4.0 * (rows * mlp) as f64,
    );
    let t = b.time(|| dev.adaln_modulate(xa, xb, modv, rows, n, d, 9 * d, 0, d, 1e-6))?;
    op("adaLN LayerNorm+modulate", t, 0.0, 4.0 * (rows * d) as f64);
    let t = b.time(|| dev.gated_residual(xa, xb, modv, rows, n, d, 9 * d, 2 * d))?;
    op("gated residual", t, 0.0, 6.0 * (rows * d) as f64);
    if m.head_dim() <= 256 && m.head_dim().trailing_zeros() >= 5 {
        let wq = dev.alloc(m.head_dim() * 4)?;
        dev.fill_bytes(wq.view::<f32>(), 0)?;
        let t =
            b.time(|| dev.rmsnorm_qk(qkv, wq.view(), wq.view(), rows, heads, m.head_dim(), 1e-6))?;
        op(
            "qk RMSNorm (separate kernel)",
            t,
            0.0,
            8.0 * (rows * d) as f64,
        );
    }
    if m.head_dim() == 64 && dev.has_func("joint_attn_hd64_bf16") {
        // Joint attention over l tokens: context rows read from the start of the same buffer.
        let la = bc.ctx;
        let qkv_big = dev.alloc(bs * l * 3 * d * 2)?;
        let out_big = dev.alloc(bs * l * d * 2)?;
        dev.fill_bytes(qkv_big.view::<Bf16>(), 0x3c)?;
        let qv = qkv_big.view::<Bf16>();
        let ov = out_big.view::<Bf16>();
        let (qa, qb) = (
            qv.sub(0, bs * la * 3 * d)?,
            qv.sub(bs * la * 3 * d, bs * n * 3 * d)?,
        );
        let (oa, ob) = (ov.sub(0, bs * la * d)?, ov.sub(bs * la * d, bs * n * d)?);
        let scale = 1.0 / (m.head_dim() as f32).sqrt();
        // The default variant first (the summary reads the first "joint flash attention").
        let default = AttnVariant::default();
        // Variants whose kernels this GPU lacks (wgmma below sm_90a) are skipped.
        let others = AttnVariant::ALL
            .into_iter()
            .filter(|v| *v != default && dev.has_func(v.kernel(false)));
        for v in std::iter::once(default).chain(others) {
            let t = b.time(|| {
                dev.joint_attention_fused_with(v, qa, qb, oa, ob, bs, la, n, heads, scale, None)
            })?;
            let tag = if v == default { ", default" } else { "" };
            op(
                &format!(
                    "joint flash attention B={bs} H={heads} L={l} hd=64 ({}{tag})",
                    v.name()
                ),
                t,
                4.0 * (bs * heads * l * l * 64) as f64,
                0.0,
            );
        }
    } else {
        println!("  joint flash attention: not available (module not loaded or head_dim != 64)");
    }
    drop(opbuf);

    // One full sampling step.
    println!("full step (random weights of the real shapes):");
    let t0 = Instant::now();
    let model = CudaMmdit::random(dev.clone(), m, 42)?;
    println!(
        "  weights: {:.2} GB uploaded in {:.1} s",
        model.weight_bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    let mut plan = model.plan(bs, bc.latent, bc.latent, bc.ctx, 1)?;
    let plan_bytes = plan.bytes;
    println!(
        "  activation plan: {:.1} MB (one arena); fused attention: {} ({})",
        plan.bytes as f64 / 1e6,
        model.uses_fused_attention(),
        model.opts.attn_variant.name()
    );
    let zx = Tensor::zeros(&[bs.div_ceil(2), m.in_channels, bc.latent, bc.latent]);
    plan.set_latent(&dev, &zx)?;
    plan.set_timesteps(&dev, &vec![500.0; bs])?;
    let y = Tensor {
        shape: vec![bs, m.pooled_dim],
        data: vec![0.1; bs * m.pooled_dim],
    };
    let ctx = Tensor {
        shape: vec![bs, bc.ctx, m.context_dim],
        data: vec![0.05; bs * bc.ctx * m.context_dim],
    };
    plan.set_conditions(&dev, &y, &ctx, None)?;
    let allocs_before = dev.allocations();
    let step_ms = b.time(|| model.step_cfg_euler(&plan, 0, 4.5, -0.01))?;
    let allocs_in_loop = dev.allocations() - allocs_before;
    let (gf, af) = step_flops(bc);
    let step_tflops = (gf + af) / step_ms / 1e9;
    let floor_ms = (gf + af) / gemm_tflops / 1e9;
    println!(
        "{}",
        fmt_row(
            "MMDiT step (CFG batch 2 + Euler)",
            step_ms,
            &format!("{step_tflops:.0} TFLOP/s; FLOP floor {floor_ms:.1} ms at the GEMM ceiling ({:.0}%)", 100.0 * floor_ms / step_ms)
        )
    );
    println!("  device allocations inside the timed steps: {allocs_in_loop}");
    drop(plan);
    // The sampler as a restore runs it: SAMPLE_STEPS steps per call, eager vs CUDA graph.
    let mut model = model;
    let mut splan = model.plan(bs, bc.latent, bc.latent, bc.ctx, SAMPLE_STEPS)?;
    splan.set_latent(&dev, &zx)?;
    let sig: Vec<f32> = (0..=SAMPLE_STEPS)
        .map(|i| 1.0 - i as f32 / SAMPLE_STEPS as f32)
        .collect();
    let ts: Vec<f32> = sig[..SAMPLE_STEPS]
        .iter()
        .flat_map(|s| std::iter::repeat_n(1000.0 * s, bs))
        .collect();
    splan.set_timesteps(&dev, &ts)?;
    splan.set_conditions(&dev, &y, &ctx, None)?;
    let mut per_step = |graph: bool| -> Result<(f64, usize), Error> {
        model.opts.cuda_graph = graph;
        let mut replays = 0;
        model.sample(&mut splan, 4.5, &sig)?; // warm-up (and capture)
        b.timer.start(&dev)?;
        for _ in 0..b.reps.min(5) {
            replays += model.sample(&mut splan, 4.5, &sig)?.replays;
        }
        let ms = b.timer.stop_ms(&dev)? as f64 / (b.reps.min(5) * SAMPLE_STEPS) as f64;
        Ok((ms, replays))
    };
    let (eager_ms, _) = per_step(false)?;
    let (graph_ms, replays) = per_step(true)?;
    println!(
        "{}",
        fmt_row(
            &format!("sampler, {SAMPLE_STEPS} steps per call, eager"),
            eager_ms,
            "per step"
        )
    );
    println!(
        "{}",
        fmt_row(
            &format!("sampler, {SAMPLE_STEPS} steps per call, CUDA graph"),
            graph_ms,
            &format!(
                "per step ({replays} replays; {:+.1}% vs eager)",
                100.0 * (graph_ms / eager_ms - 1.0)
            )
        )
    );
    let (free1, _) = dev.mem_info()?;
    let peak = free0.saturating_sub(free1);
    println!(
        "  memory: {:.2} GB in use after planning (of {:.1} GB); dpir allocations {:.2} GB",
        peak as f64 / 1e9,
        total_mem as f64 / 1e9,
        dev.allocated_bytes() as f64 / 1e9
    );
    Ok(json!({
        "device": dev.name,
        "sm": format!("{}{}", dev.cc.0, dev.cc.1),
        "config": bc.name,
        "weights": "random (real shapes)",
        "ceilings": {"gemm_tflops": gemm_tflops, "copy_gbs": copy_gbs},
        "ops": results,
        "step_ms": step_ms,
        "step_tflops": step_tflops,
        "step_gflop": (gf + af) / 1e9,
        "attention_gflop": af / 1e9,
        "flop_floor_ms": floor_ms,
        "fused_attention": model.uses_fused_attention(),
        "allocations_in_loop": allocs_in_loop,
        "weights_bytes": model.weight_bytes,
        "plan_bytes": plan_bytes,
        "sampler_step_ms_eager": eager_ms,
        "sampler_step_ms_graph": graph_ms,
        "memory_in_use_bytes": peak,
    }))
}

/// Analytic work of one profiled op over a whole forward at the config's shapes:
/// `(FLOPs, bytes)` — FLOPs for the GEMM and attention ops (roofline: the GEMM ceiling),
/// bytes of bf16 reads + writes for the memory-bound ones (roofline: the copy ceiling).
fn op_work(bc: &BenchConfig, op: &str) -> Option<(f64, f64)> {
    let m = &bc.model;
    let b = bc.batch as f64;
    let n = ((bc.latent / m.patch_size) * (bc.latent / m.patch_size)) as f64;
    let l = bc.ctx as f64;
    let (d, mlp, hd, h) = (
        m.hidden as f64,
        m.mlp_hidden as f64,
        m.head_dim() as f64,
        m.num_heads as f64,
    );
    let (mut fl, mut by) = (0.0, 0.0);
    for i in 0..m.depth {
        let last = i + 1 == m.depth;
        let a2 = m.attn2_blocks.get(i).copied().unwrap_or(false) as u8 as f64;
        let ctx_full = if last { 0.0 } else { 1.0 };
        match op {
            "qkv GEMM" => fl += 2.0 * 3.0 * d * d * b * (n * (1.0 + a2) + l),
            "proj GEMM" => fl += 2.0 * d * d * b * (n * (1.0 + a2) + l * ctx_full),
            "MLP (fc1+GELU+fc2)" => fl += 4.0 * d * mlp * b * (n + l * ctx_full),
            "adaLN modulation GEMM" => {
                let mods = if a2 > 0.0 { 9.0 } else { 6.0 } + if last { 2.0 } else { 6.0 };
                fl += 2.0 * d * mods * d * b
            }
            "attention (flash)" | "attention (unfused)" => {
                fl += 4.0 * b * h * hd * ((n + l) * (n + l) + a2 * n * n)
            }
            // LayerNorm + modulate: read x, write the modulated copy (bf16).
            "adaLN LayerNorm+modulate" => {
                by += 4.0 * d * b * (n * (2.0 + a2) + l * (1.0 + ctx_full))
            }
            // Gated residual: read x and the branch, write x.
            "gated residual" => by += 6.0 * d * b * (n * (2.0 + a2) + l * 2.0 * ctx_full),
            // qk RMSNorm in place: read and write q and k.
            "rmsnorm_qk" => by += 8.0 * d * b * (n * (1.0 + a2) + l),
            _ => return None,
        }
    }
    Some((fl, by))
}

pub fn profile(args: ProfileArgs) -> CliResult {
    let bc = bench_config(&args.config)?;
    let dev = open_device("no CUDA driver found: `dpir profile` needs a GPU")?;
    let gemm = Gemm::new(&dev)?;
    let flush_buf = dev.alloc(256 << 20)?;
    let (gemm_tflops, copy_gbs) = {
        let b = Bench {
            dev: &dev,
            timer: Timer::new(&dev)?,
            flush: flush_buf.view::<Bf16>(),
            reps: 5,
        };
        let (_, t, _, c) = measure_ceilings(&dev, &gemm, &b)?;
        (t, c)
    };
    drop(flush_buf);
    let m = &bc.model;
    let model = CudaMmdit::random(dev.clone(), m, 42)?;
    let mut plan = model.plan(bc.batch, bc.latent, bc.latent, bc.ctx, 1)?;
    plan.set_timesteps(&dev, &vec![500.0; bc.batch])?;
    let y = Tensor {
        shape: vec![bc.batch, m.pooled_dim],
        data: vec![0.1; bc.batch * m.pooled_dim],
    };
    let ctx = Tensor {
        shape: vec![bc.batch, bc.ctx, m.context_dim],
        data: vec![0.05; bc.batch * bc.ctx * m.context_dim],
    };
    plan.set_conditions(&dev, &y, &ctx, None)?;
    model.forward_device(&plan, 0, None)?;
    let timer = Timer::new(&dev)?;
    timer.start(&dev)?;
    model.forward_device(&plan, 0, None)?;
    let step_ms = timer.stop_ms(&dev)? as f64;
    let mut prof = Profile::default();
    model.forward_device(&plan, 0, Some(&mut prof))?;
    dev.synchronize()?;
    let totals = prof.totals()?;
    let sum: f64 = totals.iter().map(|t| t.1).sum();
    println!(
        "dpir profile: {} on {}, one forward {step_ms:.3} ms (unprofiled); per op (CUDA events):",
        bc.name, dev.name
    );
    println!(
        "  {:<32} {:>10} {:>8} {:>8}   achieved (roofline: share of the measured ceiling)",
        "op", "ms", "share", "launches"
    );
    let mut rows = Vec::new();
    for (name, ms, count) in &totals {
        let (roof, achieved) = match op_work(&bc, name) {
            Some((fl, _)) if fl > 0.0 => {
                let t = fl / ms / 1e9;
                (
                    Some(t / gemm_tflops),
                    format!("{t:.0} TFLOP/s ({:.0}% of GEMM)", 100.0 * t / gemm_tflops),
                )
            }
            Some((_, by)) if by > 0.0 => {
                let g = by / ms / 1e6;
                (
                    Some(g / copy_gbs),
                    format!("{g:.0} GB/s ({:.0}% of copy)", 100.0 * g / copy_gbs),
                )
            }
            _ => (None, "—".into()),
        };
        println!(
            "  {name:<32} {ms:>10.3} {:>7.1}% {count:>8}   {achieved}",
            100.0 * ms / sum
        );
        rows.push(json!({"op": name, "ms": ms, "share": ms / sum, "launches": count, "of_roofline": roof}));
    }
    let (gf, af) = step_flops(&bc);
    println!(
        "  FLOPs: {:.2} TFLOP in GEMMs, {:.2} TFLOP in attention",
        gf / 1e12,
        af / 1e12
    );
    if let Some(p) = &args.json {
        let v = json!({"config": bc.name, "device": dev.name, "step_ms": step_ms, "ops": rows,
                       "ceilings": {"gemm_tflops": gemm_tflops, "copy_gbs": copy_gbs}});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-op FLOPs of the profile add up to the step's FLOPs (less the embedders and
    /// the final layer, which the profile times as their own ops), for SD3 and MMDiT-X.
    #[test]
    fn profile_op_flops_add_up_to_the_step() {
        for name in ["sd3-medium-1024", "sd35-medium-1024", "tiny"] {
            let bc = bench_config(name).unwrap();
            let m = &bc.model;
            let (gemm, attn) = step_flops(&bc);
            let f = |op: &str| op_work(&bc, op).unwrap().0;
            let (b, d) = (bc.batch as f64, m.hidden as f64);
            let n = ((bc.latent / m.patch_size).pow(2)) as f64;
            let embed_final = b * n * 2.0 * d * (m.patch_size.pow(2) * m.out_channels) as f64
                + b * bc.ctx as f64 * 2.0 * d * m.context_dim as f64;
            let blocks = f("qkv GEMM") + f("proj GEMM") + f("MLP (fc1+GELU+fc2)");
            assert!(
                ((blocks + embed_final) / gemm - 1.0).abs() < 1e-9,
                "{name}: {blocks} + {embed_final} vs {gemm}"
            );
            assert!((f("attention (flash)") / attn - 1.0).abs() < 1e-9, "{name}");
            // Memory-bound ops report bytes, not FLOPs; unknown ops report nothing.
            assert_eq!(op_work(&bc, "gated residual").unwrap().0, 0.0);
            assert!(op_work(&bc, "gated residual").unwrap().1 > 0.0);
            assert!(op_work(&bc, "final layer").is_none());
        }
    }
}
