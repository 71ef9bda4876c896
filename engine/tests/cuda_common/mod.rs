//! Shared harness of the GPU tests: device setup with a visible skip, seeded inputs rounded
//! to bf16 (so the f32 CPU reference sees exactly what the GPU sees), poisoned outputs, and
//! a PASS/FAIL line per case that never stops the run.
#![allow(dead_code, unused_imports)]

use std::sync::Arc;

use dpir_engine::cuda::{Bf16, CudaDevice, DView, DeviceBuffer};
use dpir_engine::Error;

pub const BF16_TOL: f32 = 1e-2;
pub const F32_TOL: f32 = 1e-5;

/// Opens device 0, or prints `skipped: no CUDA driver` and returns None.
pub fn device(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::new(0) {
        Ok(d) => {
            println!("{test}: device {} (sm_{}{})", d.name, d.cc.0, d.cc.1);
            for (m, how) in &d.module_report {
                println!("  module {}: {how}", m.name());
            }
            Some(Arc::new(d))
        }
        Err(Error::NoCuda) => {
            println!("{test}: skipped: no CUDA driver");
            None
        }
        // A driver without any device is a skip, but say why.
        Err(e) if e.to_string().contains("NO_DEVICE") => {
            println!("{test}: skipped: no usable CUDA device ({e})");
            None
        }
        // A device that is there but does not open (a kernel module that fails to load, ...)
        // is a failure, counted by the device check's FAIL lines.
        Err(e) => {
            println!("FAIL {test}: opening the CUDA device: {e}");
            panic!("{test}: opening the CUDA device: {e}");
        }
    }
}

pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Values in [-a, a].
    pub fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| (self.uniform() * 2.0 - 1.0) * a).collect()
    }
}

pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

pub fn bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

pub use dpir_engine::cuda::metrics::{cosine, psnr_range, rel_err};

/// Seeded weights of a spec (`engine::weights::seeded_random_weights`), rounded to bf16 so
/// the CPU reference sees exactly what the GPU stores.
pub fn bf16_weights(
    spec: dpir_loader::Spec,
    seed: u64,
) -> std::collections::HashMap<String, dpir_engine::Tensor> {
    dpir_engine::weights::seeded_random_weights(spec, seed)
        .into_iter()
        .map(|(n, mut t)| {
            t.data = bf16_round(&t.data);
            (n, t)
        })
        .collect()
}

/// Test-side allocations (buffers live until the harness drops).
pub struct Mem {
    pub dev: Arc<CudaDevice>,
    bufs: Vec<DeviceBuffer>,
}

impl Mem {
    pub fn new(dev: &Arc<CudaDevice>) -> Self {
        Self {
            dev: dev.clone(),
            bufs: Vec::new(),
        }
    }
    pub fn bf16(&mut self, host: &[f32]) -> Result<DView<Bf16>, Error> {
        let b = self.dev.alloc(host.len() * 2)?;
        let v = b.view::<Bf16>().sub(0, host.len())?;
        self.dev.upload_bf16(v, &bits(host))?;
        self.bufs.push(b);
        Ok(v)
    }
    pub fn f32(&mut self, host: &[f32]) -> Result<DView<f32>, Error> {
        let b = self.dev.alloc(host.len() * 4)?;
        let v = b.view::<f32>().sub(0, host.len())?;
        self.dev.upload_f32(v, host)?;
        self.bufs.push(b);
        Ok(v)
    }
    pub fn i32(&mut self, host: &[i32]) -> Result<DView<i32>, Error> {
        let b = self.dev.alloc(host.len() * 4)?;
        let v = b.view::<i32>().sub(0, host.len())?;
        self.dev.upload_i32(v, host)?;
        self.bufs.push(b);
        Ok(v)
    }
    /// An output buffer poisoned with NaN (0xFF bytes) so unwritten elements fail.
    pub fn out_bf16(&mut self, n: usize) -> Result<DView<Bf16>, Error> {
        let b = self.dev.alloc(n * 2)?;
        let v = b.view::<Bf16>().sub(0, n)?;
        self.dev.fill_bytes(v, 0xFF)?;
        self.bufs.push(b);
        Ok(v)
    }
    pub fn out_f32(&mut self, n: usize) -> Result<DView<f32>, Error> {
        let b = self.dev.alloc(n * 4)?;
        let v = b.view::<f32>().sub(0, n)?;
        self.dev.fill_bytes(v, 0xFF)?;
        self.bufs.push(b);
        Ok(v)
    }
}

/// Counts cases; every case prints one line.
#[derive(Default)]
pub struct Report {
    pub pass: usize,
    pub fail: Vec<String>,
}

impl Report {
    /// Runs a case returning (error, tolerance); an Err or a NaN counts as a failure.
    pub fn case(&mut self, name: &str, f: impl FnOnce() -> Result<(f32, f32), Error>) {
        match f() {
            Ok((err, tol)) if err <= tol => {
                println!("PASS {name}: rel err {err:.3e} (tol {tol:.0e})");
                self.pass += 1;
            }
            Ok((err, tol)) => {
                println!("FAIL {name}: rel err {err:.3e} > tol {tol:.0e}");
                self.fail.push(name.to_string());
            }
            Err(e) => {
                println!("FAIL {name}: error: {e}");
                self.fail.push(name.to_string());
            }
        }
    }
    pub fn finish(self, test: &str) {
        println!("{test}: {} passed, {} failed", self.pass, self.fail.len());
        assert!(
            self.fail.is_empty(),
            "{test}: failed cases: {:?}",
            self.fail
        );
    }
}
