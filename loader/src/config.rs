//! Model configurations, detected from tensor names and shapes (never from flags).
//!
//! These structs are the contract between the loader (which fills them in) and the
//! engine (which sizes every buffer from them).

/// SD3 / SD3.5 MMDiT (and MMDiT-X) configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MmditConfig {
    /// Number of joint blocks (`joint_blocks.{i}`).
    pub depth: usize,
    /// Model width (`x_embedder.proj.weight` dim 0). SD3: 64 × depth.
    pub hidden: usize,
    /// Attention heads. SD3 convention: heads = depth (head_dim 64); with qk-norm the
    /// head dim is read from `ln_q.weight`.
    pub num_heads: usize,
    /// Patch size (`x_embedder.proj.weight` dims 2, 3).
    pub patch_size: usize,
    /// Latent channels in (`x_embedder.proj.weight` dim 1).
    pub in_channels: usize,
    /// Latent channels out (`final_layer.linear.weight` dim 0 / patch²).
    pub out_channels: usize,
    /// Side of the square positional-embedding grid (`pos_embed` is `[1, max², hidden]`).
    pub pos_embed_max_size: usize,
    /// Context (text) feature width (`context_embedder.weight` dim 1). SD3: 4096.
    pub context_dim: usize,
    /// Pooled vector width (`y_embedder.mlp.0.weight` dim 1). SD3: 2048.
    pub pooled_dim: usize,
    /// Sinusoidal timestep embedding size (`t_embedder.mlp.0.weight` dim 1). SD3: 256.
    pub frequency_embedding_size: usize,
    /// MLP hidden width (`mlp.fc1.weight` dim 0). SD3: 4 × hidden.
    pub mlp_hidden: usize,
    /// SD3.5: RMSNorm (eps 1e-6) on q and k per head (`attn.ln_q`, `attn.ln_k`).
    pub qk_norm: bool,
    /// MMDiT-X: `attn2_blocks[i]` is true when `joint_blocks.{i}.x_block.attn2.qkv` exists.
    pub attn2_blocks: Vec<bool>,
}

impl MmditConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.num_heads
    }
}

/// SD3 VAE (AutoencoderKL with 16 latent channels, no quant convs).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub latent_channels: usize,
    /// `[128, 256, 512, 512]` for SD3.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_groups: usize,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    pub has_encoder: bool,
    pub has_decoder: bool,
}

/// Hugging Face `CLIPVisionModel` (+ optional `visual_projection`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub num_channels: usize,
    /// `visual_projection.weight` dim 0, when present.
    pub projection_dim: Option<usize>,
    pub layer_norm_eps: f32,
}

/// DPIR's own parts: LQ branch, feature alignment gate, visual-prompt MLPs.
/// Key names are documented in `docs/WEIGHTS.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct DpirConfig {
    /// Channels of the LQ branch's hidden convs (`lq_branch.conv_in.weight` dim 0).
    pub lq_channels: usize,
    /// Number of 3×3 convs (with SiLU) before the patchifying projection.
    pub lq_convs: usize,
    /// Width the LQ tokens are projected to (= MMDiT hidden).
    pub hidden: usize,
    /// Patch size of the LQ projection (= MMDiT patch size).
    pub patch_size: usize,
    /// Latent channels the LQ branch reads (= VAE latent channels).
    pub latent_channels: usize,
    /// CLIP vision width read by the local prompt MLP.
    pub clip_dim: usize,
    /// Local-prompt MLP hidden width and output width (= MMDiT context_dim).
    pub local_hidden: usize,
    pub context_dim: usize,
    /// Global-prompt MLP input (CLIP cls width, after projection if any), hidden and
    /// output width (= MMDiT pooled_dim).
    pub global_in: usize,
    pub global_hidden: usize,
    pub pooled_dim: usize,
    /// Whether the robust VAE encoder (`robust_encoder.*`) is present.
    pub has_robust_encoder: bool,
}
