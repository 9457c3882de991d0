//! fleetgate: a thread-per-core TLS WebSocket gateway between a fleet of devices and the
//! management server that manages them.
//!
//! The shape (see `docs/architecture.md`):
//!
//! ```text
//! socket ─▶ driver (io_uring | epoll) ─▶ shard loop ─▶ tls ─▶ proto (http → ws) ─▶ routes ─▶ socket
//! ```
//!
//! * [`proto`] is sans-IO: pure state machines over byte slices (no sockets, no clocks).
//! * [`tls`] is the only module that touches rustls; it owns the TLS buffers.
//! * [`driver`] is the only place with io_uring or mio; [`sys`] holds the few raw syscalls.
//! * [`shard`] runs one event loop per core; [`server`] starts and stops them.

pub mod admin;
pub mod agent;
pub mod buf;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod discovery;
pub mod driver;
pub mod export;
pub mod logging;
pub mod mail;
pub mod metrics;
pub mod pki;
pub mod proto;
pub mod registry;
pub mod relay;
pub mod server;
pub mod shard;
pub mod status;
pub mod sys;
pub mod tls;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
