//! Image decoding and encoding for the pipeline, and the pixel-space helpers it needs
//! (bicubic resize, reflection pad, crop).
//!
//! Pixels travel as planar f32 tensors `[C, H, W]` in [0, 1]. Grayscale inputs are
//! replicated to RGB for the model and written back as grayscale; alpha is carried
//! separately (resized on its own and re-attached); 16-bit inputs give 16-bit outputs
//! where the output format has them (PNG, TIFF).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Default `--max-pixels`: 64 Mpx (an 8192×8192 input).
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;
/// Smallest side accepted on input.
pub const MIN_SIDE: usize = 8;

/// A decoded image, orientation already applied.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// `[3, H, W]` in [0, 1] (grayscale replicated).
    pub rgb: Tensor,
    /// `[1, H, W]` in [0, 1], when the input had an alpha channel.
    pub alpha: Option<Tensor>,
    /// The input had one colour channel.
    pub gray: bool,
    /// The input had 16 bits (or more) per channel.
    pub high_depth: bool,
}

/// An image error on one line (codec messages sometimes span several).
fn img_err(path: &Path, msg: impl Into<String>) -> Error {
    let msg: String = msg.into();
    let msg = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Error::Image {
        path: path.to_path_buf(),
        msg,
    }
}

/// Output format chosen from a path's extension.
pub fn format_from_extension(path: &Path) -> Result<ImageFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => Ok(ImageFormat::Png),
        "jpg" | "jpeg" => Ok(ImageFormat::Jpeg),
        "webp" => Ok(ImageFormat::WebP),
        "tif" | "tiff" => Ok(ImageFormat::Tiff),
        "bmp" => Ok(ImageFormat::Bmp),
        "" => Err(img_err(
            path,
            "no file extension to choose the output format from",
        )),
        other => Err(img_err(
            path,
            format!("unsupported output format `.{other}` (png, jpg, webp, tif, bmp)"),
        )),
    }
}

/// Whether a path's extension names a format we read (used when walking directories).
pub fn is_supported_extension(path: &Path) -> bool {
    format_from_extension(path).is_ok()
}

/// Decode `path`: header checked against `max_pixels` before any pixel is decoded,
/// EXIF orientation applied.
pub fn decode(path: &Path, max_pixels: u64) -> Result<Image> {
    let file = File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let meta = file.metadata().map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if meta.is_dir() {
        return Err(img_err(path, "is a directory"));
    }
    if meta.len() == 0 {
        return Err(img_err(path, "empty file"));
    }
    let mut reader = ImageReader::new(BufReader::new(file));
    reader = reader
        .with_guessed_format()
        .map_err(|e| img_err(path, format!("cannot read: {e}")))?;
    let format = match reader.format() {
        Some(f) => f,
        None => {
            return Err(img_err(
                path,
                "not an image in a supported format (png, jpg, webp, tif, bmp)",
            ))
        }
    };
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Tiff
            | ImageFormat::Bmp
    ) {
        return Err(img_err(
            path,
            format!("unsupported image format {format:?} (png, jpg, webp, tif, bmp)"),
        ));
    }
    let mut limits = Limits::default();
    // Bytes for the largest pixel type we accept (RGBA, 32-bit float) at max_pixels, plus slack.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(1 << 20));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| img_err(path, format!("cannot decode: {e}")))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(img_err(
            path,
            format!("image has a zero dimension ({w}×{h})"),
        ));
    }
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(img_err(
            path,
            format!("image is {w}×{h} = {pixels} pixels, more than --max-pixels {max_pixels}"),
        ));
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| img_err(path, format!("cannot read orientation: {e}")))?;
    let mut dynimg = DynamicImage::from_decoder(decoder)
        .map_err(|e| img_err(path, format!("cannot decode: {e}")))?;
    dynimg.apply_orientation(orientation);
    let (w, h) = (dynimg.width() as usize, dynimg.height() as usize);
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(img_err(
            path,
            format!("image is {w}×{h}, smaller than the {MIN_SIDE}×{MIN_SIDE} minimum"),
        ));
    }
    Ok(from_dynamic(&dynimg))
}

/// Planar f32 from any decoded image.
pub fn from_dynamic(img: &DynamicImage) -> Image {
    let color = img.color();
    let gray = color.channel_count() <= 2;
    let has_alpha = color.has_alpha();
    let high_depth = color.bytes_per_pixel() / color.channel_count() >= 2;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let rgba = img.to_rgba32f();
    let mut rgb = vec![0f32; 3 * n];
    let mut alpha = if has_alpha { Some(vec![0f32; n]) } else { None };
    for (i, px) in rgba.pixels().enumerate() {
        for c in 0..3 {
            rgb[c * n + i] = px.0[c].clamp(0.0, 1.0);
        }
        if let Some(a) = alpha.as_mut() {
            a[i] = px.0[3].clamp(0.0, 1.0);
        }
    }
    Image {
        width: w,
        height: h,
        rgb: Tensor {
            shape: vec![3, h, w],
            data: rgb,
        },
        alpha: alpha.map(|a| Tensor {
            shape: vec![1, h, w],
            data: a,
        }),
        gray,
        high_depth,
    }
}

/// The `image` crate's view of a planar image, with the input's kind (gray, alpha, depth).
pub fn to_dynamic(img: &Image) -> DynamicImage {
    let (w, h) = (img.width, img.height);
    let n = w * h;
    let px = |c: usize, i: usize| img.rgb.data[c * n + i].clamp(0.0, 1.0);
    let lum = |i: usize| (px(0, i) + px(1, i) + px(2, i)) / 3.0;
    let a = |i: usize| {
        img.alpha
            .as_ref()
            .map_or(1.0, |t| t.data[i].clamp(0.0, 1.0))
    };
    let q8 = |v: f32| (v * 255.0).round() as u8;
    let q16 = |v: f32| (v * 65535.0).round() as u16;
    let (w32, h32) = (w as u32, h as u32);
    let has_alpha = img.alpha.is_some();
    // The buffers below are sized exactly from (w, h), so construction cannot fail; the
    // fallback keeps this total anyway.
    let built = match (img.gray, has_alpha, img.high_depth) {
        (true, false, false) => {
            image::GrayImage::from_raw(w32, h32, (0..n).map(|i| q8(lum(i))).collect())
                .map(DynamicImage::ImageLuma8)
        }
        (true, false, true) => {
            image::ImageBuffer::from_raw(w32, h32, (0..n).map(|i| q16(lum(i))).collect())
                .map(DynamicImage::ImageLuma16)
        }
        (true, true, false) => image::ImageBuffer::from_raw(
            w32,
            h32,
            (0..n).flat_map(|i| [q8(lum(i)), q8(a(i))]).collect(),
        )
        .map(DynamicImage::ImageLumaA8),
        (true, true, true) => image::ImageBuffer::from_raw(
            w32,
            h32,
            (0..n).flat_map(|i| [q16(lum(i)), q16(a(i))]).collect(),
        )
        .map(DynamicImage::ImageLumaA16),
        (false, false, false) => image::RgbImage::from_raw(
            w32,
            h32,
            (0..n)
                .flat_map(|i| [q8(px(0, i)), q8(px(1, i)), q8(px(2, i))])
                .collect(),
        )
        .map(DynamicImage::ImageRgb8),
        (false, false, true) => image::ImageBuffer::from_raw(
            w32,
            h32,
            (0..n)
                .flat_map(|i| [q16(px(0, i)), q16(px(1, i)), q16(px(2, i))])
                .collect(),
        )
        .map(DynamicImage::ImageRgb16),
        (false, true, false) => image::RgbaImage::from_raw(
            w32,
            h32,
            (0..n)
                .flat_map(|i| [q8(px(0, i)), q8(px(1, i)), q8(px(2, i)), q8(a(i))])
                .collect(),
        )
        .map(DynamicImage::ImageRgba8),
        (false, true, true) => image::ImageBuffer::from_raw(
            w32,
            h32,
            (0..n)
                .flat_map(|i| [q16(px(0, i)), q16(px(1, i)), q16(px(2, i)), q16(a(i))])
                .collect(),
        )
        .map(DynamicImage::ImageRgba16),
    };
    built.unwrap_or_else(|| DynamicImage::new_rgb8(w32, h32))
}

/// Encode `img` to `path` in `format`, converting to what the format can hold
/// (JPEG: 8-bit, no alpha; WebP and BMP: 8-bit; PNG and TIFF keep 16 bits).
pub fn encode(path: &Path, img: &Image, format: ImageFormat) -> Result<()> {
    let dynimg = to_dynamic(img);
    let dynimg = match format {
        ImageFormat::Jpeg => {
            if img.gray {
                DynamicImage::ImageLuma8(dynimg.to_luma8())
            } else {
                DynamicImage::ImageRgb8(dynimg.to_rgb8())
            }
        }
        ImageFormat::WebP | ImageFormat::Bmp => {
            if img.alpha.is_some() {
                DynamicImage::ImageRgba8(dynimg.to_rgba8())
            } else {
                DynamicImage::ImageRgb8(dynimg.to_rgb8())
            }
        }
        _ => dynimg,
    };
    let io_err = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = File::create(path).map_err(io_err)?;
    let mut out = BufWriter::new(file);
    let enc_err = |e: image::ImageError| img_err(path, format!("cannot encode: {e}"));
    match format {
        ImageFormat::Jpeg => dynimg
            .write_with_encoder(JpegEncoder::new_with_quality(&mut out, 95))
            .map_err(enc_err)?,
        ImageFormat::WebP => dynimg
            .write_with_encoder(WebPEncoder::new_lossless(&mut out))
            .map_err(enc_err)?,
        other => dynimg.write_to(&mut out, other).map_err(enc_err)?,
    }
    out.flush().map_err(io_err)?;
    out.get_ref().sync_all().map_err(io_err)?;
    Ok(())
}

/// A temporary sibling of `path` that keeps its extension (`.name.dpir-tmp-PID.png`).
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.dpir-tmp-{}.{ext}", std::process::id()))
}

/// Resampling taps for one axis: for each output index, (first input index, weights).
fn bicubic_taps(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    // Keys' cubic with a = -0.5 (PIL's bicubic), support widened when shrinking so
    // downscaling is antialiased.
    fn cubic(x: f32) -> f32 {
        const A: f32 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    let scale = n_in as f32 / n_out as f32;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..n_out)
        .map(|o| {
            let center = (o as f32 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(n_in);
            let mut ws: Vec<f32> = (lo..hi)
                .map(|i| cubic((i as f32 + 0.5 - center) / filter_scale))
                .collect();
            let sum: f32 = ws.iter().sum();
            if sum.abs() > 1e-12 {
                for w in ws.iter_mut() {
                    *w /= sum;
                }
            }
            (lo, ws)
        })
        .collect()
}

/// Bicubic resize of a planar `[C, H, W]` tensor to `[C, out_h, out_w]`.
pub fn resize_bicubic(t: &Tensor, out_h: usize, out_w: usize) -> Tensor {
    let (c, h, w) = (t.shape[0], t.shape[1], t.shape[2]);
    if h == out_h && w == out_w {
        return t.clone();
    }
    let tx = bicubic_taps(w, out_w);
    let ty = bicubic_taps(h, out_h);
    // Horizontal pass: [C, H, out_w].
    let mut tmp = vec![0f32; c * h * out_w];
    for (src, dst) in t.data.chunks_exact(w).zip(tmp.chunks_exact_mut(out_w)) {
        for (o, (lo, ws)) in tx.iter().enumerate() {
            dst[o] = ws.iter().zip(&src[*lo..]).map(|(a, b)| a * b).sum();
        }
    }
    // Vertical pass.
    let mut out = vec![0f32; c * out_h * out_w];
    for ch in 0..c {
        let plane = &tmp[ch * h * out_w..][..h * out_w];
        let oplane = &mut out[ch * out_h * out_w..][..out_h * out_w];
        for (o, (lo, ws)) in ty.iter().enumerate() {
            let orow = &mut oplane[o * out_w..][..out_w];
            for (k, wv) in ws.iter().enumerate() {
                let srow = &plane[(lo + k) * out_w..][..out_w];
                for (d, s) in orow.iter_mut().zip(srow) {
                    *d += wv * s;
                }
            }
        }
    }
    Tensor {
        shape: vec![c, out_h, out_w],
        data: out,
    }
}

/// Reflect index `i` (may be out of range) into `0..n` without repeating the edge
/// (PyTorch `reflect`), folding as often as needed.
fn reflect_index(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let mut m = i.rem_euclid(period);
    if m >= n as isize {
        m = period - m;
    }
    m as usize
}

/// Reflection-pad a `[C, H, W]` tensor on the bottom and right to `[C, out_h, out_w]`.
pub fn reflect_pad(t: &Tensor, out_h: usize, out_w: usize) -> Tensor {
    let (c, h, w) = (t.shape[0], t.shape[1], t.shape[2]);
    let mut out = vec![0f32; c * out_h * out_w];
    for ch in 0..c {
        for y in 0..out_h {
            let sy = reflect_index(y as isize, h);
            let srow = &t.data[(ch * h + sy) * w..][..w];
            let drow = &mut out[(ch * out_h + y) * out_w..][..out_w];
            for (x, d) in drow.iter_mut().enumerate() {
                *d = srow[reflect_index(x as isize, w)];
            }
        }
    }
    Tensor {
        shape: vec![c, out_h, out_w],
        data: out,
    }
}

/// The `[C, h, w]` window of a `[C, H, W]` tensor starting at `(y0, x0)`.
pub fn crop(t: &Tensor, y0: usize, x0: usize, h: usize, w: usize) -> Tensor {
    let (c, th, tw) = (t.shape[0], t.shape[1], t.shape[2]);
    debug_assert!(y0 + h <= th && x0 + w <= tw);
    let mut out = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in y0..y0 + h {
            out.extend_from_slice(&t.data[(ch * th + y) * tw + x0..][..w]);
        }
    }
    Tensor {
        shape: vec![c, h, w],
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_matches_pytorch_convention() {
        // n = 4: ... 2 1 | 0 1 2 3 | 2 1 0 1 ...
        let got: Vec<usize> = (-2..8).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(got, vec![2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
    }

    #[test]
    fn bicubic_preserves_constants_and_linear_ramps() {
        let w = 7;
        let t = Tensor {
            shape: vec![1, 1, w],
            data: (0..w).map(|i| i as f32).collect(),
        };
        let up = resize_bicubic(&t, 1, 4 * w);
        // Interior samples of a linear ramp stay on the ramp: x_in = (o + 0.5)/4 - 0.5.
        for o in 8..4 * w - 8 {
            let expect = (o as f32 + 0.5) / 4.0 - 0.5;
            assert!(
                (up.data[o] - expect).abs() < 1e-4,
                "{o}: {} vs {expect}",
                up.data[o]
            );
        }
        let c = Tensor {
            shape: vec![2, 5, 6],
            data: vec![0.25; 60],
        };
        let r = resize_bicubic(&c, 13, 3);
        assert!(r.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn exif_orientation_is_applied() {
        use image::ImageEncoder;
        // 8 wide, 12 tall, every pixel distinct; EXIF orientation 6 (rotate 90° clockwise).
        let (w, h) = (8u32, 12u32);
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 20, y as u8 * 20, 7]));
        let exif = vec![
            0x49, 0x49, 0x2A, 0x00, 0x08, 0, 0, 0, // TIFF header, IFD at 8
            0x01, 0x00, // one entry
            0x12, 0x01, 0x03, 0x00, 0x01, 0, 0, 0, 0x06, 0x00, 0x00, 0x00, // Orientation = 6
            0, 0, 0, 0, // no next IFD
        ];
        let path = std::env::temp_dir().join(format!("dpir-exif-{}.png", std::process::id()));
        {
            let file = File::create(&path).unwrap();
            let mut enc = image::codecs::png::PngEncoder::new(BufWriter::new(file));
            enc.set_exif_metadata(exif).unwrap();
            enc.write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .unwrap();
        }
        let got = decode(&path, DEFAULT_MAX_PIXELS);
        let _ = std::fs::remove_file(&path);
        let got = got.unwrap();
        assert_eq!((got.width, got.height), (12, 8));
        // Clockwise: new(x', y') = old(y', h − 1 − x').
        let n = 12 * 8;
        for y2 in 0..8usize {
            for x2 in 0..12usize {
                let (ox, oy) = (y2 as f32, (h as usize - 1 - x2) as f32);
                let r = got.rgb.data[y2 * 12 + x2] * 255.0;
                let g = got.rgb.data[n + y2 * 12 + x2] * 255.0;
                assert!(
                    (r - ox * 20.0).abs() < 0.5 && (g - oy * 20.0).abs() < 0.5,
                    "({x2}, {y2})"
                );
            }
        }
    }
}
