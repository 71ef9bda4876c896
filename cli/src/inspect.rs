//! `dpir inspect PATH...`: the components found in checkpoints, the layout each was read
//! from, dtypes, parameter counts, bytes in bf16 and the detected configs.

use std::path::PathBuf;

use dpir_loader::{Component, Loaded, Model};

use crate::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// `.safetensors` files, `*.safetensors.index.json` indexes, diffusers folders,
    /// Hugging Face CLIP vision folders or folders of safetensors files.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Also list every tensor (canonical name, shape, dtype, where it was stored).
    #[arg(long)]
    pub tensors: bool,
}

pub fn run(args: Args) -> CliResult {
    let model = dpir_loader::load(&args.paths)?;
    print!("{}", report(&model, args.tensors));
    // Tensors stay in the mapped files: show what this process actually holds.
    if let Some(kib) = peak_rss_kib() {
        println!("peak resident memory: {}", bytes(kib * 1024));
    }
    Ok(())
}

/// `VmHWM` of this process (Linux), in KiB.
fn peak_rss_kib() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Thousands separators: 2084951104 → "2,084,951,104".
fn group(n: usize) -> String {
    let s = n.to_string();
    let (head, tail) = s.split_at(s.len() % 3);
    let mut out = head.to_string();
    for chunk in tail.as_bytes().chunks(3) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(std::str::from_utf8(chunk).unwrap_or("???"));
    }
    out
}

fn bytes(n: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn section<C>(out: &mut String, name: &str, l: &Loaded<C>, config: String, tensors: bool) {
    let w: &Component = &l.weights;
    let dtypes: Vec<String> = w
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d} ×{n}"))
        .collect();
    let files: Vec<String> = l.files.iter().map(|f| f.display().to_string()).collect();
    let params = w.param_count();
    out.push_str(&format!("{name}\n"));
    out.push_str(&format!("  layout:     {}\n", l.layout));
    out.push_str(&format!("  files:      {}\n", files.join(", ")));
    out.push_str(&format!(
        "  tensors:    {} ({})\n",
        w.len(),
        dtypes.join(", ")
    ));
    out.push_str(&format!("  parameters: {}\n", group(params)));
    out.push_str(&format!(
        "  bytes:      {} as stored, {} in bf16\n",
        bytes(w.stored_bytes()),
        bytes(params * 2)
    ));
    out.push_str(&format!("  config:     {config}\n"));
    if tensors {
        for n in w.names() {
            let shape = w.shape(n).unwrap_or_default();
            let dtype = w.dtype(n).map(|d| d.as_str()).unwrap_or("?");
            let origin = w.origin(n).unwrap_or("");
            out.push_str(&format!("    {n} {shape:?} {dtype} <- {origin}\n"));
        }
    }
}

fn report(m: &Model, tensors: bool) -> String {
    let mut out = String::new();
    let mut total = 0;
    if let Some(l) = &m.mmdit {
        let c = &l.config;
        let attn2: Vec<String> = c
            .attn2_blocks
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| i.to_string())
            .collect();
        let cfg = format!(
            "depth {}, hidden {}, heads {} (head dim {}), patch {}, channels {}→{}, pos_embed {}², context {}, pooled {}, t-embed {}, mlp {}, qk-norm {}, attn2 blocks [{}]",
            c.depth, c.hidden, c.num_heads, c.head_dim(), c.patch_size, c.in_channels, c.out_channels,
            c.pos_embed_max_size, c.context_dim, c.pooled_dim, c.frequency_embedding_size, c.mlp_hidden,
            if c.qk_norm { "yes" } else { "no" }, attn2.join(", ")
        );
        section(&mut out, "mmdit", l, cfg, tensors);
        total += l.weights.param_count();
    }
    let vae_cfg = |c: &dpir_loader::VaeConfig| {
        let parts = match (c.has_encoder, c.has_decoder) {
            (true, true) => "encoder + decoder",
            (true, false) => "encoder only",
            _ => "decoder only",
        };
        format!(
            "{parts}, channels {:?}, {} ResNet blocks per level, {} latent channels, {} image channels, groups {}, scale {}, shift {}",
            c.block_out_channels, c.layers_per_block, c.latent_channels, c.in_channels, c.norm_groups, c.scaling_factor, c.shift_factor
        )
    };
    if let Some(l) = &m.vae {
        section(&mut out, "vae", l, vae_cfg(&l.config), tensors);
        total += l.weights.param_count();
    }
    if let Some(l) = &m.clip_vision {
        let c = &l.config;
        let proj = c
            .projection_dim
            .map_or("none".to_string(), |p| p.to_string());
        let cfg = format!(
            "layers {}, width {}, heads {}, mlp {}, patch {}, image {} ({} patches), channels {}, projection {proj}, eps {}",
            c.layers, c.hidden, c.heads, c.intermediate, c.patch_size, c.image_size, c.num_patches(), c.num_channels, c.layer_norm_eps
        );
        section(&mut out, "clip_vision", l, cfg, tensors);
        total += l.weights.param_count();
    }
    if let Some(l) = &m.dpir {
        let c = &l.config;
        let cfg = format!(
            "LQ branch {} convs × {} channels from {} latent channels → hidden {} (patch {}), local prompt {}→{}→{}, global prompt {}→{}→{}, robust encoder {}",
            c.lq_convs, c.lq_channels, c.latent_channels, c.hidden, c.patch_size, c.clip_dim, c.local_hidden,
            c.context_dim, c.global_in, c.global_hidden, c.pooled_dim, if c.has_robust_encoder { "yes" } else { "no" }
        );
        section(&mut out, "dpir", l, cfg, tensors);
        total += l.weights.param_count();
    }
    if let Some(l) = &m.robust_encoder {
        section(&mut out, "robust_encoder", l, vae_cfg(&l.config), tensors);
        total += l.weights.param_count();
    }
    for i in &m.ignored {
        if i.tensors == 0 {
            out.push_str(&format!("ignored: {}\n", i.group));
        } else {
            out.push_str(&format!(
                "ignored: {} ({} tensors, {} parameters)\n",
                i.group,
                i.tensors,
                group(i.params)
            ));
        }
    }
    if total == 0 {
        out.push_str("no dpir components found\n");
    } else {
        out.push_str(&format!(
            "total: {} parameters, {} in bf16\n",
            group(total),
            bytes(total * 2)
        ));
    }
    out
}
