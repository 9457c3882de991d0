//! The io_uring backend, directly on the `io-uring` crate (see `docs/architecture.md` for why
//! not tokio-uring).
//!
//! * One multishot accept on the shard's own `SO_REUSEPORT` listener, accepting into the
//!   ring's fixed file table (direct descriptors): accepted sockets never occupy a slot of the
//!   process's fd table, so a shard can hold as many connections as its table has slots.
//! * One multishot receive per connection, drawing buffers from a provided-buffer ring: the
//!   kernel picks a buffer only when bytes arrive, so an idle connection holds none. When the
//!   ring runs dry the kernel ends the multishot with `ENOBUFS`; the driver re-arms it on the
//!   next poll, after the shard has recycled buffers (the bytes wait in the socket meanwhile).
//! * A send owns its `Vec` until the completion; short sends are continued here.
//! * Close = cancel everything on the descriptor, wait for those completions, then close the
//!   fixed slot; only then is `Closed` reported.
//! * Detach = cancel the receive, wait for it, install the direct descriptor as a plain one
//!   (`IORING_OP_FIXED_FD_INSTALL`, kernel ≥ 6.8), close the fixed slot. Adopt = put a plain
//!   descriptor into a slot of the table's top [`ADOPT_SLOTS`], which the kernel's own
//!   allocation (accept) never uses (`IORING_REGISTER_FILE_ALLOC_RANGE`), so the two cannot
//!   pick the same slot.
//!
//! This file and `src/sys/` are the only places with `unsafe`.

#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::{
    BufId, ConnKey, Driver, DriverConfig, Event, OpKind, Waker, decode_token, encode_token,
};
use crate::sys::EventFd;

/// Buffer group id of the shard's provided-buffer ring.
const BGID: u16 = 0;
/// Slots at the top of the fixed file table kept for adopted sockets (management connections
/// moved here from another shard), above `DriverConfig::max_connections`; fewer (an eighth
/// of the table, taken from it) when RLIMIT_NOFILE leaves no room above the connections.
pub const ADOPT_SLOTS: u32 = 256;
/// `IORING_REGISTER_FILE_ALLOC_RANGE` (not wrapped by the `io-uring` crate).
const REGISTER_FILE_ALLOC_RANGE: libc::c_uint = 25;

/// Key used for operations that belong to no connection.
const NO_CONN: ConnKey = ConnKey {
    slot: u32::MAX,
    generation: 0,
};

/// A provided-buffer ring: the ring of descriptors shared with the kernel and the buffer
/// memory it points into.
#[derive(Debug)]
struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    bufs: Box<[u8]>,
    buf_size: usize,
    entries: u16,
    /// Our copy of the tail; published to the kernel by [`BufRing::publish`].
    tail: u16,
}

impl BufRing {
    fn new(entries: usize, buf_size: usize) -> io::Result<Self> {
        let entries = u16::try_from(entries)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= 32768)
            .ok_or_else(|| {
                io::Error::other("buffer ring entries must be a power of two ≤ 32768")
            })?;
        let ring_layout =
            Layout::from_size_align(usize::from(entries) * size_of::<BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (entries ≥ 1, 16-byte entries).
        let ring = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut r = Self {
            ring,
            ring_layout,
            bufs: super::receive_buffers(usize::from(entries) * buf_size),
            buf_size,
            entries,
            tail: 0,
        };
        for bid in 0..entries {
            r.push(bid);
        }
        Ok(r)
    }

    /// Puts buffer `bid` at the tail (not yet visible to the kernel).
    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.entries - 1));
        let addr = self.bufs.as_ptr() as u64 + (usize::from(bid) * self.buf_size) as u64;
        // SAFETY: `idx` < entries, so the entry lies inside the ring allocation; the kernel
        // only reads entries between its head and the published tail, and this one is past
        // the published tail until `publish`.
        let entry = unsafe { &mut *self.ring.add(idx) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed buffer visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring base is the first entry of a live, initialised ring; `tail` gives
        // the address of its shared tail field, which the kernel reads and only we write. The
        // field is a naturally aligned u16, so viewing it as an AtomicU16 is sound, and the
        // release store orders the entry writes before the new tail.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut();
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }

    fn buf_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.buf_size;
        &mut self.bufs[start..start + len.min(self.buf_size)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring (and so the kernel's use of
        // this memory) is torn down before the driver's fields are dropped (field order).
        unsafe { dealloc(self.ring.cast(), self.ring_layout) };
    }
}

/// Restricts the kernel's own choice of fixed slots (multishot accept) to `0..accept_slots`,
/// leaving the slots above to [`Driver::adopt`] (kernel ≥ 6.0).
fn reserve_top(ring: &IoUring, accept_slots: u32) -> io::Result<()> {
    #[repr(C)]
    struct FileIndexRange {
        off: u32,
        len: u32,
        resv: u64,
    }
    let range = FileIndexRange {
        off: 0,
        len: accept_slots,
        resv: 0,
    };
    // SAFETY: `io_uring_register(fd, IORING_REGISTER_FILE_ALLOC_RANGE, &range, 0)` reads one
    // `struct io_uring_file_index_range` (the layout above) and keeps no reference to it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            REGISTER_FILE_ALLOC_RANGE,
            (&raw const range).cast::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug)]
struct Conn {
    generation: u32,
    fixed: u32,
    recv_armed: bool,
    paused: bool,
    closing: bool,
    close_submitted: bool,
    /// Being detached: the receive is stopped; the install follows once it has ended.
    detaching: bool,
    install_submitted: bool,
    send: Option<(Vec<u8>, usize)>,
}

/// The io_uring driver. See the module docs.
pub struct UringDriver {
    // Field order matters for drop: the ring is closed before the buffers it points to.
    ring: IoUring,
    bufring: BufRing,
    listener: Option<std::net::TcpListener>,
    accepting: bool,
    accept_armed: bool,
    /// Accept stopped because the fixed table was full; re-arm after a close.
    accept_full: bool,
    wake_fd: Arc<EventFd>,
    wake_armed: bool,
    conns: Vec<Option<Conn>>,
    starved: Vec<ConnKey>,
    deferred: Vec<Event<u32>>,
    /// Completions of one poll, copied out of the ring (reused).
    batch: Vec<(u64, i32, u32)>,
    /// The other half of `starved` (swapped each poll).
    starved_spare: Vec<ConnKey>,
    max_connections: usize,
    /// Peer-address lookups in flight (`SO_PEERNAME` via io_uring getsockopt, kernel ≥ 6.7),
    /// by fixed slot: the kernel writes into the box until the completion.
    peer_lookups: std::collections::HashMap<u32, Box<PeerName>>,
    /// Cleared when the kernel refuses the lookup; accepts then carry no peer address.
    peer_lookup_supported: bool,
    /// Size of the listener family's socket address.
    peer_len: u32,
    /// First slot of the range kept for adopted sockets (`None` when the kernel cannot
    /// restrict its own allocation: adopting is then refused).
    adopt_base: Option<u32>,
    /// Its free slots.
    adopt_free: Vec<u32>,
    /// Cleared when the kernel cannot install a direct descriptor (< 6.8): detaching fails.
    install_supported: bool,
}

/// Room for a peer address written by the kernel.
struct PeerName {
    storage: socket2::SockAddrStorage,
}

impl std::fmt::Debug for UringDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDriver")
            .field("connections", &self.conns.iter().flatten().count())
            .field("accepting", &self.accepting)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw ring pointer inside `BufRing` points into memory owned by the driver; the
// driver is moved to its shard thread once and used only there.
unsafe impl Send for UringDriver {}

impl UringDriver {
    /// Sets up the ring, the fixed file table and the provided-buffer ring.
    pub fn new(cfg: DriverConfig) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(16384)
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(4096)?;
        let wanted = u32::try_from(cfg.max_connections)
            .unwrap_or(u32::MAX)
            .min(u32::MAX - ADOPT_SLOTS);
        // The adoption slots come on top of the connections (the server leaves room for them
        // under RLIMIT_NOFILE); if the table would still exceed it (EMFILE), they are carved
        // out of it.
        let (table, adopt_len) = match ring.submitter().register_files_sparse(wanted + ADOPT_SLOTS)
        {
            Ok(()) => (wanted + ADOPT_SLOTS, ADOPT_SLOTS),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                ring.submitter().register_files_sparse(wanted)?;
                (wanted, ADOPT_SLOTS.min(wanted / 8))
            }
            Err(e) => return Err(e),
        };
        let accept_slots = table - adopt_len;
        let adopt_base = match reserve_top(&ring, accept_slots) {
            Ok(()) if adopt_len > 0 => Some(accept_slots),
            Ok(()) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot keep fixed slots for adoption; not adopting");
                None
            }
        };
        let adopt_free = adopt_base.map_or_else(Vec::new, |b| (b..table).rev().collect());
        let bufring = BufRing::new(cfg.recv_buffers, cfg.recv_buffer_size)?;
        // SAFETY: the ring memory stays valid and unmoved until the driver (and with it the
        // io_uring instance) is dropped; `BufRing` is dropped after `ring` (field order).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufring.ring as u64,
                bufring.entries,
                BGID,
                0,
            )?;
        }
        bufring.publish();
        Ok(Self {
            ring,
            bufring,
            listener: None,
            accepting: true,
            accept_armed: false,
            accept_full: false,
            wake_fd: Arc::new(EventFd::new()?),
            wake_armed: false,
            conns: Vec::new(),
            starved: Vec::new(),
            deferred: Vec::new(),
            batch: Vec::with_capacity(256),
            starved_spare: Vec::new(),
            max_connections: cfg.max_connections,
            peer_lookups: std::collections::HashMap::new(),
            peer_lookup_supported: true,
            peer_len: size_of::<libc::sockaddr_in>() as u32,
            adopt_base,
            adopt_free,
            install_supported: true,
        })
    }

    /// Starts the peer-address lookup of a newly accepted socket; its completion reports
    /// the accept. Without kernel support the accept is reported at once, without address.
    fn lookup_peer(&mut self, fixed: u32, out: &mut Vec<Event<u32>>) {
        if !self.peer_lookup_supported {
            out.push(Event::Accepted {
                sock: fixed,
                peer: None,
            });
            return;
        }
        let mut buf = Box::new(PeerName {
            storage: socket2::SockAddrStorage::zeroed(),
        });
        let ptr = (&raw mut buf.storage).cast::<libc::c_void>();
        let key = ConnKey {
            slot: fixed,
            generation: 0,
        };
        let sqe = opcode::GetSockOpt::new(
            Fixed(fixed),
            libc::SOL_SOCKET as u32,
            libc::SO_PEERNAME as u32,
            ptr,
            // The kernel refuses (EINVAL) a buffer longer than the address, so ask for exactly
            // the listener family's size (a dual-stack IPv6 listener reports IPv4 peers as
            // v4-mapped IPv6 addresses of the same size).
            self.peer_len,
        )
        .build()
        .user_data(encode_token(OpKind::PeerName, key));
        self.peer_lookups.insert(fixed, buf);
        // SAFETY: the box is kept in `peer_lookups` (its heap location does not move) until
        // this operation's completion removes it; the fixed slot stays open until then
        // because the shard has not seen the socket yet.
        unsafe { self.push(sqe) };
    }

    /// Queues one SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every buffer or fd the entry refers to must stay valid until its completion.
    unsafe fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
        }
    }

    fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        match self.conns.get_mut(key.slot as usize) {
            Some(Some(c)) if c.generation == key.generation => Some(c),
            _ => None,
        }
    }

    fn arm_recv(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if c.recv_armed || c.paused || c.closing || c.detaching {
            return;
        }
        c.recv_armed = true;
        let sqe = opcode::RecvMulti::new(Fixed(c.fixed), BGID)
            .build()
            .user_data(encode_token(OpKind::Recv, key));
        // SAFETY: the receive writes only into provided buffers, which live as long as the
        // ring; the fixed slot stays open until our own Close, which waits for this op.
        unsafe { self.push(sqe) };
    }

    fn submit_send(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        let Some((buf, off)) = &c.send else { return };
        let rest = &buf[*off..];
        let sqe = opcode::Send::new(Fixed(c.fixed), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(encode_token(OpKind::Send, key));
        // SAFETY: the Vec is kept in `conn.send` (its heap buffer does not move) until this
        // send's completion takes it out.
        unsafe { self.push(sqe) };
    }

    /// Cancels the multishot receive of `key` (its last completion follows).
    fn cancel_recv(&mut self, key: ConnKey) {
        let sqe =
            opcode::AsyncCancel2::new(CancelBuilder::user_data(encode_token(OpKind::Recv, key)))
                .build()
                .user_data(encode_token(OpKind::Cancel, key));
        // SAFETY: a cancellation refers to no memory.
        unsafe { self.push(sqe) };
    }

    fn cancel_all(&mut self, key: ConnKey, fixed: u32) {
        let sqe = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(fixed)).all())
            .build()
            .user_data(encode_token(OpKind::Cancel, key));
        // SAFETY: a cancellation refers to no memory.
        unsafe { self.push(sqe) };
    }

    /// Submits the close of a closing connection once nothing else is in flight.
    fn maybe_close(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if !c.closing
            || c.close_submitted
            || c.recv_armed
            || c.send.is_some()
            || c.install_submitted
        {
            return;
        }
        c.close_submitted = true;
        let fixed = c.fixed;
        let sqe = opcode::Close::new(Fixed(fixed))
            .build()
            .user_data(encode_token(OpKind::Close, key));
        // SAFETY: closing a fixed slot refers to no memory.
        unsafe { self.push(sqe) };
    }

    /// Submits the install of a detaching connection once its receive has ended.
    fn maybe_install(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if !c.detaching || c.install_submitted || c.recv_armed || c.closing {
            return;
        }
        c.install_submitted = true;
        // Flags 0: the new descriptor is close-on-exec.
        let sqe = opcode::FixedFdInstall::new(Fixed(c.fixed), 0)
            .build()
            .user_data(encode_token(OpKind::Install, key));
        // SAFETY: installing a fixed slot refers to no memory; the slot stays open until the
        // completion (nothing else closes it while detaching).
        unsafe { self.push(sqe) };
    }

    /// Closes fixed slot `fixed` of a connection that has left (detached); the slot is reused
    /// after the completion.
    fn release(&mut self, fixed: u32) {
        let sqe = opcode::Close::new(Fixed(fixed))
            .build()
            .user_data(encode_token(
                OpKind::Release,
                ConnKey {
                    slot: fixed,
                    generation: 0,
                },
            ));
        // SAFETY: closing a fixed slot refers to no memory.
        unsafe { self.push(sqe) };
    }

    /// A fixed slot is free again: an adoption slot goes back to the free list.
    fn slot_freed(&mut self, fixed: u32) {
        if let Some(base) = self.adopt_base {
            if fixed >= base {
                self.adopt_free.push(fixed);
            }
        }
    }

    fn arm_accept(&mut self) {
        let Some(l) = &self.listener else { return };
        if self.accept_armed || !self.accepting || self.accept_full {
            return;
        }
        self.accept_armed = true;
        let sqe = opcode::AcceptMulti::new(Fd(l.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(encode_token(OpKind::Accept, NO_CONN));
        // SAFETY: the listener fd stays open until `close_listener`, which cancels this op
        // first; multishot accept writes no addresses.
        unsafe { self.push(sqe) };
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        self.wake_armed = true;
        let sqe = opcode::PollAdd::new(Fd(self.wake_fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(encode_token(OpKind::Wake, NO_CONN));
        // SAFETY: the eventfd lives in an Arc held by the driver for its whole life.
        unsafe { self.push(sqe) };
    }

    fn complete(&mut self, user_data: u64, res: i32, flags: u32, out: &mut Vec<Event<u32>>) {
        let Some((op, key)) = decode_token(user_data) else {
            return;
        };
        let more = cqueue::more(flags);
        match op {
            OpKind::Accept => {
                if !more {
                    self.accept_armed = false;
                }
                if res >= 0 {
                    self.lookup_peer(res as u32, out);
                } else if res != -libc::ECANCELED {
                    if res == -libc::ENFILE || res == -libc::EMFILE {
                        self.accept_full = true;
                    }
                    out.push(Event::AcceptError(io::Error::from_raw_os_error(-res)));
                }
            }
            OpKind::Recv => {
                let bid = cqueue::buffer_select(flags);
                let live = self.conn_mut(key).map(|c| {
                    if !more {
                        c.recv_armed = false;
                    }
                    (c.closing, c.paused)
                });
                let Some((closing, paused)) = live else {
                    if let Some(bid) = bid {
                        self.recycle(bid);
                    }
                    return;
                };
                if res > 0 {
                    let bid = bid.expect("a successful provided-buffer recv names its buffer");
                    if closing {
                        self.recycle(bid);
                    } else {
                        out.push(Event::Data {
                            key,
                            buf: bid,
                            len: res as usize,
                        });
                        if !more && !paused {
                            self.starved.push(key);
                        }
                    }
                } else {
                    if let Some(bid) = bid {
                        self.recycle(bid);
                    }
                    if res == 0 {
                        if !closing {
                            out.push(Event::Eof { key });
                        }
                    } else if res == -libc::ENOBUFS {
                        if !closing && !paused {
                            self.starved.push(key);
                        }
                    } else if res == -libc::ECANCELED {
                        // Cancelled by a pause that was lifted before the cancellation
                        // completed: receive again.
                        if !closing && !paused && !more {
                            self.starved.push(key);
                        }
                    } else if !closing {
                        out.push(Event::RecvError {
                            key,
                            err: io::Error::from_raw_os_error(-res),
                        });
                    }
                }
                self.maybe_close(key);
                self.maybe_install(key);
            }
            OpKind::Send => {
                let Some(c) = self.conn_mut(key) else { return };
                let closing = c.closing;
                let Some((buf, off)) = c.send.as_mut() else {
                    return;
                };
                if res > 0 {
                    *off += res as usize;
                }
                if res > 0 && *off < buf.len() && !closing {
                    self.submit_send(key);
                    return;
                }
                let (buf, off) = c.send.take().expect("checked above");
                if !closing {
                    let result = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else if off < buf.len() {
                        Err(io::ErrorKind::WriteZero.into())
                    } else {
                        Ok(())
                    };
                    out.push(Event::SendDone { key, buf, result });
                }
                self.maybe_close(key);
            }
            OpKind::Close => {
                if key != NO_CONN {
                    if let Some(c) = self.conn_mut(key) {
                        let fixed = c.fixed;
                        self.conns[key.slot as usize] = None;
                        self.slot_freed(fixed);
                        out.push(Event::Closed { key });
                    }
                }
                self.accept_full = false;
            }
            OpKind::Release => {
                self.slot_freed(key.slot);
                self.accept_full = false;
            }
            OpKind::Install => {
                // SAFETY: a non-negative result is a new descriptor the kernel installed for
                // us; nothing else owns it.
                let fd = (res >= 0).then(|| unsafe { OwnedFd::from_raw_fd(res) });
                let Some(c) = self.conn_mut(key) else { return };
                c.install_submitted = false;
                c.detaching = false;
                if c.closing {
                    // Closed while detaching: the plain descriptor is dropped, the slot closed.
                    drop(fd);
                    self.maybe_close(key);
                    return;
                }
                match fd {
                    Some(fd) => {
                        let fixed = c.fixed;
                        self.conns[key.slot as usize] = None;
                        self.release(fixed);
                        out.push(Event::Detached {
                            key,
                            result: Ok(fd),
                        });
                    }
                    None => {
                        if matches!(-res, libc::EINVAL | libc::EOPNOTSUPP) {
                            tracing::debug!("io_uring cannot install direct descriptors here");
                            self.install_supported = false;
                        }
                        out.push(Event::Detached {
                            key,
                            result: Err(io::Error::from_raw_os_error(-res)),
                        });
                        self.arm_recv(key);
                    }
                }
            }
            OpKind::Wake => {
                if !more {
                    self.wake_armed = false;
                }
                self.wake_fd.drain();
                out.push(Event::Wake);
            }
            OpKind::PeerName => {
                let fixed = key.slot;
                let Some(buf) = self.peer_lookups.remove(&fixed) else {
                    return;
                };
                let peer = if res >= 0 {
                    // SAFETY: the kernel wrote a socket address of `peer_len` bytes into the
                    // storage, which is large enough for any address family.
                    let addr = unsafe { socket2::SockAddr::new(buf.storage, self.peer_len) };
                    addr.as_socket()
                } else {
                    if matches!(-res, libc::EOPNOTSUPP | libc::EINVAL) {
                        tracing::debug!("io_uring getsockopt unsupported; no peer addresses");
                        self.peer_lookup_supported = false;
                    }
                    None
                };
                out.push(Event::Accepted { sock: fixed, peer });
            }
            OpKind::Cancel | OpKind::AcceptCancel => {}
        }
    }
}

impl Driver for UringDriver {
    type Socket = u32;

    fn name(&self) -> &'static str {
        "uring"
    }

    fn listen(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.peer_len = if listener.local_addr()?.is_ipv6() {
            size_of::<libc::sockaddr_in6>() as u32
        } else {
            size_of::<libc::sockaddr_in>() as u32
        };
        self.listener = Some(listener);
        self.arm_accept();
        Ok(())
    }

    fn set_accepting(&mut self, on: bool) {
        self.accepting = on;
        if on {
            self.arm_accept();
        } else if self.accept_armed {
            let sqe = opcode::AsyncCancel2::new(CancelBuilder::user_data(encode_token(
                OpKind::Accept,
                NO_CONN,
            )))
            .build()
            .user_data(encode_token(OpKind::AcceptCancel, NO_CONN));
            // SAFETY: a cancellation refers to no memory.
            unsafe { self.push(sqe) };
        }
    }

    fn close_listener(&mut self) {
        self.set_accepting(false);
        // The cancelled accept holds its own reference to the file; dropping ours is safe.
        self.listener = None;
    }

    fn poll(&mut self, out: &mut Vec<Event<u32>>, timeout: Option<Duration>) -> io::Result<()> {
        out.append(&mut self.deferred);
        // Swapped with a spare list, so neither is re-allocated per poll.
        let mut starved = std::mem::take(&mut self.starved_spare);
        std::mem::swap(&mut starved, &mut self.starved);
        for key in starved.drain(..) {
            self.arm_recv(key);
        }
        self.starved_spare = starved;
        self.arm_accept();
        self.arm_wake();
        self.bufring.publish();

        let wait = if out.is_empty() { 1 } else { 0 };
        let res = match timeout {
            _ if wait == 0 => self.ring.submit(),
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        // The completions are copied out first (completing may push new submissions); the
        // batch Vec is kept between polls, so polling allocates nothing.
        let mut batch = std::mem::take(&mut self.batch);
        loop {
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags()))
                    .take(4096),
            );
            if batch.is_empty() {
                break;
            }
            for &(ud, res, flags) in &batch {
                self.complete(ud, res, flags, out);
            }
        }
        self.batch = batch;
        out.append(&mut self.deferred);
        Ok(())
    }

    fn attach(&mut self, key: ConnKey, sock: u32) -> io::Result<()> {
        let slot = key.slot as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        self.conns[slot] = Some(Conn {
            generation: key.generation,
            fixed: sock,
            recv_armed: false,
            paused: false,
            closing: false,
            close_submitted: false,
            detaching: false,
            install_submitted: false,
            send: None,
        });
        self.arm_recv(key);
        Ok(())
    }

    fn reject(&mut self, sock: u32) {
        let sqe = opcode::Close::new(Fixed(sock))
            .build()
            .user_data(encode_token(OpKind::Close, NO_CONN));
        // SAFETY: closing a fixed slot refers to no memory.
        unsafe { self.push(sqe) };
    }

    fn pause_recv(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if c.paused {
            return;
        }
        c.paused = true;
        if c.recv_armed {
            self.cancel_recv(key);
        }
    }

    fn resume_recv(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if !c.paused {
            return;
        }
        c.paused = false;
        self.arm_recv(key);
    }

    fn send(&mut self, key: ConnKey, buf: Vec<u8>) {
        let Some(c) = self.conn_mut(key).filter(|c| !c.closing) else {
            self.deferred.push(Event::SendDone {
                key,
                buf,
                result: Err(io::ErrorKind::NotConnected.into()),
            });
            return;
        };
        debug_assert!(c.send.is_none(), "one send in flight per connection");
        if buf.is_empty() {
            self.deferred.push(Event::SendDone {
                key,
                buf,
                result: Ok(()),
            });
            return;
        }
        c.send = Some((buf, 0));
        self.submit_send(key);
    }

    fn close(&mut self, key: ConnKey) {
        let Some(c) = self.conn_mut(key) else { return };
        if c.closing {
            return;
        }
        c.closing = true;
        let (busy, fixed) = (c.recv_armed || c.send.is_some(), c.fixed);
        if busy {
            self.cancel_all(key, fixed);
        }
        self.maybe_close(key);
    }

    fn buf_mut(&mut self, buf: BufId, len: usize) -> &mut [u8] {
        self.bufring.buf_mut(buf, len)
    }

    fn recycle(&mut self, buf: BufId) {
        self.bufring.push(buf);
    }

    fn waker(&self) -> Waker {
        Waker::new(self.wake_fd.clone())
    }

    fn detach(&mut self, key: ConnKey) {
        let supported = self.install_supported;
        let refusal = match self.conn_mut(key) {
            None => Some(io::Error::from(io::ErrorKind::NotConnected)),
            Some(c) if c.closing || c.detaching => Some(io::Error::other(
                "the connection is closing or already detaching",
            )),
            Some(c) if c.send.is_some() => Some(io::Error::other("a send is in flight")),
            Some(_) if !supported => Some(io::Error::from(io::ErrorKind::Unsupported)),
            Some(c) => {
                c.detaching = true;
                if c.recv_armed {
                    self.cancel_recv(key);
                }
                None
            }
        };
        match refusal {
            Some(e) => self.deferred.push(Event::Detached {
                key,
                result: Err(e),
            }),
            None => self.maybe_install(key),
        }
    }

    fn adopt(&mut self, key: ConnKey, fd: OwnedFd) -> io::Result<()> {
        let Some(fixed) = self.adopt_free.pop() else {
            return Err(io::Error::other(if self.adopt_base.is_none() {
                "this kernel cannot keep fixed slots for adopted sockets"
            } else {
                "every fixed slot for adopted sockets is in use"
            }));
        };
        if let Err(e) = self
            .ring
            .submitter()
            .register_files_update(fixed, &[fd.as_raw_fd()])
        {
            self.adopt_free.push(fixed);
            return Err(e);
        }
        // The table holds its own reference to the socket now.
        drop(fd);
        self.attach(key, fixed)
    }
}

impl UringDriver {
    /// Most connections this driver's fixed file table holds.
    pub fn capacity(&self) -> usize {
        self.max_connections
    }
}
