//! Launchers of the NHWC VAE kernels (`kernels/cuda/vae_conv.cu`, `kernels/cuda/vae_norm.cu`)
//! and the launch-shape rules they follow, mirrored from the kernels' header comments and
//! `kernels/dev/vae_check.cu` (which validated every kernel at these launch shapes).
//!
//! Activations are NHWC bf16 (`x[n][y][x][c]`); conv weights `[Cout][KH][KW][Cin]` bf16;
//! biases and GroupNorm affine parameters f32.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{derr, Bf16, CudaDevice, DView, Elem};
use super::ops::{grid_for, int};
use crate::error::{Error, Result};

/// `VAE_CONV_BLOCK_M` / `VAE_CONV_BLOCK_N`: output pixels × output channels per CTA.
const CONV_BLOCK_M: usize = 128;
const CONV_BLOCK_N: usize = 128;
/// `VAE_CONV_THREADS`.
const CONV_THREADS: u32 = 256;
/// `VAE_CONV_SMEM_BYTES` = 3 stages × (128 + 128) rows × 32 bf16 (the default 48 KiB limit).
const CONV_SMEM_BYTES: u32 = 3 * (128 + 128) * 32 * 2;
/// `VAE_CONV_GENERIC_THREADS`.
const CONV_GENERIC_THREADS: usize = 256;
/// The groups the GroupNorm kernels hard-code (`VAE_GN_GROUPS`).
pub(crate) const GN_GROUPS: usize = 32;
/// The most channels the GroupNorm kernels take (their shared-memory tables).
pub(crate) const GN_MAX_CHANNELS: usize = 2048;
const GN_THREADS: u32 = 256;
const GN_MAX_CHUNKS: usize = 256;
const GN_MIN_CHUNK: usize = 32;
const ELEMWISE_THREADS: usize = 256;

/// Which convolution kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvKernel {
    /// `vae_conv2d_bf16`: implicit GEMM on tensor cores; needs `Cin % 32 == 0`,
    /// `Cout % 8 == 0`.
    TensorCore,
    /// `vae_conv2d_generic_bf16`: any channel counts, one thread per output element.
    Generic,
}

impl ConvKernel {
    /// The fastest kernel valid for `cin → cout` (the generic one when `generic_only`).
    pub(crate) fn choose(cin: usize, cout: usize, generic_only: bool) -> Self {
        if !generic_only && cin % 32 == 0 && cout % 8 == 0 {
            Self::TensorCore
        } else {
            Self::Generic
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::TensorCore => "vae_conv2d_bf16",
            Self::Generic => "vae_conv2d_generic_bf16",
        }
    }
}

/// One convolution launch: `k × k` kernel, stride, zero padding `(top, left, bottom, right)`,
/// over a stored input `[n, h, w, cin]` that the kernel reads 2× nearest-upsampled when `up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: (usize, usize, usize, usize),
    pub up: bool,
}

impl ConvShape {
    /// The input size the convolution sees (after the fused upsample).
    pub(crate) fn logical_hw(&self) -> (usize, usize) {
        if self.up {
            (2 * self.h, 2 * self.w)
        } else {
            (self.h, self.w)
        }
    }

    /// `(ho, wo) = ((h + pad_t + pad_b − k) / stride + 1, …)`; errors when the padded input
    /// is smaller than the kernel.
    pub(crate) fn out_hw(&self) -> Result<(usize, usize)> {
        let (h, w) = self.logical_hw();
        let (pt, pl, pb, pr) = self.pad;
        if self.stride == 0 || self.k == 0 || h + pt + pb < self.k || w + pl + pr < self.k {
            return Err(Error::Arg(format!(
                "conv {}x{} stride {} does not fit a {h}x{w} input with padding {:?}",
                self.k, self.k, self.stride, self.pad
            )));
        }
        Ok((
            (h + pt + pb - self.k) / self.stride + 1,
            (w + pl + pr - self.k) / self.stride + 1,
        ))
    }

    pub(crate) fn in_elems(&self) -> usize {
        self.n * self.h * self.w * self.cin
    }

    pub(crate) fn out_elems(&self) -> Result<usize> {
        let (ho, wo) = self.out_hw()?;
        Ok(self.n * ho * wo * self.cout)
    }

    pub(crate) fn w_elems(&self) -> usize {
        self.cout * self.k * self.k * self.cin
    }
}

/// GroupNorm launch geometry (`vae_norm.cu` header): pixels per stats chunk, chunk count,
/// and the apply kernel's grid.x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GnLaunch {
    pub chunk: usize,
    pub nchunks: usize,
    pub apply_blocks: usize,
}

/// `chunk = max(32, ceil(hw / 256))`, `nchunks = ceil(hw / chunk)`,
/// `apply_blocks = min(ceil(hw · c/8 / 1024), 4096)`.
pub(crate) fn gn_launch(hw: usize, c: usize) -> GnLaunch {
    let chunk = GN_MIN_CHUNK.max(hw.div_ceil(GN_MAX_CHUNKS));
    GnLaunch {
        chunk,
        nchunks: hw.div_ceil(chunk),
        apply_blocks: (hw * (c / 8)).div_ceil(4 * 256).clamp(1, 4096),
    }
}

/// f32 scratch of one GroupNorm over `n` samples of `hw` pixels (`VAE_GN_PART_FLOATS`):
/// two partial-sum tables `[n][nchunks][32]` and the final `[n][2][32]` mean / rstd.
pub(crate) fn gn_part_floats(n: usize, hw: usize) -> usize {
    let nchunks = gn_launch(hw, GN_GROUPS * 8).nchunks;
    2 * n * nchunks * GN_GROUPS + n * 2 * GN_GROUPS
}

fn aligned16<T: Elem>(v: &DView<T>) -> bool {
    v.ptr % 16 == 0
}

/// Whether the byte ranges of two views intersect.
fn overlaps<A: Elem, B: Elem>(a: &DView<A>, an: usize, b: &DView<B>, bn: usize) -> bool {
    let (a0, a1) = (a.ptr, a.ptr + (an * A::BYTES) as u64);
    let (b0, b1) = (b.ptr, b.ptr + (bn * B::BYTES) as u64);
    a0 < b1 && b0 < a1
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Cuda(msg()))
    }
}

impl CudaDevice {
    /// `out = conv(x, w) + bias + residual` (NHWC bf16, f32 accumulation) with the kernel
    /// `kernel`. `residual` may be `out` itself (each element is read, then written by one
    /// thread); `out` must not overlap `x` or `w`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vae_conv2d(
        &self,
        x: DView<Bf16>,
        w: DView<Bf16>,
        bias: Option<DView<f32>>,
        residual: Option<DView<Bf16>>,
        out: DView<Bf16>,
        s: &ConvShape,
        kernel: ConvKernel,
    ) -> Result<()> {
        let (ho, wo) = s.out_hw()?;
        let (h, wl) = s.logical_hw();
        let m = s.n * ho * wo;
        let total = m * s.cout;
        if total == 0 {
            return Ok(());
        }
        let n_out = s.out_elems()?;
        x.need(s.in_elems(), "vae conv x")?;
        w.need(s.w_elems(), "vae conv w")?;
        out.need(n_out, "vae conv out")?;
        if let Some(b) = &bias {
            b.need(s.cout, "vae conv bias")?;
        }
        if let Some(r) = &residual {
            r.need(n_out, "vae conv residual")?;
            ensure(r.ptr == out.ptr || !overlaps(r, n_out, &out, n_out), || {
                "vae conv: residual partially overlaps out".into()
            })?;
            ensure(aligned16(r), || {
                "vae conv: residual not 16-byte aligned".into()
            })?;
        }
        ensure(
            !overlaps(&out, n_out, &x, s.in_elems()) && !overlaps(&out, n_out, &w, s.w_elems()),
            || "vae conv: out overlaps the input or the weights".into(),
        )?;
        ensure(aligned16(&x) && aligned16(&w) && aligned16(&out), || {
            "vae conv: x / w / out not 16-byte aligned".into()
        })?;
        let cfg = match kernel {
            ConvKernel::TensorCore => {
                ensure(s.cin % 32 == 0 && s.cout % 8 == 0, || {
                    format!(
                        "vae_conv2d_bf16 needs Cin % 32 == 0 and Cout % 8 == 0, got {} -> {}",
                        s.cin, s.cout
                    )
                })?;
                ensure(m < (1 << 31) && s.cout <= 65535, || {
                    format!(
                        "vae_conv2d_bf16: {m} output pixels × {} channels too large",
                        s.cout
                    )
                })?;
                let tiles = m.div_ceil(CONV_BLOCK_M) * s.cout.div_ceil(CONV_BLOCK_N);
                LaunchConfig {
                    grid_dim: (grid_for(tiles, 1)?, 1, 1),
                    block_dim: (CONV_THREADS, 1, 1),
                    shared_mem_bytes: CONV_SMEM_BYTES,
                }
            }
            ConvKernel::Generic => LaunchConfig {
                grid_dim: (grid_for(total, CONV_GENERIC_THREADS)?, 1, 1),
                block_dim: (CONV_GENERIC_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
        };
        let (bias_ptr, res_ptr) = (
            bias.map_or(0u64, |b| b.ptr),
            residual.map_or(0u64, |r| r.ptr),
        );
        let [nn, hh, ww, ci] = ints!(s.n, h, wl, s.cin);
        let [hoi, woi, co, kk] = ints!(ho, wo, s.cout, s.k);
        let [st, pt, pl] = ints!(s.stride, s.pad.0, s.pad.1);
        let up = s.up as i32;
        launch!(
            self,
            kernel.name(),
            cfg,
            x.ptr,
            w.ptr,
            bias_ptr,
            res_ptr,
            out.ptr,
            nn,
            hh,
            ww,
            ci,
            hoi,
            woi,
            co,
            kk,
            kk,
            st,
            pt,
            pl,
            up
        )
    }

    /// GroupNorm (32 groups, f32 statistics, affine) + optional SiLU of NHWC `x [n, hw, c]`
    /// into `out` (may be `x`): three statistics launches and one apply launch; `part` is
    /// the f32 scratch of [`gn_part_floats`]`(n, hw)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vae_group_norm(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        gamma: DView<f32>,
        beta: DView<f32>,
        part: DView<f32>,
        n: usize,
        hw: usize,
        c: usize,
        eps: f32,
        silu: bool,
    ) -> Result<()> {
        if n * hw * c == 0 {
            return Ok(());
        }
        ensure(
            c % GN_GROUPS == 0 && c <= GN_MAX_CHANNELS && n <= 65535,
            || {
                format!(
                    "vae group norm: {c} channels (need a multiple of 32, at most 2048), batch {n}"
                )
            },
        )?;
        x.need(n * hw * c, "vae gn x")?;
        out.need(n * hw * c, "vae gn out")?;
        gamma.need(c, "vae gn gamma")?;
        beta.need(c, "vae gn beta")?;
        part.need(gn_part_floats(n, hw), "vae gn scratch")?;
        ensure(aligned16(&x) && aligned16(&out), || {
            "vae group norm: x / out not 16-byte aligned".into()
        })?;
        let g = gn_launch(hw, c);
        let ny = int(n, "batch")? as u32;
        let block = (GN_THREADS, 1, 1);
        let stats = LaunchConfig {
            grid_dim: (int(g.nchunks, "chunks")? as u32, ny, 1),
            block_dim: block,
            shared_mem_bytes: 0,
        };
        let fin = LaunchConfig {
            grid_dim: (1, ny, 1),
            block_dim: block,
            shared_mem_bytes: 0,
        };
        let apply = LaunchConfig {
            grid_dim: (int(g.apply_blocks, "apply blocks")? as u32, ny, 1),
            block_dim: block,
            shared_mem_bytes: 0,
        };
        let [nn, hwi, cc, chunk] = ints!(n, hw, c, g.chunk);
        let final_stats = part.sub(2 * n * g.nchunks * GN_GROUPS, n * 2 * GN_GROUPS)?;
        for (pass, cfg) in [(0i32, stats), (1, stats), (2, fin)] {
            launch!(
                self,
                "vae_groupnorm_stats_bf16",
                cfg,
                x.ptr,
                part.ptr,
                nn,
                hwi,
                cc,
                chunk,
                pass,
                eps
            )?;
        }
        let si = silu as i32;
        launch!(
            self,
            "vae_groupnorm_silu_bf16",
            apply,
            x.ptr,
            out.ptr,
            gamma.ptr,
            beta.ptr,
            final_stats.ptr,
            nn,
            hwi,
            cc,
            si
        )
    }

    /// Nearest 2× upsample, NHWC `[n, h, w, c]` → `[n, 2h, 2w, c]` (`c % 8 == 0`). The
    /// decoder fuses its upsampling into the following conv instead; kept for other uses.
    #[allow(dead_code)]
    pub(crate) fn vae_upsample2x(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
    ) -> Result<()> {
        let total = n * 4 * h * w * c;
        if total == 0 {
            return Ok(());
        }
        ensure(c % 8 == 0 && aligned16(&x) && aligned16(&out), || {
            format!("vae upsample: {c} channels (need a multiple of 8), 16-byte aligned views")
        })?;
        x.need(n * h * w * c, "vae upsample x")?;
        out.need(total, "vae upsample out")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(total / 8, ELEMWISE_THREADS)?, 1, 1),
            block_dim: (ELEMWISE_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let [nn, hh, ww, cc] = ints!(n, h, w, c);
        launch!(
            self,
            "vae_upsample2x_nearest_bf16",
            cfg,
            x.ptr,
            out.ptr,
            nn,
            hh,
            ww,
            cc
        )
    }

    /// NCHW f32 `[n, c, hw]` → NHWC bf16 `[n, hw, c]` (round to nearest even).
    pub(crate) fn vae_nchw_to_nhwc(
        &self,
        x: DView<f32>,
        out: DView<Bf16>,
        n: usize,
        c: usize,
        hw: usize,
    ) -> Result<()> {
        let total = n * c * hw;
        if total == 0 {
            return Ok(());
        }
        x.need(total, "nchw_to_nhwc x")?;
        out.need(total, "nchw_to_nhwc out")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(total, ELEMWISE_THREADS)?, 1, 1),
            block_dim: (ELEMWISE_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let [nn, cc, p] = ints!(n, c, hw);
        launch!(
            self,
            "nchw_f32_to_nhwc_bf16",
            cfg,
            x.ptr,
            out.ptr,
            nn,
            cc,
            p
        )
    }

    /// NHWC bf16 `[n, hw, c]` → NCHW f32 `[n, c, hw]`.
    pub(crate) fn vae_nhwc_to_nchw(
        &self,
        x: DView<Bf16>,
        out: DView<f32>,
        n: usize,
        c: usize,
        hw: usize,
    ) -> Result<()> {
        let total = n * c * hw;
        if total == 0 {
            return Ok(());
        }
        x.need(total, "nhwc_to_nchw x")?;
        out.need(total, "nhwc_to_nchw out")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(total, ELEMWISE_THREADS)?, 1, 1),
            block_dim: (ELEMWISE_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let [nn, cc, p] = ints!(n, c, hw);
        launch!(
            self,
            "nhwc_bf16_to_nchw_f32",
            cfg,
            x.ptr,
            out.ptr,
            nn,
            cc,
            p
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice_follows_the_tensor_core_requirements() {
        use ConvKernel::*;
        // SD3: 3x3 convs between 128/256/512 channels, 1x1 shortcuts 128->256, 256->512.
        assert_eq!(ConvKernel::choose(128, 128, false), TensorCore);
        assert_eq!(ConvKernel::choose(256, 512, false), TensorCore);
        assert_eq!(ConvKernel::choose(512, 16, false), TensorCore); // encoder conv_out mean
                                                                    // conv_in 3 -> 128, decoder conv_in 16 -> 512, decoder conv_out 128 -> 3.
        assert_eq!(ConvKernel::choose(3, 128, false), Generic);
        assert_eq!(ConvKernel::choose(16, 512, false), Generic);
        assert_eq!(ConvKernel::choose(128, 3, false), Generic);
        // dpir-tiny [32, 64, 128, 128]: 32 -> 32 and 32 -> 64 qualify.
        assert_eq!(ConvKernel::choose(32, 32, false), TensorCore);
        assert_eq!(ConvKernel::choose(32, 64, false), TensorCore);
        assert_eq!(ConvKernel::choose(48, 64, false), Generic);
        assert_eq!(ConvKernel::choose(64, 20, false), Generic);
        assert_eq!(ConvKernel::choose(128, 128, true), Generic);
    }

    #[test]
    fn conv_output_sizes() {
        let s = |h, w, k, stride, pad, up| ConvShape {
            n: 2,
            h,
            w,
            cin: 32,
            cout: 64,
            k,
            stride,
            pad,
            up,
        };
        // 3x3 same padding keeps the size.
        assert_eq!(
            s(17, 9, 3, 1, (1, 1, 1, 1), false).out_hw().unwrap(),
            (17, 9)
        );
        // Downsample: pad (0, 1, 0, 1), stride 2: (64 + 1 - 3) / 2 + 1 = 32; odd 33 -> 16.
        assert_eq!(
            s(64, 33, 3, 2, (0, 0, 1, 1), false).out_hw().unwrap(),
            (32, 16)
        );
        // Upsample fused: stored 8x12 read as 16x24.
        let u = s(8, 12, 3, 1, (1, 1, 1, 1), true);
        assert_eq!(u.out_hw().unwrap(), (16, 24));
        assert_eq!(u.in_elems(), 2 * 8 * 12 * 32);
        assert_eq!(u.out_elems().unwrap(), 2 * 16 * 24 * 64);
        assert_eq!(u.w_elems(), 64 * 9 * 32);
        // 1x1.
        assert_eq!(s(5, 7, 1, 1, (0, 0, 0, 0), false).out_hw().unwrap(), (5, 7));
        // A 3x3 unpadded conv on a 1x1 input does not fit.
        assert!(s(1, 1, 3, 2, (0, 0, 1, 1), false).out_hw().is_err());
    }

    #[test]
    fn group_norm_geometry_matches_the_kernel_defines() {
        // 64x64 pixels: ceil(4096 / 256) = 16 < 32 -> chunk 32, 128 chunks.
        let g = gn_launch(4096, 128);
        assert_eq!((g.chunk, g.nchunks), (32, 128));
        // apply: ceil(4096 * 16 / 1024) = 64 blocks.
        assert_eq!(g.apply_blocks, 64);
        // 128x128 at 512 channels: chunk 64, 256 chunks, apply ceil(16384*64/1024) = 1024.
        let g = gn_launch(128 * 128, 512);
        assert_eq!((g.chunk, g.nchunks, g.apply_blocks), (64, 256, 1024));
        // 1024x1024 at 128 channels: chunk 4096, 256 chunks, apply capped at 4096.
        let g = gn_launch(1024 * 1024, 128);
        assert_eq!((g.chunk, g.nchunks, g.apply_blocks), (4096, 256, 4096));
        // 5x3 pixels, 32 channels: one chunk, one apply block.
        let g = gn_launch(15, 32);
        assert_eq!((g.chunk, g.nchunks, g.apply_blocks), (32, 1, 1));
        // Scratch: 2 * n * nchunks * 32 + n * 64.
        assert_eq!(gn_part_floats(1, 4096), 2 * 128 * 32 + 64);
        assert_eq!(gn_part_floats(2, 15), 2 * 2 * 32 + 128);
    }
}
