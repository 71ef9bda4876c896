//! `dpir restore` through the real binary: bad inputs (each one line on stderr, non-zero
//! exit, no panic, no partial output, input untouched), and restores end to end with a
//! tiny random model written in the DPIR file layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use dpir_engine::weights::seeded_random_weights;
use dpir_loader::{
    clip_vision_spec, dpir_spec, mmdit_spec, robust_encoder_file_spec, vae_spec,
    write_f32_safetensors, ClipVisionConfig, DType, DpirConfig, MmditConfig, Spec, VaeConfig,
};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpir"));
    c.env_remove("DPIR_MODEL");
    c
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("restore")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn random(spec: Spec, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    seeded_random_weights(spec, seed)
        .into_iter()
        .map(|(name, t)| (name, t.shape, t.data))
        .collect()
}

/// A tiny DPIR model (one file, DPIR layout), written once per test process.
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = scratch("model");
        let mmdit = MmditConfig {
            depth: 2,
            hidden: 32,
            num_heads: 2,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            pos_embed_max_size: 16,
            context_dim: 24,
            pooled_dim: 8,
            frequency_embedding_size: 32,
            mlp_hidden: 64,
            qk_norm: false,
            attn2_blocks: vec![false, false],
        };
        let vae = VaeConfig {
            in_channels: 3,
            latent_channels: 16,
            // The loader takes SD3's 32 norm groups, so every level is 32 wide.
            block_out_channels: vec![32, 32, 32, 32],
            layers_per_block: 1,
            norm_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: 0.0609,
            has_encoder: false,
            has_decoder: true,
        };
        let clip = ClipVisionConfig {
            // HF CLIP configs give heads in config.json; without one the loader takes
            // head_dim 64, so the width is 64.
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 1,
            patch_size: 8,
            image_size: 32,
            num_channels: 3,
            projection_dim: Some(12),
            layer_norm_eps: 1e-5,
        };
        let dpir = DpirConfig {
            lq_channels: 8,
            lq_convs: 2,
            hidden: 32,
            patch_size: 2,
            latent_channels: 16,
            clip_dim: 64,
            local_hidden: 16,
            context_dim: 24,
            global_in: 12,
            global_hidden: 16,
            pooled_dim: 8,
            has_robust_encoder: true,
        };
        let mut tensors = random(mmdit_spec(&mmdit), 1);
        tensors.extend(random(vae_spec(&vae), 2));
        tensors.extend(random(clip_vision_spec(&clip), 3));
        tensors.extend(random(dpir_spec(&dpir), 4));
        tensors.extend(random(robust_encoder_file_spec(&vae), 5));
        write_f32_safetensors(&dir.join("dpir-test.safetensors"), &tensors, DType::F32).unwrap();
        dir
    })
}

/// A smooth RGB test picture.
fn rgb_picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let f = |k: f32| {
            (127.5 + 100.0 * ((x as f32 * 0.2 + k).sin() * (y as f32 * 0.15 - k).cos())) as u8
        };
        image::Rgb([f(0.0), f(1.0), f(2.0)])
    })
}

fn write_png(path: &Path, w: u32, h: u32) {
    rgb_picture(w, h).save(path).unwrap();
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    rgb_picture(w, h)
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    buf.into_inner()
}

fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    rgb_picture(w, h)
        .write_to(&mut buf, image::ImageFormat::Jpeg)
        .unwrap();
    buf.into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG signature, an IHDR declaring `w × h` RGB8, a few bytes of IDAT and an IEND: a
/// valid header over almost no pixel data (a decompression bomb's shape).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // The start of a zlib stream: enough for a decoder to read the header and stop there.
    chunk(b"IDAT", &[0x78, 0x9C, 0xED, 0xC1, 0x01, 0x0D, 0x00, 0x00]);
    chunk(b"IEND", &[]);
    out
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Files under `dir`, recursively, as sorted paths relative to it.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn go(d: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    go(&p, root, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
                }
            }
        }
    }
    go(dir, dir, &mut out);
    out.sort();
    out
}

/// Run `dpir restore` on one bad input file with the given bytes and check the failure:
/// stderr is exactly `expected` then the summary error, exit is non-zero, nothing is
/// written (no output folder either), the input is untouched.
fn check_bad_file(test: &str, file_name: &str, bytes: &[u8], expected_cause: &str) {
    let dir = scratch(test);
    let input = dir.join(file_name);
    std::fs::write(&input, bytes).unwrap();
    let out_dir = dir.join("out");
    let o = bin()
        .args(["restore", "--steps", "1", "--model"])
        .arg(tiny_model())
        .arg(&input)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{test}: {o:?}");
    assert_eq!(
        stderr_lines(&o),
        vec![
            format!("error: {}: {expected_cause}", input.display()),
            "error: 1 of 1 images failed".to_string()
        ],
        "{test}"
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    // Not even the output folder: the one the run made is removed when nothing was written.
    assert!(
        !out_dir.exists(),
        "{test}: partial output {:?}",
        listing(&out_dir)
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        bytes,
        "{test}: input changed"
    );
}

/// Run `dpir restore` with `args` on one good input; expect exit 2 (usage) or 1 and exactly
/// one stderr line; nothing written, no output folder made.
fn check_bad_invocation(test: &str, args: &[&str], code: i32, expected: &str) {
    let dir = scratch(test);
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let before = std::fs::read(&input).unwrap();
    let out_dir = dir.join("out");
    let mut cmd = bin();
    cmd.arg("restore")
        .arg("--model")
        .arg(tiny_model())
        .arg(&input)
        .arg("-o")
        .arg(&out_dir);
    cmd.args(args);
    let o = cmd.output().unwrap();
    let expected = expected.replace("{dir}", &dir.display().to_string());
    assert_eq!(o.status.code(), Some(code), "{test}: {o:?}");
    assert_eq!(stderr_lines(&o), vec![expected], "{test}");
    assert!(!out_dir.exists(), "{test}: output folder made");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

// ---------------------------------------------------------------------------------------
// Bad inputs

#[test]
fn empty_file() {
    check_bad_file("empty", "empty.png", &[], "empty file");
}

#[test]
fn truncated_png() {
    let b = png_bytes(32, 32);
    check_bad_file(
        "truncated_png",
        "cut.png",
        &b[..b.len() / 2],
        "cannot decode: unexpected end of file",
    );
}

#[test]
fn truncated_jpeg() {
    let b = jpeg_bytes(32, 32);
    check_bad_file(
        "truncated_jpeg",
        "cut.jpg",
        &b[..b.len() / 3],
        "cannot decode: Format error decoding Jpeg: I/O errors Not enough bytes, expected 162 but found 71",
    );
}

#[test]
fn text_file_named_png() {
    check_bad_file(
        "text_png",
        "notes.png",
        b"this is not a picture\n",
        "not an image in a supported format (png, jpg, webp, tif, bmp)",
    );
}

#[test]
fn unsupported_format() {
    check_bad_file(
        "gif",
        "anim.gif",
        b"GIF89a\x10\x00\x10\x00\x00\x00\x00;",
        "unsupported image format Gif (png, jpg, webp, tif, bmp)",
    );
}

#[test]
fn decompression_bomb() {
    check_bad_file(
        "bomb",
        "bomb.png",
        &png_header_only(100_000, 100_000),
        "image is 100000×100000 = 10000000000 pixels, more than --max-pixels 67108864",
    );
}

#[test]
fn one_pixel_image() {
    check_bad_file(
        "one_pixel",
        "dot.png",
        &png_bytes(1, 1),
        "image is 1×1, smaller than the 8×8 minimum",
    );
}

#[test]
fn zero_dimension() {
    check_bad_file(
        "zero_dim",
        "zero.png",
        &png_header_only(0, 16),
        "cannot decode: Format error decoding Png: Invalid image dimensions",
    );
}

#[test]
fn unreadable_path() {
    let dir = scratch("missing");
    let input = dir.join("nope.png");
    let o = bin()
        .args(["restore", "--model"])
        .arg(tiny_model())
        .arg(&input)
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![
            format!(
                "error: {}: No such file or directory (os error 2)",
                input.display()
            ),
            "error: 1 of 1 images failed".to_string()
        ]
    );
    assert!(!dir.join("out").exists());
}

#[test]
fn output_dir_is_a_file() {
    let dir = scratch("out_is_file");
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let out = dir.join("out");
    std::fs::write(&out, b"x").unwrap();
    let o = bin()
        .args(["restore", "--model"])
        .arg(tiny_model())
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![format!(
            "error: {}: output path exists and is not a directory",
            out.display()
        )]
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"x");
}

#[test]
fn output_under_a_file_fails_before_restoring() {
    let dir = scratch("out_under_file");
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    std::fs::write(dir.join("f"), b"x").unwrap();
    let out = dir.join("f").join("out");
    let o = restore(&dir, &[], &[&input], &out);
    assert_eq!(o.status.code(), Some(1));
    // One line, before any image: no "[1/1]" progress, no per-image error.
    assert_eq!(
        stderr_lines(&o),
        vec![format!(
            "error: {}: Not a directory (os error 20)",
            out.display()
        )]
    );
    assert!(String::from_utf8_lossy(&o.stdout).is_empty());
}

#[test]
fn nested_output_folders_are_removed_when_nothing_is_written() {
    let dir = scratch("nested_out");
    let input = dir.join("in.png");
    std::fs::write(&input, b"not a png").unwrap();
    let out = dir.join("a").join("b");
    let o = restore(&dir, &[], &[&input], &out);
    assert_eq!(o.status.code(), Some(1));
    assert!(!dir.join("a").exists(), "{:?}", listing(&dir));
}

#[test]
fn input_is_output() {
    let dir = scratch("in_is_out");
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let before = std::fs::read(&input).unwrap();
    let o = bin()
        .args(["restore", "--overwrite", "--model"])
        .arg(tiny_model())
        .arg(&input)
        .arg("-o")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![
            format!(
                "error: {}: output {} is the input file",
                input.display(),
                input.display()
            ),
            "error: 1 of 1 images failed".to_string()
        ]
    );
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(listing(&dir), vec![PathBuf::from("in.png")]);
}

#[test]
fn unknown_flag_value() {
    check_bad_invocation(
        "color_fix_value",
        &["--color-fix", "sepia"],
        2,
        "error: invalid value 'sepia' for '--color-fix <COLOR_FIX>'",
    );
}

#[test]
fn scale_three() {
    check_bad_invocation(
        "scale3",
        &["--scale", "3"],
        2,
        "error: invalid value '3' for '--scale <SCALE>': must be 1, 2 or 4",
    );
}

#[test]
fn zero_steps() {
    check_bad_invocation(
        "steps0",
        &["--steps", "0"],
        2,
        "error: invalid value '0' for '--steps <STEPS>': must be an integer from 1 to 1000",
    );
}

#[test]
fn bad_shard() {
    check_bad_invocation(
        "shard",
        &["--shard", "3/2"],
        2,
        "error: invalid value '3/2' for '--shard <I/N>': must be I/N with 1 <= I <= N",
    );
}

#[test]
fn cuda_not_available() {
    if dpir_engine::cuda::driver_present() {
        println!("cuda_not_available: skipped: a CUDA driver is present");
        return;
    }
    check_bad_invocation(
        "cuda",
        &["--device", "cuda"],
        1,
        "error: --device cuda: no CUDA driver found",
    );
    check_bad_invocation(
        "cuda-dtype",
        &["--dtype", "bf16"],
        1,
        "error: --dtype bf16: needs the CUDA backend: no CUDA driver found",
    );
}

#[test]
fn dtype_the_device_cannot_compute() {
    check_bad_invocation(
        "dtype-cpu",
        &["--device", "cpu", "--dtype", "f16"],
        1,
        "error: --dtype f16: the CPU backend computes in f32 only (use --dtype f32 or auto)",
    );
}

#[test]
fn weights_that_are_not_a_dpir_model() {
    let dir = scratch("not_dpir");
    let weights = dir.join("other.safetensors");
    write_f32_safetensors(
        &weights,
        &[("classifier.weight".to_string(), vec![2, 2], vec![1.0; 4])],
        DType::F32,
    )
    .unwrap();
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let o = bin()
        .args(["restore", "--model"])
        .arg(&weights)
        .arg(&input)
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![format!(
            "error: {}: tensor `classifier.weight` belongs to no known component (mmdit, vae, clip_vision, dpir, text encoders)",
            weights.display()
        )]
    );
    assert!(!dir.join("out").exists());
}

#[test]
fn missing_model() {
    let dir = scratch("no_model");
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let m = dir.join("nowhere");
    let o = bin()
        .args(["restore", "--model"])
        .arg(&m)
        .arg(&input)
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![format!("error: {}: model not found", m.display())]
    );
    assert!(!dir.join("out").exists());
}

// ---------------------------------------------------------------------------------------
// Restores

fn restore(dir: &Path, extra: &[&str], inputs: &[&Path], out: &Path) -> Output {
    let _ = dir;
    let mut c = bin();
    c.args(["restore", "--steps", "2", "--model"])
        .arg(tiny_model());
    c.args(extra);
    for i in inputs {
        c.arg(i);
    }
    c.arg("-o").arg(out);
    c.output().unwrap()
}

#[test]
fn restore_128_at_x4_and_reproducible_bytes() {
    let dir = scratch("e2e");
    let input = dir.join("photo.png");
    write_png(&input, 128, 128);
    let out = dir.join("out");
    let o = restore(&dir, &["--seed", "5"], &[&input], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("[1/1]") && stdout.contains("128×128 -> 512×512"),
        "{stdout}"
    );
    assert!(
        stdout.contains("restored 1, skipped 0, failed 0 of 1"),
        "{stdout}"
    );
    let produced = out.join("photo.png");
    let img = image::open(&produced).unwrap();
    assert_eq!((img.width(), img.height()), (512, 512));
    let first = std::fs::read(&produced).unwrap();
    // Existing outputs are skipped...
    let o = restore(&dir, &["--seed", "5"], &[&input], &out);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("exists, skipped"));
    // ...and replaced with --overwrite, byte for byte the same with the same seed.
    let o = restore(&dir, &["--seed", "5", "--overwrite"], &[&input], &out);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&produced).unwrap(),
        first,
        "same seed, different bytes"
    );
    assert_eq!(
        listing(&out),
        vec![PathBuf::from("photo.png")],
        "temporary files left behind"
    );
}

#[test]
fn one_bad_file_does_not_stop_the_batch() {
    let dir = scratch("batch");
    let inputs = dir.join("in");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    write_png(&inputs.join("a.png"), 16, 16);
    std::fs::write(inputs.join("b.png"), b"garbage").unwrap();
    write_png(&inputs.join("sub/c.png"), 24, 16);
    std::fs::write(inputs.join("readme.txt"), b"not an input").unwrap();
    let out = dir.join("out");
    let o = restore(&dir, &["--scale", "2"], &[&inputs], &out);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![
            format!(
                "error: {}: not an image in a supported format (png, jpg, webp, tif, bmp)",
                inputs.join("b.png").display()
            ),
            "error: 1 of 3 images failed".to_string()
        ]
    );
    assert_eq!(
        listing(&out),
        vec![PathBuf::from("a.png"), PathBuf::from("sub/c.png")]
    );
    let c = image::open(out.join("sub/c.png")).unwrap();
    assert_eq!((c.width(), c.height()), (48, 32));
}

#[test]
fn shards_split_the_sorted_list() {
    let dir = scratch("shard_split");
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    for n in ["a", "b", "c"] {
        write_png(&inputs.join(format!("{n}.png")), 16, 16);
    }
    let out = dir.join("out");
    let o = restore(&dir, &["--scale", "1", "--shard", "2/2"], &[&inputs], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(&out), vec![PathBuf::from("b.png")]);
    let o = restore(&dir, &["--scale", "1", "--shard", "1/2"], &[&inputs], &out);
    assert!(o.status.success());
    assert_eq!(
        listing(&out),
        vec![
            PathBuf::from("a.png"),
            PathBuf::from("b.png"),
            PathBuf::from("c.png")
        ]
    );
}

#[test]
fn depth_gray_and_alpha_are_kept() {
    let dir = scratch("kinds");
    let gray16 = dir.join("g16.png");
    image::ImageBuffer::<image::Luma<u16>, _>::from_fn(16, 16, |x, y| {
        image::Luma([(x * 4000 + y * 100) as u16])
    })
    .save(&gray16)
    .unwrap();
    let rgba = dir.join("rgba.png");
    image::RgbaImage::from_fn(16, 16, |x, y| {
        image::Rgba([x as u8 * 10, y as u8 * 10, 90, if x < 8 { 255 } else { 0 }])
    })
    .save(&rgba)
    .unwrap();
    let out = dir.join("out");
    let o = restore(
        &dir,
        &["--scale", "2", "--format", "png"],
        &[&gray16, &rgba],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = image::open(out.join("g16.png")).unwrap();
    assert_eq!(g.color(), image::ColorType::L16);
    assert_eq!((g.width(), g.height()), (32, 32));
    let a = image::open(out.join("rgba.png")).unwrap().to_rgba8();
    assert_eq!(a.dimensions(), (32, 32));
    // Alpha is resized on its own: opaque on the left, transparent on the right.
    assert_eq!(a.get_pixel(2, 16).0[3], 255);
    assert_eq!(a.get_pixel(29, 16).0[3], 0);
}

#[test]
fn text_embeddings_are_read_and_checked() {
    let dir = scratch("t5");
    let input = dir.join("in.png");
    write_png(&input, 16, 16);
    let good = dir.join("t5.safetensors");
    write_f32_safetensors(
        &good,
        &[("t5".to_string(), vec![1, 3, 24], vec![0.1; 72])],
        DType::F32,
    )
    .unwrap();
    let out = dir.join("out");
    let o = restore(
        &dir,
        &["--scale", "1", "--text-embeddings", good.to_str().unwrap()],
        &[&input],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(&out), vec![PathBuf::from("in.png")]);

    let bad = dir.join("narrow.safetensors");
    write_f32_safetensors(
        &bad,
        &[("t5".to_string(), vec![3, 5], vec![0.1; 15])],
        DType::F32,
    )
    .unwrap();
    let out2 = dir.join("out2");
    let o = restore(
        &dir,
        &["--scale", "1", "--text-embeddings", bad.to_str().unwrap()],
        &[&input],
        &out2,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![
            "error: --text-embeddings: tokens have width 5, the model's context is 24".to_string()
        ]
    );
    assert!(listing(&out2).is_empty());
}

#[test]
fn two_inputs_never_share_an_output() {
    let dir = scratch("collide");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write_png(&a.join("x.png"), 16, 16);
    write_png(&b.join("x.png"), 16, 16);
    let out = dir.join("out");
    let o = restore(
        &dir,
        &["--scale", "1"],
        &[&a.join("x.png"), &b.join("x.png")],
        &out,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![
            format!(
                "error: {}: output {} is also the output of {}",
                b.join("x.png").display(),
                out.join("x.png").display(),
                a.join("x.png").display()
            ),
            "error: 1 of 2 images failed".to_string()
        ]
    );
    assert_eq!(listing(&out), vec![PathBuf::from("x.png")]);
}
