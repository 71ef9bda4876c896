//! Tiny random checkpoints written in every source layout load into identical canonical
//! tensors. The diffusers files are produced here by following diffusers' own conversion
//! (`scripts/convert_sd3_to_diffusers.py`, `convert_ldm_vae_checkpoint`) in the forward
//! direction, and written with the `safetensors` crate, so neither the names nor the file
//! writer come from the loader under test.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use dpir_loader::*;

/// name → (shape, f32 values)
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random(spec: &Spec, seed: u64) -> Tensors {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    spec.iter()
        .map(|(n, s)| {
            let v = (0..s.iter().product::<usize>())
                .map(|_| rng.next())
                .collect();
            (n.clone(), (s.clone(), v))
        })
        .collect()
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => unreachable!("tests write float weights only"),
    }
}

/// Writes with the `safetensors` crate (an implementation independent of ours).
fn write_st(path: &Path, tensors: &Tensors, dtype: DType) {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| (n.clone(), s.clone(), dtype.encode_f32(v).unwrap()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype(dtype), s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, &None, path).unwrap();
}

fn prefixed(t: &Tensors, prefix: &str) -> Tensors {
    t.iter()
        .map(|(n, v)| (format!("{prefix}{n}"), v.clone()))
        .collect()
}

fn chunk(v: &(Vec<usize>, Vec<f32>), k: usize, of: usize) -> (Vec<usize>, Vec<f32>) {
    let (s, d) = v;
    let rows = s[0] / of;
    let per = d.len() / of;
    let mut shape = s.clone();
    shape[0] = rows;
    (shape, d[k * per..(k + 1) * per].to_vec())
}

/// SD3's `swap_scale_shift`: (shift, scale) → (scale, shift).
fn swap(v: &(Vec<usize>, Vec<f32>)) -> (Vec<usize>, Vec<f32>) {
    let half = v.1.len() / 2;
    let mut d = v.1[half..].to_vec();
    d.extend_from_slice(&v.1[..half]);
    (v.0.clone(), d)
}

/// Original SD3 → diffusers SD3Transformer2DModel, as diffusers' conversion script does.
fn to_diffusers_mmdit(o: &Tensors, depth: usize) -> Tensors {
    let mut d = Tensors::new();
    let g = |k: &str| o[k].clone();
    for p in ["weight", "bias"] {
        d.insert(
            format!("pos_embed.proj.{p}"),
            g(&format!("x_embedder.proj.{p}")),
        );
        d.insert(
            format!("time_text_embed.timestep_embedder.linear_1.{p}"),
            g(&format!("t_embedder.mlp.0.{p}")),
        );
        d.insert(
            format!("time_text_embed.timestep_embedder.linear_2.{p}"),
            g(&format!("t_embedder.mlp.2.{p}")),
        );
        d.insert(
            format!("time_text_embed.text_embedder.linear_1.{p}"),
            g(&format!("y_embedder.mlp.0.{p}")),
        );
        d.insert(
            format!("time_text_embed.text_embedder.linear_2.{p}"),
            g(&format!("y_embedder.mlp.2.{p}")),
        );
        d.insert(
            format!("context_embedder.{p}"),
            g(&format!("context_embedder.{p}")),
        );
        d.insert(
            format!("proj_out.{p}"),
            g(&format!("final_layer.linear.{p}")),
        );
        d.insert(
            format!("norm_out.linear.{p}"),
            swap(&o[&format!("final_layer.adaLN_modulation.1.{p}")]),
        );
    }
    d.insert("pos_embed.pos_embed".into(), g("pos_embed"));
    for i in 0..depth {
        let x = format!("joint_blocks.{i}.x_block");
        let c = format!("joint_blocks.{i}.context_block");
        let t = format!("transformer_blocks.{i}");
        let last = i + 1 == depth;
        for p in ["weight", "bias"] {
            for (k, n) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                d.insert(
                    format!("{t}.attn.{n}.{p}"),
                    chunk(&o[&format!("{x}.attn.qkv.{p}")], k, 3),
                );
            }
            for (k, n) in ["add_q_proj", "add_k_proj", "add_v_proj"]
                .iter()
                .enumerate()
            {
                d.insert(
                    format!("{t}.attn.{n}.{p}"),
                    chunk(&o[&format!("{c}.attn.qkv.{p}")], k, 3),
                );
            }
            d.insert(
                format!("{t}.attn.to_out.0.{p}"),
                g(&format!("{x}.attn.proj.{p}")),
            );
            if !last {
                d.insert(
                    format!("{t}.attn.to_add_out.{p}"),
                    g(&format!("{c}.attn.proj.{p}")),
                );
            }
            if o.contains_key(&format!("{x}.attn2.qkv.{p}")) {
                for (k, n) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                    d.insert(
                        format!("{t}.attn2.{n}.{p}"),
                        chunk(&o[&format!("{x}.attn2.qkv.{p}")], k, 3),
                    );
                }
                d.insert(
                    format!("{t}.attn2.to_out.0.{p}"),
                    g(&format!("{x}.attn2.proj.{p}")),
                );
            }
            d.insert(
                format!("{t}.norm1.linear.{p}"),
                g(&format!("{x}.adaLN_modulation.1.{p}")),
            );
            let ctx_ada = &o[&format!("{c}.adaLN_modulation.1.{p}")];
            d.insert(
                format!("{t}.norm1_context.linear.{p}"),
                if last { swap(ctx_ada) } else { ctx_ada.clone() },
            );
            d.insert(
                format!("{t}.ff.net.0.proj.{p}"),
                g(&format!("{x}.mlp.fc1.{p}")),
            );
            d.insert(format!("{t}.ff.net.2.{p}"), g(&format!("{x}.mlp.fc2.{p}")));
            if !last {
                d.insert(
                    format!("{t}.ff_context.net.0.proj.{p}"),
                    g(&format!("{c}.mlp.fc1.{p}")),
                );
                d.insert(
                    format!("{t}.ff_context.net.2.{p}"),
                    g(&format!("{c}.mlp.fc2.{p}")),
                );
            }
        }
        if o.contains_key(&format!("{x}.attn.ln_q.weight")) {
            d.insert(
                format!("{t}.attn.norm_q.weight"),
                g(&format!("{x}.attn.ln_q.weight")),
            );
            d.insert(
                format!("{t}.attn.norm_k.weight"),
                g(&format!("{x}.attn.ln_k.weight")),
            );
            d.insert(
                format!("{t}.attn.norm_added_q.weight"),
                g(&format!("{c}.attn.ln_q.weight")),
            );
            d.insert(
                format!("{t}.attn.norm_added_k.weight"),
                g(&format!("{c}.attn.ln_k.weight")),
            );
            if o.contains_key(&format!("{x}.attn2.ln_q.weight")) {
                d.insert(
                    format!("{t}.attn2.norm_q.weight"),
                    g(&format!("{x}.attn2.ln_q.weight")),
                );
                d.insert(
                    format!("{t}.attn2.norm_k.weight"),
                    g(&format!("{x}.attn2.ln_k.weight")),
                );
            }
        }
    }
    assert_eq!(
        d.values().map(|v| v.1.len()).sum::<usize>(),
        o.values().map(|v| v.1.len()).sum::<usize>()
    );
    d
}

/// LDM VAE → diffusers AutoencoderKL, as diffusers' `convert_ldm_vae_checkpoint` maps it.
fn to_diffusers_vae(o: &Tensors, levels: usize) -> Tensors {
    let mut d = Tensors::new();
    for (name, v) in o {
        let mut n = name.clone();
        for (from, to) in [
            ("mid.block_1.", "mid_block.resnets.0."),
            ("mid.block_2.", "mid_block.resnets.1."),
            ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
            ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
            ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
            ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
            ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
            (".norm_out.", ".conv_norm_out."),
            ("nin_shortcut", "conv_shortcut"),
            (".downsample.conv", ".downsamplers.0.conv"),
            (".upsample.conv", ".upsamplers.0.conv"),
            (".block.", ".resnets."),
        ] {
            n = n.replace(from, to);
        }
        if let Some(rest) = n.strip_prefix("encoder.down.") {
            n = format!("encoder.down_blocks.{rest}");
        }
        if let Some(rest) = n.strip_prefix("decoder.up.") {
            let (i, tail) = rest.split_once('.').unwrap();
            let i: usize = i.parse().unwrap();
            n = format!("decoder.up_blocks.{}.{tail}", levels - 1 - i);
        }
        let mut v = v.clone();
        if n.contains("attentions.0.to_") && n.ends_with(".weight") {
            v.0.truncate(2); // [C, C, 1, 1] → Linear [C, C]
        }
        d.insert(n, v);
    }
    d
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpir-loader-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every canonical tensor: same dtype, shape and bytes in both components.
fn assert_identical(a: &Component, b: &Component) {
    let an: Vec<&str> = a.names().collect();
    let bn: Vec<&str> = b.names().collect();
    assert_eq!(an, bn);
    for n in an {
        assert_eq!(a.shape(n), b.shape(n), "{n}");
        let (da, ra) = a.raw(n).unwrap();
        let (db, rb) = b.raw(n).unwrap();
        assert_eq!(da, db, "{n}");
        assert!(ra == rb, "{n}: bytes differ");
    }
}

/// The component holds exactly `t` (values rounded through `dtype`).
fn assert_values(c: &Component, t: &Tensors, dtype: DType) {
    assert_eq!(c.len(), t.len());
    for (n, (s, v)) in t {
        assert_eq!(c.shape(n).unwrap(), s.as_slice(), "{n}");
        let want: Vec<f32> = {
            let mut out = Vec::new();
            dtype.decode_into(&dtype.encode_f32(v).unwrap(), &mut out);
            out
        };
        let got = c.f32(n).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{n}: values differ"
        );
    }
}

fn text_encoder_tensors() -> Tensors {
    let mut t = Tensors::new();
    t.insert(
        "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight".into(),
        (vec![8, 4], vec![0.5; 32]),
    );
    t.insert(
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight".into(),
        (vec![4, 4], vec![0.25; 16]),
    );
    t
}

#[test]
fn original_and_diffusers_layouts_give_identical_tensors() {
    let mcfg = MmditConfig::tiny();
    let vcfg = VaeConfig::tiny();
    let mmdit = random(&mmdit_spec(&mcfg), 1);
    let vae = random(&vae_spec(&vcfg), 2);
    let dir = tmp("layouts");

    for dtype in [DType::F32, DType::BF16] {
        // 1. SD3 single file: prefixed MMDiT + VAE + text encoders.
        let mut single = prefixed(&mmdit, "model.diffusion_model.");
        single.extend(prefixed(&vae, "first_stage_model."));
        single.extend(text_encoder_tensors());
        let single_path = dir.join(format!("sd3-{dtype}.safetensors"));
        write_st(&single_path, &single, dtype);
        let a = load(std::slice::from_ref(&single_path)).unwrap();

        // 2. Bare original names, MMDiT and VAE in two files.
        let bare_m = dir.join(format!("bare-mmdit-{dtype}.safetensors"));
        let bare_v = dir.join(format!("bare-vae-{dtype}.safetensors"));
        write_st(&bare_m, &mmdit, dtype);
        write_st(&bare_v, &vae, dtype);
        let b = load(&[bare_m, bare_v]).unwrap();

        // 3. diffusers folder, transformer sharded in two with an index.
        let root = dir.join(format!("diffusers-{dtype}"));
        for sub in ["transformer", "vae", "text_encoder"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(
            root.join("model_index.json"),
            r#"{"_class_name": "StableDiffusion3Pipeline"}"#,
        )
        .unwrap();
        let dm = to_diffusers_mmdit(&mmdit, mcfg.depth);
        let (s1, s2): (Tensors, Tensors) = dm
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| k.starts_with("transformer_blocks.0."));
        write_st(
            &root.join("transformer/diffusion_pytorch_model-00001-of-00002.safetensors"),
            &s1,
            dtype,
        );
        write_st(
            &root.join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors"),
            &s2,
            dtype,
        );
        let weight_map: BTreeMap<&str, &str> = s1
            .keys()
            .map(|k| {
                (
                    k.as_str(),
                    "diffusion_pytorch_model-00001-of-00002.safetensors",
                )
            })
            .chain(s2.keys().map(|k| {
                (
                    k.as_str(),
                    "diffusion_pytorch_model-00002-of-00002.safetensors",
                )
            }))
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            root.join("transformer/diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        write_st(
            &root.join("vae/diffusion_pytorch_model.safetensors"),
            &to_diffusers_vae(&vae, vcfg.block_out_channels.len()),
            dtype,
        );
        // A variant beside the plain file is not read (it would define every tensor twice).
        write_st(
            &root.join("vae/diffusion_pytorch_model.fp16.safetensors"),
            &to_diffusers_vae(&vae, vcfg.block_out_channels.len()),
            DType::F16,
        );
        std::fs::write(root.join("vae/config.json"), r#"{"_class_name": "AutoencoderKL", "scaling_factor": 1.5305, "shift_factor": 0.0609, "norm_num_groups": 32}"#).unwrap();
        let c = load(std::slice::from_ref(&root)).unwrap();

        for m in [&a, &b, &c] {
            let mm = m.mmdit.as_ref().unwrap();
            let vv = m.vae.as_ref().unwrap();
            assert_eq!(mm.config, mcfg);
            assert_eq!(vv.config, vcfg);
            assert_values(&mm.weights, &mmdit, dtype);
            assert_values(&vv.weights, &vae, dtype);
        }
        assert_identical(
            &a.mmdit.as_ref().unwrap().weights,
            &c.mmdit.as_ref().unwrap().weights,
        );
        assert_identical(
            &a.vae.as_ref().unwrap().weights,
            &c.vae.as_ref().unwrap().weights,
        );
        assert_identical(
            &a.mmdit.as_ref().unwrap().weights,
            &b.mmdit.as_ref().unwrap().weights,
        );

        assert_eq!(
            a.mmdit.as_ref().unwrap().layout,
            Layout::Original {
                prefix: "model.diffusion_model."
            }
        );
        assert_eq!(
            a.vae.as_ref().unwrap().layout,
            Layout::Original {
                prefix: "first_stage_model."
            }
        );
        assert_eq!(
            b.mmdit.as_ref().unwrap().layout,
            Layout::Original { prefix: "" }
        );
        assert_eq!(c.mmdit.as_ref().unwrap().layout, Layout::Diffusers);
        assert_eq!(c.vae.as_ref().unwrap().layout, Layout::Diffusers);
        let groups: Vec<&str> = a.ignored.iter().map(|i| i.group.as_str()).collect();
        assert_eq!(groups, ["text_encoders.clip_l", "text_encoders.t5xxl"]);
        assert_eq!(a.ignored[0].params, 32);
        assert!(c
            .ignored
            .iter()
            .any(|i| i.group.starts_with("text_encoder/")));
        assert!(c.ignored.iter().any(|i| i
            .group
            .contains("diffusion_pytorch_model.fp16.safetensors (variant")));
        assert_eq!(c.mmdit.as_ref().unwrap().files.len(), 2);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn clip_vision_folder_and_dpir_files() {
    let dir = tmp("clip-dpir");
    let ccfg = ClipVisionConfig {
        heads: 4,
        layer_norm_eps: 1e-6,
        ..ClipVisionConfig::tiny()
    };
    let clip = random(&clip_vision_spec(&ccfg), 3);
    let hf = dir.join("clip");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "clip_vision_model", "num_attention_heads": 4, "layer_norm_eps": 1e-06}"#,
    )
    .unwrap();
    let mut with_text = clip.clone();
    with_text.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        (vec![4, 2], vec![1.0; 8]),
    );
    write_st(&hf.join("model.safetensors"), &with_text, DType::F16);

    let dcfg = DpirConfig::tiny();
    let dpir = random(&dpir_spec(&dcfg), 4);
    let rcfg = VaeConfig::tiny().encoder_only();
    let robust = random(&robust_encoder_file_spec(&rcfg), 5);
    let mut dfile = dpir.clone();
    dfile.extend(robust.clone());
    let dpath = dir.join("dpir.safetensors");
    write_st(&dpath, &dfile, DType::F32);

    let m = load(&[hf, dpath]).unwrap();
    let cv = m.clip_vision.as_ref().unwrap();
    assert_eq!(cv.config, ccfg);
    assert_eq!(cv.layout, Layout::HfClipVision);
    assert_values(&cv.weights, &clip, DType::F16);
    let d = m.dpir.as_ref().unwrap();
    assert_eq!(d.config, dcfg);
    assert_values(&d.weights, &dpir, DType::F32);
    let r = m.robust_encoder.as_ref().unwrap();
    assert_eq!(r.config, rcfg);
    // robust_encoder.X is exposed as encoder.X.
    let renamed: Tensors = robust
        .iter()
        .map(|(n, v)| (n.replacen("robust_encoder.", "encoder.", 1), v.clone()))
        .collect();
    assert_values(&r.weights, &renamed, DType::F32);
    assert!(m.vae.is_none() && m.mmdit.is_none());
    assert_eq!(
        m.ignored
            .iter()
            .map(|i| i.group.as_str())
            .collect::<Vec<_>>(),
        ["text_model"]
    );
    // F32 tensors in the mapping are handed out without a copy.
    assert!(matches!(
        d.weights.f32("lq_align.gate").unwrap(),
        Cow::Borrowed(_)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn our_writer_is_read_by_the_safetensors_crate() {
    let dir = tmp("writer");
    let path = dir.join("w.safetensors");
    let t = vec![
        (
            "b".to_string(),
            vec![2, 3],
            DType::BF16,
            DType::BF16
                .encode_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
                .unwrap(),
        ),
        (
            "a".to_string(),
            vec![3],
            DType::F32,
            DType::F32.encode_f32(&[0.5, -1.5, 2.5]).unwrap(),
        ),
    ];
    write_safetensors(&path, &t).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (n, s, d, b) in &t {
        let v = st.tensor(n).unwrap();
        assert_eq!(v.shape(), s.as_slice());
        assert_eq!(v.dtype(), st_dtype(*d));
        assert_eq!(v.data(), b.as_slice());
    }
    assert!(!dir.join("w.safetensors.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn in_memory_component() {
    let mut m = HashMap::new();
    m.insert("w".to_string(), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    let c = Component::from_f32(m).unwrap();
    assert_eq!(c.shape("w"), Some(&[2usize, 2][..]));
    assert_eq!(c.f32("w").unwrap().as_ref(), &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(c.param_count(), 4);
    assert_eq!(c.f32("x").unwrap_err().to_string(), "no tensor `x`");
    let mut bad = HashMap::new();
    bad.insert("w".to_string(), (vec![3], vec![1.0]));
    assert!(Component::from_f32(bad).is_err());
}

#[test]
fn loaded_models_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Component>();
    send_sync::<Model>();
}

#[test]
fn adapter_must_fit_its_backbone() {
    let dir = tmp("mismatch");
    let m = dir.join("mmdit.safetensors");
    let d = dir.join("dpir.safetensors");
    write_st(
        &m,
        &random(&mmdit_spec(&MmditConfig::tiny()), 6),
        DType::BF16,
    );
    let wide = DpirConfig {
        hidden: 256,
        ..DpirConfig::tiny()
    };
    write_st(&d, &random(&dpir_spec(&wide), 7), DType::BF16);
    let err = load(&[m.clone(), d]).unwrap_err().to_string();
    assert_eq!(
        err,
        "dpir: `lq_branch.proj.weight` gives hidden 256, but mmdit hidden is 128"
    );
    let ok = dir.join("ok.safetensors");
    write_st(
        &ok,
        &random(&dpir_spec(&DpirConfig::tiny()), 8),
        DType::BF16,
    );
    assert!(load(&[m, ok]).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}
