//! The CPU reference backend as a [`Restorer`]: MMDiT, VAE, CLIP vision and DPIR's own
//! parts, checked against each other when assembled.

use dpir_loader::{ClipVisionConfig, Component, DpirConfig, MmditConfig, VaeConfig};

use super::{Denoiser, ModelDims, Restorer, VAE_FACTOR};
use crate::error::{Error, Result};
use crate::models::clip::{preprocess, ClipOutput, ClipVision};
use crate::models::dpir::Dpir;
use crate::models::mmdit::{LqInject, Mmdit};
use crate::models::vae::{from_model_latent, to_model_latent, VaeDecoder, VaeEncoder};
use crate::tensor::Tensor;
use crate::weights::WeightSource;

/// A loader component seen as a [`WeightSource`].
pub struct ComponentSource<'a>(pub &'a Component);

impl WeightSource for ComponentSource<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .0
            .shape(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?
            .to_vec();
        let data = self.0.f32(name)?.into_owned();
        Tensor::new(&shape, data)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.0
            .shape(name)
            .map(|s| s.to_vec())
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }
}

/// Configs of the four parts (and of the robust encoder when it is separate).
#[derive(Clone, Debug)]
pub struct Configs {
    pub mmdit: MmditConfig,
    pub vae: VaeConfig,
    pub clip: ClipVisionConfig,
    pub dpir: DpirConfig,
    /// The robust encoder's config; `None`: the VAE's own encoder encodes the LQ image.
    pub robust: Option<VaeConfig>,
}

/// Every part of DPIR except the MMDiT, on the CPU: robust VAE encoder, VAE decoder, CLIP
/// vision and DPIR's own parts (LQ branch, prompt adapters, alignment gate). The CPU
/// restorer pairs it with the CPU MMDiT, the CUDA restorer with the GPU one.
pub struct CpuParts {
    pub dpir: Dpir,
    /// `None` when another backend runs the VAE.
    encoder: Option<VaeEncoder>,
    encoder_cfg: VaeConfig,
    decoder: Option<VaeDecoder>,
    decoder_cfg: VaeConfig,
    /// `None` when another backend runs CLIP vision.
    clip: Option<ClipVision>,
    cfgs: Configs,
}

/// The CPU reference backend: the f32 MMDiT and [`CpuParts`].
pub struct CpuRestorer {
    pub mmdit: Mmdit,
    pub parts: CpuParts,
}

fn no_vae(part: &str) -> Error {
    Error::Model(format!("the VAE {part} is not loaded on the CPU"))
}

fn mismatch(what: &str, a: usize, b: usize) -> Error {
    Error::Model(format!("not a consistent DPIR model: {what} ({a} vs {b})"))
}

/// The weight sources of a loaded model, with its configs.
pub struct ModelSources<'a> {
    pub cfgs: Configs,
    pub mmdit: ComponentSource<'a>,
    pub vae: ComponentSource<'a>,
    pub clip: ComponentSource<'a>,
    pub dpir: ComponentSource<'a>,
    /// The robust encoder (`encoder.*`), when separate from the VAE.
    pub robust: Option<ComponentSource<'a>>,
}

impl<'a> ModelSources<'a> {
    /// What the loader found; names the first missing part.
    pub fn new(model: &'a dpir_loader::Model) -> Result<Self> {
        let missing =
            |what: &str| Error::Model(format!("not a DPIR model: no {what} weights found"));
        let mmdit = model.mmdit.as_ref().ok_or_else(|| missing("MMDiT"))?;
        let vae = model.vae.as_ref().ok_or_else(|| missing("VAE"))?;
        let clip = model
            .clip_vision
            .as_ref()
            .ok_or_else(|| missing("CLIP vision"))?;
        let dpir = model
            .dpir
            .as_ref()
            .ok_or_else(|| missing("DPIR (lq_branch, prompt adapters)"))?;
        Ok(Self {
            cfgs: Configs {
                mmdit: mmdit.config.clone(),
                vae: vae.config.clone(),
                clip: clip.config.clone(),
                dpir: dpir.config.clone(),
                robust: model.robust_encoder.as_ref().map(|r| r.config.clone()),
            },
            mmdit: ComponentSource(&mmdit.weights),
            vae: ComponentSource(&vae.weights),
            clip: ComponentSource(&clip.weights),
            dpir: ComponentSource(&dpir.weights),
            robust: model
                .robust_encoder
                .as_ref()
                .map(|r| ComponentSource(&r.weights)),
        })
    }

    pub fn robust(&self) -> Option<&dyn WeightSource> {
        self.robust.as_ref().map(|r| r as &dyn WeightSource)
    }
}

impl CpuParts {
    /// Assemble from weight sources (canonical names; the robust encoder under `encoder.*`),
    /// after checking that the four configs describe one consistent model.
    pub fn from_sources(
        cfgs: Configs,
        vae: &dyn WeightSource,
        clip: &dyn WeightSource,
        dpir: &dyn WeightSource,
        robust: Option<&dyn WeightSource>,
    ) -> Result<Self> {
        Self::assemble(cfgs, vae, clip, dpir, robust, true, true)
    }

    /// As [`CpuParts::from_sources`]; `with_vae == false` checks the VAE configs but loads
    /// no VAE weights (another backend runs the VAE; [`CpuParts::encode_lq`] and
    /// [`CpuParts::decode`] then answer an error); `with_clip == false` likewise for CLIP
    /// vision ([`CpuParts::local_from_clip`] / [`CpuParts::global_from_clip`] take the
    /// other backend's CLIP output).
    pub fn assemble(
        cfgs: Configs,
        vae: &dyn WeightSource,
        clip: &dyn WeightSource,
        dpir: &dyn WeightSource,
        robust: Option<&dyn WeightSource>,
        with_vae: bool,
        with_clip: bool,
    ) -> Result<Self> {
        let (m, v, c, d) = (&cfgs.mmdit, &cfgs.vae, &cfgs.clip, &cfgs.dpir);
        let checks = [
            (
                "DPIR hidden width vs MMDiT hidden width",
                d.hidden,
                m.hidden,
            ),
            (
                "DPIR patch size vs MMDiT patch size",
                d.patch_size,
                m.patch_size,
            ),
            (
                "DPIR context width vs MMDiT context width",
                d.context_dim,
                m.context_dim,
            ),
            (
                "DPIR pooled width vs MMDiT pooled width",
                d.pooled_dim,
                m.pooled_dim,
            ),
            (
                "DPIR latent channels vs VAE latent channels",
                d.latent_channels,
                v.latent_channels,
            ),
            (
                "MMDiT input channels vs VAE latent channels",
                m.in_channels,
                v.latent_channels,
            ),
            (
                "MMDiT output channels vs VAE latent channels",
                m.out_channels,
                v.latent_channels,
            ),
            (
                "DPIR local-prompt input vs CLIP width",
                d.clip_dim,
                c.hidden,
            ),
            (
                "DPIR global-prompt input vs CLIP output width",
                d.global_in,
                c.projection_dim.unwrap_or(c.hidden),
            ),
        ];
        for (what, a, b) in checks {
            if a != b {
                return Err(mismatch(what, a, b));
            }
        }
        if !v.has_decoder {
            return Err(Error::Model("not a DPIR model: no VAE decoder".into()));
        }
        let (encoder, encoder_cfg) = match (&cfgs.robust, robust) {
            (Some(rc), Some(rw)) => {
                if rc.latent_channels != v.latent_channels {
                    return Err(mismatch(
                        "robust encoder vs VAE latent channels",
                        rc.latent_channels,
                        v.latent_channels,
                    ));
                }
                (
                    with_vae.then(|| VaeEncoder::load(rc, rw)).transpose()?,
                    rc.clone(),
                )
            }
            _ if v.has_encoder => (
                with_vae.then(|| VaeEncoder::load(v, vae)).transpose()?,
                v.clone(),
            ),
            _ => {
                return Err(Error::Model(
                    "not a DPIR model: no robust encoder and no VAE encoder".into(),
                ))
            }
        };
        Ok(Self {
            dpir: Dpir::load(d, dpir)?,
            encoder,
            encoder_cfg,
            decoder: with_vae.then(|| VaeDecoder::load(v, vae)).transpose()?,
            decoder_cfg: v.clone(),
            clip: with_clip.then(|| ClipVision::load(c, clip)).transpose()?,
            cfgs,
        })
    }

    pub fn configs(&self) -> &Configs {
        &self.cfgs
    }

    /// Local-prompt tokens per tile (CLIP patch count).
    pub fn local_prompt_len(&self) -> usize {
        let g = self.cfgs.clip.image_size / self.cfgs.clip.patch_size.max(1);
        g * g
    }

    /// The pipeline's sizes, read from the MMDiT config.
    pub fn dims(&self) -> ModelDims {
        let m = &self.cfgs.mmdit;
        ModelDims {
            latent_channels: m.in_channels,
            patch: m.patch_size,
            context_dim: m.context_dim,
            pooled_dim: m.pooled_dim,
            max_tile_latent: m.pos_embed_max_size * m.patch_size,
        }
    }

    /// The config of the encoder that encodes the LQ image (the robust one when present).
    pub fn encoder_config(&self) -> &VaeConfig {
        &self.encoder_cfg
    }

    /// See [`Restorer::encode_lq`].
    pub fn encode_lq(&self, image: &Tensor) -> Result<Tensor> {
        let enc = self.encoder.as_ref().ok_or_else(|| no_vae("encoder"))?;
        let mut z = enc.encode(image)?;
        to_model_latent(&mut z, &self.encoder_cfg);
        Ok(z)
    }

    /// See [`Restorer::decode`].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut z = z.clone();
        from_model_latent(&mut z, &self.decoder_cfg);
        let dec = self.decoder.as_ref().ok_or_else(|| no_vae("decoder"))?;
        dec.decode(&z)
    }

    /// See [`Restorer::lq_tokens`].
    pub fn lq_tokens(&self, z_lq: &Tensor) -> Result<Tensor> {
        self.dpir.lq_branch.forward(z_lq)
    }

    /// A region `[3, h, w]` in [-1, 1] as CLIP pixels `[1, 3, S, S]`.
    pub fn clip_pixels(&self, region: &Tensor) -> Result<Tensor> {
        let s = self.cfgs.clip.image_size;
        preprocess(region, s)?.reshape(&[1, 3, s, s])
    }

    /// Local-prompt tokens `[P, ctx]` from a CLIP forward: the patch tokens of the
    /// penultimate hidden state through the local MLP.
    pub fn local_from_clip(&self, out: &ClipOutput) -> Result<Tensor> {
        let [_, l, w] = out.penultimate.shape[..] else {
            return Err(Error::Model(format!(
                "CLIP penultimate state has shape {:?}",
                out.penultimate.shape
            )));
        };
        let patches = Tensor::new(&[1, l - 1, w], out.penultimate.data[w..].to_vec())?;
        let ctx = self.dpir.prompts.local(&patches)?;
        let shape = [ctx.shape[1], ctx.shape[2]];
        ctx.reshape(&shape)
    }

    /// The pooled vector `[pooled]` from a CLIP forward: pooled output through the global MLP.
    pub fn global_from_clip(&self, out: &ClipOutput) -> Result<Tensor> {
        let y = self.dpir.prompts.global(&out.pooled)?;
        let n = y.numel();
        y.reshape(&[n])
    }

    fn clip(&self) -> Result<&ClipVision> {
        self.clip
            .as_ref()
            .ok_or_else(|| Error::Model("CLIP vision is not loaded on the CPU".into()))
    }

    /// See [`Restorer::local_prompt`].
    pub fn local_prompt(&self, region: &Tensor) -> Result<Tensor> {
        let out = self.clip()?.forward(&self.clip_pixels(region)?)?;
        self.local_from_clip(&out)
    }

    /// See [`Restorer::global_prompt`].
    pub fn global_prompt(&self, image: &Tensor) -> Result<Tensor> {
        let out = self.clip()?.forward(&self.clip_pixels(image)?)?;
        self.global_from_clip(&out)
    }

    /// Parameters held here: DPIR's parts and, when loaded, CLIP vision and the VAE.
    pub fn param_count(&self) -> usize {
        use dpir_loader::{
            clip_vision_spec, dpir_spec, param_count, vae_decoder_spec, vae_encoder_spec,
        };
        let c = &self.cfgs;
        let mut n = param_count(&dpir_spec(&c.dpir));
        if self.clip.is_some() {
            n += param_count(&clip_vision_spec(&c.clip));
        }
        if self.decoder.is_some() {
            n += param_count(&vae_decoder_spec(&c.vae));
        }
        if self.encoder.is_some() {
            n += param_count(&vae_encoder_spec(&self.encoder_cfg, "encoder"));
        }
        n
    }

    /// Peak f32 activations of the VAE decoder on a `tile_h × tile_w` latent tile.
    pub fn vae_plan_bytes(&self, tile_h: usize, tile_w: usize) -> u64 {
        let top = self
            .cfgs
            .vae
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(128);
        4 * (3 * top * (tile_h * VAE_FACTOR) * (tile_w * VAE_FACTOR)) as u64
    }
}

impl CpuRestorer {
    /// Assemble from weight sources (canonical names; the robust encoder under `encoder.*`).
    pub fn from_sources(
        cfgs: Configs,
        mmdit: &dyn WeightSource,
        vae: &dyn WeightSource,
        clip: &dyn WeightSource,
        dpir: &dyn WeightSource,
        robust: Option<&dyn WeightSource>,
    ) -> Result<Self> {
        let parts = CpuParts::from_sources(cfgs, vae, clip, dpir, robust)?;
        Ok(Self {
            mmdit: Mmdit::load(&parts.cfgs.mmdit, mmdit)?,
            parts,
        })
    }

    /// Assemble from what the loader found; names the first missing part.
    pub fn from_model(model: dpir_loader::Model) -> Result<Self> {
        let s = ModelSources::new(&model)?;
        Self::from_sources(
            s.cfgs.clone(),
            &s.mmdit,
            &s.vae,
            &s.clip,
            &s.dpir,
            s.robust(),
        )
    }
}

impl Denoiser for CpuRestorer {
    fn velocity(
        &mut self,
        z: &Tensor,
        timestep: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq_tokens: &Tensor,
    ) -> Result<Tensor> {
        let lq = LqInject {
            tokens: lq_tokens,
            gate: &self.parts.dpir.gate,
        };
        self.mmdit.forward(z, timestep, y, context, Some(lq))
    }
}

impl Restorer for CpuRestorer {
    fn dims(&self) -> ModelDims {
        self.parts.dims()
    }

    fn encode_lq(&mut self, image: &Tensor) -> Result<Tensor> {
        self.parts.encode_lq(image)
    }

    fn decode(&mut self, z: &Tensor) -> Result<Tensor> {
        self.parts.decode(z)
    }

    fn lq_tokens(&mut self, z_lq: &Tensor) -> Result<Tensor> {
        self.parts.lq_tokens(z_lq)
    }

    fn local_prompt(&mut self, region: &Tensor) -> Result<Tensor> {
        self.parts.local_prompt(region)
    }

    fn global_prompt(&mut self, image: &Tensor) -> Result<Tensor> {
        self.parts.global_prompt(image)
    }

    fn weight_bytes(&self) -> u64 {
        let params = dpir_loader::param_count(&dpir_loader::mmdit_spec(&self.parts.cfgs.mmdit))
            + self.parts.param_count();
        4 * params as u64
    }

    /// Peak f32 activations of one guided MMDiT call on a `tile_h × tile_w` latent tile, or
    /// of the VAE decoder on its default tile (512 px), whichever is larger.
    fn plan_bytes(&self, tile_h: usize, tile_w: usize, context_len: usize, batch: usize) -> u64 {
        let m = &self.parts.cfgs.mmdit;
        let n = (tile_h / m.patch_size.max(1)) * (tile_w / m.patch_size.max(1));
        let t = n + context_len;
        // Modulated input, fused qkv, joint qkv, attention out, k/v panels, MLP hidden.
        let dit = 4 * (batch * t * (m.hidden * 14 + m.mlp_hidden)) as u64;
        let vae_tile = super::DEFAULT_VAE_TILE / VAE_FACTOR;
        dit.max(self.parts.vae_plan_bytes(vae_tile, vae_tile))
    }
}
