//! mmdit (placeholder).
