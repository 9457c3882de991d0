//! Chooses the backend at start-up: io_uring when the kernel lets us set up a ring with every
//! opcode and feature the driver uses, epoll otherwise (Docker ≥ 25 and containerd ≥ 2 block
//! io_uring by default; `/proc/sys/kernel/io_uring_disabled` can too).

use io_uring::{IoUring, Probe, opcode};

use crate::config::DriverKind;

/// The backend that will run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    /// io_uring.
    Uring,
    /// epoll, with the reason io_uring was not used (`None` when forced by the operator).
    Epoll(Option<String>),
}

/// Environment variable that makes the probe report io_uring as unavailable, to exercise
/// and test the automatic fallback (as a container that blocks io_uring would).
pub const DISABLE_ENV: &str = "FLEETGATE_DISABLE_URING";

/// Why io_uring cannot be used here, or `Ok` when it can.
pub fn uring_usable() -> Result<(), String> {
    if std::env::var_os(DISABLE_ENV).is_some() {
        return Err(format!("disabled by {DISABLE_ENV}"));
    }
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    let needed = [
        ("accept", opcode::AcceptMulti::CODE),
        ("recv", opcode::RecvMulti::CODE),
        ("send", opcode::Send::CODE),
        ("close", opcode::Close::CODE),
        ("poll_add", opcode::PollAdd::CODE),
        ("async_cancel", opcode::AsyncCancel2::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(format!(
                "io_uring opcode {name} is not supported by this kernel"
            ));
        }
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| format!("io_uring fixed file table unavailable: {e}"))?;
    if !ring.params().is_feature_ext_arg() {
        return Err("io_uring lacks IORING_FEAT_EXT_ARG (kernel < 5.11)".into());
    }
    // Multishot accept/recv and provided-buffer rings need 6.0; the buffer ring registration
    // is the cheapest way to tell.
    crate::driver::uring::UringDriver::new(crate::driver::DriverConfig {
        max_connections: 4,
        recv_buffer_size: 4096,
        recv_buffers: 8,
    })
    .map_err(|e| format!("io_uring provided-buffer ring unavailable: {e}"))?;
    Ok(())
}

/// Resolves `auto` by probing; `uring` fails when the probe fails.
pub fn choose(kind: DriverKind) -> Result<Chosen, String> {
    match kind {
        DriverKind::Epoll => Ok(Chosen::Epoll(None)),
        DriverKind::Uring => uring_usable().map(|()| Chosen::Uring),
        DriverKind::Auto => Ok(match uring_usable() {
            Ok(()) => Chosen::Uring,
            Err(why) => Chosen::Epoll(Some(why)),
        }),
    }
}
