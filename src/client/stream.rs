//! Streams (§6.6): the reader grants credit as it consumes, the writer waits for credit.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::io::{Cmd, Link, Reply};
use super::{CHUNK, ClientError, envelope};
use crate::proto::envelope::Kind;

/// What the I/O thread hands a stream's reader.
pub(crate) enum Incoming {
    /// Bytes from the device.
    Data(Vec<u8>),
    /// The device's half-close and its body.
    Close(Value),
    /// Reset, device down or connection lost.
    Failed(ClientError),
}

/// Why a stream can no longer carry data (a cloneable [`ClientError`] subset).
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The device reset it.
    Remote { code: String, message: String },
    /// `device_down`.
    DeviceDown(String),
    /// The connection is gone.
    Closed(String),
    /// This side reset it.
    Local,
}

impl Failure {
    fn error(&self) -> ClientError {
        match self.clone() {
            Failure::Remote { code, message } => ClientError::Remote { code, message },
            Failure::DeviceDown(u) => ClientError::DeviceDown(u),
            Failure::Closed(r) => ClientError::Closed(r),
            Failure::Local => ClientError::Protocol("the stream was reset by this side".into()),
        }
    }
}

#[derive(Debug, Default)]
struct SendState {
    /// Bytes we may still send.
    credit: u64,
    /// Why the stream cannot carry data any more.
    failed: Option<Failure>,
}

/// Send credit shared by the writer (waits) and the I/O thread (grants).
#[derive(Debug, Default)]
pub(crate) struct StreamShared {
    state: Mutex<SendState>,
    cv: Condvar,
}

impl StreamShared {
    pub(crate) fn grant(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.credit = s.credit.saturating_add(n);
        self.cv.notify_all();
    }

    pub(crate) fn fail(&self, why: Failure) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.failed.is_none() {
            s.failed = Some(why);
        }
        self.cv.notify_all();
    }

    /// Waits for credit; takes up to `want` bytes of it.
    fn take(&self, want: usize) -> Result<usize, ClientError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(f) = &s.failed {
                return Err(f.error());
            }
            if s.credit > 0 {
                let n = (want as u64).min(s.credit) as usize;
                s.credit -= n as u64;
                return Ok(n);
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Credit available now (for tests and diagnostics).
    fn credit(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).credit
    }
}

/// Registers the stream with the I/O thread and sends its `open`; returns the handle and the
/// channel the `accept` (or failure) arrives on.
pub(crate) fn open(
    link: Arc<Link>,
    id: u32,
    unit: &str,
    window: u32,
    frame: Vec<u8>,
) -> Result<(StreamHandle, Receiver<Result<Value, ClientError>>), ClientError> {
    let shared = Arc::new(StreamShared::default());
    let (in_tx, in_rx): (Sender<Incoming>, _) = channel();
    let (acc_tx, acc_rx): (Reply, _) = channel();
    link.send(Cmd::Open {
        id,
        unit: unit.to_owned(),
        frame,
        shared: shared.clone(),
        incoming: in_tx,
        accept: acc_tx,
    })?;
    let ends = Arc::new(Ends {
        link,
        id,
        unit: unit.to_owned(),
    });
    Ok((
        StreamHandle {
            reader: StreamReader {
                ends: ends.clone(),
                rx: in_rx,
                buf: Vec::new(),
                pos: 0,
                window,
                consumed: 0,
                closed: None,
            },
            writer: StreamWriter {
                ends,
                shared,
                closed: false,
            },
            accept: Value::Null,
        },
        acc_rx,
    ))
}

/// What both halves need to send.
#[derive(Debug)]
struct Ends {
    link: Arc<Link>,
    id: u32,
    unit: String,
}

impl Ends {
    fn send(&self, kind: Kind, body: &[u8]) -> Result<(), ClientError> {
        self.link.send(Cmd::Send {
            frame: envelope(kind, self.id, &self.unit, body),
        })
    }

    fn reset(&self, code: &str, message: &str) {
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        let _ = self.send(Kind::Reset, body.to_string().as_bytes());
    }
}

/// An open stream. Use it directly, or [`split`](StreamHandle::split) it to read and write
/// from two threads.
#[derive(Debug)]
pub struct StreamHandle {
    reader: StreamReader,
    writer: StreamWriter,
    /// The device's `accept` body.
    pub(crate) accept: Value,
}

impl StreamHandle {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.writer.ends.id
    }

    /// The device's `accept` body (`{"window": …}`).
    pub fn accept(&self) -> &Value {
        &self.accept
    }

    /// The two halves.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    /// See [`StreamReader::read`].
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ClientError> {
        self.reader.read(buf)
    }

    /// See [`StreamWriter::write_all`].
    pub fn write_all(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(data)
    }

    /// See [`StreamWriter::close`].
    pub fn close(&mut self, body: Value) -> Result<(), ClientError> {
        self.writer.close(body)
    }

    /// Aborts the stream in both directions (`reset` with `code`).
    pub fn reset(&self, code: &str, message: &str) {
        self.writer.ends.reset(code, message);
    }
}

/// The receiving half: bytes from the device, granting credit as they are consumed.
#[derive(Debug)]
pub struct StreamReader {
    ends: Arc<Ends>,
    rx: Receiver<Incoming>,
    buf: Vec<u8>,
    pos: usize,
    window: u32,
    consumed: u64,
    closed: Option<Value>,
}

impl StreamReader {
    /// Reads bytes from the device, waiting for them. `Ok(0)` once the device has closed its
    /// side ([`close_body`](Self::close_body) then has its `close` body). Grants the device
    /// more credit each time half the window has been consumed.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, ClientError> {
        self.read_inner(out, None)
    }

    /// [`read`](Self::read) waiting at most `timeout` ([`ClientError::Timeout`]).
    pub fn read_timeout(
        &mut self,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, ClientError> {
        self.read_inner(out, Some(timeout))
    }

    fn read_inner(
        &mut self,
        out: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, ClientError> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos >= self.buf.len() {
            if self.closed.is_some() {
                return Ok(0);
            }
            let next = match timeout {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(t) => self.rx.recv_timeout(t),
            };
            match next {
                Ok(Incoming::Data(d)) => {
                    self.buf = d;
                    self.pos = 0;
                }
                Ok(Incoming::Close(v)) => self.closed = Some(v),
                Ok(Incoming::Failed(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ClientError::Timeout(timeout.unwrap_or_default()));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ClientError::Closed(self.ends.link.close_reason()));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.consumed += n as u64;
        if self.consumed >= u64::from(self.window / 2) {
            let grant = self.consumed.min(u64::from(u32::MAX)) as u32;
            self.consumed -= u64::from(grant);
            // Best effort: a dead link shows on the next read.
            let _ = self.ends.send(Kind::Credit, &grant.to_be_bytes());
        }
        Ok(n)
    }

    /// Waits (up to `timeout`) for the device's `close` and returns its body, discarding any
    /// data still arriving. A `reset` is an error.
    pub fn wait_close(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut sink = [0u8; 4096];
        loop {
            if let Some(v) = &self.closed {
                return Ok(v.clone());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            match self.read_timeout(&mut sink, left) {
                Ok(_) => {}
                Err(ClientError::Timeout(_)) => return Err(ClientError::Timeout(timeout)),
                Err(e) => return Err(e),
            }
        }
    }

    /// The device's `close` body, once [`read`](Self::read) returned 0.
    pub fn close_body(&self) -> Option<&Value> {
        self.closed.as_ref()
    }

    /// A failure already delivered (reset, device down), without waiting.
    pub fn take_error(&mut self) -> Option<ClientError> {
        loop {
            match self.rx.try_recv() {
                Ok(Incoming::Failed(e)) => return Some(e),
                Ok(Incoming::Close(v)) => self.closed = Some(v),
                Ok(Incoming::Data(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            }
        }
    }
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        StreamReader::read(self, buf).map_err(std::io::Error::other)
    }
}

/// The sending half: waits for credit, sends 16 KiB pieces in the bulk lane.
#[derive(Debug)]
pub struct StreamWriter {
    ends: Arc<Ends>,
    shared: Arc<StreamShared>,
    closed: bool,
}

impl StreamWriter {
    /// Sends up to 16 KiB of `data`, waiting until the device has granted credit; returns how
    /// many bytes were sent (never more than the credit).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, ClientError> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.closed {
            return Err(ClientError::Protocol("write after close".into()));
        }
        let n = self.shared.take(data.len().min(CHUNK))?;
        self.ends.send(Kind::Data, &data[..n])?;
        Ok(n)
    }

    /// Sends all of `data` (in pieces of at most 16 KiB, as credit allows).
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            let n = self.write(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Half-closes: no more data from this side (`close` with `body`, normally
    /// `{"ok": true}`).
    pub fn close(&mut self, body: Value) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.ends.send(Kind::Close, body.to_string().as_bytes())
    }

    /// Aborts the stream in both directions (`reset` with `code`).
    pub fn reset(&self, code: &str, message: &str) {
        self.ends.reset(code, message);
    }

    /// Bytes the device will accept now without more credit.
    pub fn credit(&self) -> u64 {
        self.shared.credit()
    }
}

impl std::io::Write for StreamWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        StreamWriter::write(self, buf).map_err(std::io::Error::other)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
