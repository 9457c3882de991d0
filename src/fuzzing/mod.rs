//! Hidden entry points for the `fuzz/` targets (enabled by the `fuzzing` feature). Each target
//! in `fuzz/fuzz_targets/` is a one-line call into a function here, so the targets stay trivial
//! and the code under test stays private.

pub mod envelope;
pub mod http;
pub mod pki;
pub mod tls;
pub mod ws;
