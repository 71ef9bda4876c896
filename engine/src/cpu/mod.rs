//! The CPU reference backend: plain f32 ops, multi-threaded with rayon.

pub mod attention;
pub mod conv;
pub mod matmul;
pub mod ops;
