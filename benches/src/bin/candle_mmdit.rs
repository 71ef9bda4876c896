//! Baseline: candle-transformers' MMDiT forward (CPU, F16: the only dtype its CPU path
//! runs) on seeded random weights, timed; prints one JSON object with the median.
//!
//! Usage: `candle_mmdit [--config tiny|mid] [--depth N --head-dim N --context-dim N
//! --pooled-dim N] [--latent N] [--context-len N] [--batch N] [--runs N]`.
//! Defaults: the "mid" config, 64×64 latent, 154 context tokens, batch 1, 3 runs.

use std::process::ExitCode;
use std::time::Instant;

use dpir_tests::{
    candle_mmdit, candle_mmdit_forward, mid_config, mmdit_flops, mmdit_inputs, mmdit_spec,
    random_weights, sd3_like_config, tiny_bench_config,
};

struct Args {
    config: String,
    depth: Option<usize>,
    head_dim: Option<usize>,
    context_dim: Option<usize>,
    pooled_dim: Option<usize>,
    latent: usize,
    context_len: usize,
    batch: usize,
    runs: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: "mid".into(),
        depth: None,
        head_dim: None,
        context_dim: None,
        pooled_dim: None,
        latent: 64,
        context_len: 154,
        batch: 1,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = || {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: expected a number, got `{v}`"))
        };
        match k.as_str() {
            "--config" => a.config = v.clone(),
            "--depth" => a.depth = Some(num()?),
            "--head-dim" => a.head_dim = Some(num()?),
            "--context-dim" => a.context_dim = Some(num()?),
            "--pooled-dim" => a.pooled_dim = Some(num()?),
            "--latent" => a.latent = num()?,
            "--context-len" => a.context_len = num()?,
            "--batch" => a.batch = num()?,
            "--runs" => a.runs = num()?,
            _ => return Err(format!("unknown argument `{k}`")),
        }
    }
    if a.runs == 0 || a.batch == 0 || a.latent == 0 || !a.latent.is_multiple_of(2) {
        return Err("--runs and --batch must be >= 1, --latent even and >= 2".into());
    }
    Ok(a)
}

fn run() -> Result<String, String> {
    let a = parse()?;
    let base = match a.config.as_str() {
        "mid" => mid_config(),
        "tiny" => tiny_bench_config(),
        other => return Err(format!("unknown --config `{other}` (tiny, mid)")),
    };
    let cfg = sd3_like_config(
        a.depth.unwrap_or(base.depth),
        a.head_dim.unwrap_or(base.head_dim()),
        base.pos_embed_max_size.max(a.latent / 2),
        a.context_dim.unwrap_or(base.context_dim),
        a.pooled_dim.unwrap_or(base.pooled_dim),
        base.frequency_embedding_size,
        false,
        0,
    );
    let weights = random_weights(&mmdit_spec(&cfg, false), 1);
    let (x, t, y, ctx) = mmdit_inputs(&cfg, a.batch, a.latent, a.latent, a.context_len, 2);
    let dt = candle_core::DType::F16;
    let model = candle_mmdit(&cfg, &weights, dt).map_err(|e| format!("candle MMDiT: {e}"))?;
    let mut times = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let s = Instant::now();
        candle_mmdit_forward(&model, &x, &t, &y, &ctx, dt)
            .map_err(|e| format!("candle forward: {e}"))?;
        times.push(s.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = mmdit_flops(&cfg, a.batch, a.latent, a.latent, a.context_len);
    let json = serde_json::json!({
        "impl": "candle-transformers 0.11.1 mmdit (cpu, f16)",
        "depth": cfg.depth,
        "hidden": cfg.hidden,
        "heads": cfg.num_heads,
        "context_dim": cfg.context_dim,
        "pooled_dim": cfg.pooled_dim,
        "latent": a.latent,
        "context_len": a.context_len,
        "batch": a.batch,
        "runs": a.runs,
        "median_s": median,
        "times_s": times,
        "gflop": flops / 1e9,
        "gflops": flops / 1e9 / median,
    });
    Ok(json.to_string())
}

fn main() -> ExitCode {
    match run() {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("candle_mmdit: {e}");
            ExitCode::FAILURE
        }
    }
}
