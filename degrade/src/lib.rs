//! Real-ESRGAN-style second-order image degradation (blur, resize, noise, JPEG, twice, then a
//! final resize with sinc filtering and JPEG), seeded and deterministic, for making dpir
//! training and benchmark pairs.
//!
//! One seed and stream id give identical bytes on every run and thread count: each image draws
//! from its own [`Rng`] stream and nothing inside one image runs in parallel.

pub mod batch;
pub mod error;
pub mod jpeg;
pub mod kernels;
pub mod noise;
pub mod pipeline;
pub mod planar;
pub mod resize;
pub mod rng;

pub use error::{Error, Result};
pub use pipeline::{
    apply, degrade, Config, FinalParams, NoiseParams, Params, Preset, ResizeParams, Stage1Params,
    Stage2Params, StageConfig,
};
pub use planar::Planar;
pub use rng::Rng;
