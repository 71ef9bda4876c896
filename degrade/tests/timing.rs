//! Single-thread cost of one 256 -> 64 degradation (no file I/O). A measurement, not a check:
//! `cargo test --release -p dpir-degrade --test timing -- --ignored --nocapture`.

use dpir_degrade::kernels::{filter2d, gaussian_family, KernelKind};
use dpir_degrade::noise::{add_gaussian, add_poisson};
use dpir_degrade::{degrade, jpeg, Planar, Preset, Rng};
use std::time::Instant;

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn time_256_to_64() {
    let n = 256;
    let mut img = Planar::zeros(n, n);
    let mut rng = Rng::new(1);
    let len = img.data.len();
    for (i, v) in img.data.iter_mut().enumerate() {
        let x = (i % n) as f32;
        let y = ((i / n) % n) as f32;
        *v = 0.5 + 0.3 * (x * 0.11).sin() * (y * 0.07).cos() + 0.05 * rng.f64() as f32;
    }
    assert_eq!(len, 3 * n * n);
    img.round_to_u8_grid();
    for preset in [Preset::Standard, Preset::Light] {
        let cfg = preset.config();
        let runs = 200;
        let start = Instant::now();
        for i in 0..runs {
            let mut r = Rng::for_stream(7, i);
            let (lq, _) = degrade(&img, &cfg, 4, &mut r).expect("degrade");
            assert_eq!((lq.width, lq.height), (64, 64));
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
        println!("{preset:?}: {ms:.2} ms per 256->64 degradation (1 thread, {runs} runs)");
    }
    let time = |name: &str, f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..20 {
            f();
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / 20.0;
        println!("  {name}: {ms:.2} ms on 256x256");
    };
    for k in [7, 13, 21] {
        let kern = gaussian_family(KernelKind::Aniso, k, 2.0, 1.0, 0.3, 1.0);
        time(&format!("blur {k}x{k}"), &mut || {
            let _ = filter2d(&img, &kern);
        });
    }
    let mut r = Rng::new(3);
    time("gaussian noise", &mut || {
        let mut x = img.clone();
        add_gaussian(&mut x, 10.0, false, &mut r);
    });
    time("poisson noise", &mut || {
        let mut x = img.clone();
        add_poisson(&mut x, 1.0, false, &mut r);
    });
    time("jpeg round trip", &mut || {
        let _ = jpeg::roundtrip(&img, 50);
    });
}
