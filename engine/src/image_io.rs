//! Image decoding/encoding for the pipeline (placeholder).
