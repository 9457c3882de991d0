//! The device agent (`docs/protocol.md` §5): registers a device with a first-authentication
//! key, stores its credential, and keeps it connected to the gateway. `fleetgate agent`
//! ([`crate::cli::agent`]) is a thin layer over this module.
//!
//! Blocking std I/O and one thread: TCP, rustls ([`tls::TlsStream`]) and tungstenite as the
//! WebSocket client. No async runtime.
//!
//! # The steps
//!
//! 1. [`AgentState::open`] a state directory (layout in [`state`]).
//! 2. First contact: [`fetch_fingerprint`] connects, takes the root of the gateway's chain and
//!    validates the chain with it; show [`FirstContact::fingerprint`] with a
//!    [`FingerprintChallenge`] (or compare a full fingerprint with [`prompt::matches_full`]);
//!    when confirmed, [`AgentState::adopt`] pins it. A chain that validates against the system
//!    roots ([`FirstContact::system_trusted`]) needs no fingerprint step.
//! 3. [`register`] with the unit ID and the key: stores `device.key`/`device.pem` (0600), and
//!    returns the registration connection as the first session when the gateway continued it
//!    (`docs/protocol.md` §5.3).
//! 4. [`run_from`] (or [`run()`]) until stopped: starts with that session or connects with the
//!    credential, reports [`AgentEvent::Ready`] on each session `hello`, reconnects with
//!    backoff, falls back through the connectors.
//!
//! ```no_run
//! use fleetgate::agent::*;
//!
//! # fn main() -> Result<(), AgentError> {
//! let mut state = AgentState::open("/var/lib/my-agent")?;
//! let gateway = Connector::parse("gw.example.com")?; // wss://gw.example.com:8443/usg/endpoint
//! let options = AgentOptions::default();
//! let stop = StopHandle::new();
//! let mut first = None;
//! if !state.has_credential() {
//!     let contact = fetch_fingerprint(&gateway, &options)?;
//!     // … let the user confirm contact.fingerprint (FingerprintChallenge) …
//!     state.adopt(&contact)?;
//!     state.config.connectors = vec![gateway.clone()];
//!     let request = RegisterRequest {
//!         connector: gateway,
//!         unit_id: "kiosk-17".into(),
//!         key: "ABCD-EFGH-JKLM-NPQR".into(),
//!     };
//!     // The gateway usually continues the registration connection as the session.
//!     first = register(&mut state, &request, &options, &stop)?.session;
//! }
//! let outcome = run_from(&mut state, &options, &stop, &mut |event| {
//!     if let AgentEvent::Ready { .. } = event {
//!         println!("connection ready");
//!     }
//! }, first)?;
//! # let _ = outcome;
//! # Ok(())
//! # }
//! ```
//!
//! For tests: [`AgentOptions::fast`] shortens the backoff, timeouts and the re-probe
//! interval; run the agent on a thread and [`StopHandle::stop`] it; collect events through a
//! channel in the `on_event` callback.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod client;
pub mod prompt;
pub mod relay;
pub mod run;
pub mod state;
pub mod tls;

use std::time::Duration;

pub use backoff::{Backoff, StopHandle};
pub use client::{
    FirstContact, RegisterRequest, Registered, Session, connect_session, connect_session_with,
    fetch_fingerprint, make_csr, register,
};
pub use prompt::FingerprintChallenge;
pub use run::{RunOutcome, run, run_from};
pub use state::{AgentConfig, AgentState, Connector, Credential, Trust};

/// Timing of the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Reconnect pacing (base 1 s, cap 5 min).
    pub backoff: Backoff,
    /// While on a later connector, re-try the first this often (default 3 min).
    pub reprobe_interval: Duration,
    /// Read timeout of a live session: how quickly a stop or a due re-probe is noticed
    /// (default 250 ms).
    pub poll_interval: Duration,
    /// TCP connect timeout per address (default 10 s).
    pub connect_timeout: Duration,
    /// Timeout of the TLS handshake, the upgrade, and waiting for `hello` or an answer to
    /// `register` (default 15 s).
    pub handshake_timeout: Duration,
    /// Attempts of [`register`] on transport failures and `internal_error` (default 4).
    pub register_attempts: u32,
    /// [`run()`] returns after the first ready session (`fleetgate agent --once`).
    pub once: bool,
}

impl Default for AgentOptions {
    fn default() -> AgentOptions {
        AgentOptions {
            backoff: Backoff::default(),
            reprobe_interval: Duration::from_secs(180),
            poll_interval: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            register_attempts: 4,
            once: false,
        }
    }
}

impl AgentOptions {
    /// Options for tests on loopback: backoff 50 ms … 500 ms, re-probe every 500 ms, poll
    /// every 50 ms, 5 s timeouts.
    pub fn fast() -> AgentOptions {
        AgentOptions {
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(500),
            },
            reprobe_interval: Duration::from_millis(500),
            poll_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            register_attempts: 4,
            once: false,
        }
    }
}

/// What the running agent reports ([`run()`]'s `on_event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Connecting to a gateway (each attempt, re-probes included).
    Connecting {
        /// The gateway.
        connector: Connector,
    },
    /// The session `hello` arrived: "connection ready".
    Ready {
        /// The unit ID the gateway greeted with.
        unit_id: String,
        /// The gateway.
        connector: Connector,
    },
    /// A connection attempt failed (network, TLS, protocol).
    ConnectFailed {
        /// The gateway.
        connector: Connector,
        /// Why.
        error: String,
    },
    /// The gateway sent `refused` (before `hello` or during the session).
    Refused {
        /// The gateway.
        connector: Connector,
        /// Reason code, message, retry hint.
        refusal: Refusal,
    },
    /// A ready session ended (closed, broken, or left for the first connector).
    Disconnected {
        /// The gateway.
        connector: Connector,
        /// Why.
        reason: String,
    },
    /// Waiting before the next round of attempts.
    Waiting {
        /// How long.
        delay: Duration,
    },
    /// `drop_settings`: connectors, trust and credential were deleted from the state.
    SettingsDropped,
    /// The (superseded, unknown or expired) certificate was deleted from the state.
    CredentialDropped,
    /// Gateway use is off in `agent.toml`.
    Disabled,
}

/// A `refused` from the gateway (`docs/protocol.md` §5.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The stable reason code (`key_used`, `credential_revoked`, …).
    pub reason: String,
    /// The gateway's sentence for the user.
    pub message: String,
    /// Wait at least this long before trying again.
    pub retry_after: Option<Duration>,
    /// Forget the gateway settings and the credential.
    pub drop_settings: bool,
}

impl From<crate::proto::device::Refused> for Refusal {
    fn from(r: crate::proto::device::Refused) -> Refusal {
        Refusal {
            reason: r.reason,
            message: r.message,
            retry_after: r.retry_after_ms.map(Duration::from_millis),
            drop_settings: r.drop_settings,
        }
    }
}

impl Refusal {
    /// The refusals after which the agent must stop using its credential (§5.5):
    /// `credential_revoked`, `credential_superseded`, `credential_unknown`,
    /// `credential_expired`, or any refusal with `drop_settings`.
    pub fn stops_agent(&self) -> bool {
        self.drop_settings
            || matches!(
                self.reason.as_str(),
                "credential_revoked"
                    | "credential_superseded"
                    | "credential_unknown"
                    | "credential_expired"
            )
    }

    /// What the user should do, for the reason codes of §5.6 (`None` for unknown codes).
    pub fn advice(&self) -> Option<&'static str> {
        Some(match self.reason.as_str() {
            "key_unknown" => "check the key and type it again",
            "key_used" | "key_revoked" => "ask your administrator for a new key",
            "key_wrong_unit" => "ask your administrator for this unit's key",
            "unit_id_invalid" | "bad_request" => "this is a bug in the agent or the gateway",
            "rate_limited" | "limit_reached" | "internal_error" => "try again later",
            "credential_unknown" | "credential_expired" => "register again with a new key",
            "credential_revoked" => "the device was removed from the gateway",
            "credential_superseded" => {
                "the unit registered again elsewhere; this credential \
                                        is no longer valid"
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.reason)?;
        if let Some(d) = self.retry_after {
            write!(f, "; retry after {} ms", d.as_millis())?;
        }
        Ok(())
    }
}

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory or one of its files cannot be read or written.
    #[error("agent state {path}: {message}")]
    State {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A gateway address that cannot be used.
    #[error("bad gateway address {input:?}: {reason}")]
    BadConnector {
        /// What was given.
        input: String,
        /// Why it is refused.
        reason: String,
    },
    /// TCP connect, name resolution, a timeout or a broken connection.
    #[error("{connector}: {message}")]
    Connect {
        /// The gateway URL.
        connector: String,
        /// What happened.
        message: String,
    },
    /// The TLS layer failed: the gateway's chain does not verify against the pinned root, the
    /// gateway rejected the device certificate (an alert), …
    #[error("{connector}: TLS: {source}")]
    Tls {
        /// The gateway URL.
        connector: String,
        /// rustls' error.
        source: rustls::Error,
    },
    /// First contact: the chain does not validate with its own root (or not for this host).
    #[error("{connector}: the gateway's certificate chain is not valid: {message}")]
    Chain {
        /// The gateway URL.
        connector: String,
        /// The validation error.
        message: String,
    },
    /// The fingerprint the user typed (or passed) is not the gateway's.
    /// (The message does not repeat the presented fingerprint, so that a retry cannot copy it.)
    #[error(
        "the gateway's root fingerprint does not match the one given; registration stopped — \
         check the gateway address and the fingerprint from your administrator"
    )]
    FingerprintMismatch {
        /// The fingerprint the gateway presented (`Part 1: … Part 4: …`), for logs.
        presented: String,
    },
    /// The gateway answered something the protocol does not allow here.
    #[error("{connector}: protocol error: {message}")]
    Protocol {
        /// The gateway URL.
        connector: String,
        /// What arrived.
        message: String,
    },
    /// The gateway closed the WebSocket.
    #[error("{connector}: the gateway closed the connection{}", close_suffix(*.code, .reason))]
    Closed {
        /// The gateway URL.
        connector: String,
        /// The close code, if a close frame arrived.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// The gateway refused (`refused`): the reason code and its message.
    #[error("the gateway refused: {0}")]
    Refused(Refusal),
    /// The device credential cannot be used (unreadable, wrong key).
    #[error("{0}")]
    Credential(String),
    /// Trust set-up failed (no system roots, …).
    #[error("{0}")]
    Trust(String),
    /// Key generation or the CSR failed.
    #[error("{0}")]
    Crypto(String),
    /// No credential in the state directory: register first.
    #[error("the agent is not registered (no device credential in its state directory)")]
    NotRegistered,
    /// No gateway configured.
    #[error("no gateway configured: give --gateway HOST[:PORT] or --email user@domain")]
    NoConnectors,
    /// No trusted root yet: the first contact was not made.
    #[error("no trusted gateway root yet: make the first contact (fingerprint check) first")]
    NoTrust,
    /// Stopped through the [`StopHandle`].
    #[error("stopped")]
    Stopped,
}

fn close_suffix(code: Option<u16>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (None, true) => String::new(),
        (None, false) => format!(" ({reason})"),
        (Some(c), true) => format!(" (close {c})"),
        (Some(c), false) => format!(" (close {c}: {reason})"),
    }
}

impl AgentError {
    pub(crate) fn state(path: &std::path::Path, e: impl std::fmt::Display) -> AgentError {
        AgentError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    /// The refusal, if the gateway refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            AgentError::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// A failure worth retrying by itself: the network, a timeout, a connection closed before
    /// the answer.
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Connect { .. } | AgentError::Closed { .. } => true,
            AgentError::Tls { source, .. } => matches!(
                source,
                rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify)
            ),
            _ => false,
        }
    }

    /// The gateway rejected the client certificate as expired (a TLS alert).
    pub fn is_credential_expired_alert(&self) -> bool {
        matches!(
            self,
            AgentError::Tls {
                source: rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired),
                ..
            }
        )
    }
}
