//! `move` (`docs/protocol.md` §6.4): prove the new gateway works, then switch to it.
//!
//! [`prove`] (on a worker thread) connects to the new gateway and authenticates: with the
//! current credential, or — when a key is given — by registering there first (in a scratch
//! directory holding a copy of the device key, so nothing of the current state changes) and
//! then opening a session with the new credential. The gateway is authenticated with the
//! given root fingerprint, else with the roots trusted now. Only when that worked does the
//! run loop [`apply_move`]: the new gateway becomes the first connector (the old ones stay
//! as fallbacks), its root is trusted besides the old ones, a new credential replaces the old
//! one; then it answers `{"moved": true}` and reconnects. Otherwise the answer is
//! `move_failed` with the reason, and nothing changes.

use serde::Deserialize;

use super::super::client::{RegisterRequest, connect_session, connect_session_with, register};
use super::super::state::{AgentState, CERT_FILE, Connector, DEVICE_CA_FILE, KEY_FILE, Trust};
use super::super::{AgentError, AgentOptions, StopHandle, prompt};
use crate::pki::Fingerprint;

/// The parameters of `move`.
#[derive(Debug, Clone)]
pub struct MoveParams {
    /// The new gateway.
    pub connector: Connector,
    /// Its root fingerprint, when it is not one the agent trusts already.
    pub fingerprint: Option<Fingerprint>,
    /// A first-authentication key to register there with.
    pub key: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    gateway: String,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

impl MoveParams {
    /// Parses `{"gateway", "fingerprint"?, "key"?}`.
    pub fn parse(params: &serde_json::Value) -> Result<MoveParams, String> {
        let raw: Raw = serde_json::from_value(params.clone()).map_err(|e| format!("move: {e}"))?;
        let connector = Connector::parse(&raw.gateway).map_err(|e| format!("move: {e}"))?;
        let fingerprint = match raw.fingerprint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(f) => Some(
                prompt::parse_full(f)
                    .ok_or_else(|| format!("move: fingerprint {f:?} is not 64 hex digits"))?,
            ),
        };
        let key = raw.key.filter(|k| !k.trim().is_empty());
        Ok(MoveParams {
            connector,
            fingerprint,
            key,
        })
    }
}

/// What [`prove`] found to work.
#[derive(Debug, Clone)]
pub struct MovePlan {
    /// The new gateway.
    pub connector: Connector,
    /// Its root, to trust besides the current ones.
    pub fingerprint: Option<Fingerprint>,
    /// A new credential (certificate PEM, device CA PEM) from registering there.
    pub credential: Option<(String, String)>,
}

/// The state to try the new gateway with: the current trust plus the given root.
fn with_root(state: &AgentState, fingerprint: Option<Fingerprint>) -> AgentState {
    let mut s = state.clone();
    if let Some(fp) = fingerprint
        && s.config.trust != Some(Trust::Pinned(fp))
        && !s.config.extra_roots.contains(&fp)
    {
        if s.config.trust.is_none() {
            s.config.trust = Some(Trust::Pinned(fp));
        } else {
            s.config.extra_roots.push(fp);
        }
    }
    s
}

/// Connects and authenticates at the new gateway (see the module docs). Changes nothing.
pub fn prove(
    state: &AgentState,
    unit_id: &str,
    params: &MoveParams,
    options: &AgentOptions,
) -> Result<MovePlan, String> {
    let trial = with_root(state, params.fingerprint);
    let connector = &params.connector;
    let Some(key) = &params.key else {
        let credential = trial
            .credential()
            .map_err(|e| e.to_string())?
            .ok_or("no device credential")?;
        let config = trial
            .tls_config(Some(&credential))
            .map_err(|e| e.to_string())?;
        let session = connect_session_with(connector, config, options).map_err(reason)?;
        session.close();
        return Ok(MovePlan {
            connector: connector.clone(),
            fingerprint: params.fingerprint,
            credential: None,
        });
    };
    // Register in a scratch directory with a copy of the device key.
    let mut nonce = [0u8; 6];
    let _ = getrandom::fill(&mut nonce);
    let scratch_dir = state.path(&format!(
        "move-{}",
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let result = (|| {
        let mut scratch = AgentState::open(&scratch_dir).map_err(|e| e.to_string())?;
        std::fs::copy(state.path(KEY_FILE), scratch.path(KEY_FILE))
            .map_err(|e| format!("copying the device key: {e}"))?;
        for name in [
            super::super::state::ROOT_FILE,
            super::super::state::EXTRA_ROOTS_FILE,
        ] {
            let _ = std::fs::copy(state.path(name), scratch.path(name));
        }
        scratch.config.trust = trial.config.trust;
        scratch.config.extra_roots = trial.config.extra_roots.clone();
        scratch.config.unit_id = Some(unit_id.to_owned());
        let request = RegisterRequest {
            connector: connector.clone(),
            unit_id: unit_id.to_owned(),
            key: key.clone(),
        };
        let registered =
            register(&mut scratch, &request, options, &StopHandle::new()).map_err(reason)?;
        if let Some(s) = registered.session {
            s.close();
        }
        connect_session(&scratch, connector, options)
            .map_err(reason)?
            .close();
        let cert = std::fs::read_to_string(scratch.path(CERT_FILE))
            .map_err(|e| format!("reading the new credential: {e}"))?;
        let ca = std::fs::read_to_string(scratch.path(DEVICE_CA_FILE)).unwrap_or_default();
        Ok(MovePlan {
            connector: connector.clone(),
            fingerprint: params.fingerprint,
            credential: Some((cert, ca)),
        })
    })();
    let _ = std::fs::remove_dir_all(&scratch_dir);
    result
}

fn reason(e: AgentError) -> String {
    match e {
        AgentError::Refused(r) => format!("the new gateway refused: {} ({})", r.message, r.reason),
        e => e.to_string(),
    }
}

/// Switches `state` to the proven gateway and saves `agent.toml`: the new gateway first (the
/// others stay, in their order), its root trusted, its credential stored.
pub fn apply_move(state: &mut AgentState, plan: &MovePlan) -> Result<(), AgentError> {
    let moved = with_root(state, plan.fingerprint);
    state.config.trust = moved.config.trust;
    state.config.extra_roots = moved.config.extra_roots;
    if let Some((cert, ca)) = &plan.credential {
        state.store_certificate(cert, ca)?;
    }
    state.config.connectors.retain(|c| *c != plan.connector);
    state.config.connectors.insert(0, plan.connector.clone());
    state.save()
}
