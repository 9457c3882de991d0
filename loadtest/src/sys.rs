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

/// CPU time (user + system) a process has used so far, in seconds, from `/proc/PID/stat`
/// (clock ticks of 1/100 s, Linux's fixed USER_HZ).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_secs(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in seconds.
pub fn parse_stat_cpu_secs(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU time this process has used, seconds.
pub fn own_cpu_secs() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
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
    fn parses_cpu_time_from_stat() {
        let stat = "4242 (fleet gate) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_secs(stat), Some(3.25));
        assert!(cpu_secs(std::process::id()).is_some());
    }

    #[test]
    fn reads_own_rss() {
        let rss = own_rss_bytes().expect("/proc/self/status is readable");
        assert!(rss > 100 * 1024, "implausible RSS {rss}");
    }
}
