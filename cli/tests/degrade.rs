//! `dpir degrade` end to end on small generated images in a temporary folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dpir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dpir"))
}

/// A fresh, empty temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpir-degrade-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A textured synthetic photo.
fn write_photo(path: &Path, w: u32, h: u32, phase: f32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let r = 128.0 + 100.0 * (fx * 0.05 + phase).sin();
        let g = 128.0 + 90.0 * (fy * 0.08).cos() * (fx * 0.3).sin();
        let b = (fx + fy) * 255.0 / (w + h) as f32;
        image::Rgb([r as u8, g as u8, b as u8])
    });
    img.save(path).expect("write synthetic photo");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run dpir")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dims(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).expect("readable output")
}

#[test]
fn single_images_are_seeded_and_sized() {
    let dir = temp_dir("single");
    let a = dir.join("a.png");
    let b = dir.join("b.jpg");
    write_photo(&a, 96, 64, 0.0);
    write_photo(&b, 70, 50, 1.0);
    let out1 = dir.join("out1");
    let o = run(dpir()
        .args(["degrade", "--seed", "5", "-o"])
        .arg(&out1)
        .arg(&a)
        .arg(&b));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(dims(&out1.join("a.png")), (24, 16));
    assert_eq!(dims(&out1.join("b.png")), (17, 12));

    // Same seed: same bytes, also when the file is given alone (per-file streams).
    let out2 = dir.join("out2");
    let o = run(dpir()
        .args(["degrade", "--seed", "5", "-o"])
        .arg(&out2)
        .arg(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&out1.join("a.png")), read(&out2.join("a.png")));

    // Another seed, scale 2 and the light preset.
    let out3 = dir.join("out3");
    let o = run(dpir()
        .args([
            "degrade", "--seed", "6", "--scale", "2", "--preset", "light", "-o",
        ])
        .arg(&out3)
        .arg(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(dims(&out3.join("a.png")), (48, 32));
    let out4 = dir.join("out4");
    let o = run(dpir()
        .args(["degrade", "--seed", "6", "-o"])
        .arg(&out4)
        .arg(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(read(&out1.join("a.png")), read(&out4.join("a.png")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_input_is_reported_and_skipped() {
    let dir = temp_dir("bad");
    let good = dir.join("good.png");
    let bad = dir.join("broken.png");
    write_photo(&good, 64, 64, 0.0);
    std::fs::write(&bad, b"not an image").expect("write");
    let out = dir.join("out");
    let o = run(dpir()
        .args(["degrade", "-o"])
        .arg(&out)
        .arg(&bad)
        .arg(&good));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("broken.png"), "{err}");
    assert_eq!(dims(&out.join("good.png")), (16, 16));
    assert!(!out.join("broken.png").exists());
    let missing = run(dpir()
        .args(["degrade", "-o"])
        .arg(&out)
        .arg(dir.join("nope.png")));
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("nope.png"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_options_fail_with_one_line() {
    let dir = temp_dir("opts");
    let a = dir.join("a.png");
    write_photo(&a, 64, 64, 0.0);
    let out = dir.join("out");
    for args in [
        vec!["--scale", "3"],
        vec!["--preset", "heavy"],
        vec!["--pairs", "2", "--crop", "30"],
        vec!["--pairs", "2", "--downscale", "0.5"],
        vec!["--crop", "64"],
    ] {
        let o = run(dpir()
            .arg("degrade")
            .args(&args)
            .arg("-o")
            .arg(&out)
            .arg(&a));
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn pair_files(out: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("hq"))
        .expect("hq dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let hq = read(&out.join("hq").join(&n));
            let lq = read(&out.join("lq").join(&n));
            (n, hq, lq)
        })
        .collect()
}

#[test]
fn pairs_are_reproducible_resumable_and_sized() {
    let dir = temp_dir("pairs");
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).expect("mkdir");
    write_photo(&photos.join("p1.png"), 200, 150, 0.0);
    write_photo(&photos.join("p2.jpg"), 180, 260, 2.0);
    // Too small after the 2x downscale: skipped.
    write_photo(&photos.join("tiny.png"), 100, 100, 1.0);
    let args = |out: &Path| {
        let mut c = dpir();
        c.args([
            "degrade",
            "--pairs",
            "6",
            "--crop",
            "64",
            "--downscale",
            "2",
        ])
        .args(["--seed", "9", "-o"])
        .arg(out)
        .arg(&photos);
        c
    };
    let out1 = dir.join("out1");
    let o = run(args(&out1).env("RAYON_NUM_THREADS", "2"));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("from 2 photos (1 too small)"), "{stdout}");
    let first = pair_files(&out1);
    assert_eq!(first.len(), 6);
    for (i, (name, _, _)) in first.iter().enumerate() {
        assert_eq!(name, &format!("{i:06}.png"));
        assert_eq!(dims(&out1.join("hq").join(name)), (64, 64));
        assert_eq!(dims(&out1.join("lq").join(name)), (16, 16));
    }

    // One thread gives the same bytes.
    let out2 = dir.join("out2");
    let o = run(args(&out2).env("RAYON_NUM_THREADS", "1"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(first, pair_files(&out2));

    // Resume: remove one LQ and one HQ; only those pairs are redone, identically.
    std::fs::remove_file(out2.join("lq").join("000002.png")).expect("rm");
    std::fs::remove_file(out2.join("hq").join("000004.png")).expect("rm");
    let o = run(&mut args(&out2));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("2 pairs written, 4 already present"),
        "{stdout}"
    );
    assert_eq!(first, pair_files(&out2));

    // Another seed differs.
    let out3 = dir.join("out3");
    let o = run(dpir()
        .args([
            "degrade", "--pairs", "6", "--crop", "64", "--seed", "10", "-o",
        ])
        .arg(&out3)
        .arg(&photos));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(first, pair_files(&out3));

    // Nothing large enough: one-line error.
    let o = run(dpir()
        .args(["degrade", "--pairs", "2", "--crop", "256", "-o"])
        .arg(dir.join("out4"))
        .arg(&photos));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("at least 256x256"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
