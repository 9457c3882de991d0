//! Fuzz entry points for `ws`.
