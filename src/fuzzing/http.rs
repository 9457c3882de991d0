//! Fuzz entry points for `http`.
