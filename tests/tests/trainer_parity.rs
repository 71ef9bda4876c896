//! The trainer (PyTorch, `trainer/`) and the inference side agree on the exported weights.
//!
//! `tests/fixtures/trainer_parity/` holds a tiny random dpir model exported by the trainer
//! exactly as it exports dpir-tiny (real layouts, f16 storage) and the trainer's f32
//! outputs for each component (`io.safetensors`; regenerate with
//! `python3 -m trainer.make_parity_fixtures`, which documents every tensor).
//!
//! - Always: the files are in the real layouts, and the trainer's CLIP vision and VAE
//!   outputs equal candle's (an independent implementation) on those weights.
//! - The engine's MMDiT (with and without LQ injection), VAE encoder/decoder, robust
//!   encoder, CLIP vision, LQ branch and prompt MLPs, loaded through `dpir_loader::load`,
//!   equal the trainer's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/trainer_parity")
        .join(name)
}

/// All tensors of a fixture file, cast to f32.
fn load_f32(name: &str) -> Res<HashMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(fixture(name), &Device::Cpu)?;
    let mut out = HashMap::new();
    for (k, v) in raw {
        out.insert(k, v.to_dtype(DType::F32)?);
    }
    Ok(out)
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> Res<&'a Tensor> {
    m.get(k)
        .ok_or_else(|| format!("fixture has no tensor {k}").into())
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Res<f32> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} vs {:?}", a.dims(), b.dims()).into());
    }
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> Res<()> {
    let e = rel_err(got, want)?;
    eprintln!("{what}: relative error {e:e}");
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
    Ok(())
}

fn config() -> Res<serde_json::Value> {
    let text = std::fs::read_to_string(fixture("trainer_config.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn cfg_usize(c: &serde_json::Value, k: &str) -> Res<usize> {
    c[k].as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| format!("trainer_config.json has no integer {k}").into())
}

#[test]
fn fixture_weights_use_the_real_layouts() -> Res<()> {
    let c = config()?;
    let depth = cfg_usize(&c, "depth")?;
    let hidden = cfg_usize(&c, "hidden")?;
    for file in [
        "mmdit.safetensors",
        "vae.safetensors",
        "clip_vision.safetensors",
        "dpir.safetensors",
    ] {
        let raw = candle_core::safetensors::load(fixture(file), &Device::Cpu)?;
        assert!(!raw.is_empty(), "{file} is empty");
        for (k, v) in &raw {
            assert_eq!(v.dtype(), DType::F16, "{file}: {k} is not f16");
        }
    }
    let m = load_f32("mmdit.safetensors")?;
    assert_eq!(
        get(&m, "x_embedder.proj.weight")?.dims(),
        &[hidden, 16, 2, 2]
    );
    assert_eq!(get(&m, "pos_embed")?.dims()[2], hidden);
    let last = format!("joint_blocks.{}.context_block.", depth - 1);
    assert!(m.contains_key(&format!("{last}attn.qkv.weight")));
    assert!(!m.contains_key(&format!("{last}attn.proj.weight")));
    assert!(!m.contains_key(&format!("{last}mlp.fc1.weight")));
    assert_eq!(
        get(&m, &format!("{last}adaLN_modulation.1.weight"))?.dims(),
        &[2 * hidden, hidden]
    );
    assert_eq!(
        get(&m, "joint_blocks.0.context_block.adaLN_modulation.1.weight")?.dims(),
        &[6 * hidden, hidden]
    );
    assert!(!m.keys().any(|k| k.contains("ln_q") || k.contains("attn2")));
    let v = load_f32("vae.safetensors")?;
    assert!(v.contains_key("encoder.mid.attn_1.proj_out.weight"));
    assert!(v.contains_key("decoder.up.1.upsample.conv.weight"));
    assert!(!v.keys().any(|k| k.contains("quant_conv")));
    assert_eq!(get(&v, "encoder.conv_out.weight")?.dims()[0], 32);
    let d = load_f32("dpir.safetensors")?;
    assert_eq!(get(&d, "lq_align.gate")?.dims(), &[hidden]);
    assert!(d.contains_key("robust_encoder.mid.attn_1.q.weight"));
    assert!(d.contains_key("lq_branch.proj.weight"));
    // The LQ injection changes the output, so comparing with it cannot pass vacuously.
    let io = load_f32("io.safetensors")?;
    let with = get(&io, "mmdit.out")?;
    let without = get(&io, "mmdit.out_plain")?;
    assert!(
        rel_err(with, without)? > 1e-2,
        "the LQ injection has no visible effect"
    );
    Ok(())
}

#[test]
fn trainer_clip_vision_matches_candle() -> Res<()> {
    let c = config()?;
    let w = load_f32("clip_vision.safetensors")?;
    let io = load_f32("io.safetensors")?;
    let layers = cfg_usize(&c, "clip_layers")?;
    let cc = ClipVisionConfig {
        embed_dim: cfg_usize(&c, "clip_width")?,
        activation: Activation::QuickGelu,
        intermediate_size: cfg_usize(&c, "clip_mlp")?,
        num_hidden_layers: layers,
        num_attention_heads: cfg_usize(&c, "clip_heads")?,
        projection_dim: 0,
        num_channels: 3,
        image_size: cfg_usize(&c, "clip_image")?,
        patch_size: cfg_usize(&c, "clip_patch")?,
    };
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let model = ClipVisionTransformer::new(vb.pp("vision_model"), &cc)?;
    // One entry per layer output, then post_layernorm(cls).
    let states = model.output_hidden_states(get(&io, "clip.pixels")?)?;
    assert_eq!(states.len(), layers + 1);
    assert_close(
        "clip penultimate",
        &states[layers - 2],
        get(&io, "clip.penultimate")?,
    )?;
    assert_close("clip pooled", &states[layers], get(&io, "clip.pooled")?)?;
    Ok(())
}

/// LDM (SD3 original) VAE names → diffusers names, as candle reads them.
fn ldm_to_diffusers(key: &str, levels: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let next = parts.get(i + 1).copied();
        match (p, next) {
            ("down", Some(n)) => {
                out.push(format!("down_blocks.{n}"));
                i += 2;
                continue;
            }
            ("up", Some(n)) => {
                let idx: usize = n.parse().unwrap_or(0);
                out.push(format!("up_blocks.{}", levels - 1 - idx));
                i += 2;
                continue;
            }
            ("block", Some(n)) if n.chars().all(|ch| ch.is_ascii_digit()) => {
                out.push(format!("resnets.{n}"));
                i += 2;
                continue;
            }
            ("downsample", _) => out.push("downsamplers.0".into()),
            ("upsample", _) => out.push("upsamplers.0".into()),
            ("mid", _) => out.push("mid_block".into()),
            ("block_1", _) => out.push("resnets.0".into()),
            ("block_2", _) => out.push("resnets.1".into()),
            ("attn_1", _) => out.push("attentions.0".into()),
            ("norm", _) => out.push("group_norm".into()),
            ("q", _) => out.push("query".into()),
            ("k", _) => out.push("key".into()),
            ("v", _) => out.push("value".into()),
            ("proj_out", _) => out.push("proj_attn".into()),
            ("nin_shortcut", _) => out.push("conv_shortcut".into()),
            ("norm_out", _) => out.push("conv_norm_out".into()),
            _ => out.push(p.to_string()),
        }
        i += 1;
    }
    out.join(".")
}

/// candle's AutoEncoderKL on LDM-named weights. Its `encode` only samples, so a
/// `quant_conv` passes the mean through and pins the log-variance at its floor (std
/// e^-15): the sample is then the posterior mean to well within the tolerance.
fn candle_vae(
    enc_dec: HashMap<String, Tensor>,
    channels: Vec<usize>,
    layers: usize,
) -> Res<AutoEncoderKL> {
    let levels = channels.len();
    let mut w: HashMap<String, Tensor> = enc_dec
        .into_iter()
        .map(|(k, v)| (ldm_to_diffusers(&k, levels), v))
        .collect();
    let z = 16;
    let mut qw = vec![0f32; 2 * z * 2 * z];
    for c in 0..z {
        qw[c * 2 * z + c] = 1.0;
    }
    let mut qb = vec![0f32; 2 * z];
    for b in qb.iter_mut().skip(z) {
        *b = -100.0;
    }
    w.insert(
        "quant_conv.weight".into(),
        Tensor::from_vec(qw, (2 * z, 2 * z, 1, 1), &Device::Cpu)?,
    );
    w.insert(
        "quant_conv.bias".into(),
        Tensor::from_vec(qb, 2 * z, &Device::Cpu)?,
    );
    let cfg = AutoEncoderKLConfig {
        block_out_channels: channels,
        layers_per_block: layers,
        latent_channels: z,
        norm_num_groups: 32,
        use_quant_conv: true,
        use_post_quant_conv: false,
    };
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    Ok(AutoEncoderKL::new(vb, 3, 3, cfg)?)
}

fn vae_shape(c: &serde_json::Value) -> Res<(Vec<usize>, usize)> {
    let ch = c["vae_channels"]
        .as_array()
        .ok_or("trainer_config.json has no vae_channels")?
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as usize))
        .collect();
    Ok((ch, cfg_usize(c, "vae_layers")?))
}

#[test]
fn trainer_vae_matches_candle() -> Res<()> {
    let c = config()?;
    let (ch, layers) = vae_shape(&c)?;
    let io = load_f32("io.safetensors")?;
    let vae = candle_vae(load_f32("vae.safetensors")?, ch.clone(), layers)?;
    let mean = vae.encode(get(&io, "vae.image")?)?.sample()?;
    assert_close("vae encoder mean", &mean, get(&io, "vae.mean")?)?;
    // decode() takes the unscaled latent: z / scale + shift.
    let z = get(&io, "vae.z")?;
    let latent = ((z / 1.5305)? + 0.0609)?;
    assert_close(
        "vae decoder",
        &vae.decode(&latent)?,
        get(&io, "vae.decoded")?,
    )?;

    // The robust encoder: LDM encoder names under `robust_encoder.` in dpir.safetensors.
    let d = load_f32("dpir.safetensors")?;
    let mut enc: HashMap<String, Tensor> = d
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("robust_encoder.")
                .map(|s| (format!("encoder.{s}"), v))
        })
        .collect();
    for (k, v) in load_f32("vae.safetensors")? {
        if k.starts_with("decoder.") {
            enc.insert(k, v);
        }
    }
    let robust = candle_vae(enc, ch, layers)?;
    let rmean = robust.encode(get(&io, "vae.image")?)?.sample()?;
    assert_close("robust encoder mean", &rmean, get(&io, "robust.mean")?)?;
    // Sanity of the io file itself: z is the scaled mean.
    let scaled = ((get(&io, "vae.mean")? - 0.0609)? * 1.5305)?;
    assert_close("vae.z = scaled mean", &scaled, z)?;
    Ok(())
}

/// The engine side: the trainer's outputs reproduced by the engine's CPU models, with the
/// weights read through `dpir_loader::load`.
mod engine {
    use super::{fixture, Res, TOL};
    use dpir_engine::models::{clip, dpir, mmdit, vae};
    use dpir_engine::Tensor;
    use std::collections::HashMap;

    fn io() -> Res<HashMap<String, Tensor>> {
        let bytes = std::fs::read(fixture("io.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut out = HashMap::new();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.insert(name, Tensor::new(view.shape(), data)?);
        }
        Ok(out)
    }

    fn t<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> Res<&'a Tensor> {
        m.get(k)
            .ok_or_else(|| format!("io.safetensors has no {k}").into())
    }

    fn close(what: &str, got: &Tensor, want: &Tensor) {
        let e = got.max_rel_err(want);
        eprintln!("{what}: relative error {e:e}");
        assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
    }

    fn model() -> Res<dpir_loader::Model> {
        let paths: Vec<_> = [
            "mmdit.safetensors",
            "vae.safetensors",
            "clip_vision.safetensors",
            "dpir.safetensors",
        ]
        .iter()
        .map(|f| fixture(f))
        .collect();
        Ok(dpir_loader::load(&paths)?)
    }

    #[test]
    fn engine_mmdit_matches_trainer() -> Res<()> {
        let io = io()?;
        let m = model()?;
        let mm = m.mmdit.as_ref().ok_or("no mmdit component")?;
        let d = m.dpir.as_ref().ok_or("no dpir component")?;
        let net = mmdit::Mmdit::load(&mm.config, &mm.weights)?;
        let gate = dpir::load_gate(&d.config, &d.weights)?;
        let (x, ts) = (t(&io, "mmdit.x")?, &t(&io, "mmdit.t")?.data);
        let (y, ctx) = (t(&io, "mmdit.y")?, t(&io, "mmdit.context")?);
        let inject = mmdit::LqInject {
            tokens: t(&io, "mmdit.lq_tokens")?,
            gate: &gate,
        };
        let out = net.forward(x, ts, y, ctx, Some(inject))?;
        close("mmdit with LQ injection", &out, t(&io, "mmdit.out")?);
        let plain = net.forward(x, ts, y, ctx, None)?;
        close(
            "mmdit without injection",
            &plain,
            t(&io, "mmdit.out_plain")?,
        );
        Ok(())
    }

    #[test]
    fn engine_vae_matches_trainer() -> Res<()> {
        let io = io()?;
        let m = model()?;
        let v = m.vae.as_ref().ok_or("no vae component")?;
        let enc = vae::VaeEncoder::load(&v.config, &v.weights)?;
        let mut z = enc.encode(t(&io, "vae.image")?)?;
        close("vae encoder mean", &z, t(&io, "vae.mean")?);
        vae::to_model_latent(&mut z, &v.config);
        close("vae scaled latent", &z, t(&io, "vae.z")?);
        let dec = vae::VaeDecoder::load(&v.config, &v.weights)?;
        let mut zin = t(&io, "vae.z")?.clone();
        vae::from_model_latent(&mut zin, &v.config);
        close("vae decoder", &dec.decode(&zin)?, t(&io, "vae.decoded")?);
        let r = m.robust_encoder.as_ref().ok_or("no robust encoder")?;
        let rob = vae::VaeEncoder::load(&r.config, &r.weights)?;
        let rz = rob.encode(t(&io, "vae.image")?)?;
        close("robust encoder mean", &rz, t(&io, "robust.mean")?);
        Ok(())
    }

    #[test]
    fn engine_clip_vision_matches_trainer() -> Res<()> {
        let io = io()?;
        let m = model()?;
        let c = m.clip_vision.as_ref().ok_or("no clip_vision component")?;
        let net = clip::ClipVision::load(&c.config, &c.weights)?;
        let out = net.forward(t(&io, "clip.pixels")?)?;
        close(
            "clip penultimate",
            &out.penultimate,
            t(&io, "clip.penultimate")?,
        );
        close("clip pooled", &out.pooled, t(&io, "clip.pooled")?);
        Ok(())
    }

    #[test]
    fn engine_dpir_parts_match_trainer() -> Res<()> {
        let io = io()?;
        let m = model()?;
        let d = m.dpir.as_ref().ok_or("no dpir component")?;
        let branch = dpir::LqBranch::load(&d.config, &d.weights)?;
        close(
            "lq branch",
            &branch.forward(t(&io, "lq.z")?)?,
            t(&io, "lq.tokens")?,
        );
        let p = dpir::PromptAdapters::load(&d.config, &d.weights)?;
        let local = p.local(t(&io, "prompt.local_in")?)?;
        close("local prompt", &local, t(&io, "prompt.local_out")?);
        let global = p.global(t(&io, "prompt.global_in")?)?;
        close("global prompt", &global, t(&io, "prompt.global_out")?);
        Ok(())
    }
}
