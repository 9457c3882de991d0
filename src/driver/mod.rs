//! The I/O drivers: the only place that talks to io_uring or epoll.
//!
//! A shard owns one driver. The shard asks for operations (arm a receive, send a buffer,
//! close a connection) and the driver reports what happened as [`Event`]s. Each operation
//! exists once with an io_uring form ([`uring::UringDriver`]) and an epoll form
//! ([`epoll::EpollDriver`]); both produce the same events, so the shard loop — and every
//! integration test — is the same on both backends.
//!
//! Contracts the shard relies on:
//! * Received bytes arrive in driver-owned buffers ([`Event::Data`]); the shard reads them
//!   with [`Driver::buf_mut`] (it may modify them: TLS decrypts in place) and must give each
//!   back with [`Driver::recycle`] before the next [`Driver::poll`]. An idle connection holds
//!   no receive buffer: with io_uring the kernel picks one from the provided-buffer ring only
//!   when bytes arrive.
//! * At most one [`Driver::send`] per connection is in flight; the driver owns the `Vec` until
//!   [`Event::SendDone`] hands it back (the kernel may read it until then), and sends all of
//!   it (short writes are continued inside the driver).
//! * After [`Driver::close`] the shard gets no more events for that key except exactly one
//!   [`Event::Closed`], once every in-flight operation has finished and the socket is closed.
//!   Only then may the shard reuse the connection's slot.

pub mod epoll;
pub mod probe;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::sys::EventFd;

/// Identifies a connection of one shard: its slab slot and the slot's generation, so that a
/// completion for a connection that is gone (and whose slot was reused) is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Index into the shard's connection slab.
    pub slot: u32,
    /// Generation of the slot (24 bits are carried through the kernel).
    pub generation: u32,
}

impl ConnKey {
    /// Mask of the generation bits that fit in a token.
    pub const GENERATION_MASK: u32 = 0x00ff_ffff;
}

/// What an operation was, carried in the token so a completion can be dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Multishot accept on the listener.
    Accept = 1,
    /// Multishot receive on a connection.
    Recv = 2,
    /// A send on a connection.
    Send = 3,
    /// Cancellation of a connection's operations.
    Cancel = 4,
    /// Closing a connection's socket.
    Close = 5,
    /// Poll on the wake-up eventfd.
    Wake = 6,
    /// Cancellation of the accept.
    AcceptCancel = 7,
    /// A lookup of the peer address (io_uring direct descriptors).
    PeerName = 8,
}

/// The receive buffers of a shard, with every page touched now.
///
/// They are a fixed cost (`recv_buffers_per_shard × recv_buffer_size`, 8.25 MiB per shard with
/// the defaults) that `fleetgate sizing` counts from the start. Untouched, they would enter the
/// resident set one page at a time as traffic reaches them, and that growth would look like
/// buffering during the first heavy transfer after start-up. The value written is arbitrary:
/// each buffer is overwritten by a receive before it is read.
pub fn receive_buffers(len: usize) -> Box<[u8]> {
    let mut bufs = vec![0u8; len].into_boxed_slice();
    for b in bufs.iter_mut().step_by(4096) {
        *b = 0xA5;
    }
    std::hint::black_box(&bufs);
    bufs
}

/// `user_data` / mio token layout: `op:8 | generation:24 | slot:32`.
pub fn encode_token(op: OpKind, key: ConnKey) -> u64 {
    ((op as u64) << 56)
        | (u64::from(key.generation & ConnKey::GENERATION_MASK) << 32)
        | u64::from(key.slot)
}

/// Inverse of [`encode_token`]; `None` for an unknown op byte.
pub fn decode_token(token: u64) -> Option<(OpKind, ConnKey)> {
    let op = match (token >> 56) as u8 {
        1 => OpKind::Accept,
        2 => OpKind::Recv,
        3 => OpKind::Send,
        4 => OpKind::Cancel,
        5 => OpKind::Close,
        6 => OpKind::Wake,
        7 => OpKind::AcceptCancel,
        8 => OpKind::PeerName,
        _ => return None,
    };
    let key = ConnKey {
        slot: token as u32,
        generation: ((token >> 32) as u32) & ConnKey::GENERATION_MASK,
    };
    Some((op, key))
}

/// A receive buffer owned by the driver, lent to the shard between [`Event::Data`] and
/// [`Driver::recycle`].
pub type BufId = u16;

/// Something that happened on the driver.
#[derive(Debug)]
pub enum Event<S> {
    /// A new connection; hand it to [`Driver::attach`] or [`Driver::reject`].
    Accepted {
        /// The driver's handle for the socket.
        sock: S,
        /// The peer's address (`None` only if the kernel cannot tell: io_uring before 6.7).
        peer: Option<SocketAddr>,
    },
    /// Accepting failed (the listener keeps going unless the error says otherwise).
    AcceptError(io::Error),
    /// `len` bytes arrived for `key` in buffer `buf`.
    Data {
        /// The connection.
        key: ConnKey,
        /// The buffer holding them (recycle it).
        buf: BufId,
        /// How many bytes.
        len: usize,
    },
    /// The peer closed its sending side (orderly TCP FIN).
    Eof {
        /// The connection.
        key: ConnKey,
    },
    /// Receiving failed (reset, …).
    RecvError {
        /// The connection.
        key: ConnKey,
        /// The cause.
        err: io::Error,
    },
    /// A send finished: the whole buffer was sent, or it failed.
    SendDone {
        /// The connection.
        key: ConnKey,
        /// The buffer, back to its owner.
        buf: Vec<u8>,
        /// Ok when every byte was handed to the kernel.
        result: io::Result<()>,
    },
    /// The connection is closed and every operation on it has finished.
    Closed {
        /// The connection.
        key: ConnKey,
    },
    /// The waker was notified.
    Wake,
}

/// Wakes a shard's loop from another thread.
#[derive(Debug, Clone)]
pub struct Waker {
    fd: Arc<EventFd>,
}

impl Waker {
    /// Wraps an eventfd.
    pub fn new(fd: Arc<EventFd>) -> Self {
        Self { fd }
    }

    /// Wakes the loop (cheap; coalesces).
    pub fn wake(&self) {
        self.fd.notify();
    }
}

/// Sizes a driver is built with.
#[derive(Debug, Clone, Copy)]
pub struct DriverConfig {
    /// Most connections (the io_uring fixed file table size).
    pub max_connections: usize,
    /// Size of one receive buffer.
    pub recv_buffer_size: usize,
    /// Number of receive buffers (power of two).
    pub recv_buffers: usize,
}

/// The operations of a backend. See the module docs for the contracts.
pub trait Driver {
    /// The driver's handle for an accepted socket.
    type Socket: std::fmt::Debug;

    /// Which backend this is ("uring" or "epoll"), for logs and metrics.
    fn name(&self) -> &'static str;

    /// Starts accepting on `listener` (non-blocking, SO_REUSEPORT, already listening).
    fn listen(&mut self, listener: std::net::TcpListener) -> io::Result<()>;

    /// Stops or resumes accepting (connection limit reached, shutdown).
    fn set_accepting(&mut self, on: bool);

    /// Stops accepting for good and closes the listener.
    fn close_listener(&mut self);

    /// Waits for events (at most `timeout`; `None` = until something happens) and appends
    /// them to `out`.
    fn poll(
        &mut self,
        out: &mut Vec<Event<Self::Socket>>,
        timeout: Option<Duration>,
    ) -> io::Result<()>;

    /// Takes ownership of an accepted socket under `key` and starts receiving on it.
    fn attach(&mut self, key: ConnKey, sock: Self::Socket) -> io::Result<()>;

    /// Closes an accepted socket that was not attached (no events follow).
    fn reject(&mut self, sock: Self::Socket);

    /// Stops receiving on `key` until [`Driver::resume_recv`] (backpressure).
    fn pause_recv(&mut self, key: ConnKey);

    /// Resumes receiving on `key`.
    fn resume_recv(&mut self, key: ConnKey);

    /// Sends all of `buf` on `key`; completes with [`Event::SendDone`].
    fn send(&mut self, key: ConnKey, buf: Vec<u8>);

    /// Closes `key`; completes with [`Event::Closed`].
    fn close(&mut self, key: ConnKey);

    /// The bytes of a lent receive buffer.
    fn buf_mut(&mut self, buf: BufId, len: usize) -> &mut [u8];

    /// Gives a lent receive buffer back.
    fn recycle(&mut self, buf: BufId);

    /// A handle that wakes this driver's [`Driver::poll`] from another thread.
    fn waker(&self) -> Waker;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accept, echo one message through the driver's own buffers and sends, close: the same
    /// contract on both backends.
    fn accept_recv_send_close<D: Driver>(mut d: D) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        d.listen(l).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let mut events = Vec::new();
        let key = ConnKey {
            slot: 3,
            generation: 7,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut attached = false;
        let mut got = Vec::new();
        while got.len() < 5 {
            assert!(std::time::Instant::now() < deadline, "timed out");
            d.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            for ev in events.drain(..) {
                match ev {
                    Event::Accepted { sock, peer } => {
                        assert_eq!(
                            peer,
                            Some(client.local_addr().unwrap()),
                            "{}: the peer address is reported",
                            d.name()
                        );
                        d.attach(key, sock).unwrap();
                        attached = true;
                        io::Write::write_all(&mut client, b"hello").unwrap();
                    }
                    Event::Data { key: k, buf, len } => {
                        assert_eq!(k, key);
                        got.extend_from_slice(d.buf_mut(buf, len));
                        d.recycle(buf);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(attached);
        assert_eq!(got, b"hello");
        d.send(key, b"world".to_vec());
        d.close(key);
        let mut closed = false;
        while !closed {
            assert!(std::time::Instant::now() < deadline, "timed out");
            d.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            for ev in events.drain(..) {
                match ev {
                    Event::Closed { key: k } => {
                        assert_eq!(k, key);
                        closed = true;
                    }
                    Event::SendDone { .. } => {}
                    other => panic!("after close: unexpected {other:?}"),
                }
            }
        }
        let mut rest = Vec::new();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = io::Read::read_to_end(&mut client, &mut rest);
        // The close cancels what is in flight; what was sent arrives whole or not at all.
        assert!(rest.is_empty() || rest == b"world", "{rest:?}");
    }

    fn cfg() -> DriverConfig {
        DriverConfig {
            max_connections: 64,
            recv_buffer_size: 4096,
            recv_buffers: 16,
        }
    }

    #[test]
    fn epoll_driver_contract() {
        accept_recv_send_close(epoll::EpollDriver::new(cfg()).unwrap());
    }

    #[test]
    fn uring_driver_contract() {
        accept_recv_send_close(uring::UringDriver::new(cfg()).unwrap());
    }

    #[test]
    fn tokens_round_trip_and_truncate_generation() {
        let key = ConnKey {
            slot: 0xdead_beef,
            generation: 0x0123_4567,
        };
        let (op, back) = decode_token(encode_token(OpKind::Send, key)).unwrap();
        assert_eq!(op, OpKind::Send);
        assert_eq!(back.slot, key.slot);
        assert_eq!(back.generation, 0x0023_4567);
        assert!(decode_token(0).is_none());
    }
}
