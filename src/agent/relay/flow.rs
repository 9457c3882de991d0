//! Plumbing between the session thread and the stream and worker threads: the two outbound
//! lanes (control before bulk), the waker, send credit, and a stream's context.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};

use crate::proto::envelope::{ErrorBody, Kind};

/// Largest data piece the agent sends (`docs/protocol.md` §6.2: send data in 16 KiB pieces).
pub const DATA_PIECE: usize = 16 * 1024;

/// One envelope on its way out, not yet encoded.
#[derive(Debug)]
pub(crate) struct OutMsg {
    pub kind: Kind,
    pub route: u64,
    pub channel: u32,
    pub body: Vec<u8>,
}

/// The sending side of the session's outbound lanes, cloned into every stream and worker
/// thread. Sends block while a lane is full (the session thread drains them).
#[derive(Clone)]
pub(crate) struct Outbound {
    control: SyncSender<OutMsg>,
    bulk: SyncSender<OutMsg>,
    waker: Arc<UnixStream>,
}

/// The receiving side, kept by the session thread.
pub(crate) struct Lanes {
    pub control: Receiver<OutMsg>,
    pub bulk: Receiver<OutMsg>,
    pub waker: UnixStream,
}

/// Capacity of the control lane (messages).
const CONTROL_LANE: usize = 1024;
/// Capacity of the bulk lane (messages of at most 16 KiB).
const BULK_LANE: usize = 32;

/// The two lanes and the waker.
pub(crate) fn lanes() -> std::io::Result<(Outbound, Lanes)> {
    let (control_tx, control_rx) = std::sync::mpsc::sync_channel(CONTROL_LANE);
    let (bulk_tx, bulk_rx) = std::sync::mpsc::sync_channel(BULK_LANE);
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    Ok((
        Outbound {
            control: control_tx,
            bulk: bulk_tx,
            waker: Arc::new(wake_tx),
        },
        Lanes {
            control: control_rx,
            bulk: bulk_rx,
            waker: wake_rx,
        },
    ))
}

impl Outbound {
    /// Wakes the session thread (something else for it is ready).
    pub fn wake(&self) {
        // A full socket buffer means the session thread is woken anyway.
        let _ = (&*self.waker).write(&[1]);
    }

    /// Queues `msg` on the control lane; false when the session is gone.
    pub fn control(&self, msg: OutMsg) -> bool {
        let ok = self.control.send(msg).is_ok();
        self.wake();
        ok
    }

    /// Queues `msg` on the bulk lane; false when the session is gone.
    pub fn bulk(&self, msg: OutMsg) -> bool {
        let ok = self.bulk.send(msg).is_ok();
        self.wake();
        ok
    }
}

/// Credit to send: the peer's window plus its `credit` messages, minus the data sent.
#[derive(Debug, Default)]
pub(crate) struct SendCredit {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl SendCredit {
    pub fn new(initial: u32) -> SendCredit {
        SendCredit {
            state: Mutex::new((u64::from(initial), false)),
            cv: Condvar::new(),
        }
    }

    /// The peer granted `n` more bytes.
    pub fn grant(&self, n: u32) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.saturating_add(u64::from(n));
        self.cv.notify_all();
    }

    /// The stream is over: wakes a waiting sender for good.
    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 = true;
        self.cv.notify_all();
    }

    /// Waits for credit and takes up to `max` bytes of it; `None` when closed.
    pub fn take(&self, max: usize) -> Option<usize> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.1 {
                return None;
            }
            if s.0 > 0 {
                let n = (max as u64).min(s.0);
                s.0 -= n;
                return Some(n as usize);
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Credit available now (tests, diagnostics).
    #[cfg(test)]
    pub fn available(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// What the session thread hands a stream thread.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Data from the peer (within the credit the stream granted).
    Data(Vec<u8>),
    /// The peer sent `close`: no more data from it.
    Close,
    /// The management side's terminal changed size (`terminal.resize`); streams other than
    /// terminals ignore it.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// The sending half of a stream: data within the peer's credit, `close`, `reset`. Cloned
/// into a stream's output thread.
#[derive(Clone)]
pub(crate) struct StreamSender {
    out: Outbound,
    credit: Arc<SendCredit>,
    route: u64,
    channel: u32,
}

impl StreamSender {
    fn msg(&self, kind: Kind, body: Vec<u8>) -> OutMsg {
        OutMsg {
            kind,
            route: self.route,
            channel: self.channel,
            body,
        }
    }

    /// Sends `reset {"error": {code, message}}`.
    pub fn reset(&self, code: &str, message: impl Into<String>) {
        let body = serde_json::json!({
            "error": ErrorBody { code: code.into(), message: message.into() }
        })
        .to_string();
        self.out.control(self.msg(Kind::Reset, body.into_bytes()));
    }

    /// Sends `close` with `body` after every data message sent before (same lane).
    pub fn close(&self, body: serde_json::Value) -> bool {
        self.out
            .bulk(self.msg(Kind::Close, body.to_string().into_bytes()))
    }

    /// Sends `bytes` as data within the peer's credit (waiting for credit, in pieces of at
    /// most 16 KiB). False when the stream or the session is gone.
    pub fn send_data(&self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let Some(n) = self.credit.take(bytes.len().min(DATA_PIECE)) else {
                return false;
            };
            if !self.out.bulk(self.msg(Kind::Data, bytes[..n].to_vec())) {
                return false;
            }
            bytes = &bytes[n..];
        }
        true
    }
}

/// A stream thread's handle on its stream: sends to the peer (echoing route and channel),
/// counts consumed bytes and grants credit.
pub(crate) struct StreamCtx {
    tx: StreamSender,
    granted: Arc<AtomicU64>,
    window: u32,
    unacknowledged: u64,
}

impl std::ops::Deref for StreamCtx {
    type Target = StreamSender;
    fn deref(&self) -> &StreamSender {
        &self.tx
    }
}

impl StreamCtx {
    /// A sender for another thread.
    pub fn sender(&self) -> StreamSender {
        self.tx.clone()
    }

    /// Sends `accept {"window": W}` (the receive window this agent grants).
    pub fn accept(&self) -> bool {
        let body = serde_json::json!({ "window": self.window }).to_string();
        self.tx
            .out
            .control(self.tx.msg(Kind::Accept, body.into_bytes()))
    }

    /// `n` received bytes were consumed; grants credit once half the window is consumed.
    pub fn consumed(&mut self, n: usize) {
        self.unacknowledged += n as u64;
        if self.unacknowledged >= u64::from(self.window / 2).max(1) {
            let grant = self.unacknowledged.min(u64::from(u32::MAX)) as u32;
            self.unacknowledged -= u64::from(grant);
            // Counted before it is sent, so the session never sees data beyond it.
            self.granted.fetch_add(u64::from(grant), Ordering::SeqCst);
            self.tx
                .out
                .control(self.tx.msg(Kind::Credit, grant.to_be_bytes().to_vec()));
        }
    }
}

/// Something the session thread calls when a stream ends early (kill the shell, shut the
/// socket down).
pub(crate) type CancelHook = Box<dyn FnOnce() + Send>;

/// The session thread's record of an open stream. Dropping it ends the stream's threads:
/// the inbound channel disconnects, the send credit closes and the cancel hook runs.
pub(crate) struct StreamEntry {
    inbound: Option<SyncSender<Inbound>>,
    credit: Arc<SendCredit>,
    granted: Arc<AtomicU64>,
    received: u64,
    /// The peer sent `close`.
    pub remote_closed: bool,
    /// This agent sent `close`.
    pub local_closed: bool,
    cancel: Option<CancelHook>,
}

/// Capacity of a stream's inbound channel (messages; bytes are bounded by the window).
const INBOUND: usize = 1024;

/// Why an inbound message could not be delivered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Deliver {
    /// Delivered (or dropped because the stream thread already finished).
    Ok,
    /// The peer sent more than the credit granted (or too many small pieces).
    Overrun,
}

/// A new stream: the session's entry, the thread's context and its inbound receiver.
pub(crate) fn stream(
    route: u64,
    channel: u32,
    out: &Outbound,
    send_window: u32,
    recv_window: u32,
) -> (StreamEntry, StreamCtx, Receiver<Inbound>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(INBOUND);
    let credit = Arc::new(SendCredit::new(send_window));
    let granted = Arc::new(AtomicU64::new(u64::from(recv_window)));
    (
        StreamEntry {
            inbound: Some(tx),
            credit: credit.clone(),
            granted: granted.clone(),
            received: 0,
            remote_closed: false,
            local_closed: false,
            cancel: None,
        },
        StreamCtx {
            tx: StreamSender {
                route,
                channel,
                out: out.clone(),
                credit,
            },
            granted,
            window: recv_window,
            unacknowledged: 0,
        },
        rx,
    )
}

impl StreamEntry {
    /// Sets what to do when the stream ends early.
    pub fn on_cancel(&mut self, hook: CancelHook) {
        self.cancel = Some(hook);
    }

    /// The peer granted more credit.
    pub fn credit(&self, n: u32) {
        self.credit.grant(n);
    }

    /// Hands data to the stream thread, checking the peer stays within the credit granted.
    pub fn data(&mut self, bytes: &[u8]) -> Deliver {
        self.received += bytes.len() as u64;
        if self.received > self.granted.load(Ordering::SeqCst) {
            return Deliver::Overrun;
        }
        self.send(Inbound::Data(bytes.to_vec()))
    }

    /// Hands a new terminal size to the stream thread.
    pub fn resize(&mut self, cols: u16, rows: u16) -> Deliver {
        self.send(Inbound::Resize { cols, rows })
    }

    /// Hands the peer's `close` to the stream thread.
    pub fn close(&mut self) -> Deliver {
        self.remote_closed = true;
        self.send(Inbound::Close)
    }

    fn send(&mut self, m: Inbound) -> Deliver {
        match self.inbound.as_ref().map(|tx| tx.try_send(m)) {
            Some(Err(TrySendError::Full(_))) => Deliver::Overrun,
            _ => Deliver::Ok,
        }
    }
}

impl Drop for StreamEntry {
    fn drop(&mut self) {
        self.inbound = None;
        self.credit.close();
        if let Some(hook) = self.cancel.take() {
            hook();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_never_exceeded() {
        let (out, lanes) = lanes().unwrap();
        let (mut entry, mut ctx, rx) = stream(1, 2, &out, 40_000, 1000);
        let sender = std::thread::spawn(move || {
            assert!(ctx.send_data(&[7u8; 50_000]));
            ctx.consumed(400);
            ctx.consumed(200); // half the window: a credit of 600
            ctx
        });
        let mut total = 0;
        while total < 40_000 {
            let m = lanes.bulk.recv().unwrap();
            assert_eq!((m.kind, m.route, m.channel), (Kind::Data, 1, 2));
            assert!(m.body.len() <= DATA_PIECE);
            total += m.body.len();
        }
        assert_eq!(total, 40_000, "stops at the window");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(lanes.bulk.try_recv().is_err(), "waits for credit");
        entry.credit(10_000);
        let m = lanes.bulk.recv().unwrap();
        assert_eq!(m.body.len(), 10_000);
        let ctx = sender.join().unwrap();
        let c = lanes.control.recv().unwrap();
        assert_eq!(
            (c.kind, c.body.as_slice()),
            (Kind::Credit, &600u32.to_be_bytes()[..])
        );
        // Inbound: within 1000 + 600 granted.
        assert_eq!(entry.data(&[0; 1600]), Deliver::Ok);
        assert!(matches!(rx.try_recv(), Ok(Inbound::Data(d)) if d.len() == 1600));
        assert_eq!(entry.data(&[0; 1]), Deliver::Overrun);
        assert_eq!(ctx.tx.credit.available(), 0);
        drop(entry);
        assert!(ctx.tx.credit.take(1).is_none(), "closed with the entry");
    }
}
