//! Our CPU MMDiT forward against candle's, same weights, same process.
//!
//! Configs: "tiny" (depth 4, hidden 256, 32×32 latent, 16 context tokens) and "mid"
//! (depth 8, hidden 512, context 4096, pooled 2048, 64×64 latent = 1024 image tokens,
//! 154 context tokens), batch 1. candle runs in F16 (its CPU MMDiT's only dtype); ours in
//! f32. After each config the bench prints both medians, the ratio and GFLOP/s.
//!
//! Run: `cargo bench -p dpir-benches --bench cpu_mmdit` (a few minutes on 2 cores).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dpir_engine::models::mmdit::Mmdit;
use dpir_loader::config::MmditConfig;
use dpir_tests::{
    candle_mmdit, candle_mmdit_forward, mid_config, mmdit_flops, mmdit_inputs, mmdit_spec,
    random_weights, tiny_bench_config,
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_config(
    c: &mut Criterion,
    name: &str,
    cfg: &MmditConfig,
    hw: usize,
    l: usize,
    samples: usize,
) {
    let weights = random_weights(&mmdit_spec(cfg, false), 1);
    let (x, t, y, ctx) = mmdit_inputs(cfg, 1, hw, hw, l, 2);
    let ours = match Mmdit::load(cfg, &weights) {
        Ok(m) => m,
        Err(e) => panic!("loading our MMDiT: {e}"),
    };
    let dt = candle_core::DType::F16;
    let theirs = match candle_mmdit(cfg, &weights, dt) {
        Ok(m) => m,
        Err(e) => panic!("loading candle's MMDiT: {e}"),
    };
    let ours_t = RefCell::new(Vec::new());
    let theirs_t = RefCell::new(Vec::new());
    let mut g = c.benchmark_group(format!("mmdit_{name}"));
    g.sample_size(samples)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("dpir_cpu_f32", |b| {
        b.iter_custom(|iters| {
            let s = Instant::now();
            for _ in 0..iters {
                let o = ours.forward(&x, &t, &y, &ctx, None);
                assert!(o.is_ok());
            }
            let e = s.elapsed();
            ours_t.borrow_mut().push(e.as_secs_f64() / iters as f64);
            e
        })
    });
    g.bench_function("candle_cpu_f16", |b| {
        b.iter_custom(|iters| {
            let s = Instant::now();
            for _ in 0..iters {
                let o = candle_mmdit_forward(&theirs, &x, &t, &y, &ctx, dt);
                assert!(o.is_ok());
            }
            let e = s.elapsed();
            theirs_t.borrow_mut().push(e.as_secs_f64() / iters as f64);
            e
        })
    });
    g.finish();
    let mo = median(&mut ours_t.borrow_mut());
    let mt = median(&mut theirs_t.borrow_mut());
    let gf = mmdit_flops(cfg, 1, hw, hw, l) / 1e9;
    println!(
        "mmdit {name}: dpir {:.1} ms ({:.1} GFLOP/s), candle {:.1} ms ({:.1} GFLOP/s), speed-up {:.2}x ({gf:.1} GFLOP per forward)",
        mo * 1e3,
        gf / mo,
        mt * 1e3,
        gf / mt,
        mt / mo
    );
}

fn benches(c: &mut Criterion) {
    bench_config(c, "tiny", &tiny_bench_config(), 32, 16, 10);
    bench_config(c, "mid", &mid_config(), 64, 154, 10);
}

criterion_group!(name = cpu_mmdit; config = Criterion::default(); targets = benches);
criterion_main!(cpu_mmdit);
