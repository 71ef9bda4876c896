//! Convolutions, GroupNorm and resampling (CPU).
//!
//! Layout everywhere is NCHW, row-major f32. Two convolution paths, both validated against
//! the direct definition in the tests:
//!
//! - **direct** (stride 1, 1×1 or 3×3, AVX2 + FMA; every VAE convolution but the encoder's
//!   three downsamplers and the wider 1×1 shortcuts): the input rows are formed through an
//!   optional [`Prologue`] (GroupNorm + SiLU, nearest 2× upsampling), so those never exist
//!   as tensors of their own, into a zero-bordered buffer local to the task that reads
//!   them: each task runs a band of output rows, forming a few padded input rows at a time
//!   (the last `k − 1` carried over) so they are read back from cache, not memory. Per
//!   output row a register-blocked kernel (6 output channels × 16 pixels, 12 accumulators)
//!   runs over every channel block and adds bias and residual on the way out. No im2col:
//!   a 3×3 tap is a shifted load.
//! - **im2col** (everything else): a tile of output pixels is unfolded into a per-thread
//!   column buffer that stays in L2, then one single-threaded sgemm per tile
//!   `out[O, tile] += W[O, C·kh·kw] · col[C·kh·kw, tile]`, with the output pre-filled with
//!   the bias (and the residual) so the gemm accumulates into it. Tiles run in parallel.
//!   An unpadded plain 1×1 reads its input in place as the gemm's right-hand side.
//!
//! Outputs come from a [`Scratch`] the caller owns, so a model's layers (and successive
//! calls) reuse memory instead of faulting in fresh pages every time.

use std::sync::Mutex;

use rayon::prelude::*;

use crate::cpu::ops::{affine_act, affine_act_inplace, shifted_sums};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Column-tile budget per task, in f32 elements (the tile stays in L2).
const TILE_BUDGET: usize = 64 << 10;
/// Fewest output pixels per task (so the gemm is not dominated by packing the weight).
const MIN_TILE: usize = 256;

/// Values per task-local buffer of padded input rows on the direct path (1 MiB: about one
/// core's L2).
const BAND_BUDGET: usize = 256 << 10;
/// Bands of output rows per thread on the direct path (load balance against the
/// re-formed rows where bands meet).
const BANDS_PER_THREAD: usize = 4;

/// Fewest output channels for which a plain 1×1 convolution runs as a gemm rather than on
/// the direct kernel (see [`Conv2d::prefers_direct`]).
const GEMM_1X1_MIN_OUT: usize = 64;

/// Zero padding on each side of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    /// The same padding on all four sides.
    pub const fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// A 2-D convolution with its weights: `weight [O, C, kh, kw]`, optional `bias [O]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    /// The weight repacked for the direct kernel (see [`pack_weights`]).
    packed: Vec<f32>,
    bias: Option<Vec<f32>>,
    stride: usize,
    pad: Padding,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, pad: Padding) -> Result<Self> {
        if weight.shape.len() != 4 {
            return Err(Error::Model(format!(
                "conv weight must be [O, C, kh, kw], found {:?}",
                weight.shape
            )));
        }
        if stride == 0 {
            return Err(Error::Model("conv stride must be at least 1".into()));
        }
        if let Some(b) = &bias {
            if b.shape != [weight.shape[0]] {
                return Err(Error::Model(format!(
                    "conv bias {:?} does not match weight {:?}",
                    b.shape, weight.shape
                )));
            }
        }
        Ok(Self {
            packed: pack_weights(&weight),
            weight,
            bias: bias.map(|b| b.data),
            stride,
            pad,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.shape[1]
    }

    /// Keep only the first `n` output channels (e.g. the posterior mean of a VAE encoder).
    pub fn truncate_out(&mut self, n: usize) {
        let o = self.out_channels();
        if n >= o {
            return;
        }
        let per = self.weight.numel() / o;
        self.weight.data.truncate(n * per);
        self.weight.shape[0] = n;
        self.packed = pack_weights(&self.weight);
        if let Some(b) = &mut self.bias {
            b.truncate(n);
        }
    }

    /// `conv(x)` for `x [B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Prologue::None, None, &Scratch::default())
    }

    /// `conv(x) + residual`, the residual added for free by accumulating into it.
    pub fn forward_add(&self, x: &Tensor, residual: Tensor) -> Result<Tensor> {
        self.forward_with(x, Prologue::None, Some(residual), &Scratch::default())
    }

    /// `conv(prologue(x)) (+ residual)`. On the direct path the prologue (GroupNorm + SiLU,
    /// nearest upsampling) is applied while the input is copied into the padded rows the
    /// kernel reads, so its result is never stored as a tensor of its own. The output comes
    /// from `scratch`.
    pub fn forward_with(
        &self,
        x: &Tensor,
        prologue: Prologue<'_>,
        residual: Option<Tensor>,
        scratch: &Scratch,
    ) -> Result<Tensor> {
        self.run(
            x,
            prologue,
            residual,
            scratch,
            self.prefers_direct(&prologue),
        )
    }

    /// Whether [`Conv2d::forward_with`] takes the direct path: every eligible convolution
    /// but a plain unpadded 1×1 with at least [`GEMM_1X1_MIN_OUT`] outputs. Such a 1×1 is
    /// one gemm per tile reading its input in place, and beats the direct kernel (128 → 64
    /// channels at 256²: 12 ms against 20 ms on 2 cores); with fewer outputs the gemm's
    /// packing dominates and the direct kernel wins (64 → 32 at 512²: 18 ms against 20 ms).
    fn prefers_direct(&self, prologue: &Prologue<'_>) -> bool {
        let plain_1x1 = self.weight.shape[2] == 1
            && self.weight.shape[3] == 1
            && matches!(prologue, Prologue::None)
            && self.pad == Padding::same(0);
        self.direct_eligible() && !(plain_1x1 && self.out_channels() >= GEMM_1X1_MIN_OUT)
    }

    /// [`Conv2d::forward_with`] on the direct path when `direct` (the caller checked
    /// [`Conv2d::direct_eligible`]), on the im2col path otherwise.
    fn run(
        &self,
        x: &Tensor,
        prologue: Prologue<'_>,
        residual: Option<Tensor>,
        scratch: &Scratch,
        direct: bool,
    ) -> Result<Tensor> {
        self.run_banded(x, prologue, residual, scratch, direct, BAND_BUDGET)
    }

    /// [`Conv2d::run`] with `budget` values per task-local buffer of padded rows on the
    /// direct path (tests shrink it to run many carried steps per band).
    fn run_banded(
        &self,
        x: &Tensor,
        prologue: Prologue<'_>,
        residual: Option<Tensor>,
        scratch: &Scratch,
        direct: bool,
        budget: usize,
    ) -> Result<Tensor> {
        let [b, xc, xh, xw] = dims4(x)?;
        let (h, w) = match prologue {
            Prologue::Upsample2x => (2 * xh, 2 * xw),
            _ => (xh, xw),
        };
        let (o, c, kh, kw) = (
            self.weight.shape[0],
            self.weight.shape[1],
            self.weight.shape[2],
            self.weight.shape[3],
        );
        if xc != c {
            return Err(Error::Model(format!(
                "conv expects {c} input channels, got input {:?}",
                x.shape
            )));
        }
        let (ph, pw) = (
            h + self.pad.top + self.pad.bottom,
            w + self.pad.left + self.pad.right,
        );
        if ph < kh || pw < kw {
            return Err(Error::Model(format!(
                "conv kernel {kh}x{kw} larger than padded input {ph}x{pw}"
            )));
        }
        let ho = (ph - kh) / self.stride + 1;
        let wo = (pw - kw) / self.stride + 1;
        let n = ho * wo;
        let shape = [b, o, ho, wo];
        let (mut out, accumulate) = match residual {
            Some(r) => {
                if r.shape != shape {
                    return Err(Error::Model(format!(
                        "conv residual {:?} does not match output {shape:?}",
                        r.shape
                    )));
                }
                (r, true)
            }
            // Every output value is written (not accumulated) when there is no residual.
            None => (
                Tensor {
                    shape: shape.to_vec(),
                    data: scratch.take(shape.iter().product()),
                },
                false,
            ),
        };
        let input = match prologue {
            Prologue::None => Input::Plain,
            Prologue::GroupNorm {
                groups,
                weight,
                bias,
                eps,
                silu,
            } => Input::Norm(group_norm_coeffs(x, groups, weight, bias, eps)?, silu),
            Prologue::Upsample2x => Input::Upsampled,
        };
        if n == 0 || o == 0 {
            return Ok(out);
        }
        let geo = Geometry {
            b,
            c,
            h,
            w,
            o,
            kh,
            kw,
            ho,
            wo,
        };
        if direct {
            self.run_direct(x, &input, &mut out, accumulate, &geo, budget);
        } else {
            let formed;
            let xin = match input {
                Input::Plain => x,
                Input::Norm(coef, silu) => {
                    formed = apply_norm(x.clone(), &coef, silu);
                    &formed
                }
                Input::Upsampled => {
                    formed = upsample_nearest2x(x)?;
                    &formed
                }
            };
            self.run_im2col(xin, &mut out, accumulate, &geo);
        }
        Ok(out)
    }

    /// Whether the direct kernel handles this convolution (stride 1, a 1×1 or 3×3 kernel,
    /// and a CPU with AVX2 + FMA).
    fn direct_eligible(&self) -> bool {
        let k = (self.weight.shape[2], self.weight.shape[3]);
        self.stride == 1
            && self.in_channels() > 0
            && (k == (1, 1) || k == (3, 3))
            && direct::available()
    }

    /// The direct path: padded input rows, long enough for whole [`direct::XB`]-pixel
    /// blocks, are formed per band of output rows in a task-local buffer of about `budget`
    /// values, and the register-blocked kernel runs over every (channel block, pixel block)
    /// of each output row (an input already in that layout is read in place, one task per
    /// row).
    fn run_direct(
        &self,
        x: &Tensor,
        input: &Input,
        out: &mut Tensor,
        accumulate: bool,
        g: &Geometry,
        budget: usize,
    ) {
        let Geometry {
            b,
            c,
            h,
            w,
            o,
            kh,
            kw,
            ho,
            wo,
        } = *g;
        let (pt, pl) = (self.pad.top, self.pad.left);
        let wo_pad = wo.next_multiple_of(direct::XB);
        // Padded input rows: every kernel read of a pixel block stays inside its row.
        let wp = wo_pad + kw - 1;
        let kk = c * kh * kw;
        let blocks = o.div_ceil(direct::OB);
        let dst = SharedOut(out.data.as_mut_ptr());
        // Output row `y` of image `bi` from `img` (`c` padded planes of `plane` values),
        // whose row `ly` holds padded input row `y`.
        let run_row = |img: &[f32], plane: usize, bi: usize, y: usize, ly: usize| {
            // Column chunks outside, channel blocks inside: a chunk's input window (C × k
            // rows × XC + k − 1 values) is reused from L1/L2 by every channel block.
            for xs in (0..wo).step_by(direct::XC) {
                for ob in 0..blocks {
                    let oc0 = ob * direct::OB;
                    let nc = direct::OB.min(o - oc0);
                    let mut bias = [0f32; direct::OB];
                    if let Some(bs) = &self.bias {
                        bias[..nc].copy_from_slice(&bs[oc0..oc0 + nc]);
                    }
                    let job = direct::RowJob {
                        src: img,
                        plane,
                        row: wp,
                        y: ly,
                        c,
                        k: kh,
                        w: &self.packed[ob * kk * direct::OB..][..kk * direct::OB],
                        bias,
                        nc,
                        x_begin: xs,
                        x_end: (xs + direct::XC).min(wo),
                        accumulate,
                    };
                    // SAFETY: `direct_eligible` checked the CPU. A call writes only output
                    // row `y` of image `bi` (channels `oc0 .. oc0 + nc`, columns below `wo`,
                    // rows `ho·wo` apart); every row is run by exactly one task, and `out`
                    // outlives the parallel loop.
                    unsafe {
                        direct::row(&job, dst.get().add(((bi * o + oc0) * ho + y) * wo), ho * wo)
                    };
                }
            }
        };
        if matches!(input, Input::Plain) && self.pad == Padding::same(0) && wp == w {
            // The input already has the padded layout: one task per row reads it in place.
            (0..b * ho).into_par_iter().for_each(|t| {
                let (bi, y) = (t / ho, t % ho);
                run_row(&x.data[bi * c * h * w..][..c * h * w], h * w, bi, y, y);
            });
            return;
        }
        // Otherwise each task runs a band of output rows, forming the padded input rows it
        // reads (through the prologue) into its own buffer of `sub + kh − 1` rows per
        // channel, `sub` output rows at a time, so they are read back from cache rather
        // than memory; the last `kh − 1` rows carry over to the next step.
        let threads = rayon::current_num_threads().max(1);
        let band = ho.div_ceil((BANDS_PER_THREAD * threads).div_ceil(b).max(1));
        let bands = ho.div_ceil(band);
        let sub = (budget / (c * wp)).saturating_sub(kh - 1).clamp(1, band);
        let lrows = sub + kh - 1;
        let plane = lrows * wp;
        let [xh, xw] = [x.shape[2], x.shape[3]];
        let xplane = xh * xw;
        (0..b * bands)
            .into_par_iter()
            .for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
                let (bi, y0) = (t / bands, (t % bands) * band);
                let y1 = (y0 + band).min(ho);
                buf.resize(c * plane, 0.0);
                let mut ys = y0;
                let mut carried = false;
                while ys < y1 {
                    let ye = (ys + sub).min(y1);
                    let rows = ye - ys + kh - 1;
                    for ci in 0..c {
                        let lp = &mut buf[ci * plane..][..plane];
                        let first = if carried {
                            lp.copy_within(sub * wp..lrows * wp, 0);
                            kh - 1
                        } else {
                            0
                        };
                        let src = &x.data[(bi * c + ci) * xplane..][..xplane];
                        for r in first..rows {
                            let row = &mut lp[r * wp..][..wp];
                            fill_row(row, src, input, bi * c + ci, ys + r, [h, w], xw, [pt, pl]);
                        }
                    }
                    for y in ys..ye {
                        run_row(buf, plane, bi, y, y - ys);
                    }
                    carried = ye - ys == sub;
                    ys = ye;
                }
            });
    }

    /// The general path: im2col of a tile of output pixels into a per-thread buffer, then
    /// one single-threaded sgemm `out[O, tile] += W[O, C·kh·kw] · col[C·kh·kw, tile]` per
    /// task (1×1 stride-1 unpadded convolutions read the input directly).
    fn run_im2col(&self, x: &Tensor, out: &mut Tensor, accumulate: bool, geo: &Geometry) {
        let Geometry {
            b,
            c,
            h,
            w,
            o,
            kh,
            kw,
            ho,
            wo,
        } = *geo;
        let n = ho * wo;
        let kdim = c * kh * kw;
        let direct = kh == 1 && kw == 1 && self.stride == 1 && self.pad == Padding::same(0);
        // Output pixels per task: the column tile `[kdim, nt]` stays in L2.
        let nt = (TILE_BUDGET / kdim.max(1)).max(MIN_TILE).min(n);
        let tiles = n.div_ceil(nt);
        let dst = SharedOut(out.data.as_mut_ptr());
        (0..b * tiles)
            .into_par_iter()
            .for_each_init(Vec::new, |col: &mut Vec<f32>, t| {
                let (bi, p0) = (t / tiles, (t % tiles) * nt);
                let len = nt.min(n - p0);
                let xb = &x.data[bi * c * h * w..][..c * h * w];
                // SAFETY: task `t` touches only output pixels `p0 .. p0 + len` of image `bi`
                // (for every channel); tasks cover disjoint pixel ranges, and `out` outlives
                // the parallel loop.
                let ob = unsafe { dst.get().add(bi * o * n + p0) };
                for (oc, bv) in (0..o).zip(self.bias_iter()) {
                    // SAFETY: as above; row `oc` of the tile is `len` elements at `oc * n`.
                    let row = unsafe { std::slice::from_raw_parts_mut(ob.add(oc * n), len) };
                    if accumulate {
                        row.iter_mut().for_each(|v| *v += bv);
                    } else {
                        row.fill(bv);
                    }
                }
                let (rhs, rhs_rs) = if direct {
                    (&xb[p0..], n)
                } else {
                    col.resize(kdim * len, 0.0);
                    self.im2col(xb, geo, p0, len, col);
                    (&col[..], len)
                };
                // SAFETY: lhs is `[o, kdim]` row-major (the weight), rhs `[kdim, len]` with
                // rows `rhs_rs` apart inside its slice, dst `[o, len]` with rows `n` apart
                // inside this task's pixel range (see above).
                unsafe {
                    gemm::gemm(
                        o,
                        len,
                        kdim,
                        ob,
                        1,
                        n as isize,
                        true,
                        self.weight.data.as_ptr(),
                        1,
                        kdim as isize,
                        rhs.as_ptr(),
                        1,
                        rhs_rs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
    }

    /// Bias per output channel (zeros without a bias).
    fn bias_iter(&self) -> impl Iterator<Item = f32> + '_ {
        let o = self.out_channels();
        (0..o).map(|i| self.bias.as_ref().map_or(0.0, |b| b[i]))
    }

    /// Fill `col [C·kh·kw, len]` for the output pixels `p0 .. p0 + len` (row-major over the
    /// output image) of one image.
    fn im2col(&self, x: &[f32], g: &Geometry, p0: usize, len: usize, col: &mut [f32]) {
        let (s, pt, pl) = (self.stride, self.pad.top, self.pad.left);
        let Geometry {
            c,
            h,
            w,
            kh,
            kw,
            wo,
            ..
        } = *g;
        let mut rows = col.chunks_exact_mut(len);
        for ci in 0..c {
            let plane = &x[ci * h * w..][..h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let Some(dst) = rows.next() else { return };
                    // Output columns whose input column lies inside the image.
                    let lo = pl.saturating_sub(kx).div_ceil(s).min(wo);
                    let hi = if w + pl > kx {
                        ((w + pl - kx - 1) / s + 1).min(wo)
                    } else {
                        0
                    }
                    .max(lo);
                    let mut p = p0;
                    let mut d = 0;
                    while d < len {
                        let (oy, ox0) = (p / wo, p % wo);
                        let ox1 = (ox0 + len - d).min(wo);
                        let seg = &mut dst[d..d + ox1 - ox0];
                        let iy = oy * s + ky;
                        if iy < pt || iy - pt >= h {
                            seg.fill(0.0);
                        } else {
                            let src = &plane[(iy - pt) * w..][..w];
                            // Inside-image part of this segment: [a, e) in output columns.
                            let a = lo.clamp(ox0, ox1);
                            let e = hi.clamp(a, ox1);
                            seg[..a - ox0].fill(0.0);
                            seg[e - ox0..].fill(0.0);
                            let ix0 = a * s + kx - pl;
                            let inside = &mut seg[a - ox0..e - ox0];
                            if s == 1 {
                                inside.copy_from_slice(&src[ix0..ix0 + e - a]);
                            } else {
                                for (j, v) in inside.iter_mut().enumerate() {
                                    *v = src[ix0 + j * s];
                                }
                            }
                        }
                        d += ox1 - ox0;
                        p += ox1 - ox0;
                    }
                }
            }
        }
    }
}

/// Input and output sizes of one convolution call.
#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

/// `w [O, C, kh, kw]` repacked as `[⌈O/OB⌉, C, kh, kw, OB]` (channels past O are zero), so
/// the direct kernel reads one block's weights for one tap as `OB` consecutive values.
fn pack_weights(w: &Tensor) -> Vec<f32> {
    let o = w.shape[0];
    let kk = w.shape[1..].iter().product::<usize>();
    let ob = direct::OB;
    let mut p = vec![0f32; o.div_ceil(ob) * kk * ob];
    for (oc, wrow) in w.data.chunks_exact(kk.max(1)).enumerate().take(o) {
        let blk = &mut p[(oc / ob) * kk * ob..][..kk * ob];
        for (t, &v) in wrow.iter().enumerate() {
            blk[t * ob + oc % ob] = v;
        }
    }
    p
}

/// Large f32 buffers kept for reuse between layers. A fresh large allocation is mapped from
/// the OS and pays a page fault per 4 KiB page on first touch (about a quarter of the VAE
/// decoder's time at 512² before this pool existed); a model that owns a `Scratch` and hands
/// dead activations back with [`Scratch::give`] runs its layers on recycled memory.
#[derive(Debug, Default)]
pub struct Scratch {
    free: Mutex<Vec<Vec<f32>>>,
}

impl Scratch {
    /// Buffers kept at most (the smallest are dropped first); a ResNet block needs three.
    const KEEP: usize = 4;
    /// Buffers smaller than this (in values) are not worth keeping.
    const MIN_LEN: usize = 1 << 16;

    /// A buffer of `len` values with unspecified contents: the caller writes all of them.
    /// The smallest kept buffer that fits; a fresh one (and none kept) when none fits.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut v = free.swap_remove(i);
                drop(free);
                v.resize(len, 0.0);
                v
            }
            None => {
                // Every kept buffer is too small: they belong to a smaller resolution a
                // model has left behind (a decoder grows level by level), so free them
                // rather than hold them beside the new one.
                free.clear();
                drop(free);
                vec![0f32; len]
            }
        }
    }

    /// Frees every kept buffer.
    pub fn clear(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Keeps `v` for a later [`Scratch::take`].
    pub fn give(&self, v: Vec<f32>) {
        if v.capacity() < Self::MIN_LEN {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(v);
        if free.len() > Self::KEEP {
            if let Some(i) = free
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
            {
                free.swap_remove(i);
            }
        }
    }
}

/// What a convolution reads: its input as is, or transformed on the fly.
#[derive(Clone, Copy, Debug)]
pub enum Prologue<'a> {
    /// The input as is.
    None,
    /// GroupNorm over `groups` groups of consecutive channels with affine `weight`/`bias
    /// [C]`, then SiLU when `silu` (as [`group_norm`]).
    GroupNorm {
        groups: usize,
        weight: &'a [f32],
        bias: &'a [f32],
        eps: f32,
        silu: bool,
    },
    /// Nearest-neighbour 2× upsampling (as [`upsample_nearest2x`]).
    Upsample2x,
}

/// A [`Prologue`] made ready: GroupNorm reduced to a per (image, channel) affine map.
enum Input {
    Plain,
    Norm(Vec<[f32; 2]>, bool),
    Upsampled,
}

/// Writes padded row `r` (all `wp` values of `row`) of plane `i` (image · C + channel) of
/// the formed input: `src` is that plane untransformed (`xw` wide), `input` forms it to
/// `[h, w]`, placed at offset `[pt, pl]` among zeros.
#[allow(clippy::too_many_arguments)]
fn fill_row(
    row: &mut [f32],
    src: &[f32],
    input: &Input,
    i: usize,
    r: usize,
    [h, w]: [usize; 2],
    xw: usize,
    [pt, pl]: [usize; 2],
) {
    if r < pt || r - pt >= h {
        row.fill(0.0);
        return;
    }
    let y = r - pt;
    row[..pl].fill(0.0);
    row[pl + w..].fill(0.0);
    let d = &mut row[pl..pl + w];
    match input {
        Input::Plain => d.copy_from_slice(&src[y * w..][..w]),
        Input::Norm(coef, silu) => {
            let [a, b] = coef[i];
            affine_act(&src[y * w..][..w], d, a, b, *silu);
        }
        Input::Upsampled => {
            let s = &src[(y / 2) * xw..][..xw];
            for (pair, &v) in d.chunks_exact_mut(2).zip(s) {
                pair[0] = v;
                pair[1] = v;
            }
        }
    }
}

/// The direct convolution kernel: register blocks of `OB` output channels × `XB` output
/// pixels of one row, accumulated over every input channel and tap with 8-lane FMAs
/// (AVX2 + FMA, picked at run time; other CPUs take the im2col path), bias and residual
/// added on the way out.
mod direct {
    /// Output channels per register block.
    pub const OB: usize = 6;
    /// Output pixels per register block (two 8-lane vectors).
    pub const XB: usize = 16;
    /// Output columns per chunk of a row (a multiple of `XB`): every channel block runs
    /// over one chunk before the next, so the chunk's input window stays in L1/L2
    /// (measured ~4% faster on the tiny decoder than whole rows).
    pub const XC: usize = 64;

    /// Whether this CPU runs the kernel.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// One output row of one block of output channels.
    pub struct RowJob<'a> {
        /// The image's `c` zero-padded input planes of `plane` values, rows `row` long.
        pub src: &'a [f32],
        pub plane: usize,
        pub row: usize,
        /// Output row.
        pub y: usize,
        pub c: usize,
        /// Kernel size (1 or 3).
        pub k: usize,
        /// The block's packed weights `[c, k, k, OB]`.
        pub w: &'a [f32],
        pub bias: [f32; OB],
        /// Live channels of the block (1 ..= OB).
        pub nc: usize,
        /// Output columns `x_begin .. x_end` (`x_begin` a multiple of `XB`).
        pub x_begin: usize,
        pub x_end: usize,
        /// Add to the output instead of overwriting it.
        pub accumulate: bool,
    }

    /// Computes `job` into `out + j·ostride + [x_begin, x_end)` for each live channel `j`.
    /// Panics if `job`'s input reads would leave `job.src` (the padded rows must hold
    /// `x_end` rounded up to `XB`, plus `k − 1`).
    ///
    /// # Safety
    /// [`available`] is true; `out + j·ostride + i` is valid for writes (and reads) for
    /// `j < job.nc`, `job.x_begin <= i < job.x_end`, and nothing else accesses those values
    /// meanwhile.
    pub unsafe fn row(job: &RowJob<'_>, out: *mut f32, ostride: usize) {
        let span = job.x_end.next_multiple_of(XB) + job.k - 1;
        assert!(
            job.c > 0
                && (1..=OB).contains(&job.nc)
                && job.x_begin.is_multiple_of(XB)
                && span <= job.row
                && (job.c - 1) * job.plane + (job.y + job.k - 1) * job.row + span <= job.src.len()
                && job.w.len() >= job.c * job.k * job.k * OB
        );
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the caller's contract covers the CPU features and the output; the
            // assert above bounds every input read (plane `ci < c` at `ci·plane`, rows
            // `y .. y + k`, columns below `span`) and every weight read.
            unsafe {
                match (job.k, job.nc) {
                    (1, 1..=2) => kernel::<1, 2>(job, out, ostride),
                    (1, 3..=4) => kernel::<1, 4>(job, out, ostride),
                    (1, _) => kernel::<1, 6>(job, out, ostride),
                    (3, 1..=2) => kernel::<3, 2>(job, out, ostride),
                    (3, 3..=4) => kernel::<3, 4>(job, out, ostride),
                    (3, _) => kernel::<3, 6>(job, out, ostride),
                    _ => unreachable!("direct kernel is built for 1×1 and 3×3 only"),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (out, ostride);
            unreachable!("direct kernel needs x86-64");
        }
    }

    /// `N` (≥ `job.nc`) channels of the block at a time, `K×K` taps.
    ///
    /// # Safety
    /// As [`row`], with its assert holding.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const K: usize, const N: usize>(
        job: &RowJob<'_>,
        out: *mut f32,
        ostride: usize,
    ) {
        use std::arch::x86_64::*;
        let base = job.src.as_ptr().add(job.y * job.row);
        let mut x0 = job.x_begin;
        while x0 < job.x_end {
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let mut wp = job.w.as_ptr();
            let mut p = base.add(x0);
            for _ in 0..job.c {
                for ky in 0..K {
                    let r = p.add(ky * job.row);
                    for kx in 0..K {
                        let a0 = _mm256_loadu_ps(r.add(kx));
                        let a1 = _mm256_loadu_ps(r.add(kx + 8));
                        for (j, aj) in acc.iter_mut().enumerate() {
                            let wv = _mm256_broadcast_ss(&*wp.add(j));
                            aj[0] = _mm256_fmadd_ps(wv, a0, aj[0]);
                            aj[1] = _mm256_fmadd_ps(wv, a1, aj[1]);
                        }
                        wp = wp.add(OB);
                    }
                }
                p = p.add(job.plane);
            }
            // Spill the block once, with constant indices only, so `acc` stays in registers
            // through the reduction above.
            let mut t = [[0f32; XB]; N];
            for (tj, aj) in t.iter_mut().zip(&acc) {
                _mm256_storeu_ps(tj.as_mut_ptr(), aj[0]);
                _mm256_storeu_ps(tj.as_mut_ptr().add(8), aj[1]);
            }
            let nx = (job.x_end - x0).min(XB);
            for (j, (tj, &bj)) in t.iter().zip(&job.bias).enumerate().take(job.nc) {
                // SAFETY: `j < nc` and `x0 + nx <= wo` (the caller's output contract).
                let o = std::slice::from_raw_parts_mut(out.add(j * ostride + x0), nx);
                if job.accumulate {
                    for (d, &v) in o.iter_mut().zip(tj) {
                        *d += v + bj;
                    }
                } else {
                    for (d, &v) in o.iter_mut().zip(tj) {
                        *d = v + bj;
                    }
                }
            }
            x0 += XB;
        }
    }
}

/// The output buffer, shared by tasks that write disjoint pixel ranges of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (see `Conv2d::run`), and the buffer outlives the
// parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn dims4(x: &Tensor) -> Result<[usize; 4]> {
    match x.shape[..] {
        [b, c, h, w] => Ok([b, c, h, w]),
        _ => Err(Error::Model(format!(
            "expected a [B, C, H, W] tensor, got {:?}",
            x.shape
        ))),
    }
}

/// GroupNorm over `x [B, C, H, W]` (per sample, `groups` groups of consecutive channels),
/// affine with `weight`/`bias [C]`, followed by SiLU when `silu`. Statistics in f64.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let mut y = x.clone();
    group_norm_inplace(&mut y, groups, weight, bias, eps, silu)?;
    Ok(y)
}

/// [`group_norm`] in place.
pub fn group_norm_inplace(
    x: &mut Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Result<()> {
    let coef = group_norm_coeffs(x, groups, weight, bias, eps)?;
    let y = std::mem::take(&mut x.data);
    x.data = apply_norm(
        Tensor {
            shape: x.shape.clone(),
            data: y,
        },
        &coef,
        silu,
    )
    .data;
    Ok(())
}

/// `act(a·x + b)` per (image, channel) plane, `[a, b]` from [`group_norm_coeffs`].
fn apply_norm(mut x: Tensor, coef: &[[f32; 2]], silu: bool) -> Tensor {
    let hw = x.shape[2] * x.shape[3];
    if hw > 0 {
        x.data
            .par_chunks_mut(hw)
            .zip(coef.par_iter())
            .for_each(|(plane, &[a, b])| affine_act_inplace(plane, a, b, silu));
    }
    x
}

/// GroupNorm as one affine map per (image, channel): `[a, b]` with `norm(x) = a·x + b`.
/// Statistics: one pass of shifted sums, accumulated in f64.
fn group_norm_coeffs(
    x: &Tensor,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<Vec<[f32; 2]>> {
    let [b, c, h, w] = dims4(x)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::Model(format!(
            "group norm: {groups} groups do not divide {c} channels"
        )));
    }
    if weight.len() != c || bias.len() != c {
        return Err(Error::Model(format!(
            "group norm: affine of length {}/{} for {c} channels",
            weight.len(),
            bias.len()
        )));
    }
    let cpg = c / groups;
    let glen = cpg * h * w;
    let mut coef = vec![[1f32, 0f32]; b * c];
    if glen == 0 {
        return Ok(coef);
    }
    coef.par_chunks_mut(cpg)
        .zip(x.data.par_chunks(glen))
        .enumerate()
        .for_each(|(i, (cf, g))| {
            let c0 = (i % groups) * cpg;
            let pivot = g[0];
            let mut sums = [0f64; 2];
            shifted_sums(g, pivot, &mut sums);
            let md = sums[0] / glen as f64;
            let var = (sums[1] / glen as f64 - md * md).max(0.0);
            let mean = pivot as f64 + md;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (j, ab) in cf.iter_mut().enumerate() {
                let a = inv * weight[c0 + j] as f64;
                *ab = [a as f32, (bias[c0 + j] as f64 - mean * a) as f32];
            }
        });
    Ok(coef)
}

/// Nearest-neighbour 2× upsampling of `x [B, C, H, W]` → `[B, C, 2H, 2W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = dims4(x)?;
    let mut y = Tensor::zeros(&[b, c, 2 * h, 2 * w]);
    if h * w == 0 {
        return Ok(y);
    }
    y.data
        .par_chunks_mut(4 * h * w)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (iy, srow) in src.chunks_exact(w).enumerate() {
                let (r0, r1) = dst[2 * iy * 2 * w..][..4 * w].split_at_mut(2 * w);
                for (ix, &v) in srow.iter().enumerate() {
                    r0[2 * ix] = v;
                    r0[2 * ix + 1] = v;
                }
                r1.copy_from_slice(r0);
            }
        });
    Ok(y)
}

/// PIL's bicubic kernel (a = −0.5).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index and normalised weights (PIL's separable resampling:
/// the kernel is widened by the scale factor when downsampling, i.e. antialiased).
fn resample_weights(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f64 / out as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    (0..out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize)
                .min(inp)
                .max(lo + 1);
            let ws: Vec<f64> = (lo..hi)
                .map(|j| cubic((j as f64 - center + 0.5) / fscale))
                .collect();
            let sum: f64 = ws.iter().sum();
            let norm = if sum != 0.0 { 1.0 / sum } else { 0.0 };
            (lo, ws.iter().map(|v| (v * norm) as f32).collect())
        })
        .collect()
}

/// Bicubic resize of `x [C, H, W]` to `[C, oh, ow]`, as PIL's `Image.resize(BICUBIC)`
/// does it (separable, horizontal pass first, antialiased when shrinking), in float.
pub fn resize_bicubic(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (c, h, w) = match x.shape[..] {
        [c, h, w] => (c, h, w),
        _ => {
            return Err(Error::Model(format!(
                "bicubic resize expects [C, H, W], got {:?}",
                x.shape
            )))
        }
    };
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::Arg(format!(
            "bicubic resize from {h}x{w} to {oh}x{ow}: sizes must be positive"
        )));
    }
    let wx = resample_weights(w, ow);
    let wy = resample_weights(h, oh);
    let mut y = Tensor::zeros(&[c, oh, ow]);
    y.data
        .par_chunks_mut(oh * ow)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            let mut tmp = vec![0f32; h * ow];
            for (srow, trow) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(ow)) {
                for (t, (lo, ws)) in trow.iter_mut().zip(&wx) {
                    *t = ws.iter().zip(&srow[*lo..]).map(|(a, b)| a * b).sum();
                }
            }
            for (drow, (lo, ws)) in dst.chunks_exact_mut(ow).zip(&wy) {
                for (k, wk) in ws.iter().enumerate() {
                    let trow = &tmp[(lo + k) * ow..][..ow];
                    for (d, t) in drow.iter_mut().zip(trow) {
                        *d += wk * t;
                    }
                }
            }
        });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Direct convolution, the definition, in f64.
    // Index loops mirror the textbook formula on purpose.
    #[allow(clippy::needless_range_loop)]
    fn naive(x: &Tensor, w: &Tensor, b: &[f32], s: usize, p: Padding) -> Tensor {
        let [bn, c, h, wd] = dims4(x).unwrap();
        let (o, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
        let ho = (h + p.top + p.bottom - kh) / s + 1;
        let wo = (wd + p.left + p.right - kw) / s + 1;
        let mut y = Tensor::zeros(&[bn, o, ho, wo]);
        for bi in 0..bn {
            for oc in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b[oc] as f64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * s + ky) as isize - p.top as isize;
                                    let ix = (ox * s + kx) as isize - p.left as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xv = x.data
                                        [((bi * c + ci) * h + iy as usize) * wd + ix as usize];
                                    let wv = w.data[((oc * c + ci) * kh + ky) * kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y.data[((bi * o + oc) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    /// (b, c, o, h, w, k, stride, pad)
    type Case = (usize, usize, usize, usize, usize, usize, usize, Padding);

    #[test]
    fn conv2d_matches_direct_convolution() {
        let cases: &[Case] = &[
            // (b, c, o, h, w, k, stride, pad)
            (2, 3, 5, 9, 7, 3, 1, Padding::same(1)),
            (
                1,
                4,
                6,
                8,
                8,
                3,
                2,
                Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
            ),
            (2, 5, 3, 6, 5, 1, 1, Padding::same(0)),
            (1, 3, 8, 16, 16, 8, 8, Padding::same(0)),
            (1, 2, 3, 5, 6, 3, 2, Padding::same(2)),
        ];
        for (i, &(b, c, o, h, w, k, s, p)) in cases.iter().enumerate() {
            let x = Tensor::new(&[b, c, h, w], rand(b * c * h * w, i as u64 + 1)).unwrap();
            let wt = Tensor::new(&[o, c, k, k], rand(o * c * k * k, i as u64 + 100)).unwrap();
            let bias = rand(o, i as u64 + 200);
            let conv = Conv2d::new(
                wt.clone(),
                Some(Tensor::new(&[o], bias.clone()).unwrap()),
                s,
                p,
            )
            .unwrap();
            let got = conv.forward(&x).unwrap();
            let want = naive(&x, &wt, &bias, s, p);
            assert_eq!(got.shape, want.shape, "case {i}");
            let err = got.max_rel_err(&want);
            assert!(err < 1e-5, "case {i}: rel err {err}");
            // forward_add adds the residual.
            let res = Tensor::new(&want.shape, rand(want.numel(), 7)).unwrap();
            let got = conv.forward_add(&x, res.clone()).unwrap();
            let mut want2 = want.clone();
            want2
                .data
                .iter_mut()
                .zip(&res.data)
                .for_each(|(a, r)| *a += r);
            assert!(got.max_rel_err(&want2) < 1e-5, "case {i} (residual)");
        }
    }

    /// GroupNorm + SiLU then conv, or nearest 2× upsampling then conv, computed the
    /// plain way: the reference for the fused prologues.
    fn unfused(x: &Tensor, pro: Prologue<'_>) -> Tensor {
        match pro {
            Prologue::None => x.clone(),
            Prologue::GroupNorm {
                groups,
                weight,
                bias,
                eps,
                silu,
            } => group_norm(x, groups, weight, bias, eps, silu).unwrap(),
            Prologue::Upsample2x => upsample_nearest2x(x).unwrap(),
        }
    }

    #[test]
    fn direct_and_im2col_paths_match_direct_convolution() {
        // Every live-channel remainder of the 6-channel block (o = 1 ..= 7, 13), widths
        // around the 16-pixel block (1, 15, 16, 17, 33) and the 64-column chunk (81), 1×1
        // and 3×3, asymmetric padding, channel counts that are not multiples of anything.
        let pads = [
            Padding::same(1),
            Padding {
                top: 0,
                bottom: 2,
                left: 1,
                right: 0,
            },
        ];
        let mut case = 0u64;
        for &(c, o, h, w) in &[
            (1, 1, 3, 1),
            (3, 2, 4, 15),
            (5, 3, 5, 16),
            (2, 4, 3, 17),
            (7, 5, 2, 33),
            (4, 6, 6, 9),
            (6, 7, 5, 20),
            (3, 13, 4, 18),
            // Past one 64-column chunk, with a ragged tail.
            (3, 7, 3, 81),
        ] {
            for (k, pad) in [
                (1, Padding::same(0)),
                (3, pads[0]),
                (3, pads[1]),
                (1, pads[1]),
            ] {
                case += 1;
                if w + pad.left + pad.right < k || h + pad.top + pad.bottom < k {
                    continue;
                }
                let x = Tensor::new(&[2, c, h, w], rand(2 * c * h * w, case)).unwrap();
                let wt = Tensor::new(&[o, c, k, k], rand(o * c * k * k, case + 50)).unwrap();
                let bias = rand(o, case + 90);
                let conv = Conv2d::new(
                    wt.clone(),
                    Some(Tensor::new(&[o], bias.clone()).unwrap()),
                    1,
                    pad,
                )
                .unwrap();
                let want = naive(&x, &wt, &bias, 1, pad);
                let res = Tensor::new(&want.shape, rand(want.numel(), case + 7)).unwrap();
                let mut want_res = want.clone();
                want_res
                    .data
                    .iter_mut()
                    .zip(&res.data)
                    .for_each(|(a, r)| *a += r);
                let s = Scratch::default();
                let paths: &[bool] = if direct::available() {
                    assert!(conv.direct_eligible(), "case {case}: direct path expected");
                    &[true, false]
                } else {
                    &[false]
                };
                for &direct in paths {
                    let got = conv.run(&x, Prologue::None, None, &s, direct).unwrap();
                    assert_eq!(got.shape, want.shape, "case {case}");
                    let err = got.max_rel_err(&want);
                    assert!(err < 1e-5, "case {case} direct={direct}: rel err {err}");
                    let got = conv
                        .run(&x, Prologue::None, Some(res.clone()), &s, direct)
                        .unwrap();
                    let err = got.max_rel_err(&want_res);
                    assert!(err < 1e-5, "case {case} direct={direct} residual: {err}");
                    s.give(got.data);
                }
            }
        }
    }

    #[test]
    fn fused_prologues_match_unfused() {
        let (c, o, h, w) = (8, 5, 7, 19);
        let x = Tensor::new(&[2, c, h, w], rand(2 * c * h * w, 31)).unwrap();
        let gamma: Vec<f32> = rand(c, 32).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = rand(c, 33);
        let pros = [
            Prologue::GroupNorm {
                groups: 4,
                weight: &gamma,
                bias: &beta,
                eps: 1e-6,
                silu: true,
            },
            Prologue::GroupNorm {
                groups: 2,
                weight: &gamma,
                bias: &beta,
                eps: 1e-6,
                silu: false,
            },
            Prologue::Upsample2x,
        ];
        for (i, pro) in pros.into_iter().enumerate() {
            for (k, stride, pad) in [
                (3, 1, Padding::same(1)),
                (1, 1, Padding::same(0)),
                (
                    3,
                    2,
                    Padding {
                        top: 0,
                        bottom: 1,
                        left: 0,
                        right: 1,
                    },
                ),
            ] {
                let wt = Tensor::new(&[o, c, k, k], rand(o * c * k * k, 40 + i as u64)).unwrap();
                let bias = rand(o, 60);
                let conv = Conv2d::new(
                    wt.clone(),
                    Some(Tensor::new(&[o], bias.clone()).unwrap()),
                    stride,
                    pad,
                )
                .unwrap();
                let want = naive(&unfused(&x, pro), &wt, &bias, stride, pad);
                let s = Scratch::default();
                for direct in [conv.direct_eligible(), false] {
                    let got = conv.run(&x, pro, None, &s, direct).unwrap();
                    let err = got.max_rel_err(&want);
                    assert!(
                        err < 1e-5,
                        "prologue {i} k{k} s{stride} direct={direct}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn banded_direct_path_matches_direct_convolution() {
        // Task-local bands of padded rows formed `sub` output rows at a time, the last
        // `k − 1` rows carried to the next step: every prologue, 1×1 and 3×3, bands whose
        // steps divide them and steps that leave a ragged tail, a residual.
        if !direct::available() {
            return;
        }
        let (c, o, h, w) = (6, 7, 23, 21);
        let x = Tensor::new(&[2, c, h, w], rand(2 * c * h * w, 81)).unwrap();
        let gamma: Vec<f32> = rand(c, 82).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = rand(c, 83);
        let pros = [
            Prologue::None,
            Prologue::GroupNorm {
                groups: 3,
                weight: &gamma,
                bias: &beta,
                eps: 1e-6,
                silu: true,
            },
            Prologue::Upsample2x,
        ];
        let asym = Padding {
            top: 1,
            bottom: 0,
            left: 0,
            right: 2,
        };
        for (i, pro) in pros.into_iter().enumerate() {
            for (k, pad) in [(3, Padding::same(1)), (1, asym), (3, asym)] {
                let wt = Tensor::new(&[o, c, k, k], rand(o * c * k * k, 84 + i as u64)).unwrap();
                let bias = rand(o, 85);
                let conv = Conv2d::new(
                    wt.clone(),
                    Some(Tensor::new(&[o], bias.clone()).unwrap()),
                    1,
                    pad,
                )
                .unwrap();
                let want = naive(&unfused(&x, pro), &wt, &bias, 1, pad);
                let res = Tensor::new(&want.shape, rand(want.numel(), 86)).unwrap();
                let wo = want.shape[3];
                let wp = wo.next_multiple_of(direct::XB) + k - 1;
                let s = Scratch::default();
                for sub in [1, 2, 3, 5, 1000] {
                    let budget = c * wp * (sub + k - 1);
                    let got = conv.run_banded(&x, pro, None, &s, true, budget).unwrap();
                    let err = got.max_rel_err(&want);
                    assert!(err < 1e-5, "prologue {i} k{k} {pad:?} sub {sub}: {err}");
                    let got = conv
                        .run_banded(&x, pro, Some(res.clone()), &s, true, budget)
                        .unwrap();
                    let mut want_res = want.clone();
                    want_res
                        .data
                        .iter_mut()
                        .zip(&res.data)
                        .for_each(|(a, r)| *a += r);
                    let err = got.max_rel_err(&want_res);
                    assert!(err < 1e-5, "prologue {i} k{k} sub {sub} residual: {err}");
                }
            }
        }
    }

    #[test]
    fn plain_wide_1x1_runs_as_gemm() {
        // A plain 1×1 with many outputs takes the gemm path through `forward_with`, and
        // agrees with the direct convolution; with a prologue it stays direct.
        let (c, o, h, w) = (5, GEMM_1X1_MIN_OUT + 3, 6, 11);
        let x = Tensor::new(&[2, c, h, w], rand(2 * c * h * w, 91)).unwrap();
        let wt = Tensor::new(&[o, c, 1, 1], rand(o * c, 92)).unwrap();
        let bias = rand(o, 93);
        let conv = Conv2d::new(
            wt.clone(),
            Some(Tensor::new(&[o], bias.clone()).unwrap()),
            1,
            Padding::same(0),
        )
        .unwrap();
        assert!(!conv.prefers_direct(&Prologue::None));
        assert_eq!(
            conv.prefers_direct(&Prologue::Upsample2x),
            direct::available()
        );
        let got = conv
            .forward_with(&x, Prologue::None, None, &Scratch::default())
            .unwrap();
        let want = naive(&x, &wt, &bias, 1, Padding::same(0));
        assert!(got.max_rel_err(&want) < 1e-5);
    }

    #[test]
    fn recycled_buffers_are_fully_overwritten() {
        // Buffers handed back full of NaN must not leak into outputs or padding.
        let s = Scratch::default();
        for _ in 0..3 {
            s.give(vec![f32::NAN; 1 << 17]);
        }
        let (c, o, h, w) = (4, 6, 40, 40);
        let x = Tensor::new(&[1, c, h, w], rand(c * h * w, 70)).unwrap();
        let wt = Tensor::new(&[o, c, 3, 3], rand(o * c * 9, 71)).unwrap();
        let conv = Conv2d::new(wt.clone(), None, 1, Padding::same(1)).unwrap();
        let want = naive(&x, &wt, &[0.0; 6], 1, Padding::same(1));
        for direct in [conv.direct_eligible(), false] {
            let got = conv.run(&x, Prologue::None, None, &s, direct).unwrap();
            assert!(got.data.iter().all(|v| v.is_finite()), "direct={direct}");
            assert!(got.max_rel_err(&want) < 1e-5, "direct={direct}");
            s.give(got.data);
        }
    }

    #[test]
    fn group_norm_stats_survive_a_large_mean() {
        // Values 100 ± 0.1 (mean / std ≈ 1700): a one-pass f32 variance without the shift
        // would lose every digit.
        let (c, h, w) = (2, 16, 16);
        let x: Vec<f32> = rand(c * h * w, 80)
            .iter()
            .map(|v| 100.0 + 0.1 * v)
            .collect();
        let x = Tensor::new(&[1, c, h, w], x).unwrap();
        let y = group_norm(&x, 1, &[1.0, 1.0], &[0.0, 0.0], 1e-6, false).unwrap();
        let v: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
        for (got, a) in y.data.iter().zip(&v) {
            let want = (a - mean) / (var + 1e-6).sqrt();
            assert!((*got as f64 - want).abs() < 1e-3, "{got} vs {want}");
        }
    }

    #[test]
    fn conv2d_tiled_matches_untiled() {
        // Large enough that the column buffer is split into several row tiles.
        let (c, o, h, w) = (64, 4, 160, 130);
        let x = Tensor::new(&[1, c, h, w], rand(c * h * w, 3)).unwrap();
        let wt = Tensor::new(&[o, c, 3, 3], rand(o * c * 9, 4)).unwrap();
        assert!(c * 9 * h * w > 4 * TILE_BUDGET, "test must tile");
        let bias = rand(o, 5);
        let conv = Conv2d::new(
            wt.clone(),
            Some(Tensor::new(&[o], bias.clone()).unwrap()),
            1,
            Padding::same(1),
        )
        .unwrap();
        let got = conv.forward(&x).unwrap();
        let want = naive(&x, &wt, &bias, 1, Padding::same(1));
        assert!(got.max_rel_err(&want) < 1e-5);
    }

    #[test]
    fn group_norm_matches_formula() {
        let (b, c, h, w, g) = (2, 6, 3, 4, 3);
        let x = Tensor::new(&[b, c, h, w], rand(b * c * h * w, 11)).unwrap();
        let gamma = rand(c, 12);
        let beta = rand(c, 13);
        for silu in [false, true] {
            let y = group_norm(&x, g, &gamma, &beta, 1e-6, silu).unwrap();
            let cpg = c / g;
            for bi in 0..b {
                for gi in 0..g {
                    let vals: Vec<f64> = (0..cpg * h * w)
                        .map(|j| x.data[(bi * c + gi * cpg) * h * w + j] as f64)
                        .collect();
                    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                    let var =
                        vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                    for (j, v) in vals.iter().enumerate() {
                        let ch = gi * cpg + j / (h * w);
                        let mut r =
                            (v - mean) / (var + 1e-6).sqrt() * gamma[ch] as f64 + beta[ch] as f64;
                        if silu {
                            r /= 1.0 + (-r).exp();
                        }
                        let got = y.data[(bi * c + gi * cpg) * h * w + j] as f64;
                        assert!(
                            (got - r).abs() < 1e-5,
                            "silu={silu} {bi} {gi} {j}: {got} vs {r}"
                        );
                    }
                }
            }
        }
        assert!(group_norm(&x, 4, &gamma, &beta, 1e-6, false).is_err());
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Tensor::new(&[1, 2, 2, 3], (0..12).map(|v| v as f32).collect()).unwrap();
        let y = upsample_nearest2x(&x).unwrap();
        assert_eq!(y.shape, [1, 2, 4, 6]);
        for c in 0..2 {
            for yy in 0..4 {
                for xx in 0..6 {
                    assert_eq!(
                        y.data[(c * 4 + yy) * 6 + xx],
                        x.data[(c * 2 + yy / 2) * 3 + xx / 2]
                    );
                }
            }
        }
    }

    #[test]
    fn bicubic_identity_and_known_values() {
        let x = Tensor::new(&[2, 5, 7], rand(70, 21)).unwrap();
        let y = resize_bicubic(&x, 5, 7).unwrap();
        assert!(y.max_rel_err(&x) < 1e-6, "same-size resize is the identity");
        // Constant images stay constant in both directions.
        let k = Tensor::new(&[1, 6, 9], vec![0.25; 54]).unwrap();
        for (oh, ow) in [(3, 4), (13, 20)] {
            let y = resize_bicubic(&k, oh, ow).unwrap();
            assert!(y.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        }
        // 1-D upsampling 2 → 4 of [0, 1], worked by hand: output centres 0.25, 0.75 (and
        // mirrored); tap weights cubic(0.25) = 0.8671875, cubic(1.25) = -0.0703125,
        // cubic(0.75) = 0.2265625, renormalised over the two taps inside the image.
        let x = Tensor::new(&[1, 1, 2], vec![0.0, 1.0]).unwrap();
        let y = resize_bicubic(&x, 1, 4).unwrap();
        let y0 = -0.0703125 / (0.8671875 - 0.0703125);
        let y1 = 0.2265625 / (0.8671875 + 0.2265625);
        for (i, want) in [y0, y1, 1.0 - y1, 1.0 - y0].into_iter().enumerate() {
            assert!(
                (y.data[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                y.data[i]
            );
        }
    }
}
