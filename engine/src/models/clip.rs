//! clip (placeholder).
