//! Command-line front ends over the library (`fleetgate <command> …`).

pub mod agent;
pub mod console;
pub mod devices;
pub mod keys;
pub mod mgmt;
pub mod pki;
pub mod sizing;
pub mod status;
