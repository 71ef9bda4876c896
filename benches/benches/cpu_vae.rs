//! Our CPU SD3-layout VAE at the bundled model's size (dpir-tiny: channels [32, 64, 128, 128],
//! 2 ResNet blocks per level, GroupNorm 32, mid-block attention), on seeded random weights:
//! the decoder at a 64×64 latent (→ 512² image) and the encoder at a 512² image, the two
//! VAE calls of a `dpir restore` of a 128² input at ×4.
//!
//! Before the criterion groups, a per-layer table times every distinct layer shape the two
//! graphs run (3×3 / 1×1 convolutions, GroupNorm + SiLU, nearest upsampling + conv, the
//! mid-block attention), so the table says where a forward spends its time. After each
//! criterion group the bench prints the median and the effective GFLOP/s (convolution and
//! attention multiply-adds × 2 over the wall time).
//!
//! Run: `cargo bench -p dpir-benches --bench cpu_vae` (about a minute on 2 cores).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use dpir_engine::cpu::attention::attention;
use dpir_engine::cpu::conv::{group_norm, Conv2d, Padding, Prologue, Scratch};
use dpir_engine::models::vae::{VaeDecoder, VaeEncoder};
use dpir_engine::weights::seeded_random_weights;
use dpir_engine::Tensor;
use dpir_loader::config::VaeConfig;
use dpir_loader::spec::vae_spec;

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

/// The median (NaN for no samples, e.g. when criterion's filter skipped the bench).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time of this process (all threads), in ms: on a machine shared with other work it
/// counts the work done rather than the time spent waiting for a core.
#[cfg(target_os = "linux")]
fn cpu_ms() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on 64-bit Linux).
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.sec as f64 * 1e3 + ts.nsec as f64 * 1e-6
}

#[cfg(not(target_os = "linux"))]
fn cpu_ms() -> f64 {
    f64::NAN
}

/// Fastest wall time and fastest process CPU time of `f` in ms over `reps` runs (after one
/// warm-up run): the least disturbed by other work on a shared machine.
fn time_ms(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    (0..reps)
        .map(|_| {
            let (s, c) = (Instant::now(), cpu_ms());
            f();
            (s.elapsed().as_secs_f64() * 1e3, cpu_ms() - c)
        })
        .fold((f64::INFINITY, f64::INFINITY), |(a, b), (x, y)| {
            (a.min(x), b.min(y))
        })
}

/// Multiply-add FLOPs of a k×k conv from `c` to `o` channels at an `h×w` output.
fn conv_flops(c: usize, o: usize, k: usize, h: usize, w: usize) -> f64 {
    2.0 * (c * o * k * k * h * w) as f64
}

/// Convolution + attention FLOPs of the decoder at an `h×w` latent and of the encoder at an
/// `h×w` image (the same graph walked in the other direction, minus the extra block per level).
fn vae_flops(cfg: &VaeConfig, decoder: bool, h: usize, w: usize) -> f64 {
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let resnet = |i: usize, o: usize, h: usize, w: usize| {
        conv_flops(i, o, 3, h, w)
            + conv_flops(o, o, 3, h, w)
            + if i != o {
                conv_flops(i, o, 1, h, w)
            } else {
                0.0
            }
    };
    let mid = |c: usize, h: usize, w: usize| {
        let t = (h * w) as f64;
        2.0 * resnet(c, c, h, w) + 4.0 * conv_flops(c, c, 1, h, w) + 4.0 * t * t * c as f64
    };
    let mut f = 0.0;
    if decoder {
        let (mut hh, mut ww) = (h, w);
        f += conv_flops(cfg.latent_channels, ch[n - 1], 3, hh, ww) + mid(ch[n - 1], hh, ww);
        let mut cin = ch[n - 1];
        for i in (0..n).rev() {
            for _ in 0..=cfg.layers_per_block {
                f += resnet(cin, ch[i], hh, ww);
                cin = ch[i];
            }
            if i > 0 {
                hh *= 2;
                ww *= 2;
                f += conv_flops(ch[i], ch[i], 3, hh, ww);
            }
        }
        f + conv_flops(ch[0], cfg.in_channels, 3, hh, ww)
    } else {
        let (mut hh, mut ww) = (h, w);
        f += conv_flops(cfg.in_channels, ch[0], 3, hh, ww);
        let mut cin = ch[0];
        for (i, &o) in ch.iter().enumerate() {
            for _ in 0..cfg.layers_per_block {
                f += resnet(cin, o, hh, ww);
                cin = o;
            }
            if i + 1 < n {
                hh /= 2;
                ww /= 2;
                f += conv_flops(o, o, 3, hh, ww);
            }
        }
        f + mid(ch[n - 1], hh, ww) + conv_flops(ch[n - 1], cfg.latent_channels, 3, hh, ww)
    }
}

fn conv(c: usize, o: usize, k: usize, stride: usize, pad: Padding, seed: u64) -> Conv2d {
    let w = rand_tensor(&[o, c, k, k], seed);
    let b = rand_tensor(&[o], seed + 1);
    match Conv2d::new(w, Some(b), stride, pad) {
        Ok(c) => c,
        Err(e) => panic!("conv: {e}"),
    }
}

/// One table row: name, decoder count, encoder count, (wall ms, CPU ms), FLOPs.
type Row = (String, usize, usize, (f64, f64), f64);
/// (in, out, k, stride, input side, decoder count, encoder count, upsampling prologue).
type PlainConv = (usize, usize, usize, usize, usize, usize, usize, bool);

/// Per-layer table: each distinct layer shape of the decoder (64² latent) and encoder (512²
/// image) as the VAE runs it (3×3 convolutions read GroupNorm + SiLU of their input through
/// the conv prologue; upsampling convolutions read the 2× nearest upsampled input), its
/// fastest time, and how many times the decoder and the encoder run it.
fn layer_table(cfg: &VaeConfig) {
    let p1 = Padding::same(1);
    let p0 = Padding::same(0);
    let down_pad = Padding {
        top: 0,
        bottom: 1,
        left: 0,
        right: 1,
    };
    let s = Scratch::default();
    let g = cfg.norm_groups;
    // (name, decoder count, encoder count, ms, flops)
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |name: String, dec: usize, enc: usize, flops: f64, f: &mut dyn FnMut()| {
        let ms = time_ms(3, f);
        rows.push((name, dec, enc, ms, flops));
    };
    // 3×3 convs with the GroupNorm + SiLU prologue: (in, out, side, decoder n, encoder n).
    let gn_convs: &[(usize, usize, usize, usize, usize)] = &[
        (32, 32, 512, 5, 4),
        (64, 32, 512, 1, 0),
        (64, 64, 256, 5, 3),
        (128, 64, 256, 1, 0),
        (32, 64, 256, 0, 1),
        (128, 128, 128, 6, 3),
        (64, 128, 128, 0, 1),
        (128, 128, 64, 10, 8),
        (32, 3, 512, 1, 0),
        (128, 16, 64, 0, 1),
    ];
    for &(c, o, side, dn, en) in gn_convs {
        let x = rand_tensor(&[1, c, side, side], 3);
        let cv = conv(c, o, 3, 1, p1, 5);
        let gamma = vec![1.0f32; c];
        let beta = vec![0.0f32; c];
        add(
            format!("gn+silu+conv3x3 {c}->{o} @{side}²"),
            dn,
            en,
            conv_flops(c, o, 3, side, side),
            &mut || {
                let pro = Prologue::GroupNorm {
                    groups: g,
                    weight: &gamma,
                    bias: &beta,
                    eps: 1e-6,
                    silu: true,
                };
                let y = cv.forward_with(&x, pro, None, &s);
                assert!(y.is_ok());
                if let Ok(y) = y {
                    s.give(y.data);
                }
            },
        );
    }
    // Convolutions without GroupNorm (see `PlainConv`).
    let plain: &[PlainConv] = &[
        (64, 32, 1, 1, 512, 1, 0, false),
        (128, 64, 1, 1, 256, 1, 0, false),
        (32, 64, 1, 1, 256, 0, 1, false),
        (64, 128, 1, 1, 128, 0, 1, false),
        (64, 64, 3, 1, 256, 1, 0, true),
        (128, 128, 3, 1, 128, 1, 0, true),
        (128, 128, 3, 1, 64, 1, 0, true),
        (32, 32, 3, 2, 512, 0, 1, false),
        (64, 64, 3, 2, 256, 0, 1, false),
        (128, 128, 3, 2, 128, 0, 1, false),
        (3, 32, 3, 1, 512, 0, 1, false),
        (16, 128, 3, 1, 64, 1, 0, false),
        // Without a prologue, for comparison with the GroupNorm + SiLU rows.
        (32, 32, 3, 1, 512, 0, 0, false),
        (128, 128, 3, 1, 128, 0, 0, false),
    ];
    for &(c, o, k, st, side, dn, en, up) in plain {
        let x = rand_tensor(&[1, c, side, side], 3);
        let pad = match (k, st) {
            (1, _) => p0,
            (_, 2) => down_pad,
            _ => p1,
        };
        let cv = conv(c, o, k, st, pad, 5);
        let out_side = if up { 2 * side } else { side / st };
        let name = if up {
            format!("upsample2x+conv3x3 {c}->{o} @{side}²")
        } else {
            format!("conv{k}x{k}/{st} {c}->{o} @{side}²")
        };
        add(
            name,
            dn,
            en,
            conv_flops(c, o, k, out_side, out_side),
            &mut || {
                let pro = if up {
                    Prologue::Upsample2x
                } else {
                    Prologue::None
                };
                let y = cv.forward_with(&x, pro, None, &s);
                assert!(y.is_ok());
                if let Ok(y) = y {
                    s.give(y.data);
                }
            },
        );
    }
    {
        // Mid-block attention core at 64² (4096 tokens, one head of 128).
        let (n, c) = (64 * 64, 128);
        let q = rand_tensor(&[n, c], 1);
        let k = rand_tensor(&[n, c], 2);
        let v = rand_tensor(&[n, c], 3);
        let mut o = vec![0f32; n * c];
        add(
            "attention 4096 tokens x 128".into(),
            1,
            1,
            4.0 * (n * n * c) as f64,
            &mut || {
                attention(
                    &q.data,
                    &k.data,
                    &v.data,
                    &mut o,
                    1,
                    1,
                    n,
                    n,
                    c,
                    1.0 / (c as f32).sqrt(),
                )
            },
        );
        let x = rand_tensor(&[1, c, 64, 64], 3);
        let gamma = vec![1.0f32; c];
        let beta = vec![0.0f32; c];
        add("group_norm 128 @64²".into(), 1, 1, 0.0, &mut || {
            let y = group_norm(&x, g, &gamma, &beta, 1e-6, false);
            assert!(y.is_ok());
        });
        let x = rand_tensor(&[1, 32, 512, 512], 3);
        let gamma = vec![1.0f32; 32];
        let beta = vec![0.0f32; 32];
        for silu in [false, true] {
            add(
                format!("group_norm silu={silu} 32 @512² (copy)"),
                0,
                0,
                0.0,
                &mut || {
                    let y = group_norm(&x, g, &gamma, &beta, 1e-6, silu);
                    assert!(y.is_ok());
                },
            );
        }
    }
    println!(
        "\nper-layer times (batch 1, fastest of 3 runs after a warm-up; cpu = process CPU time):"
    );
    println!(
        "{:<36} {:>9} {:>9} {:>8} {:>5} {:>5} {:>9} {:>9}",
        "layer", "wall ms", "cpu ms", "GFLOP/s", "dec×", "enc×", "dec ms", "enc ms"
    );
    let (mut td, mut te) = (0.0, 0.0);
    for (name, dn, en, (ms, cpu), flops) in &rows {
        let gf = if *flops > 0.0 {
            format!("{:.1}", flops / ms / 1e6)
        } else {
            "-".into()
        };
        let (d, e) = (*dn as f64 * ms, *en as f64 * ms);
        td += d;
        te += e;
        println!("{name:<36} {ms:>9.2} {cpu:>9.2} {gf:>8} {dn:>5} {en:>5} {d:>9.1} {e:>9.1}");
    }
    println!(
        "{:<36} {:>9} {:>9} {:>8} {:>5} {:>5} {td:>9.1} {te:>9.1}",
        "sum (wall)", "", "", "", "", ""
    );
}

fn bench(c: &mut Criterion) {
    let cfg = VaeConfig::dpir_tiny();
    let weights: HashMap<String, Tensor> = seeded_random_weights(vae_spec(&cfg), 1)
        .into_iter()
        .collect();
    let dec = match VaeDecoder::load(&cfg, &weights) {
        Ok(d) => d,
        Err(e) => panic!("decoder: {e}"),
    };
    let enc = match VaeEncoder::load(&cfg, &weights) {
        Ok(d) => d,
        Err(e) => panic!("encoder: {e}"),
    };
    let z = rand_tensor(&[1, 16, 64, 64], 11);
    let img = rand_tensor(&[1, 3, 512, 512], 12);
    if std::env::var_os("DPIR_BENCH_LAYERS").is_some() {
        layer_table(&cfg);
        let (w, c) = time_ms(3, || assert!(dec.decode(&z).is_ok()));
        println!("whole decoder: fastest wall {w:.1} ms, CPU {c:.1} ms");
        let (w, c) = time_ms(3, || assert!(enc.encode(&img).is_ok()));
        println!("whole encoder: fastest wall {w:.1} ms, CPU {c:.1} ms");
    }
    let mut g = c.benchmark_group("vae_tiny");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    let mut dec_t = Vec::new();
    bench_recorded(&mut g, "decode_64x64_latent", &mut dec_t, || {
        assert!(dec.decode(&z).is_ok())
    });
    let mut enc_t = Vec::new();
    bench_recorded(&mut g, "encode_512x512_image", &mut enc_t, || {
        assert!(enc.encode(&img).is_ok())
    });
    g.finish();
    for (name, t, fl) in [
        (
            "decoder 64² latent",
            &mut dec_t,
            vae_flops(&cfg, true, 64, 64),
        ),
        (
            "encoder 512² image",
            &mut enc_t,
            vae_flops(&cfg, false, 512, 512),
        ),
    ] {
        let m = median(t);
        println!(
            "vae tiny {name}: {:.1} ms, {:.1} GFLOP, {:.1} GFLOP/s",
            m * 1e3,
            fl / 1e9,
            fl / m / 1e9
        );
    }
}

/// Benches `f` as `name`, also recording each sample's mean seconds per call into `times`.
fn bench_recorded(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    times: &mut Vec<f64>,
    mut f: impl FnMut(),
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let s = Instant::now();
            for _ in 0..iters {
                f();
            }
            let e = s.elapsed();
            times.push(e.as_secs_f64() / iters as f64);
            e
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
