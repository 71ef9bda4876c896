//! Name mapping from each source layout into the canonical layout (docs/WEIGHTS.md).
//! All checkpoint-layout knowledge lives here: prefixes, diffusers renames, q/k/v fusion,
//! adaLN half swaps and Linear → 1×1-conv reshapes.

use crate::model::Layout;

/// The components a tensor can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Comp {
    Mmdit,
    Vae,
    ClipVision,
    Dpir,
    RobustEncoder,
}

impl Comp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Comp::Mmdit => "mmdit",
            Comp::Vae => "vae",
            Comp::ClipVision => "clip_vision",
            Comp::Dpir => "dpir",
            Comp::RobustEncoder => "robust_encoder",
        }
    }
}

/// How a stored tensor becomes (part of) a canonical one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// Same data, same shape.
    Copy,
    /// Part `index` of `of` concatenated along dim 0 (diffusers q/k/v → `qkv`).
    Part { index: usize, of: usize },
    /// Swap the two halves along dim 0 (diffusers `AdaLayerNormContinuous` stores
    /// (scale, shift); SD3 computes (shift, scale)).
    SwapHalves,
    /// `SwapHalves` when block `i` is the last block (its context norm is an
    /// `AdaLayerNormContinuous`), else `Copy`. Resolved once all names are known.
    SwapHalvesIfLast(usize),
    /// Linear `[C, C]` → 1×1 conv `[C, C, 1, 1]` (diffusers VAE attention).
    Conv1x1,
}

pub(crate) enum Target {
    Tensor {
        comp: Comp,
        layout: Layout,
        name: String,
        op: Op,
    },
    /// A recognised tensor dpir does not use (text encoders, buffers), and its group.
    Ignored(String),
    Unknown,
}

/// What a file's names say about its layout.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FileKind {
    pub diffusers_mmdit: bool,
    pub diffusers_vae: bool,
}

impl FileKind {
    pub(crate) fn of<'a>(names: impl Iterator<Item = &'a str>) -> Self {
        let mut k = FileKind::default();
        for n in names {
            k.diffusers_mmdit |= n.starts_with("transformer_blocks.")
                || n.starts_with("time_text_embed.")
                || n.starts_with("pos_embed.");
            k.diffusers_vae |= n.contains("down_blocks.")
                || n.contains("up_blocks.")
                || n.contains("mid_block.")
                || n.contains("conv_norm_out.");
        }
        k
    }
}

/// Indices that need every name of a model: the last diffusers transformer block, and the
/// number of diffusers VAE up blocks (`up_blocks[i]` is LDM `up[n − 1 − i]`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hints {
    pub last_block: usize,
    pub up_blocks: usize,
}

fn index_after(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    rest.split('.').next()?.parse().ok()
}

impl Hints {
    pub(crate) fn observe(&mut self, name: &str) {
        if let Some(i) = index_after(name, "transformer_blocks.") {
            self.last_block = self.last_block.max(i);
        }
        for p in ["decoder.up_blocks.", "first_stage_model.decoder.up_blocks."] {
            if let Some(i) = index_after(name, p) {
                self.up_blocks = self.up_blocks.max(i + 1);
            }
        }
    }
}

const IGNORED_PREFIXES: [&str; 6] = [
    "text_encoders.",
    "cond_stage_model.",
    "conditioner.",
    "text_model.",
    "text_projection.",
    "encoder.block.",
];

fn ignored_group(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("text_encoders.") {
        let model = rest.split('.').next().unwrap_or("");
        return Some(format!("text_encoders.{model}"));
    }
    for p in IGNORED_PREFIXES {
        if name.starts_with(p) {
            return Some(p.trim_end_matches('.').to_string());
        }
    }
    if name == "logit_scale" || name == "text_projection.weight" {
        return Some("clip text head".into());
    }
    if name == "shared.weight"
        || name.starts_with("encoder.final_layer_norm.")
        || name.starts_with("encoder.embed_tokens.")
    {
        return Some("t5".into());
    }
    if name == "vision_model.embeddings.position_ids" {
        return Some("clip_vision buffers".into());
    }
    None
}

/// Maps one stored name to its canonical target.
pub(crate) fn classify(name: &str, kind: FileKind, hints: Hints) -> Target {
    if let Some(g) = ignored_group(name) {
        return Target::Ignored(g);
    }
    let t = |comp, layout, name: String, op| Target::Tensor {
        comp,
        layout,
        name,
        op,
    };
    if let Some(rest) = name.strip_prefix("model.diffusion_model.") {
        let layout = Layout::Original {
            prefix: "model.diffusion_model.",
        };
        return t(Comp::Mmdit, layout, rest.to_string(), Op::Copy);
    }
    if let Some(rest) = name.strip_prefix("first_stage_model.") {
        let layout = Layout::Original {
            prefix: "first_stage_model.",
        };
        if kind.diffusers_vae {
            if let Some((n, op)) = diffusers_vae(rest, hints) {
                return t(Comp::Vae, Layout::Diffusers, n, op);
            }
        }
        return t(Comp::Vae, layout, rest.to_string(), Op::Copy);
    }
    if let Some(rest) = name.strip_prefix("robust_encoder.") {
        return t(
            Comp::RobustEncoder,
            Layout::Dpir,
            format!("encoder.{rest}"),
            Op::Copy,
        );
    }
    let first = name.split('.').next().unwrap_or("");
    match first {
        "lq_branch" | "lq_align" | "local_prompt" | "global_prompt" => {
            t(Comp::Dpir, Layout::Dpir, name.to_string(), Op::Copy)
        }
        "vision_model" | "visual_projection" => t(
            Comp::ClipVision,
            Layout::HfClipVision,
            name.to_string(),
            Op::Copy,
        ),
        "joint_blocks" | "x_embedder" | "t_embedder" | "y_embedder" | "final_layer" => t(
            Comp::Mmdit,
            Layout::Original { prefix: "" },
            name.to_string(),
            Op::Copy,
        ),
        "pos_embed" if name == "pos_embed" => t(
            Comp::Mmdit,
            Layout::Original { prefix: "" },
            name.to_string(),
            Op::Copy,
        ),
        "context_embedder" if !kind.diffusers_mmdit => t(
            Comp::Mmdit,
            Layout::Original { prefix: "" },
            name.to_string(),
            Op::Copy,
        ),
        "transformer_blocks" | "pos_embed" | "time_text_embed" | "norm_out" | "proj_out"
        | "context_embedder" => match diffusers_mmdit(name) {
            Some((n, op)) => t(Comp::Mmdit, Layout::Diffusers, n, op),
            // Kept under its stored name: the spec check reports it as unexpected.
            None => t(Comp::Mmdit, Layout::Diffusers, name.to_string(), Op::Copy),
        },
        "encoder" | "decoder" | "quant_conv" | "post_quant_conv" => {
            if kind.diffusers_vae {
                match diffusers_vae(name, hints) {
                    Some((n, op)) => t(Comp::Vae, Layout::Diffusers, n, op),
                    None => t(Comp::Vae, Layout::Diffusers, name.to_string(), Op::Copy),
                }
            } else {
                t(
                    Comp::Vae,
                    Layout::Original { prefix: "" },
                    name.to_string(),
                    Op::Copy,
                )
            }
        }
        _ => Target::Unknown,
    }
}

/// `weight`/`bias` suffix split: ("attn.to_q", "weight").
fn split_param(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('.')
}

/// diffusers `SD3Transformer2DModel` → SD3 original (mirrors diffusers'
/// `scripts/convert_sd3_to_diffusers.py`, inverted).
fn diffusers_mmdit(name: &str) -> Option<(String, Op)> {
    let (module, param) = split_param(name)?;
    let simple = |m: &str| Some((format!("{m}.{param}"), Op::Copy));
    match module {
        "pos_embed" if param == "pos_embed" => return Some(("pos_embed".into(), Op::Copy)),
        "pos_embed.proj" => return simple("x_embedder.proj"),
        "time_text_embed.timestep_embedder.linear_1" => return simple("t_embedder.mlp.0"),
        "time_text_embed.timestep_embedder.linear_2" => return simple("t_embedder.mlp.2"),
        "time_text_embed.text_embedder.linear_1" => return simple("y_embedder.mlp.0"),
        "time_text_embed.text_embedder.linear_2" => return simple("y_embedder.mlp.2"),
        "context_embedder" => return simple("context_embedder"),
        "proj_out" => return simple("final_layer.linear"),
        "norm_out.linear" => {
            return Some((
                format!("final_layer.adaLN_modulation.1.{param}"),
                Op::SwapHalves,
            ))
        }
        _ => {}
    }
    let rest = module.strip_prefix("transformer_blocks.")?;
    let (i, sub) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let x = format!("joint_blocks.{i}.x_block");
    let c = format!("joint_blocks.{i}.context_block");
    let part = |index| Op::Part { index, of: 3 };
    let (target, op) = match sub {
        "attn.to_q" => (format!("{x}.attn.qkv"), part(0)),
        "attn.to_k" => (format!("{x}.attn.qkv"), part(1)),
        "attn.to_v" => (format!("{x}.attn.qkv"), part(2)),
        "attn.add_q_proj" => (format!("{c}.attn.qkv"), part(0)),
        "attn.add_k_proj" => (format!("{c}.attn.qkv"), part(1)),
        "attn.add_v_proj" => (format!("{c}.attn.qkv"), part(2)),
        "attn.norm_q" => (format!("{x}.attn.ln_q"), Op::Copy),
        "attn.norm_k" => (format!("{x}.attn.ln_k"), Op::Copy),
        "attn.norm_added_q" => (format!("{c}.attn.ln_q"), Op::Copy),
        "attn.norm_added_k" => (format!("{c}.attn.ln_k"), Op::Copy),
        "attn.to_out.0" => (format!("{x}.attn.proj"), Op::Copy),
        "attn.to_add_out" => (format!("{c}.attn.proj"), Op::Copy),
        "attn2.to_q" => (format!("{x}.attn2.qkv"), part(0)),
        "attn2.to_k" => (format!("{x}.attn2.qkv"), part(1)),
        "attn2.to_v" => (format!("{x}.attn2.qkv"), part(2)),
        "attn2.norm_q" => (format!("{x}.attn2.ln_q"), Op::Copy),
        "attn2.norm_k" => (format!("{x}.attn2.ln_k"), Op::Copy),
        "attn2.to_out.0" => (format!("{x}.attn2.proj"), Op::Copy),
        "norm1.linear" => (format!("{x}.adaLN_modulation.1"), Op::Copy),
        "norm1_context.linear" => (format!("{c}.adaLN_modulation.1"), Op::SwapHalvesIfLast(i)),
        "ff.net.0.proj" => (format!("{x}.mlp.fc1"), Op::Copy),
        "ff.net.2" => (format!("{x}.mlp.fc2"), Op::Copy),
        "ff_context.net.0.proj" => (format!("{c}.mlp.fc1"), Op::Copy),
        "ff_context.net.2" => (format!("{c}.mlp.fc2"), Op::Copy),
        _ => return None,
    };
    Some((format!("{target}.{param}"), op))
}

fn diffusers_resnet(sub: &str) -> Option<&'static str> {
    Some(match sub {
        "norm1" => "norm1",
        "conv1" => "conv1",
        "norm2" => "norm2",
        "conv2" => "conv2",
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    })
}

/// diffusers `AutoencoderKL` → LDM (mirrors diffusers' `convert_ldm_vae_checkpoint`,
/// inverted). `name` starts with `encoder.` or `decoder.`.
fn diffusers_vae(name: &str, hints: Hints) -> Option<(String, Op)> {
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let (module, param) = split_param(rest)?;
    let out = |m: String, op| Some((format!("{side}.{m}.{param}"), op));
    match module {
        "conv_in" | "conv_out" => return out(module.to_string(), Op::Copy),
        "conv_norm_out" => return out("norm_out".into(), Op::Copy),
        _ => {}
    }
    let parts: Vec<&str> = module.split('.').collect();
    match parts.as_slice() {
        ["mid_block", "resnets", j, sub] => {
            let block = match *j {
                "0" => "block_1",
                "1" => "block_2",
                _ => return None,
            };
            out(format!("mid.{block}.{}", diffusers_resnet(sub)?), Op::Copy)
        }
        ["mid_block", "attentions", "0", rest @ ..] => {
            let target = match rest {
                ["group_norm"] => "norm",
                ["to_q"] | ["query"] => "q",
                ["to_k"] | ["key"] => "k",
                ["to_v"] | ["value"] => "v",
                ["to_out", "0"] | ["proj_attn"] => "proj_out",
                _ => return None,
            };
            let op = if target != "norm" && param == "weight" {
                Op::Conv1x1
            } else {
                Op::Copy
            };
            out(format!("mid.attn_1.{target}"), op)
        }
        ["down_blocks", i, "resnets", j, sub] if side == "encoder" => out(
            format!("down.{i}.block.{j}.{}", diffusers_resnet(sub)?),
            Op::Copy,
        ),
        ["down_blocks", i, "downsamplers", "0", "conv"] if side == "encoder" => {
            out(format!("down.{i}.downsample.conv"), Op::Copy)
        }
        ["up_blocks", i, "resnets", j, sub] if side == "decoder" => {
            let i: usize = i.parse().ok()?;
            let level = hints.up_blocks.checked_sub(i + 1)?;
            out(
                format!("up.{level}.block.{j}.{}", diffusers_resnet(sub)?),
                Op::Copy,
            )
        }
        ["up_blocks", i, "upsamplers", "0", "conv"] if side == "decoder" => {
            let i: usize = i.parse().ok()?;
            let level = hints.up_blocks.checked_sub(i + 1)?;
            out(format!("up.{level}.upsample.conv"), Op::Copy)
        }
        _ => None,
    }
}
