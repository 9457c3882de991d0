//! Fuzz entry points for `pki`.
