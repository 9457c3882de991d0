//! The few facts this harness reads from the operating system: the open-file limit, a
//! process's resident memory and the ephemeral port range. Linux only (`/proc`).

use std::path::Path;

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit
/// (`u64::MAX` when unlimited). Each simulated device holds one descriptor.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft != hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(finite(hard))
}

/// The hard open-file limit (what [`raise_fd_limit`] raises the soft limit to).
pub fn fd_hard_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(_, hard)| finite(hard))
}

fn finite(limit: u64) -> u64 {
    if limit == RLIM_INFINITY {
        u64::MAX
    } else {
        limit
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding a source address defers the choice of
/// the local port to `connect()`. Without it, `bind(ip, 0)` searches the port range itself
/// (preferring half of it), which becomes slow once ~14,000 ports of one address are taken
/// and collapses the connect rate.
pub fn bind_address_no_port(socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    Ok(())
}

/// Resident set size (`VmRSS`) of a process in bytes, or `None` if it is gone or unreadable.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    read_status_field(
        &Path::new("/proc").join(pid.to_string()).join("status"),
        "VmRSS:",
    )
}

/// Resident set size of this process in bytes.
pub fn own_rss_bytes() -> Option<u64> {
    read_status_field(Path::new("/proc/self/status"), "VmRSS:")
}

fn read_status_field(path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_status_kib(&text, field).map(|kib| kib * 1024)
}

/// Finds `field` (e.g. `VmRSS:`) in a `/proc/PID/status` text and returns its value in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(field))?;
    let mut words = line[field.len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

/// Name of a process (`/proc/PID/comm`), for messages.
pub fn process_name(pid: u32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim().to_owned())
}

/// How many local ports the kernel hands out to connecting sockets
/// (`net.ipv4.ip_local_port_range`), or `None` if unknown.
pub fn ephemeral_port_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut words = text.split_whitespace();
    let low: u64 = words.next()?.parse().ok()?;
    let high: u64 = words.next()?.parse().ok()?;
    (high >= low).then(|| high - low + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss_from_status() {
        let status = "Name:\tfleetgate\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(parse_status_kib(status, "VmHWM:"), None);
    }

    #[test]
    fn reads_own_rss() {
        let rss = own_rss_bytes().expect("/proc/self/status is readable");
        assert!(rss > 100 * 1024, "implausible RSS {rss}");
    }
}
