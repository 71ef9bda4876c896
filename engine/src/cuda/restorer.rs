//! DPIR on the GPU as a [`Restorer`]: the MMDiT ([`CudaMmdit`]), the VAE — robust encoder
//! and decoder ([`CudaVaeEncoder`], [`CudaVaeDecoder`]) — and CLIP vision
//! ([`CudaClipVision`]) run on the device; DPIR's own small parts (LQ branch convs, prompt
//! MLPs, a few MFLOP) run on the CPU ([`CpuParts`]). A VAE or CLIP config the GPU kernels
//! do not cover (`check_config` of each), or `DPIR_CUDA_VAE=0` / `DPIR_CUDA_CLIP=0`, keeps
//! that part on the CPU.
//!
//! A one-tile image takes the device-resident sampler: the latent, the conditions and the
//! whole timestep schedule are uploaded once, then every step (CFG batch of 2, guidance,
//! Euler update) runs on the device with no host round trip and no device allocation, as
//! one CUDA-graph replay per step ([`CudaMmdit::sample`]).
//! Several tiles go through the pipeline's generic loop (one host round trip per tile and
//! step, for the Gaussian blend).

use std::sync::Arc;

use super::clip::{self, CudaClipVision};
use super::device::CudaDevice;
use super::mmdit::{CudaMmdit, StepPlan};
use super::vae::{self, CudaVaeDecoder, CudaVaeEncoder};
use crate::error::{Error, Result};
use crate::models::mmdit::LqInject;
use crate::models::vae::{from_model_latent, to_model_latent};
use crate::pipeline::cpu::{Configs, CpuParts, ModelSources};
use crate::pipeline::{cfg_conditions, Denoiser, ModelDims, Restorer};
use crate::tensor::Tensor;
use crate::weights::WeightSource;

/// Schedule slots a sampler plan holds at least (so one plan serves any step count up to it).
const PLAN_STEPS: usize = 64;
/// Share of the free device memory the tile chooser plans for (the rest: cuBLASLt, the
/// driver, fragmentation).
const MEMORY_HEADROOM: f64 = 0.85;

pub struct CudaRestorer {
    pub mmdit: CudaMmdit,
    pub parts: CpuParts,
    /// The GPU VAE; `None`: `parts` holds the CPU one.
    vae: Option<(CudaVaeEncoder, CudaVaeDecoder)>,
    /// GPU CLIP vision; `None`: `parts` holds the CPU one.
    clip: Option<CudaClipVision>,
    /// The sampler's plan for the last (latent h, w, context length, steps).
    sampler: Option<StepPlan>,
}

impl CudaRestorer {
    /// Assemble from weight sources (canonical names; the robust encoder under `encoder.*`).
    pub fn from_sources(
        dev: Arc<CudaDevice>,
        cfgs: Configs,
        mmdit: &dyn WeightSource,
        vae: &dyn WeightSource,
        clip: &dyn WeightSource,
        dpir: &dyn WeightSource,
        robust: Option<&dyn WeightSource>,
    ) -> Result<Self> {
        let enc_cfg = cfgs.robust.clone().unwrap_or_else(|| cfgs.vae.clone());
        let enabled = |k: &str| std::env::var(k).map_or(true, |v| v != "0");
        let gpu_vae = enabled("DPIR_CUDA_VAE")
            && vae::check_config(&cfgs.vae).is_ok()
            && vae::check_config(&enc_cfg).is_ok();
        let gpu_clip = enabled("DPIR_CUDA_CLIP") && clip::check_config(&cfgs.clip).is_ok();
        let clip_src = clip;
        let parts = CpuParts::assemble(cfgs, vae, clip_src, dpir, robust, !gpu_vae, !gpu_clip)?;
        let clip = if gpu_clip {
            Some(CudaClipVision::load(
                dev.clone(),
                &parts.configs().clip,
                clip_src,
            )?)
        } else {
            None
        };
        let vae = if gpu_vae {
            let enc_src = match (robust, &parts.configs().robust) {
                (Some(r), Some(_)) => r,
                _ => vae,
            };
            Some((
                CudaVaeEncoder::load(dev.clone(), parts.encoder_config(), enc_src)?,
                CudaVaeDecoder::load(dev.clone(), &parts.configs().vae, vae)?,
            ))
        } else {
            None
        };
        let mmdit = CudaMmdit::load(dev, &parts.configs().mmdit, mmdit)?;
        Ok(Self {
            mmdit,
            parts,
            vae,
            clip,
            sampler: None,
        })
    }

    /// Assemble from what the loader found; names the first missing part.
    pub fn from_model(dev: Arc<CudaDevice>, model: &dpir_loader::Model) -> Result<Self> {
        let s = ModelSources::new(model)?;
        Self::from_sources(
            dev,
            s.cfgs.clone(),
            &s.mmdit,
            &s.vae,
            &s.clip,
            &s.dpir,
            s.robust(),
        )
    }

    /// Whether the VAE runs on the GPU.
    pub fn gpu_vae(&self) -> bool {
        self.vae.is_some()
    }

    /// Whether CLIP vision runs on the GPU.
    pub fn gpu_clip(&self) -> bool {
        self.clip.is_some()
    }

    pub fn device(&self) -> &CudaDevice {
        &self.mmdit.dev
    }

    /// A sampler plan for a CFG batch of 2 at (h, w, l, steps), reused when it fits.
    fn sampler_plan(&mut self, h: usize, w: usize, l: usize, steps: usize) -> Result<StepPlan> {
        match self.sampler.take() {
            Some(p) if p.h == h && p.w == w && p.ctx_len == l && p.steps >= steps => Ok(p),
            old => {
                // Free the old arena before sizing the new one.
                drop(old);
                self.mmdit.plan(2, h, w, l, steps.max(PLAN_STEPS))
            }
        }
    }
}

impl Denoiser for CudaRestorer {
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

impl Restorer for CudaRestorer {
    fn dims(&self) -> ModelDims {
        self.parts.dims()
    }

    fn encode_lq(&mut self, image: &Tensor) -> Result<Tensor> {
        match &mut self.vae {
            Some((enc, _)) => {
                let mut z = enc.encode(image)?;
                to_model_latent(&mut z, self.parts.encoder_config());
                Ok(z)
            }
            None => self.parts.encode_lq(image),
        }
    }

    fn decode(&mut self, z: &Tensor) -> Result<Tensor> {
        match &mut self.vae {
            Some((_, dec)) => {
                let mut z = z.clone();
                from_model_latent(&mut z, &self.parts.configs().vae);
                dec.decode(&z)
            }
            None => self.parts.decode(z),
        }
    }

    fn lq_tokens(&mut self, z_lq: &Tensor) -> Result<Tensor> {
        self.parts.lq_tokens(z_lq)
    }

    fn local_prompt(&mut self, region: &Tensor) -> Result<Tensor> {
        match &mut self.clip {
            Some(c) => {
                let out = c.forward(&self.parts.clip_pixels(region)?)?;
                self.parts.local_from_clip(&out)
            }
            None => self.parts.local_prompt(region),
        }
    }

    fn global_prompt(&mut self, image: &Tensor) -> Result<Tensor> {
        match &mut self.clip {
            Some(c) => {
                let out = c.forward(&self.parts.clip_pixels(image)?)?;
                self.parts.global_from_clip(&out)
            }
            None => self.parts.global_prompt(image),
        }
    }

    /// Device bytes of the MMDiT, VAE and CLIP (bf16) plus host bytes of the CPU parts (f32).
    fn weight_bytes(&self) -> u64 {
        let vae = self
            .vae
            .as_ref()
            .map_or(0, |(e, d)| e.weight_bytes() + d.weight_bytes());
        let clip = self.clip.as_ref().map_or(0, |c| c.weight_bytes());
        (self.mmdit.weight_bytes + vae + clip) as u64 + 4 * self.parts.param_count() as u64
    }

    /// Device bytes of the activation arenas: the sampler's plan on this tile, plus the
    /// VAE's at its default tile and CLIP's at batch 1 when they run on the GPU.
    fn plan_bytes(&self, tile_h: usize, tile_w: usize, context_len: usize, batch: usize) -> u64 {
        let sampler =
            StepPlan::bytes_for(&self.mmdit, batch, tile_h, tile_w, context_len, PLAN_STEPS)
                .unwrap_or(0);
        let t = crate::pipeline::DEFAULT_VAE_TILE;
        let f = crate::pipeline::VAE_FACTOR;
        let vae = self.vae.as_ref().map_or(0, |(e, d)| {
            let enc = e.plan_bytes(1, t, t).unwrap_or(0);
            let dec = d.plan_bytes(1, t / f, t / f).unwrap_or(0);
            enc + dec
        });
        let clip = self.clip.as_ref().map_or(0, |c| c.plan_bytes(1));
        (sampler + vae + clip) as u64
    }

    fn memory_tile_limit(&self, context_len: usize, steps: usize) -> Option<usize> {
        let (free, _) = self.mmdit.dev.mem_info().ok()?;
        // The plan held now is freed before a new one is made.
        let held = self.sampler.as_ref().map_or(0, |p| p.bytes);
        let budget = ((free + held) as f64 * MEMORY_HEADROOM) as usize;
        let cfg = &self.mmdit.cfg;
        let pz = cfg.patch_size.max(1);
        let steps = steps.max(PLAN_STEPS);
        let mut side = cfg.pos_embed_max_size * pz;
        while side > pz {
            match StepPlan::bytes_for(&self.mmdit, 2, side, side, context_len, steps) {
                Ok(b) if b <= budget => return Some(side),
                _ => side -= pz,
            }
        }
        Some(pz)
    }

    fn sample_single_tile(
        &mut self,
        z0: &Tensor,
        sigmas: &[f32],
        y: &Tensor,
        context: &Tensor,
        lq_tokens: &Tensor,
        cfg: f32,
    ) -> Result<Option<Tensor>> {
        let [c, h, w] = z0.shape[..] else {
            return Err(Error::Model(format!(
                "latent tile: expected [C, h, w], got {:?}",
                z0.shape
            )));
        };
        let steps = sigmas.len().saturating_sub(1);
        if steps == 0 {
            return Ok(Some(z0.clone()));
        }
        let l = context.shape.first().copied().unwrap_or(0);
        let mut plan = self.sampler_plan(h, w, l, steps)?;
        let run = (|| {
            let dev = &*self.mmdit.dev;
            plan.set_latent(dev, z0)?;
            let t: Vec<f32> = sigmas[..steps]
                .iter()
                .flat_map(|&s| [1000.0 * s, 1000.0 * s])
                .collect();
            plan.set_timesteps(dev, &t)?;
            let (y2, ctx2, lq2) = cfg_conditions(y, context, lq_tokens)?;
            let inject = LqInject {
                tokens: &lq2,
                gate: &self.parts.dpir.gate,
            };
            plan.set_conditions(dev, &y2, &ctx2, Some(inject))?;
            self.mmdit.sample(&mut plan, cfg, sigmas)?;
            let z = plan.latent(dev)?;
            Tensor::new(&[c, h, w], z)
        })();
        self.sampler = Some(plan);
        run.map(Some)
    }
}
