//! One client connection: TLS, then HTTP requests, then (after an upgrade) WebSocket.
//!
//! The connection is driven by its shard with received bytes, end-of-stream, timer checks and
//! shutdown; it never touches a socket. What it wants sent accumulates in [`Conn::out`]
//! (ciphertext), and [`Conn::after`] tells the shard whether to keep going, close once the
//! output is flushed, or drop the connection at once.
//!
//! Phases, named for what they expect next:
//! `Handshake` → `ExpectRequest` (keep-alive requests loop here) → `Open` (WebSocket) →
//! `Closing` (we sent a close frame, waiting for the peer's) → `Draining` (flush, then TCP
//! close). Failures jump to `Draining` with a last message (HTTP error status or WebSocket
//! close code), or drop the connection when nothing useful can be said (TLS errors, timeouts
//! before the handshake).

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;

use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};

use crate::buf::{self, VecPool};
use crate::control::{Kick, RegisterOutcome, Revocations};
use crate::metrics::{ErrorKind, Onboarding, ShardStats};
use crate::proto::device::{self as dev, Message as DevMessage};
use crate::proto::http::{self, HttpLimits, Method, Parsed, RequestHead};
use crate::proto::ws::{self, CloseCode, DataKind, Decoder, OpCode, Role as WsRole, WsLimits};
use crate::registry::Reason;
use crate::status::StatusCell;
use crate::tls::TlsSession;

/// Which WebSocket endpoint a connection upgraded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/usg/endpoint`: a device.
    Device,
    /// `/usg/management`: a management server.
    Management,
    /// `/usg/echo`: the diagnostic echo (only with `enable_echo`).
    Echo,
}

/// Path of the device endpoint (SPEC.md).
pub const DEVICE_PATH: &str = "/usg/endpoint";
/// Path of the management endpoint.
pub const MANAGEMENT_PATH: &str = "/usg/management";
/// Path of the diagnostic echo endpoint.
pub const ECHO_PATH: &str = "/usg/echo";
/// Path of the status check (SPEC.md).
pub const STATUS_PATH: &str = "/usg/check-status";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// WebSocket subprotocols we accept, in our order of preference.
pub const SUBPROTOCOLS: &[&str] = &["fleetgate.v1"];

/// Data encrypted per `pump_bulk` turn: the loop stops once 64 KiB are sealed, so this holds
/// that, one more recommended-size frame and the record overhead, without growing.
const BULK_OUTPUT: usize = BULK_TURN + buf::ENVELOPE + 1024;

/// Bytes of queued data frames encrypted per `pump_bulk` turn.
const BULK_TURN: usize = 64 * 1024;
/// At most this many queued frames are sealed in one turn (a bound for the stack array that
/// gathers them; small frames in the bulk lane are rare: a stream's `close` behind its data).
const TURN_FRAMES: usize = 32;

/// Limits and timeouts a shard applies to every connection (from the config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// HTTP head limits.
    pub http: HttpLimits,
    /// WebSocket size limits.
    pub ws: WsLimits,
    /// TLS handshake deadline from accept.
    pub handshake_timeout_ms: u64,
    /// Request head deadline from the end of the handshake / the previous response.
    pub head_timeout_ms: u64,
    /// Silence after which the gateway pings.
    pub ping_after_ms: u64,
    /// Silence after which the gateway closes.
    pub idle_timeout_ms: u64,
    /// How long to wait for the peer's close frame, and for output to drain.
    pub close_timeout_ms: u64,
    /// Requests per keep-alive connection.
    pub max_requests: u32,
    /// Serve `/usg/echo`.
    pub enable_echo: bool,
    /// Output bytes queued per connection above which reading pauses.
    pub max_queued_output: usize,
    /// How long a device in register mode has to send `register`.
    pub registration_timeout_ms: u64,
    /// Base of the retry hint for devices refused by the connection limit (ms).
    pub limit_retry_after_ms: u64,
}

impl Settings {
    /// Derives the settings from the configuration.
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            http: HttpLimits {
                max_head_bytes: c.http.max_head_bytes,
                max_headers: c.http.max_headers,
            },
            ws: WsLimits {
                max_frame_size: c.websocket.max_frame_size,
                max_message_size: c.websocket.max_message_size,
            },
            handshake_timeout_ms: c.tls.handshake_timeout_ms,
            head_timeout_ms: c.http.head_timeout_ms,
            ping_after_ms: c.websocket.ping_after_secs * 1000,
            idle_timeout_ms: c.websocket.idle_timeout_secs * 1000,
            close_timeout_ms: c.websocket.close_timeout_ms,
            max_requests: c.http.max_requests_per_connection,
            enable_echo: c.server.enable_echo,
            max_queued_output: c.limits.max_queued_output,
            registration_timeout_ms: c.registration.timeout_ms,
            limit_retry_after_ms: c.limits.limit_retry_after_secs * 1000,
        }
    }
}

/// Everything a connection needs from its shard while handling an input.
pub struct Cx<'a> {
    /// Milliseconds on the shard's monotonic clock.
    pub now_ms: u64,
    /// Limits and timeouts.
    pub settings: &'a Settings,
    /// This shard's counters.
    pub stats: &'a ShardStats,
    /// Every shard's counters (for `/metrics`).
    pub all_stats: &'a [ShardStats],
    /// The cached health.
    pub status: &'a StatusCell,
    /// Backend name (for `/metrics`).
    pub driver: &'static str,
    /// Reusable plaintext buffers of the shard.
    pub scratch: &'a mut Vec<u8>,
    /// Plaintext waiting to be encrypted (shard-owned, empty between calls).
    pub staged: &'a mut Vec<u8>,
    /// Output buffers.
    pub pool: &'a mut VecPool,
    /// Relay data frames waiting in bulk lanes (sized to fit, kept apart from `pool`'s large
    /// output buffers so a queued 16 KiB frame never pins a 256 KiB buffer).
    pub frame_pool: &'a mut VecPool,
    /// Registration and session figures, the device limit.
    pub onboarding: &'a Onboarding,
    /// Credentials that must not open a session.
    pub revocations: &'a Revocations,
    /// Issuer names of the gateway's client-certificate CAs.
    pub client_cas: &'a ClientCas,
}

/// The subjects (DER) of the device CA and the management CA: a client certificate's issuer
/// says which kind it is.
#[derive(Debug, Clone, Default)]
pub struct ClientCas {
    /// The device CA's subject.
    pub device: Vec<u8>,
    /// The management CA's subject.
    pub management: Vec<u8>,
}

impl ClientCas {
    /// The issuers of device and management certificates, from the two CA certificates.
    pub fn new(device_ca: &CertificateDer<'_>, management_ca: Option<&CertificateDer<'_>>) -> Self {
        Self {
            device: subject_of(device_ca),
            management: management_ca.map(subject_of).unwrap_or_default(),
        }
    }
}

/// The subject name (DER) of a CA certificate: what its certificates carry as issuer.
fn subject_of(cert: &CertificateDer<'_>) -> Vec<u8> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .unwrap_or_default()
}

/// An authenticated device session (kept on the connection until it closes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSession {
    /// SHA-256 of the device certificate.
    pub fingerprint: [u8; 32],
    /// The unit ID (certificate CN).
    pub unit_id: Box<str>,
    /// Routes of the management connections that opened streams to this device (usually
    /// none or one): each is told `management_down` when its connection goes.
    pub stream_routes: Vec<u64>,
}

/// Something the connection needs the shard (or the registrar) to do.
#[derive(Debug)]
pub enum Request {
    /// Decide this registration (send it to the registrar).
    Register(Box<dev::Register>),
    /// A session was admitted: index it, tell the registrar.
    SessionUp,
    /// A management connection was admitted.
    ManagementUp,
    /// A malformed registration message (throttling and audit).
    BadRegistration,
    /// A session was refused (audit).
    SessionRefused {
        /// Certificate CN.
        unit_id: Box<str>,
        /// Why.
        reason: Reason,
    },
}

/// What an open WebSocket is for.
#[derive(Debug)]
enum Role {
    Echo,
    /// An authenticated management server (relay).
    Management,
    /// Register mode: collecting the `register` message (`msg`), then waiting for the registrar.
    Registering {
        msg: Vec<u8>,
        waiting: bool,
    },
    /// Session mode: an authenticated device.
    Device,
    /// Refused or answered: only the close handshake remains.
    Done,
}

/// What the shard should do with the connection after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keep it; send `out` if any.
    Continue,
    /// Send what is in `out`, then close.
    CloseAfterFlush,
    /// Close now, dropping any output.
    Abort,
}

#[derive(Debug)]
struct Open {
    role: Role,
    decoder: Decoder,
    pinged: bool,
    /// The relay envelope being received (device sessions and management only).
    env: Vec<u8>,
}

#[derive(Debug)]
enum Phase {
    Handshake,
    ExpectRequest { head: Vec<u8>, served: u32 },
    Open(Open),
    Closing(Open),
    Draining,
}

/// A connection. See the module docs.
#[derive(Debug)]
pub struct Conn {
    tls: TlsSession,
    phase: Phase,
    /// Ciphertext waiting to be sent (no allocation when empty and idle).
    pub out: Vec<u8>,
    /// A send is in flight (its length), owned by the driver.
    pub in_flight: usize,
    /// Reading is paused for backpressure.
    pub paused: bool,
    /// Paused because another shard's mesh inbox was full (resumed by the shard).
    pub stalled: bool,
    /// Paused because the gateway was over its memory budget (resumed by the shard).
    pub budget_paused: bool,
    /// The bytes of this connection counted in the shard's `relay_buffered` gauge.
    pub accounted: usize,
    /// Counted in the shard's handshakes-in-progress (accept pacing) until it leaves the
    /// handshake for any reason (done, EOF, timeout, close).
    pub handshake_counted: bool,
    /// The shard has asked the driver to close it.
    pub closing: bool,
    /// Where the connection is going (see [`After`]).
    after: After,
    /// When the current phase began (ms).
    since_ms: u64,
    /// When a byte last arrived (ms).
    last_rx_ms: u64,
    /// Timer-wheel tick of the earliest pending hint (u64::MAX = none).
    pub hint_tick: u64,
    /// The endpoint counted in the gauges, to uncount on close.
    counted: Option<Endpoint>,
    /// Ask TLS to append close_notify after the current output.
    want_close_notify: bool,
    /// The peer's address (for the registrar: rate limits, audit).
    pub peer: Option<IpAddr>,
    /// The authenticated device session, once admitted (until the connection is gone).
    session: Option<Box<DeviceSession>>,
    /// Work for the shard (taken after each input).
    request: Option<Request>,
    /// Complete relay envelopes received, for the shard to route.
    pub relay_in: Vec<Vec<u8>>,
    /// Relay data frames (plaintext WebSocket frames) waiting behind control output.
    /// Each entry: a buffer and where its frame starts in it (an envelope turned into a frame
    /// in place, [`Conn::deliver_in_place`], starts after its old header).
    bulk: std::collections::VecDeque<(Vec<u8>, usize)>,
    /// Bytes in `bulk`.
    pub bulk_bytes: usize,
    /// A management connection (admitted), for event broadcasts and routing checks.
    management: Option<Box<str>>,
}

impl Conn {
    /// A connection accepted at `now_ms`, about to receive a ClientHello.
    pub fn new(tls: TlsSession, now_ms: u64) -> Self {
        Self {
            tls,
            phase: Phase::Handshake,
            out: Vec::new(),
            in_flight: 0,
            paused: false,
            stalled: false,
            budget_paused: false,
            accounted: 0,
            handshake_counted: false,
            closing: false,
            after: After::Continue,
            since_ms: now_ms,
            last_rx_ms: now_ms,
            hint_tick: u64::MAX,
            counted: None,
            want_close_notify: false,
            peer: None,
            session: None,
            request: None,
            relay_in: Vec::new(),
            bulk: std::collections::VecDeque::new(),
            bulk_bytes: 0,
            management: None,
        }
    }

    /// The name of the management connection, once admitted.
    pub fn management(&self) -> Option<&str> {
        self.management.as_deref()
    }

    /// True when relay envelopes can be delivered (an open session or management link).
    pub fn accepts_relay(&self) -> bool {
        self.after == After::Continue
            && matches!(
                &self.phase,
                Phase::Open(Open {
                    role: Role::Device | Role::Management,
                    ..
                })
            )
    }

    /// Queues a relay envelope for this peer as one WebSocket binary message: control kinds
    /// are encrypted at once (they overtake queued data), data waits in the bulk lane.
    /// Returns false when the connection cannot take it (closing).
    pub fn deliver(
        &mut self,
        header: &crate::proto::envelope::Header<'_>,
        body: &[u8],
        cx: &mut Cx<'_>,
    ) -> bool {
        if !self.accepts_relay() {
            return false;
        }
        let write = |out: &mut Vec<u8>| {
            let len = header.len() + body.len();
            let mut h = [0u8; ws::MAX_HEADER_LEN];
            let n = ws::encode_header(true, OpCode::Binary, None, len as u64, &mut h);
            out.extend_from_slice(&h[..n]);
            header.write(out);
            out.extend_from_slice(body);
        };
        // A stream's close must not overtake that stream's queued data: while data is waiting
        // it queues behind it (a reset, which aborts, still goes first).
        let behind_data =
            header.kind == crate::proto::envelope::Kind::Close && !self.bulk.is_empty();
        if header.kind.is_bulk() || behind_data {
            let need = ws::MAX_HEADER_LEN + header.len() + body.len();
            let mut frame = cx.frame_pool.take_fitting(need);
            frame.clear();
            write(&mut frame);
            self.bulk_bytes += frame.len();
            self.bulk.push_back((frame, 0));
            self.pump_bulk(cx);
        } else {
            write(cx.staged);
            self.send_plain(cx);
        }
        true
    }

    /// Queues a `data` envelope for a device without copying it: the envelope's own buffer
    /// becomes the WebSocket frame. The device form of the header (no unit) is shorter than
    /// the management form by the unit's length, which leaves room for the frame header in
    /// front of it. `at` is where the body starts in `env`. Gives `env` back (`Err`) when the
    /// unit is too short for that; the caller then copies ([`Conn::deliver`]).
    pub fn deliver_in_place(
        &mut self,
        header: &crate::proto::envelope::Header<'_>,
        mut env: Vec<u8>,
        at: usize,
        cx: &mut Cx<'_>,
    ) -> Result<(), Vec<u8>> {
        if !self.accepts_relay()
            || header.kind != crate::proto::envelope::Kind::Data
            || !header.unit.is_empty()
        {
            return Err(env);
        }
        let hlen = header.len();
        let len = hlen + (env.len() - at);
        let mut h = [0u8; ws::MAX_HEADER_LEN];
        let n = ws::encode_header(true, OpCode::Binary, None, len as u64, &mut h);
        let Some(start) = at.checked_sub(hlen + n) else {
            return Err(env);
        };
        env[start..start + n].copy_from_slice(&h[..n]);
        // The device form: kind, 0, unit length 0, channel, route (docs/protocol.md §6.1).
        debug_assert_eq!(
            hlen,
            crate::proto::envelope::FIXED_HEADER,
            "device form: no unit"
        );
        let head = &mut env[start + n..at];
        head[..4].copy_from_slice(&[header.kind as u8, 0, 0, 0]);
        head[4..8].copy_from_slice(&header.channel.to_be_bytes());
        head[8..16].copy_from_slice(&header.route.to_be_bytes());
        self.bulk_bytes += env.len() - start;
        self.bulk.push_back((env, start));
        self.pump_bulk(cx);
        Ok(())
    }

    /// Encrypts queued data frames when nothing else is waiting to be sent (at most ~64 KiB
    /// at a time, so control output never waits behind more than that).
    pub fn pump_bulk(&mut self, cx: &mut Cx<'_>) {
        if self.in_flight > 0 || !self.out.is_empty() || self.after == After::Abort {
            return;
        }
        if self.bulk.is_empty() {
            return;
        }
        // `out` is empty here: swap a small one for one with room for the whole turn.
        if self.out.capacity() < BULK_OUTPUT {
            cx.pool.give(std::mem::take(&mut self.out));
            self.out = cx.pool.take_min(BULK_OUTPUT);
        }
        // The turn's frames are sealed together, into full records.
        let mut parts: [&[u8]; TURN_FRAMES] = [&[]; TURN_FRAMES];
        let (mut n, mut budget) = (0, BULK_TURN);
        for (frame, start) in self.bulk.iter().take(TURN_FRAMES) {
            if budget == 0 {
                break;
            }
            parts[n] = &frame[*start..];
            budget = budget.saturating_sub(parts[n].len());
            n += 1;
        }
        if self.tls.send_parts(&parts[..n], &mut self.out).is_err() {
            self.after = After::Abort;
        }
        for (frame, start) in self.bulk.drain(..n) {
            self.bulk_bytes -= frame.len() - start;
            Self::recycle(frame, start, cx);
        }
    }

    /// A sent frame's buffer goes back where it came from: an envelope delivered in place
    /// (`start > 0`) to the envelope pool, a copied frame to the frame pool.
    fn recycle(frame: Vec<u8>, start: usize, cx: &mut Cx<'_>) {
        if start > 0 {
            cx.pool.give(frame);
        } else {
            cx.frame_pool.give(frame);
        }
    }

    /// Drops queued data (the connection is closing); buffers go back to the pool.
    pub fn clear_bulk(&mut self, pool: &mut VecPool) {
        for (f, _) in self.bulk.drain(..) {
            pool.give(f);
        }
        self.bulk_bytes = 0;
    }

    /// Notes that the management connection `route` opened a stream to this device session;
    /// true when it is the first route noted (the shard then lists the connection).
    pub fn note_stream_route(&mut self, route: u64) -> bool {
        let Some(s) = self.session.as_deref_mut() else {
            return false;
        };
        if s.stream_routes.contains(&route) {
            return false;
        }
        s.stream_routes.push(route);
        s.stream_routes.len() == 1
    }

    /// Forgets the stream route `route`; true when it was noted.
    pub fn forget_stream_route(&mut self, route: u64) -> bool {
        let Some(s) = self.session.as_deref_mut() else {
            return false;
        };
        let before = s.stream_routes.len();
        s.stream_routes.retain(|r| *r != route);
        s.stream_routes.len() != before
    }

    /// Whether any management connection has opened streams to this device session.
    pub fn has_stream_routes(&self) -> bool {
        self.session
            .as_deref()
            .is_some_and(|s| !s.stream_routes.is_empty())
    }

    /// The device session this connection carries, if admitted.
    pub fn session(&self) -> Option<&DeviceSession> {
        self.session.as_deref()
    }

    /// Work the last input produced for the shard.
    pub fn take_request(&mut self) -> Option<Request> {
        self.request.take()
    }

    /// Still in the TLS handshake (for accept pacing).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Handshake)
    }

    /// What the shard should do now.
    pub fn after(&self) -> After {
        self.after
    }

    /// The endpoint this connection is counted under, if upgraded.
    pub fn endpoint(&self) -> Option<Endpoint> {
        self.counted
    }

    /// Whether the WebSocket is open (not closing), e.g. to count live devices.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Bytes queued or in flight.
    pub fn queued(&self) -> usize {
        self.out.len() + self.in_flight
    }

    /// Everything held for sending: encrypted output (queued and in flight) and data frames
    /// waiting in the bulk lane (what the memory budget counts).
    pub fn held(&self) -> usize {
        self.queued() + self.bulk_bytes
    }

    /// Ciphertext received.
    pub fn on_data(&mut self, input: &mut [u8], cx: &mut Cx<'_>) -> After {
        if self.after != After::Continue && !matches!(self.phase, Phase::Closing(_)) {
            // Draining: nothing more is read.
            return self.after;
        }
        self.last_rx_ms = cx.now_ms;
        if self.out.capacity() == 0 {
            self.out = cx.pool.take();
        }
        let Conn {
            tls,
            phase,
            after,
            since_ms,
            counted,
            want_close_notify,
            session,
            request,
            relay_in,
            management,
            out,
            ..
        } = self;
        let was_established = tls.is_established();
        let now = cx.now_ms;
        let mut st = Handler {
            phase,
            after,
            since_ms,
            counted,
            want_close_notify,
            session,
            request,
            relay_in,
            management,
            pool: cx.pool,
            client_cas: cx.client_cas,
            now,
            settings: cx.settings,
            stats: cx.stats,
            all_stats: cx.all_stats,
            status: cx.status,
            driver: cx.driver,
            onboarding: cx.onboarding,
            revocations: cx.revocations,
        };
        let res = tls.receive(
            input,
            out,
            cx.staged,
            cx.scratch,
            cx.frame_pool,
            |plain, staged, peer_cert| st.plaintext(plain, staged, peer_cert),
        );
        cx.staged.clear();
        if matches!(self.phase, Phase::Open(_)) {
            // Requests (and the client certificate they are checked against) are over once
            // the connection is a WebSocket: ~0.5 KB less per idle device.
            self.tls.forget_peer_certificate();
        }
        match res {
            Ok(progress) => {
                if progress.handshake_done && !was_established {
                    self.on_handshake(cx);
                }
                if progress.peer_closed && self.after == After::Continue {
                    self.after = After::CloseAfterFlush;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "TLS error");
                cx.stats.error(ErrorKind::Tls);
                self.after = After::Abort;
            }
        }
        self.finish_output(cx);
        self.after
    }

    fn on_handshake(&mut self, cx: &mut Cx<'_>) {
        if let Some(n) = self.tls.negotiated() {
            let c = if crate::tls::version_label(n.version) == "1.3" {
                &cx.stats.handshakes_tls13
            } else {
                &cx.stats.handshakes_tls12
            };
            ShardStats::inc(c);
            if self.tls.resumed() {
                ShardStats::inc(&cx.stats.handshakes_resumed);
            }
        }
        if matches!(self.phase, Phase::Handshake) {
            self.phase = Phase::ExpectRequest {
                head: Vec::new(),
                served: 0,
            };
            self.since_ms = cx.now_ms;
        }
    }

    /// Appends close_notify if asked, and returns an unused output buffer to the pool.
    fn finish_output(&mut self, cx: &mut Cx<'_>) {
        if self.want_close_notify && self.after != After::Abort {
            self.want_close_notify = false;
            if self.tls.close_notify(&mut self.out).is_err() {
                self.after = After::Abort;
            }
        }
        if self.out.is_empty() && self.out.capacity() > 0 {
            cx.pool.give(std::mem::take(&mut self.out));
        }
    }

    /// Encrypts a plaintext message produced outside `on_data` (pings, shutdown).
    fn send_plain(&mut self, cx: &mut Cx<'_>) {
        if cx.staged.is_empty() {
            return;
        }
        if self.out.capacity() == 0 {
            self.out = cx.pool.take();
        }
        if self.tls.send(cx.staged, &mut self.out).is_err() {
            self.after = After::Abort;
        }
        cx.staged.clear();
    }

    /// The registrar decided this connection's registration.
    pub fn on_registered(&mut self, outcome: RegisterOutcome, cx: &mut Cx<'_>) -> After {
        let waiting = matches!(
            &self.phase,
            Phase::Open(Open {
                role: Role::Registering { waiting: true, .. },
                ..
            })
        );
        if !waiting || self.after != After::Continue {
            return self.after;
        }
        let (msg, code, reason) = match outcome {
            RegisterOutcome::Granted {
                unit_id,
                certificate,
                device_ca,
                session: Some(fingerprint),
            } => {
                // The device asked to stay: `registered`, then the session on this connection.
                write_message(
                    cx.staged,
                    &DevMessage::Registered(dev::Registered {
                        reason: Reason::Granted.as_str().into(),
                        unit_id: unit_id.clone(),
                        certificate,
                        device_ca: device_ca.to_string(),
                    }),
                );
                self.continue_as_session(fingerprint, unit_id.into(), cx);
                self.send_plain(cx);
                self.finish_output(cx);
                return self.after;
            }
            RegisterOutcome::Granted {
                unit_id,
                certificate,
                device_ca,
                session: None,
            } => (
                DevMessage::Registered(dev::Registered {
                    reason: Reason::Granted.as_str().into(),
                    unit_id,
                    certificate,
                    device_ca: device_ca.to_string(),
                }),
                dev::CLOSE_REGISTERED,
                "registered",
            ),
            RegisterOutcome::Refused {
                reason,
                retry_after_ms,
            } => (
                refused_message(reason, retry_after_ms, false),
                close_code_for(retry_after_ms),
                "refused",
            ),
        };
        write_message(cx.staged, &msg);
        let _ = ws::encode_close(cx.staged, Some((code, reason)), None);
        self.send_plain(cx);
        self.begin_closing(cx.now_ms);
        self.finish_output(cx);
        self.after
    }

    /// Register mode → session mode on the same connection (`register` with `session: true`,
    /// granted): the device limit decides as for a new session; stages `hello` or `refused`
    /// (`limit_reached`, the credential is kept) + close.
    fn continue_as_session(&mut self, fingerprint: [u8; 32], unit_id: Box<str>, cx: &mut Cx<'_>) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        if let Some(retry) = limit_refusal(cx.onboarding, cx.settings, &unit_id) {
            cx.onboarding.session_refused(Reason::LimitReached);
            write_message(
                cx.staged,
                &refused_message(Reason::LimitReached, Some(retry), false),
            );
            let _ = ws::encode_close(
                cx.staged,
                Some((close_code_for(Some(retry)), "refused")),
                None,
            );
            self.begin_closing(cx.now_ms);
            return;
        }
        open.role = Role::Device;
        open.env = Vec::new();
        write_message(cx.staged, &session_hello(&unit_id));
        self.session = Some(Box::new(DeviceSession {
            fingerprint,
            unit_id,
            stream_routes: Vec::new(),
        }));
        self.request = Some(Request::SessionUp);
    }

    /// Closes the device session if it holds the kicked credential.
    pub fn kick(&mut self, kick: &Kick, cx: &mut Cx<'_>) -> After {
        let holds = self
            .session
            .as_ref()
            .is_some_and(|s| s.fingerprint == kick.fingerprint);
        if !holds || !matches!(self.phase, Phase::Open(_)) || self.after != After::Continue {
            return self.after;
        }
        cx.onboarding.session_refused(kick.reason);
        write_message(
            cx.staged,
            &refused_message(kick.reason, None, kick.drop_settings),
        );
        let _ = ws::encode_close(cx.staged, Some((dev::CLOSE_REFUSED, "refused")), None);
        self.send_plain(cx);
        self.begin_closing(cx.now_ms);
        self.finish_output(cx);
        self.after
    }

    /// A relay protocol violation (a malformed envelope): close 1002.
    pub fn protocol_close(&mut self, cx: &mut Cx<'_>) -> After {
        if !matches!(self.phase, Phase::Open(_)) || self.after != After::Continue {
            return self.after;
        }
        let _ = ws::encode_close(
            cx.staged,
            Some((CloseCode::PROTOCOL_ERROR, "bad envelope")),
            None,
        );
        self.send_plain(cx);
        self.begin_closing(cx.now_ms);
        self.finish_output(cx);
        self.after
    }

    /// Open → Closing (we sent our close frame; waiting for the peer's).
    fn begin_closing(&mut self, now: u64) {
        if let Phase::Open(mut o) = std::mem::replace(&mut self.phase, Phase::Draining) {
            o.role = Role::Done;
            self.phase = Phase::Closing(o);
            self.since_ms = now;
        }
    }

    /// The peer closed its side of TCP.
    pub fn on_eof(&mut self) -> After {
        if self.after == After::Continue || matches!(self.phase, Phase::Closing(_)) {
            // Whatever is queued may still be read by a half-closed peer.
            self.after = After::CloseAfterFlush;
            self.phase = Phase::Draining;
        }
        self.after
    }

    /// When [`Conn::on_timer`] next has something to do (ms).
    pub fn deadline(&self, s: &Settings) -> u64 {
        match &self.phase {
            Phase::Handshake => self.since_ms + s.handshake_timeout_ms,
            Phase::ExpectRequest { .. } => self.since_ms + s.head_timeout_ms,
            Phase::Open(o) => {
                let keep_alive = self.last_rx_ms
                    + if o.pinged {
                        s.idle_timeout_ms
                    } else {
                        s.ping_after_ms
                    };
                match o.role {
                    Role::Registering { waiting: false, .. } => {
                        keep_alive.min(self.since_ms + s.registration_timeout_ms)
                    }
                    _ => keep_alive,
                }
            }
            Phase::Closing(_) | Phase::Draining => self.since_ms + s.close_timeout_ms,
        }
    }

    /// Checks the phase's deadline.
    pub fn on_timer(&mut self, cx: &mut Cx<'_>) -> After {
        let s = cx.settings;
        if cx.now_ms < self.deadline(s) {
            return self.after;
        }
        match &mut self.phase {
            Phase::Handshake => {
                cx.stats.error(ErrorKind::HandshakeTimeout);
                self.after = After::Abort;
            }
            Phase::ExpectRequest { .. } => {
                tracing::debug!(
                    now = cx.now_ms,
                    since = self.since_ms,
                    "request head timeout"
                );
                cx.stats.error(ErrorKind::HeadTimeout);
                http::write_response(cx.staged, 408, &[], None, b"", true);
                self.send_plain(cx);
                self.phase = Phase::Draining;
                self.since_ms = cx.now_ms;
                self.after = After::CloseAfterFlush;
            }
            Phase::Open(Open {
                role: Role::Registering { waiting: false, .. },
                ..
            }) if cx.now_ms >= self.since_ms + s.registration_timeout_ms => {
                cx.stats.error(ErrorKind::IdleTimeout);
                let _ = ws::encode_close(
                    cx.staged,
                    Some((dev::CLOSE_REFUSED, "registration timeout")),
                    None,
                );
                self.send_plain(cx);
                self.begin_closing(cx.now_ms);
            }
            Phase::Open(o) => {
                if o.pinged || cx.now_ms >= self.last_rx_ms + s.idle_timeout_ms {
                    cx.stats.error(ErrorKind::IdleTimeout);
                    let _ = ws::encode_close(
                        cx.staged,
                        Some((CloseCode::GOING_AWAY, "idle timeout")),
                        None,
                    );
                    self.send_plain(cx);
                    self.want_close_notify = true;
                    self.phase = Phase::Draining;
                    self.since_ms = cx.now_ms;
                    self.after = After::CloseAfterFlush;
                } else {
                    o.pinged = true;
                    let _ = ws::encode_ping(cx.staged, b"fleetgate", None);
                    self.send_plain(cx);
                }
            }
            Phase::Closing(_) | Phase::Draining => self.after = After::Abort,
        }
        self.finish_output(cx);
        self.after
    }

    /// Graceful shutdown: WebSockets get a 1001 close; other connections are dropped once
    /// their output is flushed.
    pub fn shutdown(&mut self, cx: &mut Cx<'_>) -> After {
        match std::mem::replace(&mut self.phase, Phase::Draining) {
            Phase::Open(o) => {
                let _ = ws::encode_close(
                    cx.staged,
                    Some((CloseCode::GOING_AWAY, "gateway shutting down")),
                    None,
                );
                self.send_plain(cx);
                self.phase = Phase::Closing(o);
                self.since_ms = cx.now_ms;
            }
            Phase::Closing(o) => self.phase = Phase::Closing(o),
            Phase::Handshake => self.after = After::Abort,
            Phase::ExpectRequest { .. } | Phase::Draining => {
                if self.after == After::Continue {
                    self.after = if self.queued() > 0 {
                        After::CloseAfterFlush
                    } else {
                        After::Abort
                    };
                }
            }
        }
        self.finish_output(cx);
        self.after
    }
}

/// The parts of a connection the plaintext handler may touch while TLS is borrowed.
struct Handler<'a> {
    phase: &'a mut Phase,
    after: &'a mut After,
    since_ms: &'a mut u64,
    counted: &'a mut Option<Endpoint>,
    want_close_notify: &'a mut bool,
    session: &'a mut Option<Box<DeviceSession>>,
    request: &'a mut Option<Request>,
    relay_in: &'a mut Vec<Vec<u8>>,
    management: &'a mut Option<Box<str>>,
    pool: &'a mut VecPool,
    client_cas: &'a ClientCas,
    now: u64,
    settings: &'a Settings,
    stats: &'a ShardStats,
    all_stats: &'a [ShardStats],
    status: &'a StatusCell,
    driver: &'static str,
    onboarding: &'a Onboarding,
    revocations: &'a Revocations,
}

impl Handler<'_> {
    fn plaintext(
        &mut self,
        mut data: &mut [u8],
        staged: &mut Vec<u8>,
        peer_cert: Option<&CertificateDer<'static>>,
    ) {
        loop {
            if data.is_empty() {
                return;
            }
            match self.phase {
                Phase::Handshake => {
                    // Plaintext only flows once the handshake is complete.
                    *self.phase = Phase::ExpectRequest {
                        head: Vec::new(),
                        served: 0,
                    };
                    *self.since_ms = self.now;
                    continue;
                }
                Phase::Draining => return,
                Phase::ExpectRequest { head, served } => {
                    let served = *served;
                    let (parsed, from_head) = if head.is_empty() {
                        (http::parse_request(data, &self.settings.http), false)
                    } else {
                        head.extend_from_slice(data);
                        // A head can only complete with a new line feed: a client trickling
                        // bytes costs a re-parse only when one arrives (linear, not
                        // quadratic), while the size limit is still enforced at once.
                        let parsed = if data.contains(&b'\n')
                            || head.len() > self.settings.http.max_head_bytes
                        {
                            http::parse_request(head, &self.settings.http)
                        } else {
                            Ok(Parsed::Incomplete)
                        };
                        (parsed, true)
                    };
                    match parsed {
                        Ok(Parsed::Incomplete) => {
                            if !from_head {
                                head.extend_from_slice(data);
                            }
                            return;
                        }
                        Ok(Parsed::Complete {
                            head: req,
                            consumed,
                        }) => {
                            // Bytes after the head: from `data` directly, or from the
                            // accumulated head buffer (copied out, since `data` was appended).
                            let mut rest: Vec<u8> = Vec::new();
                            if from_head {
                                rest = head[consumed..].to_vec();
                                *head = Vec::new();
                            } else {
                                data = &mut data[consumed..];
                            }
                            self.request(&req, served, staged, peer_cert);
                            if rest.is_empty() {
                                continue;
                            }
                            self.plaintext(&mut rest, staged, peer_cert);
                            return;
                        }
                        Err(e) => {
                            self.stats.error(ErrorKind::Http);
                            let status = e.status();
                            http::write_response(
                                staged,
                                status,
                                &[],
                                Some("text/plain"),
                                format!("{e}\n").as_bytes(),
                                true,
                            );
                            self.drain();
                            return;
                        }
                    }
                }
                Phase::Open(_) | Phase::Closing(_) => {
                    self.websocket(data, staged);
                    return;
                }
            }
        }
    }

    fn drain(&mut self) {
        *self.want_close_notify = true;
        *self.phase = Phase::Draining;
        *self.since_ms = self.now;
        *self.after = After::CloseAfterFlush;
    }

    /// Answers one request (or upgrades).
    fn request(
        &mut self,
        req: &RequestHead,
        served: u32,
        staged: &mut Vec<u8>,
        peer_cert: Option<&CertificateDer<'static>>,
    ) {
        let keep_alive =
            req.keep_alive() && !req.has_body() && served + 1 < self.settings.max_requests;
        let endpoint = match req.path.as_str() {
            DEVICE_PATH => Some(Endpoint::Device),
            MANAGEMENT_PATH => Some(Endpoint::Management),
            ECHO_PATH if self.settings.enable_echo => Some(Endpoint::Echo),
            _ => None,
        };
        if let Some(endpoint) = endpoint {
            match http::check_upgrade(req) {
                Ok(_)
                    if endpoint == Endpoint::Management && !self.management_allowed(peer_cert) =>
                {
                    self.stats.error(ErrorKind::Http);
                    http::write_response(
                        staged,
                        403,
                        &[],
                        Some("text/plain"),
                        b"a management client certificate from this gateway is required (fleetgate mgmt add)\n",
                        true,
                    );
                    self.drain();
                }
                Ok(up) => {
                    let proto = http::negotiate_subprotocol(up.protocols, SUBPROTOCOLS);
                    http::write_switching_protocols(staged, &up.accept, proto);
                    ShardStats::inc(&self.stats.upgrades);
                    let role = match endpoint {
                        Endpoint::Echo => Role::Echo,
                        Endpoint::Management => self.admit_management(staged, peer_cert),
                        Endpoint::Device => self.admit_device(staged, peer_cert),
                    };
                    if !matches!(role, Role::Done | Role::Registering { .. }) {
                        ShardStats::inc(gauge(self.stats, endpoint));
                        *self.counted = Some(endpoint);
                    }
                    let open = Open {
                        role,
                        decoder: Decoder::new(WsRole::Server, self.settings.ws),
                        pinged: false,
                        env: Vec::new(),
                    };
                    *self.phase = if matches!(open.role, Role::Done) {
                        Phase::Closing(open)
                    } else {
                        Phase::Open(open)
                    };
                    *self.since_ms = self.now;
                }
                Err(e) => {
                    self.stats.error(ErrorKind::Http);
                    let body = format!("{e}\n");
                    http::write_response(
                        staged,
                        e.status(),
                        e.headers(),
                        Some("text/plain"),
                        body.as_bytes(),
                        true,
                    );
                    self.drain();
                }
            }
            return;
        }
        ShardStats::inc(&self.stats.http_requests);
        let (status, ctype, body, extra): (u16, &str, std::borrow::Cow<'_, str>, &[(&str, &str)]) =
            match (req.path.as_str(), req.method) {
                (STATUS_PATH, Method::Get | Method::Head) => (
                    200,
                    "application/json",
                    self.status.get().json().into(),
                    &[("Cache-Control", "no-store")],
                ),
                (METRICS_PATH, Method::Get | Method::Head) => (
                    200,
                    "text/plain; version=0.0.4",
                    {
                        let mut text = crate::metrics::render(
                            self.all_stats,
                            self.status.get(),
                            self.driver,
                            crate::sys::rss_bytes(),
                        );
                        self.onboarding.render_into(&mut text);
                        text.into()
                    },
                    &[],
                ),
                (STATUS_PATH | METRICS_PATH, _) => (
                    405,
                    "text/plain",
                    "method not allowed\n".into(),
                    &[("Allow", "GET, HEAD")],
                ),
                (ECHO_PATH | DEVICE_PATH | MANAGEMENT_PATH, _) => {
                    (404, "text/plain", "not found\n".into(), &[])
                }
                _ => (404, "text/plain", "not found\n".into(), &[]),
            };
        if req.method == Method::Head {
            http::write_head_response(
                staged,
                status,
                extra,
                Some(ctype),
                body.len() as u64,
                !keep_alive,
            );
        } else {
            http::write_response(
                staged,
                status,
                extra,
                Some(ctype),
                body.as_bytes(),
                !keep_alive,
            );
        }
        if keep_alive {
            *self.phase = Phase::ExpectRequest {
                head: Vec::new(),
                served: served + 1,
            };
            *self.since_ms = self.now;
        } else {
            self.drain();
        }
    }

    /// Whether the handshake carried a management certificate (from the management CA, not
    /// expired, not revoked).
    fn management_allowed(&self, peer_cert: Option<&CertificateDer<'static>>) -> bool {
        let Some(cert) = peer_cert else { return false };
        let fingerprint: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        match issued_by(cert, &self.client_cas.management) {
            Some((true, _, not_after)) => {
                not_after >= crate::registry::unix_now() && !self.revocations.contains(&fingerprint)
            }
            _ => false,
        }
    }

    /// A management upgrade (the 101 is already staged): it needs a certificate from the
    /// management CA that is not revoked. Stages `hello` or a `refused` + close.
    fn admit_management(
        &mut self,
        staged: &mut Vec<u8>,
        peer_cert: Option<&CertificateDer<'static>>,
    ) -> Role {
        let refusal = match peer_cert {
            None => Some(Reason::CredentialUnknown),
            Some(cert) => {
                let fingerprint: [u8; 32] = Sha256::digest(cert.as_ref()).into();
                match issued_by(cert, &self.client_cas.management) {
                    Some((true, name, not_after)) => {
                        if not_after < crate::registry::unix_now() {
                            Some(Reason::CredentialExpired)
                        } else if self.revocations.contains(&fingerprint) {
                            Some(Reason::CredentialRevoked)
                        } else {
                            write_message(
                                staged,
                                &DevMessage::Hello(dev::Hello {
                                    protocol: dev::PROTOCOL_VERSION,
                                    mode: dev::Mode::Management,
                                    gateway: dev::gateway_name(),
                                    unit_id: None,
                                    name: Some(name.to_string()),
                                }),
                            );
                            tracing::info!(name = %name, "management server connected");
                            *self.management = Some(name);
                            *self.session = Some(Box::new(DeviceSession {
                                fingerprint,
                                unit_id: "".into(),
                                stream_routes: Vec::new(),
                            }));
                            *self.request = Some(Request::ManagementUp);
                            return Role::Management;
                        }
                    }
                    _ => Some(Reason::CredentialUnknown),
                }
            }
        };
        let reason = refusal.unwrap_or(Reason::CredentialUnknown);
        tracing::info!(reason = %reason, "management connection refused");
        write_message(staged, &refused_message(reason, None, false));
        let _ = ws::encode_close(staged, Some((dev::CLOSE_REFUSED, "refused")), None);
        Role::Done
    }

    /// Decides what a device upgrade is (the 101 is already staged): a session when the
    /// handshake carried a device certificate that is not revoked and the limit allows it,
    /// register mode when it carried none. Stages `hello` or `refused` + close.
    fn admit_device(
        &mut self,
        staged: &mut Vec<u8>,
        peer_cert: Option<&CertificateDer<'static>>,
    ) -> Role {
        let Some(cert) = peer_cert else {
            write_message(
                staged,
                &DevMessage::Hello(dev::Hello {
                    protocol: dev::PROTOCOL_VERSION,
                    mode: dev::Mode::Register,
                    gateway: dev::gateway_name(),
                    unit_id: None,
                    name: None,
                }),
            );
            return Role::Registering {
                msg: Vec::new(),
                waiting: false,
            };
        };
        let fingerprint: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        let (device_issued, unit_id, not_after) =
            issued_by(cert, &self.client_cas.device).unwrap_or_else(|| (false, "?".into(), 0));
        // A resumed TLS session does not re-check the certificate's validity: do it here.
        let expired = not_after < crate::registry::unix_now();
        let refusal = if !device_issued {
            // A management certificate (the other CA the handshake accepts).
            Some((Reason::CredentialUnknown, None))
        } else if expired {
            Some((Reason::CredentialExpired, None))
        } else if let Some(superseded) = self.revocations.reason(&fingerprint) {
            Some((
                if superseded {
                    Reason::CredentialSuperseded
                } else {
                    Reason::CredentialRevoked
                },
                None,
            ))
        } else {
            limit_refusal(self.onboarding, self.settings, &unit_id)
                .map(|retry| (Reason::LimitReached, Some(retry)))
        };
        if let Some((reason, retry)) = refusal {
            self.onboarding.session_refused(reason);
            write_message(
                staged,
                &refused_message(reason, retry, reason == Reason::CredentialRevoked),
            );
            let _ = ws::encode_close(staged, Some((close_code_for(retry), "refused")), None);
            if reason != Reason::LimitReached {
                *self.request = Some(Request::SessionRefused { unit_id, reason });
            }
            return Role::Done;
        }
        write_message(staged, &session_hello(&unit_id));
        *self.session = Some(Box::new(DeviceSession {
            fingerprint,
            unit_id,
            stream_routes: Vec::new(),
        }));
        *self.request = Some(Request::SessionUp);
        Role::Device
    }

    /// Register mode: the device sent something that is not a valid `register`.
    fn refuse_registration(&mut self, staged: &mut Vec<u8>) {
        self.onboarding.registration(Reason::BadRequest);
        *self.request = Some(Request::BadRegistration);
        write_message(staged, &refused_message(Reason::BadRequest, None, false));
        let _ = ws::encode_close(staged, Some((dev::CLOSE_REFUSED, "refused")), None);
        if let Phase::Open(mut o) = std::mem::replace(self.phase, Phase::Draining) {
            o.role = Role::Done;
            *self.phase = Phase::Closing(o);
            *self.since_ms = self.now;
        }
    }

    /// Runs the WebSocket decoder over `data`.
    fn websocket(&mut self, data: &mut [u8], staged: &mut Vec<u8>) {
        let mut pos = 0;
        loop {
            let (closing, open) = match self.phase {
                Phase::Open(o) => (false, o),
                Phase::Closing(o) => (true, o),
                _ => return,
            };
            let echo = matches!(open.role, Role::Echo);
            open.pinged = false;
            let res = open.decoder.decode(&mut data[pos..]);
            let (used, event) = match res {
                Ok(x) => x,
                Err(e) => {
                    self.stats.error(ErrorKind::WebSocket);
                    tracing::debug!(error = %e, "WebSocket protocol error");
                    if !closing {
                        let _ = ws::encode_close(staged, Some((e.close_code(), "")), None);
                    }
                    *self.want_close_notify = true;
                    self.drain();
                    return;
                }
            };
            pos += used;
            let Some(event) = event else {
                if used == 0 || pos >= data.len() {
                    return;
                }
                continue;
            };
            match event {
                ws::Event::Data {
                    kind,
                    payload,
                    first,
                    last,
                } => {
                    if last {
                        ShardStats::inc(&self.stats.ws_messages_in);
                    }
                    if let (Role::Registering { msg, waiting }, false) = (&mut open.role, closing) {
                        match register_piece(msg, *waiting, kind, payload, last) {
                            Piece::More => {}
                            Piece::Done(r) => {
                                *waiting = true;
                                *self.request = Some(Request::Register(r));
                            }
                            Piece::Bad => {
                                self.refuse_registration(staged);
                                return;
                            }
                        }
                    }
                    if matches!(open.role, Role::Device | Role::Management)
                        && !closing
                        && kind == DataKind::Binary
                    {
                        if first {
                            // Room for the whole message now, so it never grows by
                            // reallocation: a whole one gets its size (the pool rounds it up
                            // to its class), one cut by the read an envelope buffer.
                            let need = if last {
                                payload.len()
                            } else {
                                payload.len().max(buf::ENVELOPE)
                            };
                            if open.env.capacity() < need {
                                self.pool.give(std::mem::take(&mut open.env));
                                open.env = self.pool.take_min(need);
                            }
                            open.env.clear();
                        }
                        if open.env.len() + payload.len() > crate::proto::envelope::MAX_ENVELOPE {
                            self.stats.error(ErrorKind::WebSocket);
                            self.pool.give(std::mem::take(&mut open.env));
                            let _ = ws::encode_close(
                                staged,
                                Some((CloseCode::TOO_BIG, "envelope too large")),
                                None,
                            );
                            *self.want_close_notify = true;
                            self.drain();
                            return;
                        }
                        open.env.extend_from_slice(payload);
                        if last {
                            self.relay_in.push(std::mem::take(&mut open.env));
                        }
                    }
                    if echo && !closing {
                        let opcode = match (first, kind) {
                            (false, _) => OpCode::Continuation,
                            (true, DataKind::Text) => OpCode::Text,
                            (true, DataKind::Binary) => OpCode::Binary,
                        };
                        if first || last || !payload.is_empty() {
                            let _ = ws::encode_frame(staged, last, opcode, None, payload);
                        }
                    }
                }
                ws::Event::Ping(p) => {
                    if !closing {
                        let _ = ws::encode_pong(staged, p, None);
                    }
                }
                ws::Event::Pong(_) => {}
                ws::Event::Close(frame) => {
                    if !closing {
                        // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an
                        // empty close.
                        let reply = frame.map(|f| (f.code, ""));
                        let _ = ws::encode_close(staged, reply, None);
                    }
                    *self.want_close_notify = true;
                    self.drain();
                    return;
                }
            }
            if pos >= data.len() {
                // Let the decoder report events that need no more input (none expected).
                continue;
            }
        }
    }
}

fn gauge(stats: &ShardStats, e: Endpoint) -> &AtomicU64 {
    match e {
        Endpoint::Device => &stats.devices,
        Endpoint::Management => &stats.management,
        Endpoint::Echo => &stats.echo,
    }
}

/// Uncounts a closed connection's endpoint gauge.
pub fn uncount(stats: &ShardStats, e: Option<Endpoint>) {
    if let Some(e) = e {
        ShardStats::dec(gauge(stats, e));
    }
}

/// What a data piece in register mode amounts to.
enum Piece {
    More,
    Done(Box<dev::Register>),
    Bad,
}

/// Adds a piece of the `register` message; parses it when complete.
fn register_piece(
    msg: &mut Vec<u8>,
    waiting: bool,
    kind: DataKind,
    payload: &[u8],
    last: bool,
) -> Piece {
    if waiting || kind != DataKind::Text || msg.len() + payload.len() > dev::MAX_REGISTER_MESSAGE {
        *msg = Vec::new();
        return Piece::Bad;
    }
    msg.extend_from_slice(payload);
    if !last {
        return Piece::More;
    }
    let parsed = DevMessage::from_json(msg);
    *msg = Vec::new();
    match parsed {
        Ok(DevMessage::Register(r)) => Piece::Done(Box::new(r)),
        _ => Piece::Bad,
    }
}

/// Stages one device-protocol message as a text frame.
/// Takes a session place under the device limit; `Some(retry_after_ms)` (and the WARN line)
/// when the limit is reached.
fn limit_refusal(onboarding: &Onboarding, settings: &Settings, unit_id: &str) -> Option<u64> {
    if onboarding.try_open_session() {
        return None;
    }
    tracing::warn!("Max connections limit has exceeded. Device [{unit_id}] is rejected");
    let base = settings.limit_retry_after_ms.max(2);
    let jitter = getrandom::u64().unwrap_or(0) % base;
    Some(base / 2 + jitter)
}

/// The session-mode `hello` (§5.4).
fn session_hello(unit_id: &str) -> DevMessage {
    DevMessage::Hello(dev::Hello {
        protocol: dev::PROTOCOL_VERSION,
        mode: dev::Mode::Session,
        gateway: dev::gateway_name(),
        unit_id: Some(unit_id.to_string()),
        name: None,
    })
}

fn write_message(staged: &mut Vec<u8>, m: &DevMessage) {
    let _ = ws::encode_frame(staged, true, OpCode::Text, None, m.to_json().as_bytes());
}

fn refused_message(reason: Reason, retry_after_ms: Option<u64>, drop_settings: bool) -> DevMessage {
    DevMessage::Refused(dev::Refused {
        reason: reason.as_str().into(),
        message: reason.message().into(),
        retry_after_ms,
        drop_settings,
    })
}

/// 1013 (try again later) for refusals with a retry hint, else 1008.
fn close_code_for(retry_after_ms: Option<u64>) -> u16 {
    if retry_after_ms.is_some() {
        dev::CLOSE_TRY_LATER
    } else {
        dev::CLOSE_REFUSED
    }
}

/// Whether a (handshake-verified) certificate was issued by `issuer` (a subject name, DER),
/// with its subject common name and `notAfter`.
fn issued_by(cert: &CertificateDer<'_>, issuer: &[u8]) -> Option<(bool, Box<str>, i64)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    Some((
        c.issuer().as_raw() == issuer,
        cn.into(),
        c.validity().not_after.timestamp(),
    ))
}
