//! The epoll backend (through mio), for kernels or containers without io_uring.
//!
//! It emulates the io_uring driver's contract: received bytes land in driver-owned buffers
//! from a fixed pool (so an idle connection holds none), sends are owned until complete, and
//! `close` reports `Closed` exactly once. Sockets are edge-triggered; a connection whose read
//! was cut short (budget spent, pool empty, paused) is remembered and read again on the next
//! poll without waiting for a new edge.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::{BufId, ConnKey, Driver, DriverConfig, Event, Waker};
use crate::sys::EventFd;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Bytes read from one connection per poll before others get their turn.
const READ_BUDGET: usize = 256 * 1024;

#[derive(Debug)]
struct Conn {
    generation: u32,
    stream: TcpStream,
    paused: bool,
    /// A send in progress: the buffer and how much of it is written.
    send: Option<(Vec<u8>, usize)>,
}

/// The epoll driver. See the module docs.
#[derive(Debug)]
pub struct EpollDriver {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    accepting: bool,
    wake_fd: Arc<EventFd>,
    conns: Vec<Option<Conn>>,
    /// Receive buffers, `buf_size` bytes each, in one allocation (pages are touched only
    /// when used); `free` lists the ones not lent out, most recently returned last so hot
    /// buffers are reused first.
    bufs: Box<[u8]>,
    buf_size: usize,
    free: Vec<BufId>,
    /// Connections to read again without a new edge.
    pending_read: VecDeque<ConnKey>,
    /// Events produced outside `poll` (immediate sends, closes).
    deferred: Vec<Event<TcpStream>>,
    max_connections: usize,
}

impl EpollDriver {
    /// Creates the driver with `cfg.recv_buffers` receive buffers of `cfg.recv_buffer_size`.
    pub fn new(cfg: DriverConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let wake_fd = Arc::new(EventFd::new()?);
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&*wake_fd)),
            WAKER,
            Interest::READABLE,
        )?;
        let n = cfg.recv_buffers.min(usize::from(u16::MAX));
        Ok(Self {
            poll,
            events: Events::with_capacity(1024),
            listener: None,
            accepting: true,
            wake_fd,
            conns: Vec::new(),
            bufs: super::receive_buffers(n * cfg.recv_buffer_size),
            buf_size: cfg.recv_buffer_size,
            free: (0..n as u16).rev().collect(),
            pending_read: VecDeque::new(),
            deferred: Vec::new(),
            max_connections: cfg.max_connections,
        })
    }

    fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        match self.conns.get_mut(key.slot as usize) {
            Some(Some(c)) if c.generation == key.generation => Some(c),
            _ => None,
        }
    }

    fn accept_loop(&mut self, out: &mut Vec<Event<TcpStream>>) {
        let Some(listener) = &self.listener else {
            return;
        };
        if !self.accepting {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => out.push(Event::Accepted {
                    sock: stream,
                    peer: Some(peer),
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: report once and wait for the next edge or
                    // for `set_accepting(true)` to retry.
                    out.push(Event::AcceptError(e));
                    break;
                }
            }
        }
    }

    /// Reads from `key` until WouldBlock, EOF, error, the budget, or no free buffer.
    fn read_conn(&mut self, key: ConnKey, out: &mut Vec<Event<TcpStream>>) {
        let mut budget = READ_BUDGET;
        loop {
            let Some(conn) = self
                .conns
                .get_mut(key.slot as usize)
                .and_then(Option::as_mut)
            else {
                return;
            };
            if conn.generation != key.generation || conn.paused {
                return;
            }
            if budget == 0 {
                self.pending_read.push_back(key);
                return;
            }
            let Some(id) = self.free.pop() else {
                self.pending_read.push_back(key);
                return;
            };
            let start = usize::from(id) * self.buf_size;
            let buf = &mut self.bufs[start..start + self.buf_size];
            match conn.stream.read(buf) {
                Ok(0) => {
                    self.free.push(id);
                    out.push(Event::Eof { key });
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    out.push(Event::Data {
                        key,
                        buf: id,
                        len: n,
                    });
                }
                Err(e) => {
                    self.free.push(id);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            out.push(Event::RecvError { key, err: e });
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Writes as much of the pending send as the socket takes; reports completion.
    fn write_conn(&mut self, key: ConnKey, out: &mut Vec<Event<TcpStream>>) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        let Some((buf, mut off)) = conn.send.take() else {
            return;
        };
        loop {
            if off == buf.len() {
                out.push(Event::SendDone {
                    key,
                    buf,
                    result: Ok(()),
                });
                return;
            }
            match conn.stream.write(&buf[off..]) {
                Ok(0) => {
                    out.push(Event::SendDone {
                        key,
                        buf,
                        result: Err(io::ErrorKind::WriteZero.into()),
                    });
                    return;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.send = Some((buf, off));
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    out.push(Event::SendDone {
                        key,
                        buf,
                        result: Err(e),
                    });
                    return;
                }
            }
        }
    }
}

impl Driver for EpollDriver {
    type Socket = TcpStream;

    fn name(&self) -> &'static str {
        "epoll"
    }

    fn listen(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut l = TcpListener::from_std(listener);
        self.poll
            .registry()
            .register(&mut l, LISTENER, Interest::READABLE)?;
        self.listener = Some(l);
        Ok(())
    }

    fn set_accepting(&mut self, on: bool) {
        let was = self.accepting;
        self.accepting = on;
        if on && !was {
            // The edge may have passed while we were not accepting: try at once.
            let mut out = Vec::new();
            self.accept_loop(&mut out);
            self.deferred.append(&mut out);
        }
    }

    fn close_listener(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accepting = false;
    }

    fn poll(
        &mut self,
        out: &mut Vec<Event<TcpStream>>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        out.append(&mut self.deferred);
        let mut timeout = timeout;
        if !out.is_empty() || !self.pending_read.is_empty() {
            timeout = Some(Duration::ZERO);
        }
        // Connections cut short last time read again first (bounded to those queued now).
        for _ in 0..self.pending_read.len() {
            if let Some(key) = self.pending_read.pop_front() {
                self.read_conn(key, out);
            }
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let ready: Vec<(Token, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token(),
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable() || e.is_write_closed(),
                )
            })
            .collect();
        for (token, readable, writable) in ready {
            match token {
                LISTENER => self.accept_loop(out),
                WAKER => {
                    self.wake_fd.drain();
                    out.push(Event::Wake);
                }
                Token(t) => {
                    let key = ConnKey {
                        slot: t as u32,
                        generation: ((t >> 32) as u32) & ConnKey::GENERATION_MASK,
                    };
                    if writable {
                        self.write_conn(key, out);
                    }
                    if readable {
                        self.read_conn(key, out);
                    }
                }
            }
        }
        Ok(())
    }

    fn attach(&mut self, key: ConnKey, mut sock: TcpStream) -> io::Result<()> {
        let slot = key.slot as usize;
        if slot >= self.max_connections {
            return Err(io::Error::other("connection slot beyond max_connections"));
        }
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        let token = Token(((key.generation as usize) << 32) | slot);
        self.poll
            .registry()
            .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = sock.set_nodelay(true);
        self.conns[slot] = Some(Conn {
            generation: key.generation,
            stream: sock,
            paused: false,
            send: None,
        });
        // Bytes may already be waiting (the client spoke first): read without an edge.
        self.pending_read.push_back(key);
        Ok(())
    }

    fn reject(&mut self, sock: TcpStream) {
        drop(sock);
    }

    fn pause_recv(&mut self, key: ConnKey) {
        if let Some(c) = self.conn_mut(key) {
            c.paused = true;
        }
    }

    fn resume_recv(&mut self, key: ConnKey) {
        if let Some(c) = self.conn_mut(key) {
            if c.paused {
                c.paused = false;
                self.pending_read.push_back(key);
            }
        }
    }

    fn send(&mut self, key: ConnKey, buf: Vec<u8>) {
        let Some(conn) = self.conn_mut(key) else {
            self.deferred.push(Event::SendDone {
                key,
                buf,
                result: Err(io::ErrorKind::NotConnected.into()),
            });
            return;
        };
        debug_assert!(conn.send.is_none(), "one send in flight per connection");
        conn.send = Some((buf, 0));
        let mut out = Vec::new();
        self.write_conn(key, &mut out);
        self.deferred.append(&mut out);
    }

    fn close(&mut self, key: ConnKey) {
        let slot = key.slot as usize;
        if let Some(Some(c)) = self.conns.get(slot) {
            if c.generation == key.generation {
                let mut c = self.conns[slot].take().expect("checked above");
                let _ = self.poll.registry().deregister(&mut c.stream);
                drop(c);
                self.deferred.push(Event::Closed { key });
            }
        }
    }

    fn buf_mut(&mut self, buf: BufId, len: usize) -> &mut [u8] {
        let start = usize::from(buf) * self.buf_size;
        &mut self.bufs[start..start + len]
    }

    fn recycle(&mut self, buf: BufId) {
        self.free.push(buf);
    }

    fn waker(&self) -> Waker {
        Waker::new(self.wake_fd.clone())
    }

    fn detach(&mut self, key: ConnKey) {
        let result = match self.conn_mut(key) {
            None => Err(io::ErrorKind::NotConnected.into()),
            Some(c) if c.send.is_some() => Err(io::Error::other("a send is in flight")),
            Some(_) => {
                let mut c = self.conns[key.slot as usize].take().expect("checked above");
                let _ = self.poll.registry().deregister(&mut c.stream);
                Ok(std::os::fd::OwnedFd::from(c.stream))
            }
        };
        self.deferred.push(Event::Detached { key, result });
    }

    fn adopt(&mut self, key: ConnKey, fd: std::os::fd::OwnedFd) -> io::Result<()> {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        self.attach(key, TcpStream::from_std(stream))
    }
}
