//! Element-wise ops, norms and activations (CPU).
