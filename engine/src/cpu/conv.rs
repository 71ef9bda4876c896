//! Convolutions, GroupNorm and resampling (CPU).
