//! Sampler, tiling and the restoration pipeline (placeholder).
