//! Shape-only specifications of every component in the canonical layout, and config
//! detection from tensor names and shapes.
//!
//! `detect_*(spec(cfg)) == cfg` for every config the spec can express; the loader detects a
//! config from a few tensors, builds its spec and then checks every tensor against it, so
//! any missing, extra or wrongly shaped tensor is reported by name.

use std::collections::{BTreeMap, HashSet};

use crate::config::{ClipVisionConfig, DpirConfig, MmditConfig, VaeConfig};
use crate::LoadError;

/// `(canonical name, shape)` for every tensor of a component, in a fixed order.
pub type Spec = Vec<(String, Vec<usize>)>;
/// Canonical name → shape.
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

/// Total element count of a spec.
pub fn param_count(spec: &Spec) -> usize {
    spec.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// A spec as a name → shape map (what the detectors read).
pub fn shape_map(spec: &Spec) -> ShapeMap {
    spec.iter().cloned().collect()
}

fn push(spec: &mut Spec, name: String, shape: &[usize]) {
    spec.push((name, shape.to_vec()));
}

fn linear(spec: &mut Spec, prefix: &str, out: usize, inp: usize) {
    push(spec, format!("{prefix}.weight"), &[out, inp]);
    push(spec, format!("{prefix}.bias"), &[out]);
}

fn conv(spec: &mut Spec, prefix: &str, out: usize, inp: usize, k: usize) {
    push(spec, format!("{prefix}.weight"), &[out, inp, k, k]);
    push(spec, format!("{prefix}.bias"), &[out]);
}

fn norm(spec: &mut Spec, prefix: &str, c: usize) {
    push(spec, format!("{prefix}.weight"), &[c]);
    push(spec, format!("{prefix}.bias"), &[c]);
}

/// Whether `name` is one of the two optional MMDiT tensors: the qk-norm weights of the last
/// block's qkv-only context stream (SD3.5 checkpoints carry them; the loader requires them
/// when the config has qk-norm, a backend may run without them).
pub fn mmdit_last_context_qk_norm(c: &MmditConfig, name: &str) -> bool {
    let Some(i) = c.depth.checked_sub(1) else {
        return false;
    };
    name == format!("joint_blocks.{i}.context_block.attn.ln_q.weight")
        || name == format!("joint_blocks.{i}.context_block.attn.ln_k.weight")
}

/// The MMDiT in SD3's original names (without `model.diffusion_model.`).
pub fn mmdit_spec(c: &MmditConfig) -> Spec {
    let d = c.hidden;
    let p = c.patch_size;
    let hd = c.head_dim();
    let mut s = Spec::new();
    conv(&mut s, "x_embedder.proj", d, c.in_channels, p);
    push(
        &mut s,
        "pos_embed".into(),
        &[1, c.pos_embed_max_size * c.pos_embed_max_size, d],
    );
    linear(&mut s, "t_embedder.mlp.0", d, c.frequency_embedding_size);
    linear(&mut s, "t_embedder.mlp.2", d, d);
    linear(&mut s, "y_embedder.mlp.0", d, c.pooled_dim);
    linear(&mut s, "y_embedder.mlp.2", d, d);
    linear(&mut s, "context_embedder", d, c.context_dim);
    for i in 0..c.depth {
        let attn2 = c.attn2_blocks.get(i).copied().unwrap_or(false);
        for stream in ["x_block", "context_block"] {
            let b = format!("joint_blocks.{i}.{stream}");
            let pre_only = stream == "context_block" && i + 1 == c.depth;
            linear(&mut s, &format!("{b}.attn.qkv"), 3 * d, d);
            if c.qk_norm {
                push(&mut s, format!("{b}.attn.ln_q.weight"), &[hd]);
                push(&mut s, format!("{b}.attn.ln_k.weight"), &[hd]);
            }
            if !pre_only {
                linear(&mut s, &format!("{b}.attn.proj"), d, d);
            }
            if stream == "x_block" && attn2 {
                linear(&mut s, &format!("{b}.attn2.qkv"), 3 * d, d);
                if c.qk_norm {
                    push(&mut s, format!("{b}.attn2.ln_q.weight"), &[hd]);
                    push(&mut s, format!("{b}.attn2.ln_k.weight"), &[hd]);
                }
                linear(&mut s, &format!("{b}.attn2.proj"), d, d);
            }
            if !pre_only {
                linear(&mut s, &format!("{b}.mlp.fc1"), c.mlp_hidden, d);
                linear(&mut s, &format!("{b}.mlp.fc2"), d, c.mlp_hidden);
            }
            let chunks = if pre_only {
                2
            } else if stream == "x_block" && attn2 {
                9
            } else {
                6
            };
            linear(&mut s, &format!("{b}.adaLN_modulation.1"), chunks * d, d);
        }
    }
    linear(&mut s, "final_layer.linear", p * p * c.out_channels, d);
    linear(&mut s, "final_layer.adaLN_modulation.1", 2 * d, d);
    s
}

fn resnet(s: &mut Spec, prefix: &str, cin: usize, cout: usize) {
    norm(s, &format!("{prefix}.norm1"), cin);
    conv(s, &format!("{prefix}.conv1"), cout, cin, 3);
    norm(s, &format!("{prefix}.norm2"), cout);
    conv(s, &format!("{prefix}.conv2"), cout, cout, 3);
    if cin != cout {
        conv(s, &format!("{prefix}.nin_shortcut"), cout, cin, 1);
    }
}

fn vae_mid(s: &mut Spec, prefix: &str, c: usize) {
    resnet(s, &format!("{prefix}.mid.block_1"), c, c);
    norm(s, &format!("{prefix}.mid.attn_1.norm"), c);
    for n in ["q", "k", "v", "proj_out"] {
        conv(s, &format!("{prefix}.mid.attn_1.{n}"), c, c, 1);
    }
    resnet(s, &format!("{prefix}.mid.block_2"), c, c);
}

/// The VAE encoder in LDM names, each prefixed with `prefix` (`"encoder"` in the
/// canonical layout, `"robust_encoder"` in DPIR files).
pub fn vae_encoder_spec(c: &VaeConfig, prefix: &str) -> Spec {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let (Some(&first), Some(&last)) = (ch.first(), ch.last()) else {
        return Spec::new();
    };
    let mut s = Spec::new();
    conv(
        &mut s,
        &format!("{prefix}.conv_in"),
        first,
        c.in_channels,
        3,
    );
    let mut cin = first;
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..c.layers_per_block {
            resnet(&mut s, &format!("{prefix}.down.{i}.block.{j}"), cin, cout);
            cin = cout;
        }
        if i + 1 != n {
            conv(
                &mut s,
                &format!("{prefix}.down.{i}.downsample.conv"),
                cout,
                cout,
                3,
            );
        }
    }
    vae_mid(&mut s, prefix, last);
    norm(&mut s, &format!("{prefix}.norm_out"), last);
    conv(
        &mut s,
        &format!("{prefix}.conv_out"),
        2 * c.latent_channels,
        last,
        3,
    );
    s
}

/// The VAE decoder in LDM names (`decoder.*`).
pub fn vae_decoder_spec(c: &VaeConfig) -> Spec {
    let ch = &c.block_out_channels;
    let (Some(&first), Some(&last)) = (ch.first(), ch.last()) else {
        return Spec::new();
    };
    let mut s = Spec::new();
    conv(&mut s, "decoder.conv_in", last, c.latent_channels, 3);
    vae_mid(&mut s, "decoder", last);
    let mut cin = last;
    for i in (0..ch.len()).rev() {
        let cout = ch[i];
        for j in 0..=c.layers_per_block {
            resnet(&mut s, &format!("decoder.up.{i}.block.{j}"), cin, cout);
            cin = cout;
        }
        if i != 0 {
            conv(
                &mut s,
                &format!("decoder.up.{i}.upsample.conv"),
                cout,
                cout,
                3,
            );
        }
    }
    norm(&mut s, "decoder.norm_out", first);
    conv(&mut s, "decoder.conv_out", c.in_channels, first, 3);
    s
}

/// The VAE in LDM names: encoder and/or decoder as `has_encoder` / `has_decoder` say.
pub fn vae_spec(c: &VaeConfig) -> Spec {
    let mut s = Spec::new();
    if c.has_encoder {
        s.extend(vae_encoder_spec(c, "encoder"));
    }
    if c.has_decoder {
        s.extend(vae_decoder_spec(c));
    }
    s
}

/// DPIR's robust encoder as stored in DPIR files (`robust_encoder.` + the LDM encoder
/// name without `encoder.`). The loaded component uses [`vae_encoder_spec`] names.
pub fn robust_encoder_file_spec(c: &VaeConfig) -> Spec {
    vae_encoder_spec(c, "robust_encoder")
}

/// Hugging Face `CLIPVisionModel` (+ `visual_projection` when `projection_dim` is set).
pub fn clip_vision_spec(c: &ClipVisionConfig) -> Spec {
    let h = c.hidden;
    let p = c.patch_size;
    let mut s = Spec::new();
    push(
        &mut s,
        "vision_model.embeddings.class_embedding".into(),
        &[h],
    );
    push(
        &mut s,
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[h, c.num_channels, p, p],
    );
    push(
        &mut s,
        "vision_model.embeddings.position_embedding.weight".into(),
        &[c.num_patches() + 1, h],
    );
    norm(&mut s, "vision_model.pre_layrnorm", h);
    for i in 0..c.layers {
        let l = format!("vision_model.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(&mut s, &format!("{l}.self_attn.{n}"), h, h);
        }
        norm(&mut s, &format!("{l}.layer_norm1"), h);
        linear(&mut s, &format!("{l}.mlp.fc1"), c.intermediate, h);
        linear(&mut s, &format!("{l}.mlp.fc2"), h, c.intermediate);
        norm(&mut s, &format!("{l}.layer_norm2"), h);
    }
    norm(&mut s, "vision_model.post_layernorm", h);
    if let Some(pd) = c.projection_dim {
        push(&mut s, "visual_projection.weight".into(), &[pd, h]);
    }
    s
}

/// DPIR's own tensors (LQ branch, alignment gate, prompt MLPs). The robust encoder is
/// its own component: see [`robust_encoder_file_spec`].
pub fn dpir_spec(c: &DpirConfig) -> Spec {
    let mut s = Spec::new();
    conv(
        &mut s,
        "lq_branch.conv_in",
        c.lq_channels,
        c.latent_channels,
        3,
    );
    for k in 0..c.lq_convs.saturating_sub(1) {
        conv(
            &mut s,
            &format!("lq_branch.convs.{k}"),
            c.lq_channels,
            c.lq_channels,
            3,
        );
    }
    conv(
        &mut s,
        "lq_branch.proj",
        c.hidden,
        c.lq_channels,
        c.patch_size,
    );
    push(&mut s, "lq_align.gate".into(), &[c.hidden]);
    linear(&mut s, "local_prompt.fc1", c.local_hidden, c.clip_dim);
    linear(&mut s, "local_prompt.fc2", c.context_dim, c.local_hidden);
    linear(&mut s, "global_prompt.fc1", c.global_hidden, c.global_in);
    linear(&mut s, "global_prompt.fc2", c.pooled_dim, c.global_hidden);
    s
}

// ---------------------------------------------------------------------------------------
// Detection

fn get<'a>(
    s: &'a ShapeMap,
    component: &'static str,
    name: &str,
    rank: usize,
) -> Result<&'a [usize], LoadError> {
    let shape = s.get(name).ok_or_else(|| LoadError::Missing {
        component,
        name: name.to_string(),
    })?;
    if shape.len() != rank {
        return Err(LoadError::Shape {
            component,
            name: name.to_string(),
            origin: String::new(),
            expected: format!("of rank {rank}"),
            found: shape.clone(),
        });
    }
    Ok(shape)
}

fn count(s: &ShapeMap, name: impl Fn(usize) -> String) -> usize {
    (0..).take_while(|&i| s.contains_key(&name(i))).count()
}

fn isqrt(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r.checked_mul(r) == Some(n)).then_some(r)
}

/// MMDiT config from canonical names and shapes.
pub fn detect_mmdit(s: &ShapeMap) -> Result<MmditConfig, LoadError> {
    const C: &str = "mmdit";
    let bad = |name: &str, expected: &str, found: &[usize]| LoadError::Shape {
        component: C,
        name: name.to_string(),
        origin: String::new(),
        expected: expected.to_string(),
        found: found.to_vec(),
    };
    let xe = get(s, C, "x_embedder.proj.weight", 4)?;
    let (hidden, in_channels, patch_size) = (xe[0], xe[1], xe[2]);
    if xe[2] != xe[3] || patch_size == 0 {
        return Err(bad("x_embedder.proj.weight", "[hidden, in, p, p]", xe));
    }
    let depth = count(s, |i| format!("joint_blocks.{i}.x_block.attn.qkv.weight"));
    if depth == 0 {
        return Err(LoadError::Missing {
            component: C,
            name: "joint_blocks.0.x_block.attn.qkv.weight".into(),
        });
    }
    let pos = get(s, C, "pos_embed", 3)?;
    let pos_embed_max_size = isqrt(pos[1])
        .filter(|_| pos[0] == 1)
        .ok_or_else(|| bad("pos_embed", "[1, M², hidden] with M² a square", pos))?;
    let context_dim = get(s, C, "context_embedder.weight", 2)?[1];
    let pooled_dim = get(s, C, "y_embedder.mlp.0.weight", 2)?[1];
    let frequency_embedding_size = get(s, C, "t_embedder.mlp.0.weight", 2)?[1];
    let mlp_hidden = get(s, C, "joint_blocks.0.x_block.mlp.fc1.weight", 2)?[0];
    let ln_q = "joint_blocks.0.x_block.attn.ln_q.weight";
    let qk_norm = s.contains_key(ln_q);
    let num_heads = if qk_norm {
        let hd = get(s, C, ln_q, 1)?[0];
        if hd == 0 || hidden % hd != 0 {
            return Err(bad(
                ln_q,
                &format!("[head_dim] dividing hidden {hidden}"),
                &[hd],
            ));
        }
        hidden / hd
    } else {
        depth
    };
    let fl_name = "final_layer.linear.weight";
    let fl = get(s, C, fl_name, 2)?;
    let pp = patch_size * patch_size;
    if fl[0] % pp != 0 {
        return Err(bad(fl_name, &format!("[{pp}·out_channels, hidden]"), fl));
    }
    let attn2_blocks = (0..depth)
        .map(|i| s.contains_key(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
        .collect();
    Ok(MmditConfig {
        depth,
        hidden,
        num_heads,
        patch_size,
        in_channels,
        out_channels: fl[0] / pp,
        pos_embed_max_size,
        context_dim,
        pooled_dim,
        frequency_embedding_size,
        mlp_hidden,
        qk_norm,
        attn2_blocks,
    })
}

/// VAE config from LDM names and shapes. GroupNorm groups, scale and shift cannot be
/// seen in shapes; they come from `groups_scale_shift` (SD3: 32, 1.5305, 0.0609).
pub fn detect_vae(
    s: &ShapeMap,
    component: &'static str,
    groups_scale_shift: (usize, f32, f32),
) -> Result<VaeConfig, LoadError> {
    let has_encoder = s.contains_key("encoder.conv_in.weight");
    let has_decoder = s.contains_key("decoder.conv_in.weight");
    let (in_channels, latent_channels, block_out_channels, layers_per_block);
    if has_encoder {
        in_channels = get(s, component, "encoder.conv_in.weight", 4)?[1];
        let co = get(s, component, "encoder.conv_out.weight", 4)?[0];
        latent_channels = co / 2;
        let n = count(s, |i| format!("encoder.down.{i}.block.0.conv1.weight"));
        block_out_channels = (0..n)
            .map(|i| {
                get(
                    s,
                    component,
                    &format!("encoder.down.{i}.block.0.conv1.weight"),
                    4,
                )
            })
            .map(|r| r.map(|sh| sh[0]))
            .collect::<Result<Vec<_>, _>>()?;
        layers_per_block = count(s, |j| format!("encoder.down.0.block.{j}.conv1.weight"));
    } else if has_decoder {
        latent_channels = get(s, component, "decoder.conv_in.weight", 4)?[1];
        in_channels = get(s, component, "decoder.conv_out.weight", 4)?[0];
        let n = count(s, |i| format!("decoder.up.{i}.block.0.conv1.weight"));
        block_out_channels = (0..n)
            .map(|i| {
                get(
                    s,
                    component,
                    &format!("decoder.up.{i}.block.0.conv1.weight"),
                    4,
                )
            })
            .map(|r| r.map(|sh| sh[0]))
            .collect::<Result<Vec<_>, _>>()?;
        layers_per_block =
            count(s, |j| format!("decoder.up.0.block.{j}.conv1.weight")).saturating_sub(1);
    } else {
        return Err(LoadError::Missing {
            component,
            name: "encoder.conv_in.weight".into(),
        });
    }
    if block_out_channels.is_empty() {
        let side = if has_encoder {
            "encoder.down"
        } else {
            "decoder.up"
        };
        return Err(LoadError::Missing {
            component,
            name: format!("{side}.0.block.0.conv1.weight"),
        });
    }
    let (norm_groups, scaling_factor, shift_factor) = groups_scale_shift;
    Ok(VaeConfig {
        in_channels,
        latent_channels,
        block_out_channels,
        layers_per_block,
        norm_groups,
        scaling_factor,
        shift_factor,
        has_encoder,
        has_decoder,
    })
}

/// CLIP vision config from Hugging Face names and shapes. Heads and the LayerNorm eps
/// are not in the shapes: pass them from `config.json` when there is one, else heads are
/// hidden / 64 and eps 1e-5 (both as in CLIP ViT-L/14).
pub fn detect_clip_vision(
    s: &ShapeMap,
    heads: Option<usize>,
    layer_norm_eps: Option<f32>,
) -> Result<ClipVisionConfig, LoadError> {
    const C: &str = "clip_vision";
    let hidden = get(s, C, "vision_model.embeddings.class_embedding", 1)?[0];
    let pe_name = "vision_model.embeddings.patch_embedding.weight";
    let pe = get(s, C, pe_name, 4)?;
    let (num_channels, patch_size) = (pe[1], pe[2]);
    let pos_name = "vision_model.embeddings.position_embedding.weight";
    let pos = get(s, C, pos_name, 2)?;
    let side = isqrt(pos[0].saturating_sub(1))
        .filter(|&v| v > 0)
        .ok_or_else(|| LoadError::Shape {
            component: C,
            name: pos_name.into(),
            origin: String::new(),
            expected: "[side² + 1, hidden]".into(),
            found: pos.to_vec(),
        })?;
    let layers = count(s, |i| {
        format!("vision_model.encoder.layers.{i}.self_attn.q_proj.weight")
    });
    let intermediate = get(s, C, "vision_model.encoder.layers.0.mlp.fc1.weight", 2)?[0];
    let projection_dim = match s.get("visual_projection.weight") {
        Some(_) => Some(get(s, C, "visual_projection.weight", 2)?[0]),
        None => None,
    };
    let heads = match heads {
        Some(h) if h > 0 && hidden % h == 0 => h,
        Some(h) => {
            return Err(LoadError::Config(format!(
                "clip_vision: {h} attention heads do not divide width {hidden}"
            )))
        }
        None if hidden % 64 == 0 => hidden / 64,
        None => {
            return Err(LoadError::Config(format!(
                "clip_vision: width {hidden} is not a multiple of 64 and no config.json gives num_attention_heads"
            )))
        }
    };
    Ok(ClipVisionConfig {
        hidden,
        intermediate,
        layers,
        heads,
        patch_size,
        image_size: side * patch_size,
        num_channels,
        projection_dim,
        layer_norm_eps: layer_norm_eps.unwrap_or(1e-5),
    })
}

/// DPIR adapter config from our names and shapes. `has_robust_encoder` is false here;
/// the loader sets it when a `robust_encoder.*` component is present.
pub fn detect_dpir(s: &ShapeMap) -> Result<DpirConfig, LoadError> {
    const C: &str = "dpir";
    let ci = get(s, C, "lq_branch.conv_in.weight", 4)?;
    let pr = get(s, C, "lq_branch.proj.weight", 4)?;
    let l1 = get(s, C, "local_prompt.fc1.weight", 2)?;
    let l2 = get(s, C, "local_prompt.fc2.weight", 2)?;
    let g1 = get(s, C, "global_prompt.fc1.weight", 2)?;
    let g2 = get(s, C, "global_prompt.fc2.weight", 2)?;
    Ok(DpirConfig {
        lq_channels: ci[0],
        lq_convs: 1 + count(s, |k| format!("lq_branch.convs.{k}.weight")),
        hidden: pr[0],
        patch_size: pr[2],
        latent_channels: ci[1],
        clip_dim: l1[1],
        local_hidden: l1[0],
        context_dim: l2[0],
        global_in: g1[1],
        global_hidden: g1[0],
        pooled_dim: g2[0],
        has_robust_encoder: false,
    })
}

/// Checks every tensor of a component against its spec: each spec tensor present with the
/// exact shape, and nothing else. `origin(name)` says where a tensor came from (for
/// messages; may be empty).
pub fn check_spec(
    component: &'static str,
    s: &ShapeMap,
    spec: &Spec,
    origin: &dyn Fn(&str) -> String,
) -> Result<(), LoadError> {
    for (name, shape) in spec {
        match s.get(name) {
            None => {
                return Err(LoadError::Missing {
                    component,
                    name: name.clone(),
                })
            }
            Some(found) if found != shape => {
                return Err(LoadError::Shape {
                    component,
                    name: name.clone(),
                    origin: origin(name),
                    expected: format!("{shape:?}"),
                    found: found.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = spec.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = s.keys().find(|n| !known.contains(n.as_str())) {
        return Err(LoadError::Unexpected {
            component,
            name: extra.clone(),
            origin: origin(extra),
        });
    }
    Ok(())
}
