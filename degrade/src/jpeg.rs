//! JPEG compression round trip through the `image` crate's baseline encoder and decoder.

use crate::error::{Error, Result};
use crate::planar::Planar;
use image::codecs::jpeg::{JpegDecoder, JpegEncoder};
use image::{DynamicImage, ImageDecoder};
use std::io::Cursor;

/// Encode at `quality` (1–100, libjpeg table scaling) and decode again. Values are clamped to
/// [0, 1] and rounded to 8 bits first, as any encoder input would be.
pub fn roundtrip(img: &Planar, quality: u8) -> Result<Planar> {
    let rgb = img.to_rgb8();
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100))
        .encode_image(&rgb)
        .map_err(Error::Jpeg)?;
    let decoder = JpegDecoder::new(Cursor::new(&bytes)).map_err(Error::Jpeg)?;
    let (w, h) = decoder.dimensions();
    let decoded = DynamicImage::from_decoder(decoder).map_err(Error::Jpeg)?;
    let decoded = decoded.to_rgb8();
    if (w as usize, h as usize) != (img.width, img.height) {
        return Err(Error::Invalid(format!(
            "JPEG round trip changed the size from {}x{} to {w}x{h}",
            img.width, img.height
        )));
    }
    Ok(Planar::from_rgb8(&decoded))
}
