//! dpir loader: memory-mapped safetensors, checkpoint layouts mapped to one canonical
//! layout, and model configuration detected from names and shapes.
//!
//! - [`load`] reads files, sharded indexes and folders into a [`Model`] whose components
//!   use the canonical names of `docs/WEIGHTS.md`.
//! - [`Component`] hands out tensors as zero-copy views of the mapped files where it can.
//! - [`spec`] holds shape-only specs of every component and the config detectors.
//! - [`write_safetensors`] writes files (tests, trainer tooling).

pub mod component;
pub mod config;
pub mod dtype;
pub mod file;
mod layout;
pub mod model;
pub mod spec;

use std::path::PathBuf;

pub use component::Component;
pub use config::{ClipVisionConfig, DpirConfig, MmditConfig, VaeConfig};
pub use dtype::DType;
pub use file::{
    write_f32_safetensors, write_safetensors, write_safetensors_with_metadata, SafetensorsFile,
    TensorInfo,
};
pub use model::{load, Ignored, Layout, Loaded, Model};
pub use spec::{
    check_spec, clip_vision_spec, detect_clip_vision, detect_dpir, detect_mmdit, detect_vae,
    dpir_spec, mmdit_last_context_qk_norm, mmdit_spec, param_count, robust_encoder_file_spec,
    shape_map, vae_decoder_spec, vae_encoder_spec, vae_spec, ShapeMap, Spec,
};

/// Everything that can go wrong while reading checkpoints. Every message is one line that
/// names the file or tensor and the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The OS refused to open, stat, map or write a path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or folder is malformed as a whole (header, index, folder layout).
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// One header entry of a file is malformed.
    #[error("{path}: tensor `{name}`: {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// A tensor the detected config requires is absent.
    #[error("{component}: missing tensor `{name}`")]
    Missing {
        component: &'static str,
        name: String,
    },
    /// A tensor has a shape other than the detected config requires.
    #[error("{component}: tensor `{name}`{origin}: expected shape {expected}, found {found:?}")]
    Shape {
        component: &'static str,
        name: String,
        /// `" (stored as `…` in FILE)"` or empty.
        origin: String,
        expected: String,
        found: Vec<usize>,
    },
    /// A tensor that the detected config has no place for.
    #[error("{component}: unexpected tensor `{name}`{origin}")]
    Unexpected {
        component: &'static str,
        name: String,
        origin: String,
    },
    /// Two sources define the same canonical tensor.
    #[error("tensor `{name}` is defined twice: {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    /// A tensor name that belongs to no component dpir knows.
    #[error("{path}: tensor `{name}` belongs to no known component (mmdit, vae, clip_vision, dpir, text encoders)")]
    Unrecognised { path: PathBuf, name: String },
    /// A lookup of a canonical name that the component does not hold.
    #[error("no tensor `{0}`")]
    NoSuchTensor(String),
    /// A config that cannot be determined or is inconsistent.
    #[error("{0}")]
    Config(String),
    /// Anything else, already worded as one line.
    #[error("{0}")]
    Msg(String),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    }
}
