//! The CPU reference backend: plain f32 ops, multi-threaded with rayon.

pub mod matmul;
