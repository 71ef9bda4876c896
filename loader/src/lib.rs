//! dpir loader: memory-mapped safetensors, checkpoint layouts mapped to one canonical
//! layout, and model configuration detected from names and shapes.

pub mod config;

pub use config::{ClipVisionConfig, DpirConfig, MmditConfig, VaeConfig};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Msg(String),
}
