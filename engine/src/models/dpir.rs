//! dpir (placeholder).
