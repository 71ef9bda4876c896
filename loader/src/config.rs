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

impl MmditConfig {
    /// Stable Diffusion 3 medium: 24 blocks, hidden 1536, no qk-norm, pos 192.
    pub fn sd3_medium() -> Self {
        Self::sd3_family(24, 192, false, 0)
    }

    /// Stable Diffusion 3.5 medium (MMDiT-X): 24 blocks, hidden 1536, qk-norm, pos 384,
    /// `attn2` in blocks 0–12.
    pub fn sd35_medium() -> Self {
        Self::sd3_family(24, 384, true, 13)
    }

    /// Stable Diffusion 3.5 large: 38 blocks, hidden 2432, qk-norm, pos 192.
    pub fn sd35_large() -> Self {
        Self::sd3_family(38, 192, true, 0)
    }

    /// A tiny MMDiT-X for tests: 2 blocks, hidden 128 (2 heads of 64), qk-norm, `attn2` in
    /// block 0, pos 8, context 64, pooled 32.
    pub fn tiny() -> Self {
        Self {
            depth: 2,
            hidden: 128,
            num_heads: 2,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            pos_embed_max_size: 8,
            context_dim: 64,
            pooled_dim: 32,
            frequency_embedding_size: 256,
            mlp_hidden: 512,
            qk_norm: true,
            attn2_blocks: vec![true, false],
        }
    }

    fn sd3_family(depth: usize, pos: usize, qk_norm: bool, attn2_first: usize) -> Self {
        let hidden = 64 * depth;
        Self {
            depth,
            hidden,
            num_heads: depth,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            pos_embed_max_size: pos,
            context_dim: 4096,
            pooled_dim: 2048,
            frequency_embedding_size: 256,
            mlp_hidden: 4 * hidden,
            qk_norm,
            attn2_blocks: (0..depth).map(|i| i < attn2_first).collect(),
        }
    }
}

impl VaeConfig {
    /// The SD3 / SD3.5 VAE (encoder and decoder).
    pub fn sd3() -> Self {
        Self {
            in_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: 0.0609,
            has_encoder: true,
            has_decoder: true,
        }
    }

    /// The bundled dpir-tiny's VAE: SD3's layout at channels `[32, 64, 128, 128]`.
    pub fn dpir_tiny() -> Self {
        Self {
            block_out_channels: vec![32, 64, 128, 128],
            ..Self::sd3()
        }
    }

    /// A tiny VAE for tests: levels `[32, 64]` (one down/upsampling), one ResNet per
    /// level, 16 latent channels, SD3 scale and shift.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            ..Self::sd3()
        }
    }

    /// The same VAE with only its encoder (the layout of DPIR's robust encoder).
    pub fn encoder_only(mut self) -> Self {
        self.has_encoder = true;
        self.has_decoder = false;
        self
    }

    /// Spatial downsampling factor (`2^(levels − 1)`; 8 for SD3).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-L/14 at 224 px (`openai/clip-vit-large-patch14`), with its
    /// 768-wide visual projection.
    pub fn vit_l14() -> Self {
        Self {
            hidden: 1024,
            intermediate: 4096,
            layers: 24,
            heads: 16,
            patch_size: 14,
            image_size: 224,
            num_channels: 3,
            projection_dim: Some(768),
            layer_norm_eps: 1e-5,
        }
    }

    /// A tiny ViT for tests: hidden 128 (2 heads), 2 layers, patch 8 at 32 px
    /// (16 patch tokens), projection 64.
    pub fn tiny() -> Self {
        Self {
            hidden: 128,
            intermediate: 256,
            layers: 2,
            heads: 2,
            patch_size: 8,
            image_size: 32,
            num_channels: 3,
            projection_dim: Some(64),
            layer_norm_eps: 1e-5,
        }
    }

    /// Patch tokens per image (`(image_size / patch_size)²`, without the class token).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size.max(1);
        side * side
    }
}

impl DpirConfig {
    /// The DPIR adapter that fits a given backbone, VAE and CLIP vision tower: LQ branch
    /// of `lq_convs` 3×3 convs with `lq_channels` channels, prompt MLPs whose hidden width
    /// equals their output width.
    pub fn for_backbone(
        mmdit: &MmditConfig,
        vae: &VaeConfig,
        clip: &ClipVisionConfig,
        lq_channels: usize,
        lq_convs: usize,
    ) -> Self {
        let global_in = clip.projection_dim.unwrap_or(clip.hidden);
        Self {
            lq_channels,
            lq_convs,
            hidden: mmdit.hidden,
            patch_size: mmdit.patch_size,
            latent_channels: vae.latent_channels,
            clip_dim: clip.hidden,
            local_hidden: mmdit.context_dim,
            context_dim: mmdit.context_dim,
            global_in,
            global_hidden: mmdit.pooled_dim,
            pooled_dim: mmdit.pooled_dim,
            has_robust_encoder: true,
        }
    }

    /// DPIR for SD3.5 medium with CLIP ViT-L/14: LQ branch of 3 convs with 320 channels.
    pub fn sd35_medium() -> Self {
        Self::for_backbone(
            &MmditConfig::sd35_medium(),
            &VaeConfig::sd3(),
            &ClipVisionConfig::vit_l14(),
            320,
            3,
        )
    }

    /// The adapter for [`MmditConfig::tiny`], [`VaeConfig::tiny`] and
    /// [`ClipVisionConfig::tiny`]: LQ branch of 2 convs with 32 channels.
    pub fn tiny() -> Self {
        Self::for_backbone(
            &MmditConfig::tiny(),
            &VaeConfig::tiny(),
            &ClipVisionConfig::tiny(),
            32,
            2,
        )
    }
}
