//! The agent's run loop: stay connected, reconnect with backoff, fall back through the
//! connectors and return to the first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::backoff::StopHandle;
use super::client::{Session, check_expiry, connect_session_with};
use super::relay::{Relay, RelayAction, RelayConfig, apply_move};
use super::state::{AgentState, Connector, Credential, Trust};
use super::{AgentError, AgentEvent, AgentOptions, Refusal};
use crate::pki::Fingerprint;
use crate::proto::envelope::ResponseBody;

/// How [`run`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The [`StopHandle`] was triggered.
    Stopped,
    /// `options.once` and a session became ready (it was closed again).
    Ready,
    /// Gateway use was switched off in `agent.toml` (now or while running).
    Disabled,
}

/// How often a running agent re-reads `agent.toml` (to notice `--disable`).
const CONFIG_CHECK: Duration = Duration::from_secs(1);

/// Runs the agent until stopped: connects with the stored credential to the first connector
/// that answers (in order), reports [`AgentEvent::Ready`] on each session `hello`, stays
/// connected (pings are answered), and reconnects whenever the session ends — waiting with
/// exponential backoff and full jitter between rounds (`options.backoff`, at least the
/// gateway's `retry_after_ms`). A round tries every connector in order; while on a later one,
/// the first is re-tried every `options.reprobe_interval` and the agent moves back to it when
/// it answers.
///
/// Ends with:
/// * `Ok(`[`RunOutcome::Stopped`]`)` when `stop` is triggered (the session is closed with 1000);
/// * `Ok(`[`RunOutcome::Ready`]`)` after the first ready session when `options.once`;
/// * `Ok(`[`RunOutcome::Disabled`]`)` when gateway use is (or becomes) off in `agent.toml`;
/// * `Err(`[`AgentError::Refused`]`)` for the refusals that mean "stop using this credential":
///   `credential_revoked` (with `drop_settings`, the connectors, trust and credential are
///   deleted first, [`AgentEvent::SettingsDropped`]), `credential_superseded`,
///   `credential_unknown`, `credential_expired` (the certificate is deleted, the key kept:
///   register again);
/// * `Err(..)` when there is nothing to run with: [`AgentError::NotRegistered`],
///   [`AgentError::NoConnectors`], [`AgentError::NoTrust`], an unreadable state.
///
/// `agent.toml` is re-read at the start of every round (and checked every second for
/// `enabled = false` while connected), so save changes to `state.config` before calling.
///
/// `on_event` is called on the agent's thread; keep it quick (send to a channel).
pub fn run(
    state: &mut AgentState,
    options: &AgentOptions,
    stop: &StopHandle,
    on_event: &mut dyn FnMut(AgentEvent),
) -> Result<RunOutcome, AgentError> {
    run_from(state, options, stop, on_event, None)
}

/// [`run`], starting with a session that is already open: the one [`register`] got when the
/// gateway continued the registration connection ([`Registered::session`]).
///
/// [`register`]: crate::agent::register
/// [`Registered::session`]: crate::agent::Registered::session
pub fn run_from(
    state: &mut AgentState,
    options: &AgentOptions,
    stop: &StopHandle,
    on_event: &mut dyn FnMut(AgentEvent),
    mut first: Option<Session>,
) -> Result<RunOutcome, AgentError> {
    let mut attempt: u32 = 0;
    // The TLS configuration is kept while the credential and trust stay the same: it holds the
    // session tickets, so reconnects (a gateway restart included: the gateway keeps its ticket
    // keys) resume instead of running full handshakes.
    let mut cached: Option<(Vec<u8>, Anchors, Arc<rustls::ClientConfig>)> = None;
    loop {
        if stop.is_stopped() {
            return Ok(RunOutcome::Stopped);
        }
        state.reload()?;
        if !state.config.enabled {
            on_event(AgentEvent::Disabled);
            return Ok(RunOutcome::Disabled);
        }
        let credential = state.credential()?.ok_or(AgentError::NotRegistered)?;
        let trust = state.config.trust.ok_or(AgentError::NoTrust)?;
        let connectors = state.config.connectors.clone();
        if connectors.is_empty() {
            return Err(AgentError::NoConnectors);
        }
        check_expiry(&credential)?;
        let anchors = (trust, state.config.extra_roots.clone());
        let config = match &cached {
            Some((cert, a, config)) if *cert == credential.cert.as_ref() && *a == anchors => {
                config.clone()
            }
            _ => {
                let config = state.tls_config(Some(&credential))?;
                cached = Some((credential.cert.to_vec(), anchors, config.clone()));
                config
            }
        };

        // One round: every connector in order (unless a session is already open).
        let mut retry_after: Option<Duration> = None;
        let mut found: Option<(usize, Session)> = first.take().map(|s| {
            let index = connectors.iter().position(|c| c == s.connector());
            (index.unwrap_or(0), s)
        });
        for (index, connector) in connectors.iter().enumerate() {
            if found.is_some() {
                break;
            }
            if stop.is_stopped() {
                return Ok(RunOutcome::Stopped);
            }
            on_event(AgentEvent::Connecting {
                connector: connector.clone(),
            });
            match connect_session_with(connector, config.clone(), options) {
                Ok(session) => {
                    found = Some((index, session));
                    break;
                }
                Err(e) => {
                    let r = failed(state, &credential, connector, e, on_event)?;
                    retry_after = retry_after.max(r);
                }
            }
        }
        let Some((mut index, mut session)) = found else {
            let delay = options.backoff.delay(attempt, retry_after);
            attempt = attempt.saturating_add(1);
            on_event(AgentEvent::Waiting { delay });
            if stop.sleep(delay) {
                return Ok(RunOutcome::Stopped);
            }
            continue;
        };
        on_event(ready(&session, &credential));
        if options.once {
            session.close();
            return Ok(RunOutcome::Ready);
        }
        attach_relay(&mut session, state, options, &credential);

        // Connected: stay until the session ends, moving back to the first connector when it
        // answers again.
        let mut next_probe = Instant::now() + options.reprobe_interval;
        let mut next_config_check = Instant::now() + CONFIG_CHECK;
        let end = loop {
            if stop.is_stopped() {
                session.close();
                return Ok(RunOutcome::Stopped);
            }
            if let Err(e) = session.poll() {
                break End::Error(e);
            }
            if let Some(to) = finish_actions(&mut session, state) {
                break End::Moved(to);
            }
            let now = Instant::now();
            if now >= next_config_check {
                next_config_check = now + CONFIG_CHECK;
                let disabled = AgentState::open(state.dir()).is_ok_and(|f| !f.config.enabled);
                if disabled {
                    session.close();
                    state.config.enabled = false;
                    on_event(AgentEvent::Disabled);
                    return Ok(RunOutcome::Disabled);
                }
            }
            if index > 0 && now >= next_probe {
                let first = &connectors[0];
                on_event(AgentEvent::Connecting {
                    connector: first.clone(),
                });
                match connect_session_with(first, config.clone(), options) {
                    Ok(back) => {
                        on_event(AgentEvent::Disconnected {
                            connector: session.connector().clone(),
                            reason: format!("moving back to {first}"),
                        });
                        session.close();
                        session = back;
                        index = 0;
                        on_event(ready(&session, &credential));
                        attach_relay(&mut session, state, options, &credential);
                    }
                    Err(e) => {
                        failed(state, &credential, first, e, on_event)?;
                    }
                }
                next_probe = Instant::now() + options.reprobe_interval;
            }
        };
        let connector = session.connector().clone();
        let end = match end {
            End::Error(e) => e,
            End::Moved(to) => {
                session.close();
                on_event(AgentEvent::Disconnected {
                    connector,
                    reason: format!("moved to {to}"),
                });
                // Straight to the new gateway (now the first connector).
                attempt = 0;
                continue;
            }
        };
        drop(session);
        let retry_after = match end {
            AgentError::Refused(_) => failed(state, &credential, &connector, end, on_event)?,
            other => {
                let reason = other.to_string();
                let prefix = format!("{connector}: ");
                on_event(AgentEvent::Disconnected {
                    reason: reason.strip_prefix(&prefix).unwrap_or(&reason).to_owned(),
                    connector,
                });
                None
            }
        };
        // The session had succeeded: attempt 0 again, but still jittered so that a fleet
        // dropped at once does not come back at once.
        let delay = options.backoff.delay(0, retry_after);
        attempt = 1;
        on_event(AgentEvent::Waiting { delay });
        if stop.sleep(delay) {
            return Ok(RunOutcome::Stopped);
        }
    }
}

/// What the TLS configuration trusts: the trust and the further roots.
type Anchors = (Trust, Vec<Fingerprint>);

/// How a connected session ended.
enum End {
    Error(AgentError),
    /// `move` succeeded: reconnect to the new first connector.
    Moved(Connector),
}

/// Serves the relay (`docs/protocol.md` §6) in `session` with the settings of `state`.
fn attach_relay(
    session: &mut Session,
    state: &AgentState,
    options: &AgentOptions,
    credential: &Credential,
) {
    let unit_id = if session.unit_id().is_empty() {
        credential.unit_id.clone()
    } else {
        session.unit_id().to_owned()
    };
    let config = RelayConfig::from_state(state, &unit_id);
    let mut relay_options = options.clone();
    relay_options.once = false;
    match Relay::new(config, state.clone(), relay_options) {
        Ok(relay) => session.attach_relay(relay),
        Err(e) => tracing::warn!("relay unavailable in this session: {e}"),
    }
}

/// Finishes the requests that change the state (`root.offer`, `move`); returns the new
/// gateway after a successful move (its answer has been sent).
fn finish_actions(session: &mut Session, state: &mut AgentState) -> Option<Connector> {
    while let Some(action) = session.take_action() {
        match action {
            RelayAction::RootOffer { reply, root } => {
                let answer = match state.add_root(&root) {
                    Ok((fp, added)) => {
                        tracing::info!(fingerprint = %fp.hex(), added, "root offered by the gateway");
                        ResponseBody::ok(json!({
                            "accepted": true,
                            "fingerprint": fp.hex(),
                            "added": added,
                        }))
                    }
                    Err(e) => ResponseBody::err("internal_error", e.to_string()),
                };
                session.respond(reply, &answer);
            }
            RelayAction::Move { reply, plan } => match apply_move(state, &plan) {
                Ok(()) => {
                    session.respond(reply, &ResponseBody::ok(json!({ "moved": true })));
                    let _ = session.flush_relay(Duration::from_secs(2));
                    return Some(plan.connector);
                }
                Err(e) => {
                    session.respond(
                        reply,
                        &ResponseBody::err("move_failed", format!("cannot switch: {e}")),
                    );
                }
            },
        }
    }
    None
}

fn ready(session: &Session, credential: &Credential) -> AgentEvent {
    let unit_id = if session.unit_id().is_empty() {
        credential.unit_id.clone()
    } else {
        session.unit_id().to_owned()
    };
    AgentEvent::Ready {
        unit_id,
        connector: session.connector().clone(),
    }
}

/// Handles a failed connection or an ended session: reports it, and for the refusals that
/// stop the agent applies them to the state and returns the error. Otherwise returns the
/// gateway's `retry_after` (if any).
fn failed(
    state: &mut AgentState,
    credential: &Credential,
    connector: &Connector,
    error: AgentError,
    on_event: &mut dyn FnMut(AgentEvent),
) -> Result<Option<Duration>, AgentError> {
    let refusal = match error {
        AgentError::Refused(r) => r,
        e if e.is_credential_expired_alert() => Refusal {
            reason: "credential_expired".into(),
            message: format!("the gateway refused the device credential: {e}"),
            retry_after: None,
            drop_settings: false,
        },
        e => {
            tracing::debug!(%connector, "connection failed: {e}");
            on_event(AgentEvent::ConnectFailed {
                connector: connector.clone(),
                error: e.to_string(),
            });
            return Ok(None);
        }
    };
    on_event(AgentEvent::Refused {
        connector: connector.clone(),
        refusal: refusal.clone(),
    });
    if !refusal.stops_agent() {
        return Ok(refusal.retry_after);
    }
    if refusal.drop_settings || refusal.reason == "credential_revoked" {
        state.drop_settings()?;
        on_event(AgentEvent::SettingsDropped);
    } else if state.drop_credential_if(&credential.cert_pem)? {
        on_event(AgentEvent::CredentialDropped);
    }
    Err(AgentError::Refused(refusal))
}
