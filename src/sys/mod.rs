//! The few raw OS calls the gateway needs outside the io_uring driver: eventfd, CPU pinning,
//! the open-file limit and the host name. Every libc call goes through [`cvt`], which turns
//! a `-1` into `io::Error::last_os_error()`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Converts a libc return value into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A non-blocking, close-on-exec eventfd used to wake a shard's loop from other threads.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates a new eventfd with counter 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a fresh fd we now own.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Adds 1 to the counter, waking whoever polls the fd. Never blocks; a full counter
    /// (EAGAIN) already means "wake", so it is not an error.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own.
        let ret = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                8,
            )
        };
        debug_assert!(ret == 8 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock);
    }

    /// Resets the counter to 0; returns the value it had (0 if it was already 0).
    pub fn drain(&self) -> u64 {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from an fd we own.
        let ret = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&raw mut value).cast::<libc::c_void>(),
                8,
            )
        };
        if ret == 8 { value } else { 0 }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: passes a pointer to a live cpu_set_t and its exact size; pid 0 = this thread.
    cvt(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the live struct we pass.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the live struct we pass.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// The system's host name (empty if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the live buffer.
    let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if ret != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The calling thread's kernel thread ID.
pub fn thread_id() -> u64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    u64::try_from(tid).unwrap_or(0)
}

/// CPU time (user + system) used so far by thread `tid` of this process, in seconds, from
/// `/proc/self/task/TID/stat` (clock-tick resolution, 10 ms on most kernels).
pub fn thread_cpu_seconds(tid: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: the
    // state is field 3 of proc(5), utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) as f64 / hz.max(1) as f64)
}

/// Resident set size of this process in bytes (from /proc/self/statm), if readable.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_sees_its_own_cpu_time() {
        let tid = thread_id();
        assert!(tid > 0);
        let before = thread_cpu_seconds(tid).expect("readable");
        // Spin until the thread's own CPU clock says 150 ms (CPU time, not wall time: a busy
        // machine only makes this take longer).
        let cpu = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec for the call to fill.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
        };
        let start = cpu();
        let mut x = 0u64;
        while cpu() - start < 0.15 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = thread_cpu_seconds(tid).expect("readable");
        assert!(after - before >= 0.1, "{before} → {after}");
        assert!(thread_cpu_seconds(u64::MAX).is_none());
    }

    #[test]
    fn eventfd_counts_and_drains() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.drain(), 0);
        e.notify();
        e.notify();
        assert_eq!(e.drain(), 2);
        assert_eq!(e.drain(), 0);
    }

    #[test]
    fn hostname_and_rss_are_readable() {
        assert!(!hostname().is_empty());
        assert!(rss_bytes().unwrap() > 0);
    }
}

/// A global allocator that forwards to the system allocator and, while counting is switched
/// on for the current thread, tracks net bytes and the number of allocations. Benchmarks
/// install it with `#[global_allocator]` to print bytes per connection and allocations per
/// message; the gateway itself does not use it.
#[derive(Debug)]
pub struct CountingAlloc;

/// When set before the gateway starts, every shard thread counts its allocations with
/// [`CountingAlloc`] (only meaningful in a program that installs it as the global allocator:
/// the relay allocation bench).
pub static COUNT_SHARD_THREADS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

static COUNTED_NET_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
static COUNTED_ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl CountingAlloc {
    /// Runs `f` with this thread's allocations counted.
    pub fn count<T>(f: impl FnOnce() -> T) -> T {
        COUNTING.with(|c| c.set(true));
        let r = f();
        COUNTING.with(|c| c.set(false));
        r
    }

    /// Counts (or stops counting) this thread's allocations from now on.
    pub fn count_this_thread(on: bool) {
        COUNTING.with(|c| c.set(on));
    }

    /// Net bytes allocated (allocated − freed) inside `count` so far.
    pub fn net_bytes() -> i64 {
        COUNTED_NET_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Allocations (including reallocations) made inside `count` so far.
    pub fn allocations() -> u64 {
        COUNTED_ALLOCS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resets both counters.
    pub fn reset() {
        COUNTED_NET_BYTES.store(0, std::sync::atomic::Ordering::Relaxed);
        COUNTED_ALLOCS.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn counting() -> bool {
        COUNTING.try_with(std::cell::Cell::get).unwrap_or(false)
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// GlobalAlloc contract is exactly the system allocator's; the counters are plain atomics.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if Self::counting() {
            COUNTED_NET_BYTES.fetch_add(l.size() as i64, std::sync::atomic::Ordering::Relaxed);
            COUNTED_ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; the caller upholds alloc's contract.
        unsafe { std::alloc::System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if Self::counting() {
            COUNTED_NET_BYTES.fetch_sub(l.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; `p` came from this allocator, i.e. from System.
        unsafe { std::alloc::System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        if Self::counting() {
            COUNTED_NET_BYTES.fetch_add(
                new as i64 - l.size() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
            COUNTED_ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; `p` came from System with layout `l`.
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}
