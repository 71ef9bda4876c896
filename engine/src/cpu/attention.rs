//! Multi-head softmax attention for the CPU backend.
//!
//! Layout: `q [B, Lq, H·Dh]`, `k, v [B, Lk, H·Dh]`, `out [B, Lq, H·Dh]`: the natural
//! output of a fused qkv Linear, heads interleaved along the feature axis. Scores are
//! computed one query row block at a time, so at most one tile of the score matrix exists.

use rayon::prelude::*;

/// Rows of queries handled per task (and per score tile).
const Q_BLOCK: usize = 32;

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
    assert!(out.len() >= batch * lq * d);
    // Gather k and v per (batch, head) into contiguous [Lk, Dh] panels once.
    let mut kp = vec![0f32; batch * heads * lk * head_dim];
    let mut vp = vec![0f32; batch * heads * lk * head_dim];
    for b in 0..batch {
        for t in 0..lk {
            for h in 0..heads {
                let src = (b * lk + t) * d + h * head_dim;
                let dst = ((b * heads + h) * lk + t) * head_dim;
                kp[dst..dst + head_dim].copy_from_slice(&k[src..src + head_dim]);
                vp[dst..dst + head_dim].copy_from_slice(&v[src..src + head_dim]);
            }
        }
    }
    let q_blocks = lq.div_ceil(Q_BLOCK);
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..heads).flat_map(move |h| (0..q_blocks).map(move |qb| (b, h, qb))))
        .collect();
    let results: Vec<(usize, usize, usize, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(b, h, qb)| {
            let q0 = qb * Q_BLOCK;
            let rows = Q_BLOCK.min(lq - q0);
            let kh = &kp[(b * heads + h) * lk * head_dim..][..lk * head_dim];
            let vh = &vp[(b * heads + h) * lk * head_dim..][..lk * head_dim];
            let mut o = vec![0f32; rows * head_dim];
            let mut s = vec![0f32; lk];
            for r in 0..rows {
                let qrow = &q[(b * lq + q0 + r) * d + h * head_dim..][..head_dim];
                let mut mx = f32::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate() {
                    let krow = &kh[j * head_dim..][..head_dim];
                    let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    *sj = dot * scale;
                    mx = mx.max(*sj);
                }
                let mut sum = 0f32;
                for sj in s.iter_mut() {
                    *sj = (*sj - mx).exp();
                    sum += *sj;
                }
                let inv = 1.0 / sum;
                let orow = &mut o[r * head_dim..][..head_dim];
                for (j, sj) in s.iter().enumerate() {
                    let p = sj * inv;
                    for (ov, vv) in orow.iter_mut().zip(&vh[j * head_dim..][..head_dim]) {
                        *ov += p * vv;
                    }
                }
            }
            (b, h, q0, o)
        })
        .collect();
    for (b, h, q0, o) in results {
        for (r, orow) in o.chunks_exact(head_dim).enumerate() {
            let dst = (b * lq + q0 + r) * d + h * head_dim;
            out[dst..dst + head_dim].copy_from_slice(orow);
        }
    }
}
