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
//! * [`Driver::detach`] takes a connection out of the driver with its socket, for another
//!   shard's driver to [`Driver::adopt`] (a management connection moved to a shard that has
//!   none). It is asked with no send in flight; receives that completed before the receive was
//!   stopped still arrive as [`Event::Data`], then exactly one [`Event::Detached`]. After a
//!   successful detach the key gets no more events (no `Closed`: the slot is free at once);
//!   after a failed one the connection stays, receiving again.

pub mod epoll;
pub mod probe;
pub mod uring;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
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
    /// Installing a direct descriptor as a plain one (detach).
    Install = 9,
    /// Closing the direct descriptor of a detached connection (`slot` = the fixed slot).
    Release = 10,
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
        9 => OpKind::Install,
        10 => OpKind::Release,
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
    /// A [`Driver::detach`] finished: the socket, now the caller's (the key is free), or why
    /// it could not be taken out (the connection stays, receiving again).
    Detached {
        /// The connection.
        key: ConnKey,
        /// Its socket as a plain descriptor.
        result: io::Result<OwnedFd>,
    },
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

    /// Stops receiving on `key` and takes its socket out of the driver; completes with
    /// [`Event::Detached`]. Only with no send in flight (see the module docs).
    fn detach(&mut self, key: ConnKey);

    /// Takes a socket another driver detached, under `key`, and starts receiving on it.
    fn adopt(&mut self, key: ConnKey, fd: OwnedFd) -> io::Result<()>;
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

    /// Polls `d` until `done` says so (5 s at most), handing each event to `on`.
    fn poll_until<D: Driver>(d: &mut D, mut on: impl FnMut(&mut D, Event<D::Socket>) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut events = Vec::new();
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: timed out",
                d.name()
            );
            d.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            let mut done = false;
            for ev in events.drain(..) {
                done |= on(d, ev);
            }
            if done {
                return;
            }
        }
    }

    /// A connection moves from one driver to another (two shards): bytes that arrived before
    /// the detach are reported by the first, everything after by the second, nothing lost or
    /// reordered; the second sends and closes it.
    fn detach_then_adopt<D: Driver>(mut a: D, mut b: D) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        a.listen(l).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let key = ConnKey {
            slot: 5,
            generation: 9,
        };
        let mut got = Vec::new();
        poll_until(&mut a, |d, ev| match ev {
            Event::Accepted { sock, .. } => {
                d.attach(key, sock).unwrap();
                io::Write::write_all(&mut client, b"one,").unwrap();
                false
            }
            Event::Data { key: k, buf, len } => {
                assert_eq!(k, key);
                got.extend_from_slice(d.buf_mut(buf, len));
                d.recycle(buf);
                got.len() == 4
            }
            other => panic!("unexpected {other:?}"),
        });
        a.send(key, b"sent by a,".to_vec());
        poll_until(&mut a, |_, ev| match ev {
            Event::SendDone { result, .. } => {
                result.unwrap();
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        // Racing the detach: these may be reported by either driver.
        io::Write::write_all(&mut client, b"two,").unwrap();
        a.detach(key);
        let mut fd = None;
        poll_until(&mut a, |d, ev| match ev {
            Event::Data { key: k, buf, len } => {
                assert_eq!(k, key);
                got.extend_from_slice(d.buf_mut(buf, len));
                d.recycle(buf);
                false
            }
            Event::Detached { key: k, result } => {
                assert_eq!(k, key);
                fd = Some(result.expect("detached"));
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        let other = ConnKey {
            slot: 2,
            generation: 1,
        };
        b.adopt(other, fd.unwrap()).unwrap();
        io::Write::write_all(&mut client, b"three").unwrap();
        poll_until(&mut b, |d, ev| match ev {
            Event::Data { key: k, buf, len } => {
                assert_eq!(k, other);
                got.extend_from_slice(d.buf_mut(buf, len));
                d.recycle(buf);
                got.len() == b"one,two,three".len()
            }
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(got, b"one,two,three", "{}", b.name());
        b.send(other, b"sent by b".to_vec());
        poll_until(&mut b, |d, ev| match ev {
            Event::SendDone { result, .. } => {
                result.unwrap();
                d.close(other);
                false
            }
            Event::Closed { key: k } => {
                assert_eq!(k, other);
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        // The first driver reports nothing more for the key it gave away.
        let mut events = Vec::new();
        a.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        assert!(events.is_empty(), "{events:?}");
        let mut rest = Vec::new();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        io::Read::read_to_end(&mut client, &mut rest).unwrap();
        assert_eq!(rest, b"sent by a,sent by b");
    }

    /// A detach the driver cannot do (here: asked with a send in flight) is reported, and the
    /// connection keeps receiving where it is.
    fn refused_detach_keeps_the_connection<D: Driver>(mut d: D) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        d.listen(l).unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let key = ConnKey {
            slot: 1,
            generation: 1,
        };
        poll_until(&mut d, |d, ev| match ev {
            Event::Accepted { sock, .. } => {
                d.attach(key, sock).unwrap();
                true
            }
            other => panic!("unexpected {other:?}"),
        });
        // Larger than the socket buffers, so the send is still in flight at the detach.
        d.send(key, vec![7u8; 32 << 20]);
        d.detach(key);
        let mut refused = false;
        let mut sent = false;
        let mut got = Vec::new();
        let mut drained = 0usize;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut events = Vec::new();
        client.set_nonblocking(true).unwrap();
        while !(refused && sent && got == b"still here") {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: timed out",
                d.name()
            );
            let mut sink = [0u8; 65536];
            while let Ok(n) = io::Read::read(&mut client, &mut sink) {
                if n == 0 {
                    break;
                }
                drained += n;
            }
            d.poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
            for ev in events.drain(..) {
                match ev {
                    Event::Detached { key: k, result } => {
                        assert_eq!(k, key);
                        assert!(
                            result.is_err(),
                            "{}: detached with a send in flight",
                            d.name()
                        );
                        refused = true;
                        io::Write::write_all(&mut client, b"still here").unwrap();
                    }
                    Event::SendDone { result, .. } => {
                        result.unwrap();
                        sent = true;
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
        assert!(drained > 0);
    }

    #[test]
    fn epoll_driver_refuses_a_detach_it_cannot_do() {
        refused_detach_keeps_the_connection(epoll::EpollDriver::new(cfg()).unwrap());
    }

    #[test]
    fn uring_driver_refuses_a_detach_it_cannot_do() {
        refused_detach_keeps_the_connection(uring::UringDriver::new(cfg()).unwrap());
    }

    #[test]
    fn epoll_driver_hands_a_connection_to_another() {
        detach_then_adopt(
            epoll::EpollDriver::new(cfg()).unwrap(),
            epoll::EpollDriver::new(cfg()).unwrap(),
        );
    }

    #[test]
    fn uring_driver_hands_a_connection_to_another() {
        detach_then_adopt(
            uring::UringDriver::new(cfg()).unwrap(),
            uring::UringDriver::new(cfg()).unwrap(),
        );
    }

    /// A socket taken into the table's adoption slots frees its slot when closed: more
    /// adoptions than there are slots succeed one after another.
    #[test]
    fn uring_adoption_slots_are_reused() {
        let mut d = uring::UringDriver::new(cfg()).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for i in 0..uring::ADOPT_SLOTS + 8 {
            let c = std::net::TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            let key = ConnKey {
                slot: i % 4,
                generation: i,
            };
            d.adopt(key, OwnedFd::from(s)).unwrap();
            d.close(key);
            poll_until(
                &mut d,
                |_, ev| matches!(ev, Event::Closed { key: k } if k == key),
            );
            drop(c);
        }
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
