//! Our CPU MMDiT against candle-transformers 0.11.1 on the same tiny random weights,
//! written once as an SD3 original-layout safetensors file and loaded by both.
//!
//! candle's `MMDiT` runs only in F16 on the CPU (its timestep embedding casts to F16), so
//! the whole-model comparison is at 5e-3. candle's blocks and embedders are public, so
//! the test also assembles the same graph from them (`CandleRef`) and runs it in F16
//! (checked against `MMDiT::forward` itself, then per block at 5e-3) and in F32 (per
//! block and on the output at 1e-5, the real check of our arithmetic).

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mmdit::blocks::{
    ContextQkvOnlyJointBlock, FinalLayer, JointBlock, MMDiTJointBlock, MMDiTXJointBlock,
};
use candle_transformers::models::mmdit::embedding::{
    PatchEmbedder, PositionEmbedder, Unpatchifier, VectorEmbedder,
};
use candle_transformers::models::mmdit::model::MMDiT;
use dpir_engine::models::mmdit::{align_and_add, LqInject, Mmdit};
use dpir_engine::Tensor;
use dpir_loader::config::MmditConfig;
use dpir_tests::{
    candle_config, from_candle, mmdit_spec, random_tensor, random_weights, read_safetensors,
    rel_err, sd3_like_config, to_candle, write_safetensors, Rng,
};

type R<T> = Result<T, Box<dyn std::error::Error>>;
/// Per joint block: (context output, x output); the last block has no context output.
type Trace = Vec<(Option<Tensor>, Tensor)>;

/// candle's MMDiT graph assembled from its public parts, in any dtype, with per-block
/// outputs.
struct CandleRef {
    patch: PatchEmbedder,
    pos: PositionEmbedder,
    t0: candle_nn::Linear,
    t2: candle_nn::Linear,
    y: VectorEmbedder,
    ctx: candle_nn::Linear,
    blocks: Vec<Box<dyn JointBlock>>,
    last: ContextQkvOnlyJointBlock,
    fin: FinalLayer,
    unpatch: Unpatchifier,
    freq: usize,
    dtype: DType,
}

impl CandleRef {
    fn new(cfg: &MmditConfig, vb: VarBuilder, dtype: DType) -> R<Self> {
        let d = cfg.hidden;
        let heads = cfg.num_heads;
        let mut blocks: Vec<Box<dyn JointBlock>> = Vec::new();
        for i in 0..cfg.depth - 1 {
            let p = vb.pp(format!("joint_blocks.{i}"));
            if cfg.attn2_blocks[i] {
                blocks.push(Box::new(MMDiTXJointBlock::new(d, heads, false, p)?));
            } else {
                blocks.push(Box::new(MMDiTJointBlock::new(d, heads, false, p)?));
            }
        }
        Ok(Self {
            patch: PatchEmbedder::new(cfg.patch_size, cfg.in_channels, d, vb.pp("x_embedder"))?,
            pos: PositionEmbedder::new(d, cfg.patch_size, cfg.pos_embed_max_size, vb.clone())?,
            t0: candle_nn::linear(cfg.frequency_embedding_size, d, vb.pp("t_embedder.mlp.0"))?,
            t2: candle_nn::linear(d, d, vb.pp("t_embedder.mlp.2"))?,
            y: VectorEmbedder::new(cfg.pooled_dim, d, vb.pp("y_embedder"))?,
            ctx: candle_nn::linear(cfg.context_dim, d, vb.pp("context_embedder"))?,
            blocks,
            last: ContextQkvOnlyJointBlock::new(
                d,
                heads,
                false,
                vb.pp(format!("joint_blocks.{}", cfg.depth - 1)),
            )?,
            fin: FinalLayer::new(d, cfg.patch_size, cfg.out_channels, vb.pp("final_layer"))?,
            unpatch: Unpatchifier::new(cfg.patch_size, cfg.out_channels)?,
            freq: cfg.frequency_embedding_size,
            dtype,
        })
    }

    /// Output and per-block (context, x) outputs (the last block has no context output).
    fn forward(&self, x: &Tensor, t: &[f32], y: &Tensor, ctx: &Tensor) -> R<(Tensor, Trace)> {
        let dev = Device::Cpu;
        let (h, w) = (x.shape[2], x.shape[3]);
        let xc = to_candle(x, self.dtype)?;
        let mut xt = self
            .patch
            .forward(&xc)?
            .broadcast_add(&self.pos.get_cropped_pos_embed(h, w)?)?;
        // Sinusoidal embedding exactly as candle's private `timestep_embedding` computes it.
        let half = self.freq / 2;
        let freqs = (CTensor::arange(0f32, half as f32, &dev)? * (-(10000f64.ln()) / half as f64))?
            .exp()?;
        let tt = CTensor::from_vec(t.to_vec(), (t.len(), 1), &dev)?;
        let args = tt.matmul(&freqs.unsqueeze(0)?)?;
        let tf = CTensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(self.dtype)?;
        let te = self
            .t2
            .forward(&candle_nn::ops::silu(&self.t0.forward(&tf)?)?)?;
        let c = (te + self.y.forward(&to_candle(y, self.dtype)?)?)?;
        let mut cx = self.ctx.forward(&to_candle(ctx, self.dtype)?)?;
        let mut trace = Vec::new();
        for blk in &self.blocks {
            (cx, xt) = blk.forward(&cx, &xt, &c)?;
            trace.push((Some(from_candle(&cx)?), from_candle(&xt)?));
        }
        xt = self.last.forward(&cx, &xt, &c)?;
        trace.push((None, from_candle(&xt)?));
        let out = self.unpatch.unpatchify(&self.fin.forward(&xt, &c)?, h, w)?;
        Ok((from_candle(&out)?, trace))
    }
}

struct Case {
    cfg: MmditConfig,
    x: Tensor,
    t: Vec<f32>,
    y: Tensor,
    ctx: Tensor,
    file: PathBuf,
}

fn case(
    name: &str,
    cfg: MmditConfig,
    batch: usize,
    h: usize,
    w: usize,
    l: usize,
    seed: u64,
) -> R<Case> {
    let weights = random_weights(&mmdit_spec(&cfg, false), seed);
    let file = std::env::temp_dir().join(format!(
        "dpir-mmdit-{name}-{}.safetensors",
        std::process::id()
    ));
    write_safetensors(&file, &weights)?;
    let mut rng = Rng::new(seed + 1);
    let x = random_tensor(&[batch, cfg.in_channels, h, w], &mut rng, 1.0);
    let y = random_tensor(&[batch, cfg.pooled_dim], &mut rng, 1.0);
    let ctx = random_tensor(&[batch, l, cfg.context_dim], &mut rng, 1.0);
    let t = (0..batch)
        .map(|i| 1000.0 * (0.9 - 0.5 * i as f32 / batch as f32))
        .collect();
    Ok(Case {
        cfg,
        x,
        t,
        y,
        ctx,
        file,
    })
}

fn check_against_candle(c: &Case) -> R<()> {
    let ours_w = read_safetensors(&c.file).map_err(|e| e.to_string())?;
    let ours = Mmdit::load(&c.cfg, &ours_w)?;
    let (out, trace) = ours.forward_with_block_outputs(&c.x, &c.t, &c.y, &c.ctx)?;
    assert_eq!(out.shape, c.x.shape);
    assert_eq!(trace.len(), c.cfg.depth);

    // SAFETY: the file was written by this test and is not modified while mapped.
    let vb16 = unsafe {
        VarBuilder::from_mmaped_safetensors(
            std::slice::from_ref(&c.file),
            DType::F16,
            &Device::Cpu,
        )?
    };
    // SAFETY: as above.
    let vb32 = unsafe {
        VarBuilder::from_mmaped_safetensors(
            std::slice::from_ref(&c.file),
            DType::F32,
            &Device::Cpu,
        )?
    };

    // candle's own model, F16 (the only dtype its CPU path runs in).
    let model = MMDiT::new(&candle_config(&c.cfg), false, vb16.clone())?;
    let tc = CTensor::from_vec(c.t.clone(), c.t.len(), &Device::Cpu)?;
    let out_model = from_candle(&model.forward(
        &to_candle(&c.x, DType::F16)?,
        &tc,
        &to_candle(&c.y, DType::F16)?,
        &to_candle(&c.ctx, DType::F16)?,
        None,
    )?)?;

    let (out16, trace16) =
        CandleRef::new(&c.cfg, vb16, DType::F16)?.forward(&c.x, &c.t, &c.y, &c.ctx)?;
    let (out32, trace32) =
        CandleRef::new(&c.cfg, vb32, DType::F32)?.forward(&c.x, &c.t, &c.y, &c.ctx)?;

    // The assembled reference is candle's graph: identical to MMDiT::forward in F16.
    let e_asm = rel_err(&out16.data, &out_model.data);
    let e_model = rel_err(&out.data, &out_model.data);
    let e32 = rel_err(&out.data, &out32.data);
    eprintln!(
        "{}: output rel err vs candle MMDiT (F16) {e_model:.2e}, vs candle graph F32 {e32:.2e}; assembled-vs-MMDiT {e_asm:.2e}",
        c.file.display()
    );
    assert!(
        e_asm <= 1e-3,
        "assembled candle graph differs from candle's MMDiT: {e_asm}"
    );
    assert!(e_model <= 5e-3, "output vs candle MMDiT F16: {e_model}");
    assert!(e32 <= 1e-5, "output vs candle F32 graph: {e32}");
    for (i, ((ob, (c16, x16)), (c32, x32))) in trace.iter().zip(&trace16).zip(&trace32).enumerate()
    {
        let ex16 = rel_err(&ob.x.data, &x16.data);
        let ex32 = rel_err(&ob.x.data, &x32.data);
        let (ec16, ec32) = match (&ob.context, c16, c32) {
            (Some(o), Some(a), Some(b)) => (rel_err(&o.data, &a.data), rel_err(&o.data, &b.data)),
            (None, None, None) => (0.0, 0.0),
            _ => panic!("block {i}: context output present on one side only"),
        };
        eprintln!("  block {i}: x {ex16:.2e} (F16) {ex32:.2e} (F32); context {ec16:.2e} (F16) {ec32:.2e} (F32)");
        assert!(
            ex16 <= 5e-3 && ec16 <= 5e-3,
            "block {i} vs candle F16: x {ex16}, context {ec16}"
        );
        assert!(
            ex32 <= 1e-5 && ec32 <= 1e-5,
            "block {i} vs candle F32: x {ex32}, context {ec32}"
        );
    }
    std::fs::remove_file(&c.file)?;
    Ok(())
}

#[test]
fn sd3_matches_candle() -> R<()> {
    // depth 3, head dim 16 (hidden 48, 3 heads), a non-square 8×12 latent cropped from a
    // 8×8 positional grid, batch 2 at different timesteps, 5 context tokens.
    let cfg = sd3_like_config(3, 16, 8, 32, 24, 64, false, 0);
    check_against_candle(&case("sd3", cfg, 2, 8, 12, 5, 11)?)
}

#[test]
fn mmditx_matches_candle() -> R<()> {
    // SD3.5-medium shape family: qk RMSNorm everywhere candle reads it, attn2 in blocks 0-1.
    let cfg = sd3_like_config(4, 16, 6, 40, 20, 32, true, 2);
    check_against_candle(&case("mmditx", cfg, 1, 10, 6, 7, 23)?)
}

fn tiny_model(l: usize) -> R<(Mmdit, Case)> {
    let cfg = sd3_like_config(2, 16, 8, 32, 24, 64, true, 1);
    let c = case("gate", cfg, 2, 8, 8, l, 5)?;
    let w = read_safetensors(&c.file).map_err(|e| e.to_string())?;
    std::fs::remove_file(&c.file)?;
    Ok((Mmdit::load(&c.cfg, &w)?, c))
}

#[test]
fn zero_gate_is_exactly_plain_sd3() -> R<()> {
    for l in [0, 4] {
        let (m, c) = tiny_model(l)?;
        let n = (c.x.shape[2] / 2) * (c.x.shape[3] / 2);
        let d = c.cfg.hidden;
        let mut rng = Rng::new(99);
        let tokens = random_tensor(&[2, n, d], &mut rng, 3.0);
        let plain = m.forward(&c.x, &c.t, &c.y, &c.ctx, None)?;
        let zero = vec![0f32; d];
        let gated0 = m.forward(
            &c.x,
            &c.t,
            &c.y,
            &c.ctx,
            Some(LqInject {
                tokens: &tokens,
                gate: &zero,
            }),
        )?;
        assert!(
            plain
                .data
                .iter()
                .zip(&gated0.data)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "zero gate changed the output (L = {l})"
        );
        let mut gate = vec![0f32; d];
        gate[3] = 0.5;
        let gated = m.forward(
            &c.x,
            &c.t,
            &c.y,
            &c.ctx,
            Some(LqInject {
                tokens: &tokens,
                gate: &gate,
            }),
        )?;
        let e = rel_err(&gated.data, &plain.data);
        assert!(
            e > 1e-4,
            "a non-zero gate left the output unchanged (rel diff {e}, L = {l})"
        );
        assert!(plain.data.iter().all(|v| v.is_finite()));
    }
    Ok(())
}

#[test]
fn align_and_add_matches_formula() {
    let (b, n, d) = (2, 5, 3);
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..b * n * d).map(|_| rng.uniform() * 2.0 + 0.5).collect();
    let f: Vec<f32> = (0..b * n * d).map(|_| rng.uniform() * 10.0 - 3.0).collect();
    let gate = [0.0f32, 0.7, -1.3];
    let mut got = x.clone();
    align_and_add(&mut got, &f, &gate, b, n, d);
    for bi in 0..b {
        for ch in 0..d {
            let col = |a: &[f32]| {
                (0..n)
                    .map(|t| a[(bi * n + t) * d + ch] as f64)
                    .collect::<Vec<f64>>()
            };
            let (xc, fc) = (col(&x), col(&f));
            let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
            let std = |v: &[f64], m: f64| {
                (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / n as f64).sqrt()
            };
            let (mx, mf) = (mean(&xc), mean(&fc));
            let (sx, sf) = (std(&xc, mx), std(&fc, mf));
            for t in 0..n {
                let want = xc[t] + gate[ch] as f64 * ((fc[t] - mf) / (sf + 1e-6) * sx + mx);
                let g = got[(bi * n + t) * d + ch] as f64;
                assert!(
                    (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "b{bi} t{t} c{ch}: {g} vs {want}"
                );
            }
        }
    }
    // Channel 0 has a zero gate: untouched bit for bit.
    for i in (0..b * n * d).step_by(d) {
        assert_eq!(got[i].to_bits(), x[i].to_bits());
    }
}

#[test]
fn bad_inputs_are_errors() -> R<()> {
    let (m, c) = tiny_model(3)?;
    let bad_x = Tensor::zeros(&[2, 16, 7, 8]);
    assert!(m.forward(&bad_x, &c.t, &c.y, &c.ctx, None).is_err());
    assert!(m.forward(&c.x, &c.t[..1], &c.y, &c.ctx, None).is_err());
    let big = Tensor::zeros(&[2, 16, 18, 8]);
    assert!(m.forward(&big, &c.t, &c.y, &c.ctx, None).is_err());
    let tokens = Tensor::zeros(&[2, 3, c.cfg.hidden]);
    let gate = vec![0f32; c.cfg.hidden];
    assert!(m
        .forward(
            &c.x,
            &c.t,
            &c.y,
            &c.ctx,
            Some(LqInject {
                tokens: &tokens,
                gate: &gate
            })
        )
        .is_err());
    Ok(())
}
