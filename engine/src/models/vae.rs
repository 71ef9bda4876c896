//! vae (placeholder).
