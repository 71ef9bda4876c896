//! Our CPU CLIP vision tower against candle-transformers 0.11.1
//! `clip::vision_model::ClipVisionTransformer`, both in F32, on the same seeded random
//! weights in the Hugging Face `CLIPVisionModelWithProjection` layout
//! (`vision_model.*`, `visual_projection.weight`).
//!
//! candle's transformer returns `post_layernorm(cls)` and, from `output_hidden_states`,
//! every layer's output; the penultimate hidden state (the input of the last layer) is
//! entry `layers − 2`. candle keeps `visual_projection` in its `ClipModel`, a bias-free
//! Linear; the test applies it with `candle_nn::linear_no_bias` on candle's pooled output.
//! candle fixes the LayerNorm eps at 1e-5, which is what HF CLIP checkpoints use.

use std::collections::HashMap;

use candle_core::{DType, Device, Module};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{
    ClipVisionConfig as CandleClipConfig, ClipVisionTransformer,
};
use dpir_engine::models::clip::{preprocess, ClipVision};
use dpir_engine::Tensor;
use dpir_loader::config::ClipVisionConfig;
use dpir_tests::{from_candle, random_tensor, random_weights, rel_err, round_f16, to_candle, Rng};

type R<T> = Result<T, Box<dyn std::error::Error>>;

const TOL: f32 = 1e-5;

fn config(
    hidden: usize,
    layers: usize,
    heads: usize,
    projection_dim: Option<usize>,
) -> ClipVisionConfig {
    ClipVisionConfig {
        hidden,
        intermediate: 4 * hidden,
        layers,
        heads,
        patch_size: 8,
        image_size: 32,
        num_channels: 3,
        projection_dim,
        layer_norm_eps: 1e-5,
    }
}

fn hf_spec(cfg: &ClipVisionConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden;
    let p = cfg.patch_size;
    let positions = (cfg.image_size / p).pow(2) + 1;
    let mut s: Vec<(String, Vec<usize>)> = vec![
        ("vision_model.embeddings.class_embedding".into(), vec![d]),
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![d, cfg.num_channels, p, p],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![positions, d],
        ),
    ];
    let vec2 = |s: &mut Vec<(String, Vec<usize>)>, n: &str, o: usize, i: usize| {
        s.push((format!("{n}.weight"), vec![o, i]));
        s.push((format!("{n}.bias"), vec![o]));
    };
    let ln = |s: &mut Vec<(String, Vec<usize>)>, n: &str| {
        s.push((format!("{n}.weight"), vec![d]));
        s.push((format!("{n}.bias"), vec![d]));
    };
    ln(&mut s, "vision_model.pre_layrnorm");
    for i in 0..cfg.layers {
        let l = format!("vision_model.encoder.layers.{i}");
        ln(&mut s, &format!("{l}.layer_norm1"));
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            vec2(&mut s, &format!("{l}.self_attn.{p}"), d, d);
        }
        ln(&mut s, &format!("{l}.layer_norm2"));
        vec2(&mut s, &format!("{l}.mlp.fc1"), cfg.intermediate, d);
        vec2(&mut s, &format!("{l}.mlp.fc2"), d, cfg.intermediate);
    }
    ln(&mut s, "vision_model.post_layernorm");
    if let Some(pd) = cfg.projection_dim {
        s.push(("visual_projection.weight".into(), vec![pd, d]));
    }
    s
}

/// Seeded weights: matrices `U(-1, 1)/√fan_in`, vectors `U(-0.1, 0.1)`, LayerNorm gains
/// `1 + U(-0.2, 0.2)`, the class embedding `U(-1, 1)`.
fn weights(cfg: &ClipVisionConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut w = random_weights(&hf_spec(cfg), seed);
    let mut rng = Rng::new(seed ^ 0x5A5A);
    for (name, t) in w.iter_mut() {
        if (name.contains("layer_norm") || name.contains("layrnorm")) && name.ends_with(".weight") {
            t.data
                .iter_mut()
                .for_each(|v| *v = round_f16(1.0 + 0.2 * rng.uniform()));
        } else if name.ends_with("class_embedding") {
            t.data
                .iter_mut()
                .for_each(|v| *v = round_f16(rng.uniform()));
        }
    }
    w
}

fn check(cfg: &ClipVisionConfig, seed: u64, b: usize) -> R<()> {
    let w = weights(cfg, seed);
    let ours = ClipVision::load(cfg, &w)?;
    let mut ts = HashMap::new();
    for (k, t) in &w {
        ts.insert(k.clone(), to_candle(t, DType::F32)?);
    }
    let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
    let ccfg = CandleClipConfig {
        embed_dim: cfg.hidden,
        activation: Activation::QuickGelu,
        intermediate_size: cfg.intermediate,
        num_hidden_layers: cfg.layers,
        num_attention_heads: cfg.heads,
        projection_dim: cfg.projection_dim.unwrap_or(cfg.hidden),
        num_channels: cfg.num_channels,
        image_size: cfg.image_size,
        patch_size: cfg.patch_size,
    };
    let candle = ClipVisionTransformer::new(vb.pp("vision_model"), &ccfg)?;

    let mut rng = Rng::new(seed + 1);
    let s = cfg.image_size;
    let pixels = random_tensor(&[b, 3, s, s], &mut rng, 2.0);
    let out = ours.forward(&pixels)?;

    let hidden = candle.output_hidden_states(&to_candle(&pixels, DType::F32)?)?;
    let pen = from_candle(&hidden[cfg.layers - 2])?;
    let mut pooled_c = hidden[cfg.layers].clone();
    if let Some(pd) = cfg.projection_dim {
        let proj = candle_nn::linear_no_bias(cfg.hidden, pd, vb.pp("visual_projection"))?;
        pooled_c = proj.forward(&pooled_c)?;
    }
    let pooled = from_candle(&pooled_c)?;
    // The pooled output also equals candle's `forward` (the cls row of its last layer).
    let direct = from_candle(&candle.forward(&to_candle(&pixels, DType::F32)?)?)?;

    let tokens = (s / cfg.patch_size).pow(2) + 1;
    assert_eq!(out.penultimate.shape, [b, tokens, cfg.hidden]);
    assert_eq!(out.penultimate.shape, pen.shape);
    assert_eq!(out.pooled.shape, pooled.shape);
    let e_pen = rel_err(&out.penultimate.data, &pen.data);
    let e_pool = rel_err(&out.pooled.data, &pooled.data);
    println!(
        "clip hidden {} layers {} heads {} proj {:?}: penultimate rel err {e_pen:.2e}, pooled rel err {e_pool:.2e}",
        cfg.hidden, cfg.layers, cfg.heads, cfg.projection_dim
    );
    assert!(e_pen <= TOL, "penultimate rel err {e_pen}");
    assert!(e_pool <= TOL, "pooled rel err {e_pool}");
    if cfg.projection_dim.is_none() {
        let e = rel_err(&out.pooled.data, &direct.data);
        assert!(e <= TOL, "pooled vs candle forward: {e}");
    }
    Ok(())
}

#[test]
fn clip_vision_matches_candle_with_projection() -> R<()> {
    check(&config(64, 2, 4, Some(32)), 5, 2)
}

#[test]
fn clip_vision_matches_candle_without_projection() -> R<()> {
    check(&config(64, 3, 2, None), 9, 1)
}

#[test]
fn preprocess_then_forward() -> R<()> {
    // The preprocessing output feeds the tower at its image size.
    let cfg = config(64, 2, 4, Some(32));
    let ours = ClipVision::load(&cfg, &weights(&cfg, 5))?;
    let mut rng = Rng::new(3);
    let img = random_tensor(&[3, 40, 56], &mut rng, 1.0);
    let px = preprocess(&img, cfg.image_size)?;
    assert_eq!(px.shape, [3, 32, 32]);
    let out = ours.forward(&px.reshape(&[1, 3, 32, 32])?)?;
    assert_eq!(out.pooled.shape, [1, 32]);
    assert!(ours.forward(&Tensor::zeros(&[1, 3, 24, 24])).is_err());
    Ok(())
}
