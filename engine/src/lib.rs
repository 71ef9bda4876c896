//! dpir engine: the CPU reference backend, the CUDA backend and the DPIR pipeline.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod image_io;
pub mod models;
pub mod pipeline;
pub mod tensor;
pub mod weights;

pub use error::{Error, Result};
pub use tensor::Tensor;
pub use weights::WeightSource;
