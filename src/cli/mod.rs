//! Command-line front ends over the library (`fleetgate <command> …`).

pub mod pki;
