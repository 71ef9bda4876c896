//! Multi-head softmax attention for the CPU backend.
//!
//! Layout: `q [B, Lq, H·Dh]`, `k, v [B, Lk, H·Dh]`, `out [B, Lq, H·Dh]`: the natural
//! output of a fused qkv Linear, heads interleaved along the feature axis (rows may be
//! strided, e.g. read straight out of a `[B, L, 3·H·Dh]` qkv buffer).
//!
//! Each (batch, head) gets K and V gathered once into contiguous `[Lk, Dh]` panels; then
//! one task per (batch, head, block of [`q_block`] query rows) computes the score tile
//! `S = Q·Kᵀ` with a GEMM, exponentiates it in place, multiplies `S·V` with a second GEMM
//! and divides by the row sums. Only one `[q_block, Lk]` score tile per thread exists.

use rayon::prelude::*;

use super::matmul::{matmul_bt_serial, matmul_serial};
use super::ops::exp_sub_rows;

/// Fewest and most query rows per task (and per score tile).
const Q_BLOCK_MIN: usize = 64;
const Q_BLOCK_MAX: usize = 256;

/// Query rows per task: as many as leave four tasks per thread, within
/// `Q_BLOCK_MIN ..= Q_BLOCK_MAX`. Each task packs the whole K and V panels for its GEMMs, so
/// few long query blocks (a single-head attention over thousands of tokens, as in the VAE's
/// mid block) spend less of their time packing.
fn q_block(batch: usize, heads: usize, lq: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    (batch * heads * lq)
        .div_ceil(tasks)
        .clamp(Q_BLOCK_MIN, Q_BLOCK_MAX)
}

/// A row-major matrix view whose rows are `stride` apart (first row at `data[0]`).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

/// Non-causal softmax(q kᵀ · scale) v, all heads.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    head_dim: usize,
    scale: f32,
) {
    let d = heads * head_dim;
    assert!(q.len() >= batch * lq * d && k.len() >= batch * lk * d && v.len() >= batch * lk * d);
    attention_strided(
        Rows { data: q, stride: d },
        Rows { data: k, stride: d },
        Rows { data: v, stride: d },
        out,
        batch,
        heads,
        lq,
        lk,
        head_dim,
        scale,
    );
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its own query rows × its own
// head's columns), and the pointer outlives the parallel section that uses it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// As [`attention`], with strided q/k/v rows: row `t` of batch `b` starts at
/// `x.data[(b·L + t)·x.stride]` and holds the heads' `H·Dh` features contiguously.
/// `out` is contiguous `[B, Lq, H·Dh]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_strided(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    out: &mut [f32],
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    head_dim: usize,
    scale: f32,
) {
    let d = heads * head_dim;
    let need =
        |r: &Rows<'_>, l: usize| batch * l == 0 || r.data.len() >= (batch * l - 1) * r.stride + d;
    assert!(
        need(&q, lq)
            && need(&k, lk)
            && need(&v, lk)
            && q.stride >= d
            && k.stride >= d
            && v.stride >= d
    );
    assert!(out.len() >= batch * lq * d);
    if batch * lq == 0 {
        return;
    }
    if lk == 0 {
        out[..batch * lq * d].fill(0.0);
        return;
    }
    // Gather k and v per (batch, head) into contiguous [Lk, Dh] panels once.
    let panel = lk * head_dim;
    let mut kp = vec![0f32; batch * heads * panel];
    let mut vp = vec![0f32; batch * heads * panel];
    kp.par_chunks_mut(panel)
        .zip(vp.par_chunks_mut(panel))
        .enumerate()
        .for_each(|(bh, (kd, vd))| {
            let (b, h) = (bh / heads, bh % heads);
            for t in 0..lk {
                let ks = (b * lk + t) * k.stride + h * head_dim;
                let vs = (b * lk + t) * v.stride + h * head_dim;
                kd[t * head_dim..][..head_dim].copy_from_slice(&k.data[ks..ks + head_dim]);
                vd[t * head_dim..][..head_dim].copy_from_slice(&v.data[vs..vs + head_dim]);
            }
        });
    let qb_rows = q_block(batch, heads, lq);
    let q_blocks = lq.div_ceil(qb_rows);
    let n_tasks = batch * heads * q_blocks;
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n_tasks).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; qb_rows * head_dim],
                vec![0f32; qb_rows * lk],
                vec![0f32; qb_rows * head_dim],
                vec![0f32; qb_rows],
            )
        },
        |(qt, s, o, sums), task| {
            let qb = task % q_blocks;
            let bh = task / q_blocks;
            let (b, h) = (bh / heads, bh % heads);
            let q0 = qb * qb_rows;
            let rows = qb_rows.min(lq - q0);
            for r in 0..rows {
                let src = (b * lq + q0 + r) * q.stride + h * head_dim;
                for (dst, &x) in qt[r * head_dim..][..head_dim]
                    .iter_mut()
                    .zip(&q.data[src..src + head_dim])
                {
                    *dst = x * scale;
                }
            }
            let kh = &kp[bh * panel..][..panel];
            let vh = &vp[bh * panel..][..panel];
            matmul_bt_serial(qt, kh, s, rows, head_dim, lk);
            exp_sub_rows(&mut s[..rows * lk], lk, &mut sums[..rows]);
            matmul_serial(s, vh, o, rows, lk, head_dim);
            for r in 0..rows {
                let inv = 1.0 / sums[r];
                let dst = (b * lq + q0 + r) * d + h * head_dim;
                for (c, &x) in o[r * head_dim..][..head_dim].iter().enumerate() {
                    // SAFETY: `dst + c < batch·lq·d <= out.len()` (asserted above), and no
                    // other task writes row (b, q0 + r) within head h's columns.
                    unsafe { *out_ptr.get().add(dst + c) = x * inv };
                }
            }
        },
    );
}

/// The plain definition, one query row at a time, for checking the tiled version.
#[allow(clippy::too_many_arguments)]
pub fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    head_dim: usize,
    scale: f32,
) {
    let d = heads * head_dim;
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..lq {
                let qr = &q[(b * lq + i) * d + h * head_dim..][..head_dim];
                let s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let kr = &k[(b * lk + j) * d + h * head_dim..][..head_dim];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, c)| (*a as f64) * (*c as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..head_dim {
                    let acc: f64 = (0..lk)
                        .map(|j| e[j] * v[(b * lk + j) * d + h * head_dim + c] as f64)
                        .sum();
                    out[(b * lq + i) * d + h * head_dim + c] = (acc / sum) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_matches_reference() {
        for &(batch, heads, lq, lk, hd) in &[(1, 2, 5, 7, 4), (2, 3, 130, 70, 16), (1, 1, 64, 1, 8)]
        {
            let d = heads * hd;
            let gen =
                |n: usize, s: f32| (0..n).map(|i| ((i as f32) * s).sin()).collect::<Vec<f32>>();
            let q = gen(batch * lq * d, 0.37);
            let k = gen(batch * lk * d, 0.71);
            let v = gen(batch * lk * d, 0.13);
            let mut o = vec![0f32; batch * lq * d];
            let mut r = vec![0f32; batch * lq * d];
            let sc = 1.0 / (hd as f32).sqrt();
            attention(&q, &k, &v, &mut o, batch, heads, lq, lk, hd, sc);
            attention_reference(&q, &k, &v, &mut r, batch, heads, lq, lk, hd, sc);
            for (a, b) in o.iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
