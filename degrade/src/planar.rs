//! `Planar`: a 3-channel f32 image stored channel by channel, values nominally in [0, 1].

use image::RgbImage;

#[derive(Clone, Debug, PartialEq)]
pub struct Planar {
    pub width: usize,
    pub height: usize,
    /// `3 * height * width` values: the R plane, then G, then B.
    pub data: Vec<f32>,
}

impl Planar {
    pub fn zeros(width: usize, height: usize) -> Self {
        Planar {
            width,
            height,
            data: vec![0.0; 3 * width * height],
        }
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.width * self.height;
        &mut self.data[c * n..(c + 1) * n]
    }

    /// From 8-bit RGB (value / 255).
    pub fn from_rgb8(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = w * h;
        let mut out = Planar::zeros(w, h);
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                out.data[c * n + i] = f32::from(p[c]) / 255.0;
            }
        }
        out
    }

    /// To 8-bit RGB: clamp to [0, 1], scale by 255, round half away from zero.
    pub fn to_rgb8(&self) -> RgbImage {
        let n = self.width * self.height;
        let mut buf = Vec::with_capacity(3 * n);
        for i in 0..n {
            for c in 0..3 {
                buf.push(quantize(self.data[c * n + i]));
            }
        }
        // The buffer has exactly width * height * 3 bytes, so `from_raw` cannot fail.
        RgbImage::from_raw(self.width as u32, self.height as u32, buf).unwrap_or_default()
    }

    /// Clamp every value to [0, 1].
    pub fn clamp01(&mut self) {
        for v in &mut self.data {
            *v = v.clamp(0.0, 1.0);
        }
    }

    /// Round every value to the 8-bit grid (clamped), keeping the f32 representation.
    pub fn round_to_u8_grid(&mut self) {
        for v in &mut self.data {
            *v = f32::from(quantize(*v)) / 255.0;
        }
    }
}

/// [0, 1] float → 8-bit value (clamped, rounded).
pub fn quantize(v: f32) -> u8 {
    let x = (v * 255.0).round();
    if x.is_nan() {
        0
    } else {
        x.clamp(0.0, 255.0) as u8
    }
}
