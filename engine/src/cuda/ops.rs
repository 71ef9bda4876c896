//! The typed launch layer: one safe method per kernel. Each checks its views' lengths and
//! the kernel's shape requirements, then launches; `unsafe` is confined to the launch itself.
//!
//! Launch shapes mirror the header comment of each `kernels/cuda/*.cu` file.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{derr, Bf16, CudaDevice, DView};
use crate::error::{Error, Result};

const BLOCK: u32 = 256;

pub(super) fn grid_for(n: usize, per_block: usize) -> Result<u32> {
    let g = n.div_ceil(per_block);
    u32::try_from(g).map_err(|_| Error::Cuda(format!("grid of {g} blocks is too large")))
}

fn cfg1(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_for(n, BLOCK as usize)?, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("{what} = {v} does not fit an int")))
}

/// `[int(a, "a")?, int(b, "b")?, …]`: a kernel's int arguments, each named in the error.
macro_rules! ints {
    ($($v:expr),+ $(,)?) => {
        [$(int($v, stringify!($v))?),+]
    };
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Cuda(msg()))
    }
}

/// Launches `$name` with config `$cfg` and the listed arguments (each a local lvalue).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $dev.func($name)?;
        let mut b = $dev.stream.launch_builder(f);
        $( b.arg(&$arg); )*
        // SAFETY: the caller checked every view against the element count the kernel
        // touches for this launch configuration (see the kernel's header comment); the
        // arguments match the kernel's C signature in number, order and type.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(|e| derr($name, e))
    }};
}

/// Which version of the fused joint attention kernel runs: the same math (bit-identical results
/// are not guaranteed, only the same reference tolerance) in different kernels. `W8` and `W4`
/// are two instantiations of the mma.sync body (same grid and shared memory, a different split
/// of the 128 query rows of a CTA among warps); `Wgmma` and `WgmmaPoly` are the warpgroup-MMA
/// version, built for sm_90a only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AttnVariant {
    /// 8 warps × 16 query rows (256 threads, ≤ 128 registers): `joint_attn_hd64_bf16(_qknorm)`.
    W8,
    /// 4 warps × 32 query rows (128 threads, ≤ 255 registers): `joint_attn_hd64_w4_bf16(_qknorm)`.
    /// Faster on the H100 (296 vs 267 TFLOP/s at SD3-medium 1024² CFG), the default.
    #[default]
    W4,
    /// 3 warpgroups × 64 query rows (384 threads, 1 CTA per SM), wgmma with operands in shared
    /// memory, K/V tiles of 128 keys in 4 cp.async stages: `joint_attn_hd64_wgmma_bf16(_qknorm)`.
    /// sm_90a (H100/H200) only: on other GPUs its kernels are not loaded and a launch is refused.
    Wgmma,
    /// `Wgmma` with a quarter of the softmax exponentials computed by a polynomial on the FMA
    /// pipes instead of the MUFU unit (which limits head_dim 64):
    /// `joint_attn_hd64_wgmma_poly_bf16(_qknorm)`. sm_90a only.
    WgmmaPoly,
}

impl AttnVariant {
    /// Every variant, for tests and benchmarks (the wgmma ones last: on GPUs without wgmma they
    /// are the ones reported unavailable).
    pub const ALL: [AttnVariant; 4] = [
        AttnVariant::W8,
        AttnVariant::W4,
        AttnVariant::Wgmma,
        AttnVariant::WgmmaPoly,
    ];

    /// Short name (`w8`, `w4`, `wgmma`, `wgmma-poly`), as `DPIR_ATTN_VARIANT` spells it.
    pub fn name(self) -> &'static str {
        match self {
            AttnVariant::W8 => "w8",
            AttnVariant::W4 => "w4",
            AttnVariant::Wgmma => "wgmma",
            AttnVariant::WgmmaPoly => "wgmma-poly",
        }
    }

    /// Parses `w8` / `w4` / `wgmma` / `wgmma-poly`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "w8" => Some(AttnVariant::W8),
            "w4" => Some(AttnVariant::W4),
            "wgmma" => Some(AttnVariant::Wgmma),
            "wgmma-poly" => Some(AttnVariant::WgmmaPoly),
            _ => None,
        }
    }

    /// The kernel's exported name.
    pub fn kernel(self, qknorm: bool) -> &'static str {
        match (self, qknorm) {
            (AttnVariant::W8, false) => "joint_attn_hd64_bf16",
            (AttnVariant::W8, true) => "joint_attn_hd64_bf16_qknorm",
            (AttnVariant::W4, false) => "joint_attn_hd64_w4_bf16",
            (AttnVariant::W4, true) => "joint_attn_hd64_w4_bf16_qknorm",
            (AttnVariant::Wgmma, false) => "joint_attn_hd64_wgmma_bf16",
            (AttnVariant::Wgmma, true) => "joint_attn_hd64_wgmma_bf16_qknorm",
            (AttnVariant::WgmmaPoly, false) => "joint_attn_hd64_wgmma_poly_bf16",
            (AttnVariant::WgmmaPoly, true) => "joint_attn_hd64_wgmma_poly_bf16_qknorm",
        }
    }

    /// Threads per CTA (`JOINT_ATTN_HD64_THREADS` / `_W4_THREADS` / `_WG_THREADS`).
    pub fn threads(self) -> u32 {
        match self {
            AttnVariant::W8 => 256,
            AttnVariant::W4 => 128,
            AttnVariant::Wgmma | AttnVariant::WgmmaPoly => 384,
        }
    }

    /// Query rows per CTA (`JOINT_ATTN_HD64_BLOCK_M` / `JOINT_ATTN_HD64_WG_BLOCK_M`).
    pub fn block_m(self) -> usize {
        match self {
            AttnVariant::W8 | AttnVariant::W4 => 128,
            AttnVariant::Wgmma | AttnVariant::WgmmaPoly => 192,
        }
    }

    /// Whether the kernels exist for sm_90a only (wgmma): absent from the sm_80 image.
    pub fn needs_sm90a(self) -> bool {
        matches!(self, AttnVariant::Wgmma | AttnVariant::WgmmaPoly)
    }

    /// Dynamic shared memory, head_dim 64, bf16. `W8`/`W4` (`JOINT_ATTN_HD64_SMEM_BYTES`): the
    /// Q tile plus double-buffered K and V tiles of 64 keys. `Wgmma`/`WgmmaPoly`
    /// (`JOINT_ATTN_HD64_WG_SMEM_BYTES`): the Q tile plus 4 stages of K and V tiles of 128 keys
    /// and 1 KiB of alignment slack; above the default 48 KiB, so the launch opts in.
    pub fn smem_bytes(self) -> u32 {
        const HD: usize = 64;
        let bytes = match self {
            AttnVariant::W8 | AttnVariant::W4 => (self.block_m() + 4 * 64) * HD * 2,
            AttnVariant::Wgmma | AttnVariant::WgmmaPoly => {
                (self.block_m() + 2 * 4 * 128) * HD * 2 + 1024
            }
        };
        bytes as u32
    }
}

impl CudaDevice {
    /// `out = LayerNorm(x) · (1 + scale) + shift` per row; shift/scale are columns
    /// `[shift_off, +d)` / `[scale_off, +d)` of `modv` row `row / tokens`.
    #[allow(clippy::too_many_arguments)]
    pub fn adaln_modulate(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        modv: DView<Bf16>,
        rows: usize,
        tokens: usize,
        d: usize,
        mod_stride: usize,
        shift_off: usize,
        scale_off: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        check(
            d % 8 == 0
                && mod_stride % 8 == 0
                && shift_off % 8 == 0
                && scale_off % 8 == 0
                && tokens > 0,
            || {
                format!("adaln_modulate: d {d}, mod stride {mod_stride}, offsets {shift_off}/{scale_off} must be multiples of 8")
            },
        )?;
        x.need(rows * d, "adaln x")?;
        out.need(rows * d, "adaln out")?;
        let samples = rows.div_ceil(tokens);
        modv.need(
            (samples - 1) * mod_stride + shift_off.max(scale_off) + d,
            "adaln mod",
        )?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(rows, 8)?, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [r, t, dd, ms, so, sc] = ints!(rows, tokens, d, mod_stride, shift_off, scale_off);
        launch!(
            self,
            "adaln_modulate_bf16",
            cfg,
            x.ptr,
            out.ptr,
            modv.ptr,
            r,
            t,
            dd,
            ms,
            so,
            sc,
            eps
        )
    }

    /// `x += gate · y` per row; gate is columns `[gate_off, +d)` of `modv` row `row / tokens`.
    #[allow(clippy::too_many_arguments)]
    pub fn gated_residual(
        &self,
        x: DView<Bf16>,
        y: DView<Bf16>,
        modv: DView<Bf16>,
        rows: usize,
        tokens: usize,
        d: usize,
        mod_stride: usize,
        gate_off: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        check(
            d % 8 == 0 && mod_stride % 8 == 0 && gate_off % 8 == 0 && tokens > 0,
            || {
                format!("gated_residual: d {d}, mod stride {mod_stride}, offset {gate_off} must be multiples of 8")
            },
        )?;
        x.need(rows * d, "gated x")?;
        y.need(rows * d, "gated y")?;
        let samples = rows.div_ceil(tokens);
        modv.need((samples - 1) * mod_stride + gate_off + d, "gated mod")?;
        let [r, t, dd, ms, go] = ints!(rows, tokens, d, mod_stride, gate_off);
        launch!(
            self,
            "gated_residual_bf16",
            cfg1(rows * d / 8)?,
            x.ptr,
            y.ptr,
            modv.ptr,
            r,
            t,
            dd,
            ms,
            go
        )
    }

    /// Per-head RMSNorm of q and k inside a fused qkv buffer `[rows, 3·heads·hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_qk(
        &self,
        qkv: DView<Bf16>,
        wq: DView<f32>,
        wk: DView<f32>,
        rows: usize,
        heads: usize,
        hd: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        check(hd % 32 == 0 && hd <= 256, || {
            format!("rmsnorm_qk: head dim {hd} must be a multiple of 32, at most 256")
        })?;
        qkv.need(rows * 3 * heads * hd, "rmsnorm qkv")?;
        wq.need(hd, "rmsnorm wq")?;
        wk.need(hd, "rmsnorm wk")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(rows * heads * 2, 8)?, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [r, h, d] = ints!(rows, heads, hd);
        launch!(
            self,
            "rmsnorm_qk_bf16",
            cfg,
            qkv.ptr,
            wq.ptr,
            wk.ptr,
            r,
            h,
            d,
            eps
        )
    }

    /// Per (sample, channel) token mean and biased std of `x [b, n, d]`.
    pub fn channel_stats(
        &self,
        x: DView<Bf16>,
        mean: DView<f32>,
        std: DView<f32>,
        b: usize,
        n: usize,
        d: usize,
    ) -> Result<()> {
        if b * n * d == 0 {
            return Ok(());
        }
        x.need(b * n * d, "stats x")?;
        mean.need(b * d, "stats mean")?;
        std.need(b * d, "stats std")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(d, 32)?, int(b, "batch")? as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let [bb, nn, dd] = ints!(b, n, d);
        launch!(
            self,
            "channel_stats_bf16",
            cfg,
            x.ptr,
            mean.ptr,
            std.ptr,
            bb,
            nn,
            dd
        )
    }

    /// LQ alignment add: `x += gate ⊙ ((f − μf)/(σf + ε)·σx + μx)` with precomputed stats.
    #[allow(clippy::too_many_arguments)]
    pub fn align_add(
        &self,
        x: DView<Bf16>,
        f: DView<Bf16>,
        stats: [DView<f32>; 4],
        gate: DView<f32>,
        b: usize,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        if b * n * d == 0 {
            return Ok(());
        }
        x.need(b * n * d, "align x")?;
        f.need(b * n * d, "align f")?;
        for s in &stats {
            s.need(b * d, "align stats")?;
        }
        gate.need(d, "align gate")?;
        let [mx, sx, mf, sf] = stats;
        let [bb, nn, dd] = ints!(b, n, d);
        launch!(
            self,
            "align_add_bf16",
            cfg1(b * n * d)?,
            x.ptr,
            f.ptr,
            mx.ptr,
            sx.ptr,
            mf.ptr,
            sf.ptr,
            gate.ptr,
            bb,
            nn,
            dd,
            eps
        )
    }

    /// The whole adaptive feature alignment: stats of x and f, then the gated add.
    #[allow(clippy::too_many_arguments)]
    pub fn align_and_add(
        &self,
        x: DView<Bf16>,
        f: DView<Bf16>,
        gate: DView<f32>,
        scratch: [DView<f32>; 4],
        b: usize,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        let [mx, sx, mf, sf] = scratch;
        self.channel_stats(x, mx, sx, b, n, d)?;
        self.channel_stats(f, mf, sf, b, n, d)?;
        self.align_add(x, f, scratch, gate, b, n, d, eps)
    }

    /// LayerNorm with f32 affine parameters (CLIP).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_affine(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        gamma: DView<f32>,
        beta: DView<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        check(d % 8 == 0, || {
            format!("layernorm_affine: d {d} must be a multiple of 8")
        })?;
        x.need(rows * d, "ln x")?;
        out.need(rows * d, "ln out")?;
        gamma.need(d, "ln gamma")?;
        beta.need(d, "ln beta")?;
        let cfg = LaunchConfig {
            grid_dim: (grid_for(rows, 8)?, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [r, dd] = ints!(rows, d);
        launch!(
            self,
            "layernorm_affine_bf16",
            cfg,
            x.ptr,
            out.ptr,
            gamma.ptr,
            beta.ptr,
            r,
            dd,
            eps
        )
    }

    /// In-place tanh-GELU of the first `n` elements.
    pub fn gelu_tanh(&self, x: DView<Bf16>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need(n, "gelu x")?;
        let nn = n as u64;
        launch!(self, "gelu_tanh_bf16", cfg1(n)?, x.ptr, nn)
    }

    /// `y = SiLU(x)` (y may be x).
    pub fn silu(&self, x: DView<Bf16>, y: DView<Bf16>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need(n, "silu x")?;
        y.need(n, "silu y")?;
        let nn = n as u64;
        launch!(self, "silu_bf16", cfg1(n)?, x.ptr, y.ptr, nn)
    }

    /// In-place quick-GELU (CLIP).
    pub fn quick_gelu(&self, x: DView<Bf16>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need(n, "quick_gelu x")?;
        let nn = n as u64;
        launch!(self, "quick_gelu_bf16", cfg1(n)?, x.ptr, nn)
    }

    /// `out = a + b`.
    pub fn add(&self, a: DView<Bf16>, b: DView<Bf16>, out: DView<Bf16>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        a.need(n, "add a")?;
        b.need(n, "add b")?;
        out.need(n, "add out")?;
        let nn = n as u64;
        launch!(self, "add_bf16", cfg1(n)?, a.ptr, b.ptr, out.ptr, nn)
    }

    pub fn f32_to_bf16(&self, x: DView<f32>, y: DView<Bf16>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need(n, "cast x")?;
        y.need(n, "cast y")?;
        let nn = n as u64;
        launch!(self, "f32_to_bf16", cfg1(n)?, x.ptr, y.ptr, nn)
    }

    pub fn bf16_to_f32(&self, x: DView<Bf16>, y: DView<f32>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need(n, "cast x")?;
        y.need(n, "cast y")?;
        let nn = n as u64;
        launch!(self, "bf16_to_f32", cfg1(n)?, x.ptr, y.ptr, nn)
    }

    /// SD3 sinusoidal timestep embedding of `t [b]` into `out [b, dim]` (cos half first).
    pub fn timestep_embedding(
        &self,
        t: DView<f32>,
        out: DView<Bf16>,
        b: usize,
        dim: usize,
    ) -> Result<()> {
        if b * dim == 0 {
            return Ok(());
        }
        t.need(b, "timestep t")?;
        out.need(b * dim, "timestep out")?;
        let (bb, dd, period) = (int(b, "b")?, int(dim, "dim")?, 10000f32);
        launch!(
            self,
            "timestep_embedding_bf16",
            cfg1(b * dim)?,
            t.ptr,
            out.ptr,
            bb,
            dd,
            period
        )
    }

    /// In-place `softmax(scale · s)` over rows of `cols`.
    pub fn softmax_rows(&self, s: DView<Bf16>, rows: usize, cols: usize, scale: f32) -> Result<()> {
        if rows * cols == 0 {
            return Ok(());
        }
        s.need(rows * cols, "softmax s")?;
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [r, c] = ints!(rows, cols);
        launch!(self, "softmax_rows_bf16", cfg, s.ptr, r, c, scale)
    }

    /// `p = softmax(scale · s)` per row: f32 scores `s [rows, cols]` → bf16 probabilities
    /// `p [rows, cols]` (a separate buffer).
    pub fn softmax_rows_f32(
        &self,
        s: DView<f32>,
        p: DView<Bf16>,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<()> {
        if rows * cols == 0 {
            return Ok(());
        }
        s.need(rows * cols, "softmax s")?;
        p.need(rows * cols, "softmax p")?;
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [r, c] = ints!(rows, cols);
        launch!(
            self,
            "softmax_rows_f32_bf16",
            cfg,
            s.ptr,
            p.ptr,
            r,
            c,
            scale
        )
    }

    /// Latent `[b, c, h, w]` f32 → patch rows `[b·(h/p)·(w/p), c·p·p]` bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn patchify(
        &self,
        x: DView<f32>,
        out: DView<Bf16>,
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        p: usize,
    ) -> Result<()> {
        check(p > 0 && h % p == 0 && w % p == 0, || {
            format!("patchify: {h}×{w} not a multiple of patch {p}")
        })?;
        let n = b * c * h * w;
        if n == 0 {
            return Ok(());
        }
        x.need(n, "patchify x")?;
        out.need(n, "patchify out")?;
        let [bb, cc, hh, ww, pp] = ints!(b, c, h, w, p);
        launch!(
            self,
            "patchify_f32_bf16",
            cfg1(n)?,
            x.ptr,
            out.ptr,
            bb,
            cc,
            hh,
            ww,
            pp
        )
    }

    /// `x [b, hp·wp, d] += pos [m·m, d]` cropped at the centre.
    #[allow(clippy::too_many_arguments)]
    pub fn pos_embed_add(
        &self,
        x: DView<Bf16>,
        pos: DView<Bf16>,
        b: usize,
        hp: usize,
        wp: usize,
        d: usize,
        m: usize,
    ) -> Result<()> {
        check(hp <= m && wp <= m, || {
            format!("pos_embed: {hp}×{wp} patches exceed {m}×{m}")
        })?;
        let n = b * hp * wp * d;
        if n == 0 {
            return Ok(());
        }
        x.need(n, "pos x")?;
        pos.need(m * m * d, "pos table")?;
        let [bb, h, w, dd, mm] = ints!(b, hp, wp, d, m);
        launch!(
            self,
            "pos_embed_add_bf16",
            cfg1(n)?,
            x.ptr,
            pos.ptr,
            bb,
            h,
            w,
            dd,
            mm
        )
    }

    /// Final-layer rows `[b·(h/p)·(w/p), p·p·c]` bf16 → `[b, c, h, w]` f32.
    #[allow(clippy::too_many_arguments)]
    pub fn unpatchify(
        &self,
        x: DView<Bf16>,
        out: DView<f32>,
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        p: usize,
    ) -> Result<()> {
        check(p > 0 && h % p == 0 && w % p == 0, || {
            format!("unpatchify: {h}×{w} not a multiple of patch {p}")
        })?;
        let n = b * c * h * w;
        if n == 0 {
            return Ok(());
        }
        x.need(n, "unpatchify x")?;
        out.need(n, "unpatchify out")?;
        let [bb, cc, hh, ww, pp] = ints!(b, c, h, w, p);
        launch!(
            self,
            "unpatchify_bf16_f32",
            cfg1(n)?,
            x.ptr,
            out.ptr,
            bb,
            cc,
            hh,
            ww,
            pp
        )
    }

    /// `z += dsigma · (vu + cfg·(vc − vu))`, v = `[cond (n) ; uncond (n)]`.
    pub fn cfg_euler(
        &self,
        z: DView<f32>,
        v: DView<f32>,
        n: usize,
        cfg: f32,
        dsigma: f32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        z.need(n, "euler z")?;
        v.need(2 * n, "euler v")?;
        let nn = n as u64;
        launch!(
            self,
            "cfg_euler_f32",
            cfg1(n)?,
            z.ptr,
            v.ptr,
            nn,
            cfg,
            dsigma
        )
    }

    /// [`CudaDevice::cfg_euler`] with `dsigma` read from device memory (`dsigma[0]`), so a
    /// captured CUDA graph serves every step.
    pub fn cfg_euler_dev(
        &self,
        z: DView<f32>,
        v: DView<f32>,
        n: usize,
        cfg: f32,
        dsigma: DView<f32>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        z.need(n, "euler z")?;
        v.need(2 * n, "euler v")?;
        dsigma.need(1, "euler dsigma")?;
        let nn = n as u64;
        launch!(
            self,
            "cfg_euler_dsig_f32",
            cfg1(n)?,
            z.ptr,
            v.ptr,
            nn,
            cfg,
            dsigma.ptr
        )
    }

    /// The device-resident schedule: `idx = min(counter, steps − 1)`;
    /// `t_cur = timesteps[idx·b .. +b]`, `dsigma_cur = dsigmas[idx]`, then `counter = idx + 1`.
    #[allow(clippy::too_many_arguments)]
    pub fn schedule_step(
        &self,
        timesteps: DView<f32>,
        dsigmas: DView<f32>,
        counter: DView<i32>,
        t_cur: DView<f32>,
        dsigma_cur: DView<f32>,
        b: usize,
        steps: usize,
    ) -> Result<()> {
        check(steps > 0 && b > 0, || {
            format!("schedule_step: batch {b}, {steps} steps")
        })?;
        timesteps.need(steps * b, "schedule timesteps")?;
        dsigmas.need(steps, "schedule dsigmas")?;
        counter.need(1, "schedule counter")?;
        t_cur.need(b, "schedule t_cur")?;
        dsigma_cur.need(1, "schedule dsigma_cur")?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [bb, st] = ints!(b, steps);
        launch!(
            self,
            "schedule_step_f32",
            cfg,
            timesteps.ptr,
            dsigmas.ptr,
            counter.ptr,
            t_cur.ptr,
            dsigma_cur.ptr,
            bb,
            st
        )
    }

    /// `out = vu + cfg·(vc − vu)`, v = `[cond (n) ; uncond (n)]`.
    pub fn cfg_combine(&self, v: DView<f32>, out: DView<f32>, n: usize, cfg: f32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        v.need(2 * n, "cfg v")?;
        out.need(n, "cfg out")?;
        let nn = n as u64;
        launch!(self, "cfg_combine_f32", cfg1(n)?, v.ptr, out.ptr, nn, cfg)
    }

    /// Fused qkv of both streams → q, k, v `[b, heads, la + lb, hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn split_heads(
        &self,
        qkv_a: DView<Bf16>,
        qkv_b: DView<Bf16>,
        q: DView<Bf16>,
        k: DView<Bf16>,
        v: DView<Bf16>,
        b: usize,
        la: usize,
        lb: usize,
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        let n = b * heads * (la + lb) * hd;
        if n == 0 {
            return Ok(());
        }
        qkv_a.need(b * la * 3 * heads * hd, "split qkv_a")?;
        qkv_b.need(b * lb * 3 * heads * hd, "split qkv_b")?;
        for t in [q, k, v] {
            t.need(n, "split out")?;
        }
        let [bb, a, bl, h, d] = ints!(b, la, lb, heads, hd);
        launch!(
            self,
            "split_heads_bf16",
            cfg1(n)?,
            qkv_a.ptr,
            qkv_b.ptr,
            q.ptr,
            k.ptr,
            v.ptr,
            bb,
            a,
            bl,
            h,
            d
        )
    }

    /// o `[b, heads, la + lb, hd]` → out_a `[b, la, heads·hd]`, out_b `[b, lb, heads·hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_heads(
        &self,
        o: DView<Bf16>,
        out_a: DView<Bf16>,
        out_b: DView<Bf16>,
        b: usize,
        la: usize,
        lb: usize,
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        let n = b * heads * (la + lb) * hd;
        if n == 0 {
            return Ok(());
        }
        o.need(n, "merge o")?;
        out_a.need(b * la * heads * hd, "merge out_a")?;
        out_b.need(b * lb * heads * hd, "merge out_b")?;
        let [bb, a, bl, h, d] = ints!(b, la, lb, heads, hd);
        launch!(
            self,
            "merge_heads_bf16",
            cfg1(n)?,
            o.ptr,
            out_a.ptr,
            out_b.ptr,
            bb,
            a,
            bl,
            h,
            d
        )
    }

    /// Fused joint flash attention (`kernels/cuda/attention.cu`), head_dim 64, with the
    /// default instantiation ([`AttnVariant::default`]); see
    /// [`CudaDevice::joint_attention_fused_with`].
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_fused(
        &self,
        qkv_a: DView<Bf16>,
        qkv_b: DView<Bf16>,
        out_a: DView<Bf16>,
        out_b: DView<Bf16>,
        b: usize,
        la: usize,
        lb: usize,
        heads: usize,
        scale: f32,
        qknorm: Option<[DView<f32>; 4]>,
    ) -> Result<()> {
        self.joint_attention_fused_with(
            AttnVariant::default(),
            qkv_a,
            qkv_b,
            out_a,
            out_b,
            b,
            la,
            lb,
            heads,
            scale,
            qknorm,
        )
    }

    /// Fused joint flash attention (`kernels/cuda/attention.cu`), head_dim 64, instantiation
    /// `variant`. `qkv_a` may be empty (la = 0). With `qknorm = Some([w_qa, w_ka, w_qb, w_kb])`
    /// the fused qk-RMSNorm variant runs. Launch: grid (ceil((la + lb) /
    /// [`AttnVariant::block_m`]), heads, b), block [`AttnVariant::threads`],
    /// [`AttnVariant::smem_bytes`] of dynamic shared memory. A variant whose kernel is not loaded
    /// on this device (the wgmma ones below sm_90a) is refused with a one-line error.
    #[allow(clippy::too_many_arguments)]
    pub fn joint_attention_fused_with(
        &self,
        variant: AttnVariant,
        qkv_a: DView<Bf16>,
        qkv_b: DView<Bf16>,
        out_a: DView<Bf16>,
        out_b: DView<Bf16>,
        b: usize,
        la: usize,
        lb: usize,
        heads: usize,
        scale: f32,
        qknorm: Option<[DView<f32>; 4]>,
    ) -> Result<()> {
        const HD: usize = 64;
        let block_m = variant.block_m();
        let l = la + lb;
        if b * l * heads == 0 {
            return Ok(());
        }
        qkv_a.need(b * la * 3 * heads * HD, "attn qkv_a")?;
        qkv_b.need(b * lb * 3 * heads * HD, "attn qkv_b")?;
        out_a.need(b * la * heads * HD, "attn out_a")?;
        out_b.need(b * lb * heads * HD, "attn out_b")?;
        let name = variant.kernel(qknorm.is_some());
        if !self.has_func(name) {
            let (major, minor) = self.cc;
            return Err(Error::Cuda(if variant.needs_sm90a() {
                format!(
                    "attention variant `{}` needs the sm_90a kernel image (H100/H200), not \
                     loaded on this sm_{major}{minor} device",
                    variant.name()
                )
            } else {
                format!("attention kernel `{name}` is not loaded on this device")
            }));
        }
        let smem = variant.smem_bytes();
        if smem > 48 * 1024 {
            // Opt in to more than the default 48 KiB of dynamic shared memory (idempotent; a
            // function attribute, not a stream operation, so also fine during graph capture).
            let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            self.func(name)?
                .set_attribute(attr, smem as i32)
                .map_err(|e| derr(name, e))?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                grid_for(l, block_m)?,
                int(heads, "heads")? as u32,
                int(b, "b")? as u32,
            ),
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: smem,
        };
        let [bb, a, bl, h] = ints!(b, la, lb, heads);
        // A zero-row stream is passed as a null pointer, as the kernel's contract allows.
        let (pa, poa) = if la == 0 {
            (0u64, 0u64)
        } else {
            (qkv_a.ptr, out_a.ptr)
        };
        match qknorm {
            None => launch!(self, name, cfg, pa, qkv_b.ptr, poa, out_b.ptr, bb, a, bl, h, scale),
            Some(w) => {
                for v in &w {
                    v.need(HD, "attn qk-norm weight")?;
                }
                let [wqa, wka, wqb, wkb] = w;
                launch!(
                    self, name, cfg, pa, qkv_b.ptr, poa, out_b.ptr, bb, a, bl, h, scale, wqa.ptr,
                    wka.ptr, wqb.ptr, wkb.ptr
                )
            }
        }
    }

    /// GroupNorm (f32 affine) + optional SiLU over NCHW `[b, c, hw]`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_silu(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        gamma: DView<f32>,
        beta: DView<f32>,
        b: usize,
        c: usize,
        hw: usize,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<()> {
        check(groups > 0 && c % groups == 0, || {
            format!("group_norm: {c} channels, {groups} groups")
        })?;
        if b * c * hw == 0 {
            return Ok(());
        }
        x.need(b * c * hw, "gn x")?;
        out.need(b * c * hw, "gn out")?;
        gamma.need(c, "gn gamma")?;
        beta.need(c, "gn beta")?;
        let cfg = LaunchConfig {
            grid_dim: (int(b * groups, "b·groups")? as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let [bb, cc, s, g] = ints!(b, c, hw, groups);
        let si = silu as i32;
        launch!(
            self,
            "group_norm_silu_bf16",
            cfg,
            x.ptr,
            out.ptr,
            gamma.ptr,
            beta.ptr,
            bb,
            cc,
            s,
            g,
            eps,
            si
        )
    }

    /// Nearest 2× upsample of `[bc, h, w]`.
    pub fn upsample_nearest2x(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        bc: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let n = bc * 4 * h * w;
        if n == 0 {
            return Ok(());
        }
        x.need(bc * h * w, "upsample x")?;
        out.need(n, "upsample out")?;
        let [a, hh, ww] = ints!(bc, h, w);
        launch!(
            self,
            "upsample_nearest2x_bf16",
            cfg1(n)?,
            x.ptr,
            out.ptr,
            a,
            hh,
            ww
        )
    }

    /// 3×3 im2col with zero padding `(top, left, bottom, right)`; returns (ho, wo).
    #[allow(clippy::too_many_arguments)]
    pub fn im2col3x3(
        &self,
        x: DView<Bf16>,
        out: DView<Bf16>,
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        stride: usize,
        pad: (usize, usize, usize, usize),
    ) -> Result<(usize, usize)> {
        check(
            stride > 0 && h + pad.0 + pad.2 >= 3 && w + pad.1 + pad.3 >= 3,
            || "im2col: input smaller than the kernel".into(),
        )?;
        let ho = (h + pad.0 + pad.2 - 3) / stride + 1;
        let wo = (w + pad.1 + pad.3 - 3) / stride + 1;
        let n = b * ho * wo * c * 9;
        if n == 0 {
            return Ok((ho, wo));
        }
        x.need(b * c * h * w, "im2col x")?;
        out.need(n, "im2col out")?;
        let [bb, cc, hh, ww, s] = ints!(b, c, h, w, stride);
        let [pt, pl, pb, pr] = ints!(pad.0, pad.1, pad.2, pad.3);
        launch!(
            self,
            "im2col3x3_bf16",
            cfg1(n)?,
            x.ptr,
            out.ptr,
            bb,
            cc,
            hh,
            ww,
            s,
            pt,
            pl,
            pb,
            pr
        )?;
        Ok((ho, wo))
    }
}
