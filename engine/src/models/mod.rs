//! Model graphs on the CPU backend, each mirroring the original module paths.

pub mod clip;
pub mod dpir;
pub mod mmdit;
pub mod vae;
