//! CUDA backend: device setup, embedded kernel modules, a typed launch layer, cuBLASLt GEMMs,
//! one pre-planned arena, and the MMDiT forward on the GPU.
//!
//! Everything here loads the CUDA libraries dynamically: the same binary builds and runs
//! without CUDA, and [`CudaDevice::new`] answers [`Error::NoCuda`](crate::Error::NoCuda)
//! instead of panicking when no driver is present.

// `usize::is_multiple_of` is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

pub mod clip;
pub mod device;
pub mod gemm;
pub mod metrics;
pub mod mmdit;
pub mod nvtx;
// `#[macro_use]`: the `launch!` macro of `ops` also serves `vae_ops`.
#[macro_use]
pub mod ops;
pub mod restorer;
pub mod vae;
mod vae_ops;

pub use device::{Bf16, CudaDevice, DView, DeviceBuffer, Timer};
pub use gemm::{Epilogue, Gemm};
pub use mmdit::{CudaMmdit, StepPlan};
pub use restorer::CudaRestorer;
pub use vae::{CudaVaeDecoder, CudaVaeEncoder};

/// Whether a CUDA driver library can be loaded on this machine (no device is touched).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLASLt can be loaded.
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}
