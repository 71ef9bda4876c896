//! The SD3 VAE (encoder and decoder) on the GPU, mirroring `models::vae` (the CPU f32
//! reference) layer for layer: same `VaeConfig`, same canonical LDM weight names, same
//! host-tensor contract ([`CudaVaeEncoder::encode`] = `VaeEncoder::encode`,
//! [`CudaVaeDecoder::decode`] = `VaeDecoder::decode`).
//!
//! On the device everything is NHWC bf16 with f32 accumulation (`kernels/cuda/vae_conv.cu`,
//! `kernels/cuda/vae_norm.cu`): conv weights are stored `[Cout][KH][KW][Cin]` bf16, biases
//! and GroupNorm affine parameters f32, all in one allocation. A network is a flat list of
//! `Step`s; the same list sizes the activation plan and runs it, so the two cannot drift.
//!
//! Kernels per layer (rule: `ConvKernel::choose`):
//! - 3×3 / 1×1 convs, downsample (pad (0, 1, 0, 1), stride 2), upsample conv (nearest 2×
//!   fused, `up = 1`): `vae_conv2d_bf16` (tensor cores) when `Cin % 32 == 0` and
//!   `Cout % 8 == 0`, else `vae_conv2d_generic_bf16` (SD3: encoder `conv_in` 3 → 128,
//!   decoder `conv_in` 16 → 512, decoder `conv_out` 128 → 3). The ResNet residual and the
//!   attention residual are fused into the conv epilogue (in place).
//! - GroupNorm(+SiLU): `vae_groupnorm_stats_bf16` ×3 + `vae_groupnorm_silu_bf16`.
//! - Mid-block attention (one head of C channels over the H·W pixels, per image): q / k / v
//!   / proj_out as 1×1 convs, scores by cuBLASLt in f32 (`Gemm::batched_qkt_f32`),
//!   `softmax_rows_f32_bf16` into bf16 probabilities, `Gemm::batched_pv`; query rows in chunks so the
//!   score scratch stays under [`SCORE_BYTES_MAX`].
//! - Layout: `nchw_f32_to_nhwc_bf16` in, `nhwc_bf16_to_nchw_f32` out.
//!
//! Memory: the weights take one allocation; activations one arena per input shape
//! (`VaePlan`, sized by `plan_sizes`, bytes by [`PlanSizes::bytes`]), cached for the last
//! shape, so repeated calls at one shape make no device allocation.

use std::sync::Arc;

use dpir_loader::VaeConfig;

use super::device::{arena_bytes, bf16_bits, Arena, Bf16, CudaDevice, DView, DeviceBuffer};
use super::gemm::Gemm;
use super::vae_ops::{gn_part_floats, ConvKernel, ConvShape, GN_GROUPS, GN_MAX_CHANNELS};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::WeightSource;

/// Every kernel the VAE launches (checked at load: the VAE modules are optional).
const KERNELS: &[&str] = &[
    "vae_conv2d_bf16",
    "vae_conv2d_generic_bf16",
    "vae_groupnorm_stats_bf16",
    "vae_groupnorm_silu_bf16",
    "nchw_f32_to_nhwc_bf16",
    "nhwc_bf16_to_nchw_f32",
    "softmax_rows_f32_bf16",
];

/// GroupNorm epsilon of the LDM VAE (as `models::vae`).
const NORM_EPS: f32 = 1e-6;

/// Default bound of the attention score scratch (bytes); larger problems run in query
/// chunks.
pub const SCORE_BYTES_MAX: usize = 256 << 20;
/// Bytes per attention score: the f32 score and its bf16 probability.
const SCORE_ELEM_BYTES: usize = 6;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Query rows per attention chunk: all `hw` rows when the `hw × hw` scores (f32, plus their
/// bf16 probabilities: 6 bytes each) fit `budget` bytes, else the most that fit, rounded down to a multiple of
/// `128 / gcd(c, 128)` rows (at least that many) so that every chunk's q / o offset
/// (`rows · c` bf16) stays 256-byte aligned for cuBLASLt.
pub(crate) fn attn_chunk_rows(hw: usize, c: usize, budget: usize) -> usize {
    if hw * hw * SCORE_ELEM_BYTES <= budget {
        return hw;
    }
    let g = 128 / gcd(c, 128);
    let rows = budget / (SCORE_ELEM_BYTES * hw) / g * g;
    rows.max(g).min(hw)
}

/// PyTorch conv weight `[cout, cin, kh, kw]` → `[cout, kh, kw, cin]` (the layout
/// `vae_conv.cu` reads).
pub(crate) fn conv_weight_ohwi(
    w: &[f32],
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    out[((co * kh + y) * kw + x) * cin + ci] =
                        w[((co * cin + ci) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
struct Conv {
    w: DView<Bf16>,
    b: DView<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    /// (top, left, bottom, right)
    pad: (usize, usize, usize, usize),
    /// Index of the layer name (`decoder.up.2.block.0.conv1`) in the network's name table.
    name: usize,
}

impl Conv {
    fn shape(&self, n: usize, h: usize, w: usize, up: bool) -> ConvShape {
        ConvShape {
            n,
            h,
            w,
            cin: self.cin,
            cout: self.cout,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            up,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Gn {
    gamma: DView<f32>,
    beta: DView<f32>,
    c: usize,
    name: usize,
}

#[derive(Clone, Copy, Debug)]
struct Resnet {
    norm1: Gn,
    conv1: Conv,
    norm2: Gn,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

#[derive(Clone, Copy, Debug)]
struct Attn {
    norm: Gn,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

/// One layer of the flattened network.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A convolution; `up`: read the input 2× nearest-upsampled (decoder `upsample.conv`).
    Conv {
        conv: Conv,
        up: bool,
    },
    Resnet(Resnet),
    Attn(Attn),
    /// `norm_out` + SiLU.
    NormSilu(Gn),
}

impl Step {
    /// Output `(c, h, w)` for an input `(c, h, w)`; errors on a channel mismatch or a
    /// convolution that does not fit.
    fn out_dims(&self, (c, h, w): (usize, usize, usize)) -> Result<(usize, usize, usize)> {
        let cin = match self {
            Step::Conv { conv, .. } => conv.cin,
            Step::Resnet(r) => r.conv1.cin,
            Step::Attn(a) => a.norm.c,
            Step::NormSilu(g) => g.c,
        };
        if cin != c {
            return Err(Error::Model(format!(
                "CUDA VAE: a layer expects {cin} channels, gets {c}"
            )));
        }
        match self {
            Step::Conv { conv, up } => {
                let (ho, wo) = conv.shape(1, h, w, *up).out_hw()?;
                Ok((conv.cout, ho, wo))
            }
            Step::Resnet(r) => Ok((r.conv2.cout, h, w)),
            Step::Attn(_) | Step::NormSilu(_) => Ok((c, h, w)),
        }
    }
}

/// Sizes of one activation plan (element counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSizes {
    pub batch: usize,
    /// Input `(c, h, w)` and output `(c, h, w)` of the network.
    pub input: (usize, usize, usize),
    pub output: (usize, usize, usize),
    /// Elements of each of the three rotating NHWC bf16 activation buffers: the largest
    /// `batch · h · w · c` of any tensor the network reads or writes.
    pub act: usize,
    /// f32 GroupNorm scratch: the largest `gn_part_floats` of any GroupNorm.
    pub gn_part: usize,
    /// Mid-block attention `(h·w, c)` (one image), or `None` without attention.
    pub attn: Option<(usize, usize)>,
    /// Query rows per attention chunk (`attn_chunk_rows`).
    pub attn_rows: usize,
}

impl PlanSizes {
    /// Bytes of the plan's arena, each term rounded up to the 256-byte arena alignment:
    ///
    /// ```text
    /// f32(B·Cin·H·W) + f32(B·Cout·Ho·Wo) + 3·bf16(act) + f32(gn_part)
    ///     + 4·bf16(hw·c) + f32(attn_rows·hw) + bf16(attn_rows·hw)
    /// ```
    pub fn bytes(&self) -> usize {
        let (b, (ci, hi, wi), (co, ho, wo)) = (self.batch, self.input, self.output);
        let mut t = arena_bytes::<f32>(b * ci * hi * wi) + arena_bytes::<f32>(b * co * ho * wo);
        t += 3 * arena_bytes::<Bf16>(self.act) + arena_bytes::<f32>(self.gn_part);
        if let Some((hw, c)) = self.attn {
            t += 4 * arena_bytes::<Bf16>(hw * c)
                + arena_bytes::<f32>(self.attn_rows * hw)
                + arena_bytes::<Bf16>(self.attn_rows * hw);
        }
        t
    }
}

/// Walks the network once at input `[batch, c, h, w]` and sizes every buffer; `budget`:
/// bytes of attention scores per chunk.
fn plan_sizes(
    steps: &[Step],
    batch: usize,
    input: (usize, usize, usize),
    budget: usize,
) -> Result<PlanSizes> {
    let (c, h, w) = input;
    let mut s = PlanSizes {
        batch,
        input,
        output: input,
        act: batch * c * h * w,
        gn_part: 0,
        attn: None,
        attn_rows: 0,
    };
    let mut dims = input;
    for step in steps {
        let (c, h, w) = dims;
        let next = step.out_dims(dims)?;
        let hw = h * w;
        // Every tensor a step touches: its input, its output, and (ResNet) conv1's output
        // and the shortcut, which have the output's size.
        s.act = s.act.max(batch * next.0 * next.1 * next.2);
        match step {
            Step::Resnet(_) | Step::NormSilu(_) => {
                s.gn_part = s.gn_part.max(gn_part_floats(batch, hw));
            }
            Step::Attn(_) => {
                s.gn_part = s.gn_part.max(gn_part_floats(batch, hw));
                let (phw, pc) = s.attn.unwrap_or((0, 0));
                s.attn = Some((phw.max(hw), pc.max(c)));
                s.attn_rows = s.attn_rows.max(attn_chunk_rows(hw, c, budget));
            }
            Step::Conv { .. } => {}
        }
        dims = next;
    }
    s.output = dims;
    Ok(s)
}

/// Reads, converts and uploads weights into one arena; in a dry run (`arena` None) it only
/// checks shapes (when a source is given) and counts bytes, handing out null views.
struct Loader<'a> {
    dev: Option<&'a CudaDevice>,
    src: Option<&'a dyn WeightSource>,
    arena: Option<Arena>,
    bytes: usize,
    /// Layer names, indexed by `Conv::name` / `Gn::name`.
    names: Vec<String>,
}

impl Loader<'_> {
    fn name(&mut self, name: &str) -> usize {
        self.names.push(name.to_string());
        self.names.len() - 1
    }

    fn f32(&mut self, data: &[f32]) -> Result<DView<f32>> {
        self.bytes += arena_bytes::<f32>(data.len());
        match (&mut self.arena, self.dev) {
            (Some(a), Some(dev)) => {
                let v = a.carve::<f32>(data.len())?;
                dev.upload_f32(v, data)?;
                Ok(v)
            }
            _ => Ok(DView::raw(0, data.len())),
        }
    }

    fn bf16(&mut self, data: &[f32]) -> Result<DView<Bf16>> {
        self.bytes += arena_bytes::<Bf16>(data.len());
        match (&mut self.arena, self.dev) {
            (Some(a), Some(dev)) => {
                let v = a.carve::<Bf16>(data.len())?;
                dev.upload_bf16(v, &bf16_bits(data))?;
                Ok(v)
            }
            _ => Ok(DView::raw(0, data.len())),
        }
    }

    fn real(&self) -> bool {
        self.arena.is_some()
    }

    /// The tensor `name` of one of the accepted shapes (data only in a real run).
    fn tensor(&self, name: &str, shapes: &[&[usize]]) -> Result<Vec<f32>> {
        let Some(src) = self.src else {
            return Ok(Vec::new());
        };
        let found = src.shape(name)?;
        if !shapes.contains(&found.as_slice()) {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shapes[0].to_vec(),
                found,
            });
        }
        if self.real() {
            Ok(src.tensor_shaped(name, &found)?.data)
        } else {
            Ok(Vec::new())
        }
    }

    /// A conv `name.{weight,bias}` of PyTorch shape `[out, inp, k, k]`, keeping only the
    /// first `keep` output channels.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
        pad: (usize, usize, usize, usize),
        keep: usize,
    ) -> Result<Conv> {
        let w = self.tensor(&format!("{name}.weight"), &[&[out, inp, k, k]])?;
        let b = self.tensor(&format!("{name}.bias"), &[&[out]])?;
        let kk = keep * k * k * inp;
        let (w, b) = if self.real() {
            let mut w = conv_weight_ohwi(&w, out, inp, k, k);
            w.truncate(kk);
            (w, b[..keep].to_vec())
        } else {
            (vec![0.0; kk], vec![0.0; keep])
        };
        Ok(Conv {
            w: self.bf16(&w)?,
            b: self.f32(&b)?,
            cin: inp,
            cout: keep,
            k,
            stride,
            pad,
            name: self.name(name),
        })
    }

    fn conv3(&mut self, name: &str, out: usize, inp: usize) -> Result<Conv> {
        self.conv(name, out, inp, 3, 1, (1, 1, 1, 1), out)
    }

    /// An attention projection: a 1×1 conv `[c, c, 1, 1]` or the equivalent linear `[c, c]`.
    fn proj(&mut self, name: &str, c: usize) -> Result<Conv> {
        let w = self.tensor(&format!("{name}.weight"), &[&[c, c, 1, 1], &[c, c]])?;
        let b = self.tensor(&format!("{name}.bias"), &[&[c]])?;
        let (w, b) = if self.real() {
            (w, b)
        } else {
            (vec![0.0; c * c], vec![0.0; c])
        };
        Ok(Conv {
            w: self.bf16(&w)?,
            b: self.f32(&b)?,
            cin: c,
            cout: c,
            k: 1,
            stride: 1,
            pad: (0, 0, 0, 0),
            name: self.name(name),
        })
    }

    fn gn(&mut self, name: &str, c: usize) -> Result<Gn> {
        let g = self.tensor(&format!("{name}.weight"), &[&[c]])?;
        let b = self.tensor(&format!("{name}.bias"), &[&[c]])?;
        let (g, b) = if self.real() {
            (g, b)
        } else {
            (vec![0.0; c], vec![0.0; c])
        };
        Ok(Gn {
            gamma: self.f32(&g)?,
            beta: self.f32(&b)?,
            c,
            name: self.name(name),
        })
    }

    fn resnet(&mut self, pfx: &str, inp: usize, out: usize) -> Result<Resnet> {
        Ok(Resnet {
            norm1: self.gn(&format!("{pfx}.norm1"), inp)?,
            conv1: self.conv3(&format!("{pfx}.conv1"), out, inp)?,
            norm2: self.gn(&format!("{pfx}.norm2"), out)?,
            conv2: self.conv3(&format!("{pfx}.conv2"), out, out)?,
            nin_shortcut: if inp != out {
                Some(self.conv(
                    &format!("{pfx}.nin_shortcut"),
                    out,
                    inp,
                    1,
                    1,
                    (0, 0, 0, 0),
                    out,
                )?)
            } else {
                None
            },
        })
    }

    /// `block_1`, `attn_1`, `block_2` of `{pfx}.mid`.
    fn mid(&mut self, pfx: &str, c: usize, steps: &mut Vec<Step>) -> Result<()> {
        steps.push(Step::Resnet(self.resnet(
            &format!("{pfx}.mid.block_1"),
            c,
            c,
        )?));
        let a = format!("{pfx}.mid.attn_1");
        steps.push(Step::Attn(Attn {
            norm: self.gn(&format!("{a}.norm"), c)?,
            q: self.proj(&format!("{a}.q"), c)?,
            k: self.proj(&format!("{a}.k"), c)?,
            v: self.proj(&format!("{a}.v"), c)?,
            proj_out: self.proj(&format!("{a}.proj_out"), c)?,
        }));
        steps.push(Step::Resnet(self.resnet(
            &format!("{pfx}.mid.block_2"),
            c,
            c,
        )?));
        Ok(())
    }

    /// The encoder as `models::vae::VaeEncoder` builds it (`conv_out` keeps the mean half).
    fn encoder(&mut self, cfg: &VaeConfig) -> Result<Vec<Step>> {
        let ch = &cfg.block_out_channels;
        let mut steps = vec![Step::Conv {
            conv: self.conv3("encoder.conv_in", ch[0], cfg.in_channels)?,
            up: false,
        }];
        let mut inp = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            for j in 0..cfg.layers_per_block {
                steps.push(Step::Resnet(self.resnet(
                    &format!("encoder.down.{i}.block.{j}"),
                    inp,
                    out,
                )?));
                inp = out;
            }
            if i + 1 < ch.len() {
                let conv = self.conv(
                    &format!("encoder.down.{i}.downsample.conv"),
                    out,
                    out,
                    3,
                    2,
                    (0, 0, 1, 1),
                    out,
                )?;
                steps.push(Step::Conv { conv, up: false });
            }
        }
        self.mid("encoder", inp, &mut steps)?;
        steps.push(Step::NormSilu(self.gn("encoder.norm_out", inp)?));
        let l = cfg.latent_channels;
        let conv = self.conv("encoder.conv_out", 2 * l, inp, 3, 1, (1, 1, 1, 1), l)?;
        steps.push(Step::Conv { conv, up: false });
        Ok(steps)
    }

    /// The decoder as `models::vae::VaeDecoder` runs it (deepest level first).
    fn decoder(&mut self, cfg: &VaeConfig) -> Result<Vec<Step>> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let deepest = ch[n - 1];
        let mut steps = vec![Step::Conv {
            conv: self.conv3("decoder.conv_in", deepest, cfg.latent_channels)?,
            up: false,
        }];
        self.mid("decoder", deepest, &mut steps)?;
        let mut inp = deepest;
        for i in (0..n).rev() {
            let out = ch[i];
            for j in 0..=cfg.layers_per_block {
                steps.push(Step::Resnet(self.resnet(
                    &format!("decoder.up.{i}.block.{j}"),
                    inp,
                    out,
                )?));
                inp = out;
            }
            if i >= 1 {
                let conv = self.conv3(&format!("decoder.up.{i}.upsample.conv"), out, out)?;
                steps.push(Step::Conv { conv, up: true });
            }
        }
        steps.push(Step::NormSilu(self.gn("decoder.norm_out", ch[0])?));
        steps.push(Step::Conv {
            conv: self.conv3("decoder.conv_out", cfg.in_channels, ch[0])?,
            up: false,
        });
        Ok(steps)
    }
}

/// The configs the CUDA VAE runs: the CPU model's (levels, blocks) plus the GroupNorm
/// kernels' 32 groups and at most 2048 channels per level.
pub fn check_config(cfg: &VaeConfig) -> Result<()> {
    let ch = &cfg.block_out_channels;
    if ch.is_empty() || cfg.layers_per_block == 0 {
        return Err(Error::Model(
            "vae config needs at least one level and one block per level".into(),
        ));
    }
    if cfg.norm_groups != GN_GROUPS
        || ch
            .iter()
            .any(|&c| c == 0 || c % GN_GROUPS != 0 || c > GN_MAX_CHANNELS)
    {
        return Err(Error::Model(format!(
            "CUDA VAE: unsupported config (GroupNorm needs {GN_GROUPS} groups and channel \
             counts that are multiples of 32 up to {GN_MAX_CHANNELS}; got {} groups, \
             channels {ch:?})",
            cfg.norm_groups
        )));
    }
    if cfg.in_channels == 0 || cfg.latent_channels == 0 {
        return Err(Error::Model(
            "vae config has zero image or latent channels".into(),
        ));
    }
    Ok(())
}

/// Which half of the VAE a network is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Encoder,
    Decoder,
}

/// Every activation of one forward at a fixed `[batch, c, h, w]` input, carved from one
/// arena.
struct VaePlan {
    sizes: PlanSizes,
    bytes: usize,
    x_in: DView<f32>,
    out: DView<f32>,
    act: [DView<Bf16>; 3],
    gn_part: DView<f32>,
    /// q, k, v, o (one image each) and the probability chunk; the f32 score chunk.
    attn: Option<([DView<Bf16>; 5], DView<f32>)>,
    _arena: DeviceBuffer,
}

impl VaePlan {
    fn new(dev: &CudaDevice, sizes: PlanSizes) -> Result<Self> {
        let bytes = sizes.bytes();
        let buffer = dev.alloc(bytes)?;
        // Poisoned once (0xFF: bf16 / f32 NaN), so an element a kernel fails to write shows
        // up as NaN in the output instead of stale data.
        dev.fill_bytes(buffer.view::<f32>(), 0xFF)?;
        let mut a = Arena::new(buffer);
        let (b, (ci, hi, wi), (co, ho, wo)) = (sizes.batch, sizes.input, sizes.output);
        let x_in = a.carve::<f32>(b * ci * hi * wi)?;
        let out = a.carve::<f32>(b * co * ho * wo)?;
        let act = [
            a.carve::<Bf16>(sizes.act)?,
            a.carve::<Bf16>(sizes.act)?,
            a.carve::<Bf16>(sizes.act)?,
        ];
        let gn_part = a.carve::<f32>(sizes.gn_part)?;
        let attn = match sizes.attn {
            Some((hw, c)) => Some((
                [
                    a.carve::<Bf16>(hw * c)?,
                    a.carve::<Bf16>(hw * c)?,
                    a.carve::<Bf16>(hw * c)?,
                    a.carve::<Bf16>(hw * c)?,
                    a.carve::<Bf16>(sizes.attn_rows * hw)?,
                ],
                a.carve::<f32>(sizes.attn_rows * hw)?,
            )),
            None => None,
        };
        Ok(Self {
            sizes,
            bytes,
            x_in,
            out,
            act,
            gn_part,
            attn,
            _arena: a.buffer,
        })
    }
}

/// The shared machinery of the encoder and the decoder: weights, flattened layers, GEMM
/// handle, cached plan.
struct Net {
    dev: Arc<CudaDevice>,
    gemm: Gemm,
    steps: Vec<Step>,
    names: Vec<String>,
    in_channels: usize,
    part: Part,
    weight_bytes: usize,
    _weights: DeviceBuffer,
    plan: Option<VaePlan>,
    generic_only: bool,
    score_budget: usize,
}

impl Net {
    fn load(
        dev: Arc<CudaDevice>,
        cfg: &VaeConfig,
        w: &dyn WeightSource,
        part: Part,
    ) -> Result<Self> {
        check_config(cfg)?;
        if let Some(f) = KERNELS.iter().find(|f| !dev.has_func(f)) {
            return Err(Error::Cuda(format!(
                "CUDA VAE: kernel `{f}` is not loaded on {} (sm_{}{})",
                dev.name, dev.cc.0, dev.cc.1
            )));
        }
        let build = |ld: &mut Loader| match part {
            Part::Encoder => ld.encoder(cfg),
            Part::Decoder => ld.decoder(cfg),
        };
        // Dry run: shapes checked, bytes counted, nothing allocated.
        let mut dry = Loader {
            dev: None,
            src: Some(w),
            arena: None,
            bytes: 0,
            names: Vec::new(),
        };
        build(&mut dry)?;
        let total = dry.bytes;
        let mut ld = Loader {
            dev: Some(&dev),
            src: Some(w),
            arena: Some(Arena::new(dev.alloc(total)?)),
            bytes: 0,
            names: Vec::new(),
        };
        let steps = build(&mut ld)?;
        let names = std::mem::take(&mut ld.names);
        let weights = match ld.arena {
            Some(a) => a.buffer,
            None => return Err(Error::Cuda("VAE weight arena missing".into())),
        };
        let gemm = Gemm::new(&dev)?;
        let in_channels = match part {
            Part::Encoder => cfg.in_channels,
            Part::Decoder => cfg.latent_channels,
        };
        Ok(Self {
            dev,
            gemm,
            steps,
            names,
            in_channels,
            part,
            weight_bytes: total,
            _weights: weights,
            plan: None,
            generic_only: false,
            score_budget: SCORE_BYTES_MAX,
        })
    }

    fn sizes(&self, batch: usize, h: usize, w: usize) -> Result<PlanSizes> {
        if batch == 0 || h == 0 || w == 0 {
            return Err(Error::Arg(format!(
                "CUDA VAE: empty input [{batch}, {}, {h}, {w}]",
                self.in_channels
            )));
        }
        plan_sizes(
            &self.steps,
            batch,
            (self.in_channels, h, w),
            self.score_budget,
        )
    }

    /// Makes the cached plan fit `[batch, c, h, w]` (allocating only when the shape changed);
    /// returns its bytes.
    fn prepare(&mut self, batch: usize, h: usize, w: usize) -> Result<usize> {
        let sizes = self.sizes(batch, h, w)?;
        if let Some(p) = &self.plan {
            if p.sizes == sizes {
                return Ok(p.bytes);
            }
        }
        // Free the old arena before allocating the new one.
        self.plan = None;
        let p = VaePlan::new(&self.dev, sizes)?;
        let bytes = p.bytes;
        self.plan = Some(p);
        Ok(bytes)
    }

    fn kernel(&self, c: &Conv) -> ConvKernel {
        ConvKernel::choose(c.cin, c.cout, self.generic_only)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        c: &Conv,
        x: DView<Bf16>,
        residual: Option<DView<Bf16>>,
        out: DView<Bf16>,
        n: usize,
        h: usize,
        w: usize,
        up: bool,
    ) -> Result<()> {
        let s = c.shape(n, h, w, up);
        self.dev
            .vae_conv2d(x, c.w, Some(c.b), residual, out, &s, self.kernel(c))
            .map_err(|e| self.context(c.name, e))
    }

    /// `e` prefixed with the layer's name.
    fn context(&self, name: usize, e: Error) -> Error {
        let layer = self.names.get(name).map_or("?", String::as_str);
        match e {
            Error::Cuda(m) => Error::Cuda(format!("{layer}: {m}")),
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gn(
        &self,
        p: &VaePlan,
        g: &Gn,
        x: DView<Bf16>,
        out: DView<Bf16>,
        n: usize,
        hw: usize,
        silu: bool,
    ) -> Result<()> {
        self.dev
            .vae_group_norm(
                x, out, g.gamma, g.beta, p.gn_part, n, hw, g.c, NORM_EPS, silu,
            )
            .map_err(|e| self.context(g.name, e))
    }

    /// Runs the network on the host tensor `x [B, C, H, W]` (f32 NCHW) → f32 NCHW.
    fn run(&mut self, x: &Tensor) -> Result<Tensor> {
        let [b, _, h, w] = x.shape[..] else {
            return Err(Error::Arg(format!(
                "CUDA VAE: expected a [B, C, H, W] input, got {:?}",
                x.shape
            )));
        };
        if x.data.len() != b * self.in_channels * h * w {
            return Err(Error::Arg(format!(
                "CUDA VAE: input of shape {:?} holds {} values",
                x.shape,
                x.data.len()
            )));
        }
        self.prepare(b, h, w)?;
        let p = self
            .plan
            .as_ref()
            .ok_or_else(|| Error::Cuda("CUDA VAE: no plan".into()))?;
        self.dev.upload_f32(p.x_in, &x.data)?;
        let mut dims = p.sizes.input;
        let mut cur = 1;
        self.dev
            .vae_nchw_to_nhwc(p.x_in, p.act[cur], b, dims.0, h * w)?;
        for step in &self.steps {
            let next = step.out_dims(dims)?;
            cur = self.step(p, step, cur, b, dims)?;
            dims = next;
        }
        let (c, ho, wo) = dims;
        self.dev
            .vae_nhwc_to_nchw(p.act[cur], p.out, b, c, ho * wo)?;
        let data = self.dev.download_f32(p.out)?;
        Tensor::new(&[b, c, ho, wo], data)
    }

    /// Runs one step reading `act[cur]`; returns the index of the buffer holding its output.
    fn step(
        &self,
        p: &VaePlan,
        step: &Step,
        cur: usize,
        b: usize,
        (c, h, w): (usize, usize, usize),
    ) -> Result<usize> {
        let t1 = (cur + 1) % 3;
        let t2 = (cur + 2) % 3;
        let hw = h * w;
        match step {
            Step::Conv { conv, up } => {
                self.conv(conv, p.act[cur], None, p.act[t1], b, h, w, *up)?;
                Ok(t1)
            }
            Step::NormSilu(g) => {
                self.gn(p, g, p.act[cur], p.act[t1], b, hw, true)?;
                Ok(t1)
            }
            Step::Resnet(r) => {
                // h = conv1(silu(norm1(x))); h = silu(norm2(h)) in place.
                self.gn(p, &r.norm1, p.act[cur], p.act[t1], b, hw, true)?;
                self.conv(&r.conv1, p.act[t1], None, p.act[t2], b, h, w, false)?;
                self.gn(p, &r.norm2, p.act[t2], p.act[t2], b, hw, true)?;
                match &r.nin_shortcut {
                    // shortcut = nin(x) into t1 (free again), then conv2(h) + shortcut in
                    // place.
                    Some(nin) => {
                        self.conv(nin, p.act[cur], None, p.act[t1], b, h, w, false)?;
                        self.conv(
                            &r.conv2,
                            p.act[t2],
                            Some(p.act[t1]),
                            p.act[t1],
                            b,
                            h,
                            w,
                            false,
                        )?;
                        Ok(t1)
                    }
                    // x += conv2(h), in place.
                    None => {
                        self.conv(
                            &r.conv2,
                            p.act[t2],
                            Some(p.act[cur]),
                            p.act[cur],
                            b,
                            h,
                            w,
                            false,
                        )?;
                        Ok(cur)
                    }
                }
            }
            Step::Attn(a) => {
                let ([q, k, v, o, s], scores) = p
                    .attn
                    .ok_or_else(|| Error::Cuda("CUDA VAE: plan lacks attention scratch".into()))?;
                self.gn(p, &a.norm, p.act[cur], p.act[t1], b, hw, false)?;
                let rows = attn_chunk_rows(hw, c, self.score_budget);
                let scale = 1.0 / (c as f32).sqrt();
                for i in 0..b {
                    let hn = p.act[t1].sub(i * hw * c, hw * c)?;
                    self.conv(&a.q, hn, None, q, 1, h, w, false)?;
                    self.conv(&a.k, hn, None, k, 1, h, w, false)?;
                    self.conv(&a.v, hn, None, v, 1, h, w, false)?;
                    let mut r0 = 0;
                    while r0 < hw {
                        let nr = rows.min(hw - r0);
                        let qc = q.sub(r0 * c, nr * c)?;
                        let oc = o.sub(r0 * c, nr * c)?;
                        self.gemm.batched_qkt_f32(qc, k, scores, 1, nr, hw, c)?;
                        self.dev.softmax_rows_f32(scores, s, nr, hw, scale)?;
                        self.gemm.batched_pv(s, v, oc, 1, nr, hw, c)?;
                        r0 += nr;
                    }
                    // x += proj_out(o), in place.
                    let xi = p.act[cur].sub(i * hw * c, hw * c)?;
                    self.conv(&a.proj_out, o, Some(xi), xi, 1, h, w, false)?;
                }
                Ok(cur)
            }
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.shape[..] {
            [_, c, h, w] if c == self.in_channels && h > 0 && w > 0 => Ok(()),
            _ => Err(Error::Arg(match self.part {
                Part::Encoder => format!(
                    "vae encoder expects an image [B, {}, H, W], got {:?}",
                    self.in_channels, x.shape
                ),
                Part::Decoder => format!(
                    "vae decoder expects a latent [B, {}, h, w], got {:?}",
                    self.in_channels, x.shape
                ),
            })),
        }
    }
}

/// The VAE encoder on the GPU (bf16 weights and activations, f32 accumulation).
pub struct CudaVaeEncoder {
    net: Net,
}

impl CudaVaeEncoder {
    /// Uploads the encoder's weights (`encoder.*` in `w`, canonical LDM names) into one
    /// allocation. Errors on configs the kernels cannot run ([`check_config`]).
    pub fn load(dev: Arc<CudaDevice>, cfg: &VaeConfig, w: &dyn WeightSource) -> Result<Self> {
        Ok(Self {
            net: Net::load(dev, cfg, w, Part::Encoder)?,
        })
    }

    /// `img [B, 3, H, W]` in [-1, 1] → posterior mean `[B, 16, H/8, W/8]`, unscaled (as
    /// `VaeEncoder::encode`; `to_model_latent` applies shift and scale).
    pub fn encode(&mut self, img: &Tensor) -> Result<Tensor> {
        self.net.check_input(img)?;
        self.net.run(img)
    }
}

/// The VAE decoder on the GPU (bf16 weights and activations, f32 accumulation).
pub struct CudaVaeDecoder {
    net: Net,
}

impl CudaVaeDecoder {
    /// Uploads the decoder's weights (`decoder.*` in `w`, canonical LDM names) into one
    /// allocation. Errors on configs the kernels cannot run ([`check_config`]).
    pub fn load(dev: Arc<CudaDevice>, cfg: &VaeConfig, w: &dyn WeightSource) -> Result<Self> {
        Ok(Self {
            net: Net::load(dev, cfg, w, Part::Decoder)?,
        })
    }

    /// `z [B, 16, h, w]` (unscaled, i.e. after `from_model_latent`) → image
    /// `[B, 3, 8h, 8w]` (as `VaeDecoder::decode`, not clamped).
    pub fn decode(&mut self, z: &Tensor) -> Result<Tensor> {
        self.net.check_input(z)?;
        self.net.run(z)
    }
}

/// The methods the encoder and the decoder share (their input is `[batch, C, h, w]`: the
/// image for the encoder, the latent for the decoder).
macro_rules! net_methods {
    ($ty:ty) => {
        impl $ty {
            /// Sizes (and allocates, once per input shape) the activation arena for inputs
            /// `[batch, C, h, w]`; returns its bytes. Running does this itself.
            pub fn prepare(&mut self, batch: usize, h: usize, w: usize) -> Result<usize> {
                self.net.prepare(batch, h, w)
            }

            /// Bytes the activation arena for inputs `[batch, C, h, w]` takes (nothing is
            /// allocated).
            pub fn plan_bytes(&self, batch: usize, h: usize, w: usize) -> Result<usize> {
                Ok(self.net.sizes(batch, h, w)?.bytes())
            }

            /// Bytes of device memory the weights take.
            pub fn weight_bytes(&self) -> usize {
                self.net.weight_bytes
            }

            /// Runs every convolution on the generic kernel (validation of that path).
            pub fn set_generic_conv_only(&mut self, on: bool) {
                self.net.generic_only = on;
            }

            /// Bytes of attention scores per query chunk (default [`SCORE_BYTES_MAX`]; small
            /// values validate the chunked path). Takes effect at the next plan.
            pub fn set_attention_score_budget(&mut self, bytes: usize) {
                self.net.score_budget = bytes.max(1);
            }
        }
    };
}
net_methods!(CudaVaeEncoder);
net_methods!(CudaVaeDecoder);

#[cfg(test)]
mod tests {
    use crate::cuda::metrics::{psnr_range, rel_err};
    use std::collections::HashMap;

    use dpir_loader::vae_spec;

    use super::*;
    use crate::cpu::conv::{group_norm, upsample_nearest2x, Conv2d, Padding};
    use crate::models::vae::{VaeDecoder, VaeEncoder};
    use crate::weights::seeded_random_weights;

    fn round_bf16(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }

    /// A CPU run of the flattened step list in NCHW f32, reading the weights by the names
    /// the loader recorded. With `bf16`, every tensor the GPU stores in bf16 (activations,
    /// q / k / v, scores, probabilities) is rounded where the GPU rounds it, so the result
    /// shows the error bf16 storage alone costs.
    struct Emu<'a> {
        names: &'a [String],
        w: &'a dyn WeightSource,
        bf16: bool,
    }

    impl Emu<'_> {
        fn round(&self, mut t: Tensor) -> Tensor {
            if self.bf16 {
                round_bf16(&mut t.data);
            }
            t
        }

        fn conv(&self, c: &Conv, x: &Tensor, up: bool, res: Option<Tensor>) -> Result<Tensor> {
            let name = &self.names[c.name];
            let wt = self.w.tensor(&format!("{name}.weight"))?;
            let wt = Tensor::new(&[wt.shape[0], c.cin, c.k, c.k], wt.data)?;
            let b = self.w.tensor(&format!("{name}.bias"))?;
            let (top, left, bottom, right) = c.pad;
            let pad = Padding {
                top,
                bottom,
                left,
                right,
            };
            let mut conv = Conv2d::new(wt, Some(b), c.stride, pad)?;
            conv.truncate_out(c.cout);
            let x = if up {
                upsample_nearest2x(x)?
            } else {
                x.clone()
            };
            let y = match res {
                Some(r) => conv.forward_add(&x, r)?,
                None => conv.forward(&x)?,
            };
            Ok(self.round(y))
        }

        fn gn(&self, g: &Gn, x: &Tensor, silu: bool) -> Result<Tensor> {
            let name = &self.names[g.name];
            let gamma = self.w.tensor(&format!("{name}.weight"))?.data;
            let beta = self.w.tensor(&format!("{name}.bias"))?.data;
            Ok(self.round(group_norm(x, GN_GROUPS, &gamma, &beta, NORM_EPS, silu)?))
        }

        fn attn(&self, a: &Attn, x: Tensor) -> Result<Tensor> {
            let hn = self.gn(&a.norm, &x, false)?;
            let q = self.conv(&a.q, &hn, false, None)?;
            let k = self.conv(&a.k, &hn, false, None)?;
            let v = self.conv(&a.v, &hn, false, None)?;
            let [b, c, h, w] = x.shape[..] else {
                return Err(Error::Arg("emulated attention: not 4-d".into()));
            };
            let n = h * w;
            let scale = 1.0 / (c as f32).sqrt();
            let mut o = Tensor::zeros(&[b, c, h, w]);
            for bi in 0..b {
                let base = bi * c * n;
                let (qb, kb, vb) = (&q.data[base..], &k.data[base..], &v.data[base..]);
                for i in 0..n {
                    let mut s: Vec<f32> = (0..n)
                        .map(|j| (0..c).map(|ch| qb[ch * n + i] * kb[ch * n + j]).sum())
                        .collect();
                    // Scores stay f32 on the GPU (cuBLASLt f32 output).
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                    let mut sum = 0f32;
                    for v in s.iter_mut() {
                        *v = (*v * scale - m).exp();
                        sum += *v;
                    }
                    for v in s.iter_mut() {
                        *v /= sum;
                    }
                    if self.bf16 {
                        round_bf16(&mut s);
                    }
                    for ch in 0..c {
                        o.data[base + ch * n + i] =
                            (0..n).map(|j| s[j] * vb[ch * n + j]).sum::<f32>();
                    }
                }
            }
            let o = self.round(o);
            self.conv(&a.proj_out, &o, false, Some(x))
        }

        fn run(&self, steps: &[Step], x: &Tensor) -> Result<Tensor> {
            let mut x = self.round(x.clone());
            for s in steps {
                x = match s {
                    Step::Conv { conv, up } => self.conv(conv, &x, *up, None)?,
                    Step::NormSilu(g) => self.gn(g, &x, true)?,
                    Step::Resnet(r) => {
                        let h = self.gn(&r.norm1, &x, true)?;
                        let h = self.conv(&r.conv1, &h, false, None)?;
                        let h = self.gn(&r.norm2, &h, true)?;
                        let sc = match &r.nin_shortcut {
                            Some(nin) => self.conv(nin, &x, false, None)?,
                            None => x,
                        };
                        self.conv(&r.conv2, &h, false, Some(sc))?
                    }
                    Step::Attn(a) => self.attn(a, x)?,
                };
            }
            Ok(x)
        }
    }

    /// Seeded weights of the real layout, rounded to bf16 (what the GPU stores).
    fn weights(cfg: &VaeConfig, seed: u64) -> HashMap<String, Tensor> {
        seeded_random_weights(vae_spec(cfg), seed)
            .into_iter()
            .map(|(n, mut t)| {
                round_bf16(&mut t.data);
                (n, t)
            })
            .collect()
    }

    fn input(shape: &[usize], amp: f32, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut rng = crate::pipeline::rng::Rng::new(seed);
        let mut data: Vec<f32> = rng
            .normal_vec(n)
            .iter()
            .map(|v| (amp * v).clamp(-2.0 * amp, 2.0 * amp))
            .collect();
        round_bf16(&mut data);
        Tensor {
            shape: shape.to_vec(),
            data,
        }
    }

    /// The step list (with its recorded names) for `cfg`, from a dry run over `w`.
    fn steps_named(cfg: &VaeConfig, part: Part, w: &dyn WeightSource) -> (Vec<Step>, Vec<String>) {
        let mut ld = Loader {
            dev: None,
            src: Some(w),
            arena: None,
            bytes: 0,
            names: Vec::new(),
        };
        let s = match part {
            Part::Encoder => ld.encoder(cfg),
            Part::Decoder => ld.decoder(cfg),
        }
        .unwrap();
        (s, ld.names)
    }

    /// Emulated (f32, bf16) relative errors of encoder and decoder against the CPU model.
    fn emulation_errors(cfg: &VaeConfig, img: &[usize], lat: &[usize]) -> [(f32, f32); 2] {
        let w = weights(cfg, 7);
        let x = input(img, 0.6, 1);
        let z = input(lat, 1.0, 2);
        let want_e = VaeEncoder::load(cfg, &w).unwrap().encode(&x).unwrap();
        let want_d = VaeDecoder::load(cfg, &w).unwrap().decode(&z).unwrap();
        let mut out = [(0f32, 0f32); 2];
        for (k, (part, inp, want)) in [(Part::Encoder, &x, &want_e), (Part::Decoder, &z, &want_d)]
            .into_iter()
            .enumerate()
        {
            let (steps, names) = steps_named(cfg, part, &w);
            let sizes = plan_sizes(
                &steps,
                inp.shape[0],
                (inp.shape[1], inp.shape[2], inp.shape[3]),
                SCORE_BYTES_MAX,
            )
            .unwrap();
            let run = |bf16| {
                Emu {
                    names: &names,
                    w: &w,
                    bf16,
                }
                .run(&steps, inp)
                .unwrap()
            };
            let (f, b) = (run(false), run(true));
            assert_eq!(f.shape, want.shape, "{part:?}");
            assert_eq!(
                (sizes.output.0, sizes.output.1, sizes.output.2),
                (want.shape[1], want.shape[2], want.shape[3])
            );
            out[k] = (rel_err(&f.data, &want.data), rel_err(&b.data, &want.data));
            println!(
                "{part:?} {:?}: step list f32 rel err {:.2e}, bf16-emulated {:.2e} \
                 (PSNR {:.1} dB)",
                inp.shape,
                out[k].0,
                out[k].1,
                psnr_range(&b.data, &want.data)
            );
        }
        out
    }

    #[test]
    fn step_list_reproduces_the_cpu_model() {
        // The flattened layer list, run on the CPU in f32, is the CPU model (same layers,
        // same order, same shortcut and attention wiring): this checks what the GPU runs
        // without a GPU. The bf16-emulated run bounds what bf16 storage alone costs.
        for (cfg, img, lat) in [
            (VaeConfig::tiny(), vec![2, 3, 16, 24], vec![2, 16, 4, 6]),
            (
                VaeConfig::dpir_tiny(),
                vec![1, 3, 32, 24],
                vec![1, 16, 4, 3],
            ),
        ] {
            for (f32_err, bf16_err) in emulation_errors(&cfg, &img, &lat) {
                assert!(f32_err < 1e-5, "{f32_err}");
                assert!(bf16_err < 1e-1, "{bf16_err}");
            }
        }
    }

    /// The bf16-emulated error of the SD3 channel config at the GPU test's shapes (slow in
    /// a debug build): `cargo test --release -p dpir-engine --lib sd3_bf16_emulation --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn sd3_bf16_emulation() {
        for (img, lat) in [
            (vec![1, 3, 64, 64], vec![1, 16, 8, 8]),
            (vec![1, 3, 64, 96], vec![1, 16, 8, 12]),
        ] {
            emulation_errors(&VaeConfig::sd3(), &img, &lat);
        }
    }

    /// The layer list built without weights (dry run, null views).
    fn steps(cfg: &VaeConfig, part: Part) -> Vec<Step> {
        let mut ld = Loader {
            dev: None,
            src: None,
            arena: None,
            bytes: 0,
            names: Vec::new(),
        };
        match part {
            Part::Encoder => ld.encoder(cfg),
            Part::Decoder => ld.decoder(cfg),
        }
        .unwrap()
    }

    #[test]
    fn conv_weight_permutation() {
        // w_pt[co][ci][y][x] = 1000 co + 100 ci + 10 y + x, cout 2, cin 3, 2x2 kernel.
        let (co, ci, k) = (2, 3, 2);
        let mut w = Vec::new();
        for o in 0..co {
            for i in 0..ci {
                for y in 0..k {
                    for x in 0..k {
                        w.push((1000 * o + 100 * i + 10 * y + x) as f32);
                    }
                }
            }
        }
        let t = conv_weight_ohwi(&w, co, ci, k, k);
        // [co][y][x][ci]: row co = 1 starts with (y 0, x 0) over ci = 0, 1, 2.
        assert_eq!(&t[..6], &[0., 100., 200., 1., 101., 201.]);
        assert_eq!(&t[12..15], &[1000., 1100., 1200.]);
        assert_eq!(t[23], 1211.);
        // 1x1 convs are unchanged.
        let w1: Vec<f32> = (0..6).map(|v| v as f32).collect();
        assert_eq!(conv_weight_ohwi(&w1, 2, 3, 1, 1), w1);
    }

    #[test]
    fn attention_chunks_stay_under_the_cap() {
        let m = SCORE_BYTES_MAX;
        assert_eq!(attn_chunk_rows(64, 512, m), 64);
        // 6 bytes per score (f32 + bf16 probability). 128x128 latent: 16384^2 * 6 > 256 MiB
        // -> 268435456 / 98304 = 2730 rows.
        assert_eq!(attn_chunk_rows(16384, 512, m), 2730);
        // 6688^2 * 6 fits 256 MiB; 6689^2 * 6 does not: 268435456 / 40134 = 6688.
        assert_eq!(attn_chunk_rows(6688, 512, m), 6688);
        // 512 channels: any row count keeps 256-byte offsets; 96 channels: multiples of 4,
        // 40 channels: multiples of 16.
        assert_eq!(attn_chunk_rows(6689, 512, m), 6688);
        assert_eq!(attn_chunk_rows(6689, 96, m), 6688);
        assert_eq!(attn_chunk_rows(6689, 40, m), 6688 / 16 * 16);
        // A 6000-byte budget at 100 pixels: 10 rows, 96 channels -> 8.
        assert_eq!(attn_chunk_rows(100, 96, 6000), 8);
        // Tiny budgets still make progress: one alignment group.
        assert_eq!(attn_chunk_rows(100, 32, 1), 4);
    }

    #[test]
    fn sd3_encoder_plan_at_64x64() {
        let s = steps(&VaeConfig::sd3(), Part::Encoder);
        // conv_in + 4 levels × 2 ResNets + 3 downsamples + mid (3) + norm_out + conv_out.
        assert_eq!(s.len(), 1 + 8 + 3 + 3 + 1 + 1);
        let p = plan_sizes(&s, 1, (3, 64, 64), SCORE_BYTES_MAX).unwrap();
        assert_eq!(p.output, (16, 8, 8));
        // Largest tensor: 128 channels at 64x64.
        assert_eq!(p.act, 128 * 64 * 64);
        // GroupNorm at 64x64: chunk 32, 128 chunks -> 2 * 128 * 32 + 64.
        assert_eq!(p.gn_part, 8256);
        assert_eq!(p.attn, Some((64, 512)));
        assert_eq!(p.attn_rows, 64);
        // x_in 3*64*64 f32 = 49152, out 16*8*8 f32 = 4096, 3 * 128*64*64 bf16 = 3145728,
        // part 8256 f32 = 33024, q/k/v/o 4 * 64*512 bf16 = 262144, scores 64*64 f32 = 16384,
        // probabilities 64*64 bf16 = 8192.
        assert_eq!(
            p.bytes(),
            49152 + 4096 + 3145728 + 33024 + 262144 + 16384 + 8192
        );
        // Batch 2 doubles the per-batch buffers (the attention scratch is per image).
        let p2 = plan_sizes(&s, 2, (3, 64, 64), SCORE_BYTES_MAX).unwrap();
        assert_eq!(p2.act, 2 * 128 * 64 * 64);
        assert_eq!(p2.gn_part, 2 * 8256);
        assert_eq!(p2.attn, Some((64, 512)));
    }

    #[test]
    fn sd3_decoder_plan_non_square() {
        let s = steps(&VaeConfig::sd3(), Part::Decoder);
        // conv_in + mid (3) + 4 levels × 3 ResNets + 3 upsample convs + norm_out + conv_out.
        assert_eq!(s.len(), 1 + 3 + 12 + 3 + 1 + 1);
        let p = plan_sizes(&s, 1, (16, 8, 12), SCORE_BYTES_MAX).unwrap();
        assert_eq!(p.output, (3, 64, 96));
        // Largest: 256 channels at 64x96 (the level-1 upsample conv output).
        assert_eq!(p.act, 256 * 64 * 96);
        // GroupNorm at 64x96 = 6144 px: chunk max(32, 24) = 32, 192 chunks.
        assert_eq!(p.gn_part, 2 * 192 * 32 + 64);
        assert_eq!(p.attn, Some((96, 512)));
        assert_eq!(p.attn_rows, 96);
    }

    #[test]
    fn sd3_decoder_plan_at_512px() {
        // The pipeline's largest VAE tile: a 64x64 latent -> 512x512 image.
        let s = steps(&VaeConfig::sd3(), Part::Decoder);
        let p = plan_sizes(&s, 1, (16, 64, 64), SCORE_BYTES_MAX).unwrap();
        // Largest: the level-1 upsample conv output / level-0 first ResNet input, 256 x 512^2.
        assert_eq!(p.act, 256 * 512 * 512);
        // 512^2 px: chunk 1024, 256 chunks -> 2 * 256 * 32 + 64.
        assert_eq!(p.gn_part, 16448);
        assert_eq!((p.attn, p.attn_rows), (Some((4096, 512)), 4096));
        // x_in 262144 + out 3145728 + act 3 * 134217728 + part 65792
        // + q/k/v/o 4 * 4194304 + scores (f32) 67108864 + probabilities 33554432 bytes.
        assert_eq!(p.bytes(), 456_458_496 + 67_108_864);
    }

    #[test]
    fn tiny_configs_and_kernel_choice() {
        // dpir-tiny VAE: [32, 64, 128, 128], 2 ResNets per level.
        let cfg = VaeConfig::dpir_tiny();
        let generic: Vec<(usize, usize)> = steps(&cfg, Part::Decoder)
            .iter()
            .chain(steps(&cfg, Part::Encoder).iter())
            .flat_map(|s| match s {
                Step::Conv { conv, .. } => vec![*conv],
                Step::Resnet(r) => [Some(r.conv1), Some(r.conv2), r.nin_shortcut]
                    .into_iter()
                    .flatten()
                    .collect(),
                Step::Attn(a) => vec![a.q, a.k, a.v, a.proj_out],
                Step::NormSilu(_) => vec![],
            })
            .filter(|c| ConvKernel::choose(c.cin, c.cout, false) == ConvKernel::Generic)
            .map(|c| (c.cin, c.cout))
            .collect();
        // Only the image/latent-facing convs fall back to the generic kernel.
        assert_eq!(generic, vec![(16, 128), (32, 3), (3, 32)]);
        check_config(&cfg).unwrap();
        check_config(&VaeConfig::tiny()).unwrap();
        // 4 groups or 8 channels: the GroupNorm kernels cannot run it.
        let bad = VaeConfig {
            norm_groups: 4,
            ..VaeConfig::tiny()
        };
        assert!(check_config(&bad).is_err());
        let bad = VaeConfig {
            block_out_channels: vec![8, 16],
            norm_groups: 32,
            ..VaeConfig::tiny()
        };
        assert!(check_config(&bad).is_err());
    }

    #[test]
    fn dry_run_counts_weight_bytes() {
        // Tiny: levels [32, 64], one ResNet each.
        let mut ld = Loader {
            dev: None,
            src: None,
            arena: None,
            bytes: 0,
            names: Vec::new(),
        };
        ld.encoder(&VaeConfig::tiny()).unwrap();
        let a = |n: usize| n.div_ceil(128) * 256; // bf16, 256-byte aligned
        let f = |n: usize| n.div_ceil(64) * 256; // f32
        let conv = |o: usize, i: usize, k: usize| a(o * i * k * k) + f(o);
        let gn = |c: usize| 2 * f(c);
        let res = |i: usize, o: usize| {
            gn(i) + conv(o, i, 3) + gn(o) + conv(o, o, 3) + if i != o { conv(o, i, 1) } else { 0 }
        };
        let want = conv(32, 3, 3)
            + res(32, 32)
            + conv(32, 32, 3)
            + res(32, 64)
            + res(64, 64)
            + gn(64)
            + 4 * conv(64, 64, 1)
            + res(64, 64)
            + gn(64)
            + conv(16, 64, 3);
        assert_eq!(ld.bytes, want);
    }
}
