//! The engine's one error type. Every message is a single line that names the
//! problem (tensor, file, flag) so the CLI can print it as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] dpir_loader::LoadError),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid argument: {0}")]
    Arg(String),
    #[error("model: {0}")]
    Model(String),
    #[error("cuda: {0}")]
    Cuda(String),
    /// The GPU could not allocate: a caller may retry with smaller tiles.
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("no CUDA driver found")]
    NoCuda,
}

pub type Result<T> = std::result::Result<T, Error>;
