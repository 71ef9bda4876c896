//! Overlapping tiles with Gaussian blending, in latent or pixel space.
//!
//! A grid covers an `h × w` plane with tiles of at most `tile × tile`, starting on
//! multiples of `align`, overlapping by at least `overlap`; the last tile in each
//! direction is flush with the edge. Outputs of the tiles are blended with Gaussian
//! weights centred on each tile and normalised per position, so a single tile that
//! covers the plane reproduces the untiled result.

use crate::tensor::Tensor;

/// One tile: origin and size in the grid's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub y0: usize,
    pub x0: usize,
    pub h: usize,
    pub w: usize,
}

impl Tile {
    /// The same tile in a space `f` times finer (latent → pixels: `f = 8`).
    pub fn scaled(&self, f: usize) -> Tile {
        Tile {
            y0: self.y0 * f,
            x0: self.x0 * f,
            h: self.h * f,
            w: self.w * f,
        }
    }
}

/// Tile origins along one axis of length `n`.
pub fn starts(n: usize, tile: usize, overlap: usize, align: usize) -> Vec<usize> {
    let align = align.max(1);
    if n <= tile {
        return vec![0];
    }
    let tile = tile / align * align;
    let stride = (tile.saturating_sub(overlap) / align * align).max(align);
    let last = (n - tile) / align * align;
    let mut v = Vec::new();
    let mut p = 0;
    while p < last {
        v.push(p);
        p += stride;
    }
    v.push(last);
    // The last origin rounds down to `align`; when n − tile is not a multiple of it the
    // final tile is extended to the edge by `grid`.
    v
}

/// Tiles covering an `h × w` plane.
pub fn grid(h: usize, w: usize, tile: usize, overlap: usize, align: usize) -> Vec<Tile> {
    let ys = starts(h, tile, overlap, align);
    let xs = starts(w, tile, overlap, align);
    let mut out = Vec::with_capacity(ys.len() * xs.len());
    for (iy, &y0) in ys.iter().enumerate() {
        let th = if iy + 1 == ys.len() {
            h - y0
        } else {
            tile.min(h)
        };
        for (ix, &x0) in xs.iter().enumerate() {
            let tw = if ix + 1 == xs.len() {
                w - x0
            } else {
                tile.min(w)
            };
            out.push(Tile {
                y0,
                x0,
                h: th,
                w: tw,
            });
        }
    }
    out
}

/// Gaussian blending weights for a tile, `σ = size / 4` along each axis.
pub fn gaussian_weights(h: usize, w: usize) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f32> {
        let mid = (n as f32 - 1.0) / 2.0;
        let sigma = (n as f32 / 4.0).max(0.5);
        (0..n)
            .map(|i| (-((i as f32 - mid).powi(2)) / (2.0 * sigma * sigma)).exp())
            .collect()
    };
    let (wy, wx) = (axis(h), axis(w));
    wy.iter()
        .flat_map(|a| wx.iter().map(move |b| a * b))
        .collect()
}

/// Accumulates weighted tile outputs into a `[C, H, W]` plane.
pub struct Blender {
    pub acc: Tensor,
    weight: Vec<f32>,
}

impl Blender {
    pub fn new(c: usize, h: usize, w: usize) -> Self {
        Self {
            acc: Tensor::zeros(&[c, h, w]),
            weight: vec![0.0; h * w],
        }
    }

    /// Add `t` (`[C, tile.h, tile.w]`, or with a leading batch of 1) at `tile`.
    pub fn add(&mut self, tile: Tile, t: &Tensor) {
        let (c, h, w) = (self.acc.shape[0], self.acc.shape[1], self.acc.shape[2]);
        let g = gaussian_weights(tile.h, tile.w);
        for ch in 0..c {
            for y in 0..tile.h {
                let src = &t.data[(ch * tile.h + y) * tile.w..][..tile.w];
                let dst = &mut self.acc.data[(ch * h + tile.y0 + y) * w + tile.x0..][..tile.w];
                let gw = &g[y * tile.w..][..tile.w];
                for ((d, s), gv) in dst.iter_mut().zip(src).zip(gw) {
                    *d += gv * s;
                }
            }
        }
        for y in 0..tile.h {
            let dst = &mut self.weight[(tile.y0 + y) * w + tile.x0..][..tile.w];
            for (d, gv) in dst.iter_mut().zip(&g[y * tile.w..][..tile.w]) {
                *d += gv;
            }
        }
    }

    /// The blended plane.
    pub fn finish(mut self) -> Tensor {
        let plane = self.weight.len();
        for ch in self.acc.data.chunks_exact_mut(plane) {
            for (v, wv) in ch.iter_mut().zip(&self.weight) {
                if *wv > 0.0 {
                    *v /= wv;
                }
            }
        }
        self.acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_with_overlap_and_alignment() {
        for &(n, tile, ov, al) in &[
            (100, 32, 8, 2),
            (64, 64, 8, 2),
            (65, 16, 4, 1),
            (10, 32, 8, 2),
            (130, 48, 16, 2),
        ] {
            let s = starts(n, tile, ov, al);
            let mut covered = vec![0; n];
            for (i, &p) in s.iter().enumerate() {
                assert_eq!(p % al, 0);
                let len = if i + 1 == s.len() { n - p } else { tile.min(n) };
                assert!(len <= tile.max(n.min(tile)) + al, "{n} {tile}: {s:?}");
                for c in covered.iter_mut().skip(p).take(len) {
                    *c += 1;
                }
                if i > 0 {
                    assert!(s[i - 1] + tile.min(n) >= p + ov.min(tile), "overlap {s:?}");
                }
            }
            assert!(covered.iter().all(|&c| c > 0), "{n} {tile}: {s:?}");
        }
    }

    #[test]
    fn blending_a_constant_field_is_exact() {
        let tiles = grid(37, 50, 16, 6, 2);
        assert!(tiles.len() > 4);
        let mut b = Blender::new(2, 37, 50);
        for t in &tiles {
            b.add(
                *t,
                &Tensor {
                    shape: vec![2, t.h, t.w],
                    data: vec![1.5; 2 * t.h * t.w],
                },
            );
        }
        let out = b.finish();
        assert!(out.data.iter().all(|v| (v - 1.5).abs() < 1e-6));
    }
}
