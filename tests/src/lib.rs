//! Shared helpers for the integration tests (and the benches): a seeded generator,
//! random weights from a `(name, shape)` spec, safetensors writing/reading, the SD3 MMDiT
//! spec in the original layout, and error measures.

use std::collections::HashMap;
use std::path::Path;

use dpir_engine::Tensor;
use dpir_loader::config::MmditConfig;

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Rounds to the nearest f16 value, so f16 and f32 consumers of a checkpoint see the
/// same numbers.
pub fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// A random tensor with values uniform in `[-scale, scale)`, rounded to f16 values.
pub fn random_tensor(shape: &[usize], rng: &mut Rng, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|_| round_f16(rng.uniform() * scale)).collect();
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

/// Seeded random weights for a spec. Matrices get `U(-1, 1)/√fan_in` (fan_in = product of
/// all dims but the first) so activations keep their scale through deep stacks; vectors
/// (biases) get `U(-0.1, 0.1)`; names ending in `ln_q.weight`/`ln_k.weight` (norm gains)
/// get `1 + U(-0.2, 0.2)`; `pos_embed` gets `U(-0.5, 0.5)`. All values are f16-exact.
pub fn random_weights(spec: &[(String, Vec<usize>)], seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    spec.iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("ln_q.weight") || name.ends_with("ln_k.weight") {
                let mut t = random_tensor(shape, &mut rng, 0.2);
                t.data.iter_mut().for_each(|v| *v = round_f16(1.0 + *v));
                t
            } else if name == "pos_embed" {
                random_tensor(shape, &mut rng, 0.5)
            } else if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                random_tensor(shape, &mut rng, 1.0 / (fan_in as f32).sqrt())
            } else {
                random_tensor(shape, &mut rng, 0.1)
            };
            (name.clone(), t)
        })
        .collect()
}

/// Writes tensors as an f32 safetensors file.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.shape.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("{k}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, &None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads every tensor of an f32/f16/bf16 safetensors file into f32.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let buf = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(format!("{name}: unsupported dtype {other:?}")),
        };
        out.insert(
            name.clone(),
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// The tensors of an SD3 MMDiT in the original layout (no prefix), as candle-transformers
/// and SD3's `mmdit.py` name them: the loader's spec, where `last_context_qk_norm` keeps
/// `ln_q/ln_k` of the last block's qkv-only context stream (SD3.5 checkpoints have them;
/// candle does not read them).
pub fn mmdit_spec(cfg: &MmditConfig, last_context_qk_norm: bool) -> Vec<(String, Vec<usize>)> {
    dpir_loader::mmdit_spec(cfg)
        .into_iter()
        .filter(|(n, _)| last_context_qk_norm || !dpir_loader::mmdit_last_context_qk_norm(cfg, n))
        .collect()
}

/// An SD3-convention config (heads = depth, hidden = head_dim · depth, MLP ratio 4), the
/// only shape family candle's MMDiT can express.
#[allow(clippy::too_many_arguments)]
pub fn sd3_like_config(
    depth: usize,
    head_dim: usize,
    pos_embed_max_size: usize,
    context_dim: usize,
    pooled_dim: usize,
    frequency_embedding_size: usize,
    qk_norm: bool,
    attn2_first: usize,
) -> MmditConfig {
    let hidden = head_dim * depth;
    MmditConfig {
        depth,
        hidden,
        num_heads: depth,
        patch_size: 2,
        in_channels: 16,
        out_channels: 16,
        pos_embed_max_size,
        context_dim,
        pooled_dim,
        frequency_embedding_size,
        mlp_hidden: 4 * hidden,
        qk_norm,
        attn2_blocks: (0..depth).map(|i| i < attn2_first).collect(),
    }
}

/// The matching candle-transformers config.
pub fn candle_config(cfg: &MmditConfig) -> candle_transformers::models::mmdit::model::Config {
    candle_transformers::models::mmdit::model::Config {
        patch_size: cfg.patch_size,
        in_channels: cfg.in_channels,
        out_channels: cfg.out_channels,
        depth: cfg.depth,
        head_size: cfg.head_dim(),
        adm_in_channels: cfg.pooled_dim,
        pos_embed_max_size: cfg.pos_embed_max_size,
        context_embed_size: cfg.context_dim,
        frequency_embedding_size: cfg.frequency_embedding_size,
    }
}

/// Our tensor as a candle tensor of the given dtype on the CPU.
pub fn to_candle(
    t: &Tensor,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_core::Tensor> {
    candle_core::Tensor::from_vec(
        t.data.clone(),
        t.shape.as_slice(),
        &candle_core::Device::Cpu,
    )?
    .to_dtype(dtype)
}

/// A candle tensor (any float dtype) as ours, in f32.
pub fn from_candle(t: &candle_core::Tensor) -> candle_core::Result<Tensor> {
    let t32 = t.to_dtype(candle_core::DType::F32)?;
    let data = t32.flatten_all()?.to_vec1::<f32>()?;
    Ok(Tensor {
        shape: t.dims().to_vec(),
        data,
    })
}

/// `max |a − b| / max |b|`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The benchmark's "mid" MMDiT: depth 8, hidden 512 (8 heads of 64), SD3 context and
/// pooled widths. Run it on a 64×64 latent with 154 context tokens.
pub fn mid_config() -> MmditConfig {
    sd3_like_config(8, 64, 64, 4096, 2048, 256, false, 0)
}

/// The benchmark's tiny MMDiT: depth 4, hidden 256 (4 heads of 64). Run it on a 32×32
/// latent with 16 context tokens.
pub fn tiny_bench_config() -> MmditConfig {
    sd3_like_config(4, 64, 32, 256, 128, 256, false, 0)
}

/// Seeded inputs `(x [B, C, H, W], timesteps [B], y [B, pooled], context [B, L, ctx])`.
pub fn mmdit_inputs(
    cfg: &MmditConfig,
    batch: usize,
    h: usize,
    w: usize,
    l: usize,
    seed: u64,
) -> (Tensor, Vec<f32>, Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let x = random_tensor(&[batch, cfg.in_channels, h, w], &mut rng, 1.0);
    let y = random_tensor(&[batch, cfg.pooled_dim], &mut rng, 1.0);
    let ctx = random_tensor(&[batch, l, cfg.context_dim], &mut rng, 1.0);
    let t = (0..batch)
        .map(|i| 1000.0 * (0.9 - 0.5 * i as f32 / batch as f32))
        .collect();
    (x, t, y, ctx)
}

/// candle's `MMDiT` on our weights (same numbers; `dtype` F16 is the only one its CPU
/// forward runs in).
pub fn candle_mmdit(
    cfg: &MmditConfig,
    weights: &HashMap<String, Tensor>,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_transformers::models::mmdit::model::MMDiT> {
    let mut map = HashMap::new();
    for (k, t) in weights {
        map.insert(k.clone(), to_candle(t, dtype)?);
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, &candle_core::Device::Cpu);
    candle_transformers::models::mmdit::model::MMDiT::new(&candle_config(cfg), false, vb)
}

/// One candle MMDiT forward on our inputs (converted to `dtype`), returned in f32.
pub fn candle_mmdit_forward(
    model: &candle_transformers::models::mmdit::model::MMDiT,
    x: &Tensor,
    t: &[f32],
    y: &Tensor,
    ctx: &Tensor,
    dtype: candle_core::DType,
) -> candle_core::Result<Tensor> {
    let tc = candle_core::Tensor::from_vec(t.to_vec(), t.len(), &candle_core::Device::Cpu)?;
    let out = model.forward(
        &to_candle(x, dtype)?,
        &tc,
        &to_candle(y, dtype)?,
        &to_candle(ctx, dtype)?,
        None,
    )?;
    from_candle(&out)
}

/// Multiply-adds ×2 of one MMDiT forward (Linear layers and attention), the figure
/// GFLOP/s numbers are computed from.
pub fn mmdit_flops(cfg: &MmditConfig, batch: usize, h: usize, w: usize, l: usize) -> f64 {
    let d = cfg.hidden as f64;
    let n = ((h / cfg.patch_size) * (w / cfg.patch_size)) as f64;
    let l = l as f64;
    let mlp = cfg.mlp_hidden as f64;
    let mut f = 0.0;
    for i in 0..cfg.depth {
        let last = i + 1 == cfg.depth;
        let attn2 = cfg.attn2_blocks.get(i).copied().unwrap_or(false);
        // x stream: qkv, proj, mlp; context stream: qkv (+ proj, mlp unless last).
        f += n * (3.0 * d * d + d * d + 2.0 * d * mlp);
        f += l * 3.0 * d * d;
        if !last {
            f += l * (d * d + 2.0 * d * mlp);
        }
        // Joint attention: q·kᵀ and p·v over n + l tokens.
        f += 2.0 * (n + l) * (n + l) * d;
        if attn2 {
            f += n * 4.0 * d * d + 2.0 * n * n * d;
        }
    }
    f += l * d * cfg.context_dim as f64;
    f += n * d * (cfg.in_channels * cfg.patch_size * cfg.patch_size) as f64;
    f += n * d * (cfg.patch_size * cfg.patch_size * cfg.out_channels) as f64;
    2.0 * f * batch as f64
}
