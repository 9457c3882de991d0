//! The agent library against a small in-process mock gateway (rustls + tungstenite server):
//! the §5 messages, mutual TLS with a device CA, and scripted failures — lost registration
//! answers, refusals, gateways going away and coming back. The real gateway is exercised by
//! the onboarding end-to-end tests; this file pins down the agent's own behaviour (retries with
//! the same key pair, pinning, fallback and return to the first connector, refusal handling).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetgate::agent::{
    AgentError, AgentEvent, AgentOptions, AgentState, Connector, RegisterRequest, RunOutcome,
    StopHandle, Trust, connect_session, fetch_fingerprint, register, run,
};
use fleetgate::pki::Fingerprint;
use fleetgate::proto::device::{Hello, Message, Mode, Refused, Registered};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

#[path = "common/mock_pki.rs"]
mod mock_pki;
use mock_pki::{Pki, accept_until_stopped};

/// What the mock does; tests change it while it runs.
#[derive(Default)]
struct Script {
    /// Drop this many `register` messages without answering (a lost answer).
    drop_registers: usize,
    /// Refuse sessions with this (instead of hello).
    refuse_sessions: Option<Refused>,
    /// Refuse the running session with this after the hello, once.
    refuse_after_hello: Option<Refused>,
    /// SubjectPublicKeyInfo of every CSR received.
    csr_keys: Vec<Vec<u8>>,
    /// Session hellos sent.
    sessions: usize,
}

struct Mock {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    script: Arc<Mutex<Script>>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(pki: &Arc<Pki>, port: u16) -> Mock {
        let script = Arc::new(Mutex::new(Script::default()));
        Mock::start_with(pki, port, script)
    }

    fn start_with(pki: &Arc<Pki>, port: u16, script: Arc<Mutex<Script>>) -> Mock {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let config = pki.server_config();
        let (pki2, stop2, script2) = (pki.clone(), stop.clone(), script.clone());
        let thread = accept_until_stopped(listener, stop.clone(), move |tcp| {
            serve(tcp, config.clone(), &pki2, &script2, &stop2)
        });
        Mock {
            addr,
            stop,
            script,
            thread: Some(thread),
        }
    }

    fn connector(&self) -> Connector {
        Connector::parse(&format!("localhost:{}", self.addr.port())).unwrap()
    }

    /// Stops listening and drops every connection (the gateway goes away).
    fn shutdown(mut self) -> Arc<Mutex<Script>> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.script.clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    pki: &Pki,
    script: &Mutex<Script>,
    stop: &AtomicBool,
) {
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut tls = StreamOwned::new(ServerConnection::new(config).unwrap(), tcp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls.conn.is_handshaking() {
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return, // first contact closes right after the handshake
        }
    }
    let session_unit = tls.conn.peer_certificates().map(|certs| {
        let (_, c) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
        let cn = c.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_owned()
    });
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Ok(mut ws) = tungstenite::accept(tls) else {
        return;
    };
    ws.get_ref()
        .sock
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let send = |ws: &mut tungstenite::WebSocket<_>, m: Message| {
        let _ = ws.send(tungstenite::Message::text(m.to_json()));
    };
    let hello = |mode, unit_id| {
        Message::Hello(Hello {
            protocol: 1,
            mode,
            gateway: "mock/1".into(),
            unit_id,
            name: None,
        })
    };
    match session_unit {
        Some(unit) => {
            let refusal = script.lock().unwrap().refuse_sessions.clone();
            if let Some(r) = refusal {
                send(&mut ws, Message::Refused(r));
                let _ = ws.close(None);
                let _ = ws.flush();
                return;
            }
            send(&mut ws, hello(Mode::Session, Some(unit)));
            script.lock().unwrap().sessions += 1;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return; // TCP dropped without a close: the gateway died
                }
                let later = script.lock().unwrap().refuse_after_hello.take();
                if let Some(r) = later {
                    send(&mut ws, Message::Refused(r));
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    return;
                }
                match ws.read() {
                    Ok(tungstenite::Message::Close(_)) => {
                        let _ = ws.flush();
                        return;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        }
        None => {
            send(&mut ws, hello(Mode::Register, None));
            let deadline = Instant::now() + Duration::from_secs(5);
            let text = loop {
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => break t.to_string(),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                            && Instant::now() < deadline => {}
                    Err(_) => return,
                }
            };
            let Ok(Message::Register(reg)) = Message::from_json(text.as_bytes()) else {
                panic!("expected register, got {text}");
            };
            let (cert, spki) = pki.issue(&reg.unit_id, &reg.csr);
            {
                let mut s = script.lock().unwrap();
                s.csr_keys.push(spki);
                if s.drop_registers > 0 {
                    s.drop_registers -= 1;
                    return; // the answer is lost
                }
            }
            let ca: &rcgen::Certificate = pki.device_ca.as_ref();
            send(
                &mut ws,
                Message::Registered(Registered {
                    reason: "granted".into(),
                    unit_id: reg.unit_id,
                    certificate: cert,
                    device_ca: ca.pem(),
                }),
            );
            let _ = ws.close(None);
            let _ = ws.flush();
        }
    }
}

fn refused(reason: &str, retry_after_ms: Option<u64>, drop_settings: bool) -> Refused {
    Refused {
        reason: reason.into(),
        message: format!("mock says {reason}"),
        retry_after_ms,
        drop_settings,
    }
}

/// A state dir registered as `unit` with `mock` (first contact + pin + register).
fn registered(dir: &std::path::Path, mock: &Mock, unit: &str) -> AgentState {
    let options = AgentOptions::fast();
    let mut state = AgentState::open(dir).unwrap();
    let contact = fetch_fingerprint(&mock.connector(), &options).unwrap();
    assert!(!contact.system_trusted);
    state.adopt(&contact).unwrap();
    let req = RegisterRequest {
        connector: mock.connector(),
        unit_id: unit.into(),
        key: "K".into(),
    };
    register(&mut state, &req, &options, &StopHandle::new()).unwrap();
    state
}

/// Runs the agent on a thread; events arrive on the receiver.
fn spawn_agent(
    mut state: AgentState,
    options: AgentOptions,
) -> (
    StopHandle,
    Receiver<AgentEvent>,
    JoinHandle<Result<RunOutcome, AgentError>>,
) {
    let stop = StopHandle::new();
    let (tx, rx) = channel();
    let s2 = stop.clone();
    let t = std::thread::spawn(move || {
        run(&mut state, &options, &s2, &mut |e| {
            let _ = tx.send(e);
        })
    });
    (stop, rx, t)
}

/// Waits for an event matching `pred`; returns it (the events before it are dropped).
fn wait_for(
    rx: &Receiver<AgentEvent>,
    what: &str,
    pred: impl Fn(&AgentEvent) -> bool,
) -> AgentEvent {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(100)) {
            if pred(&e) {
                return e;
            }
            seen.push(e);
        }
    }
    panic!("no {what} within 15 s; saw {seen:#?}");
}

fn ready_on(port: u16) -> impl Fn(&AgentEvent) -> bool {
    move |e| matches!(e, AgentEvent::Ready { connector, .. } if connector.port == port)
}

/// A port nothing listens on (bound once, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_lost_answer_is_retried_with_the_same_key_pair() {
    let pki = Pki::new();
    let mock = Mock::start(&pki, 0);
    mock.script.lock().unwrap().drop_registers = 2;
    let dir = tempfile::tempdir().unwrap();
    let state = registered(dir.path(), &mock, "kiosk-1");
    {
        let s = mock.script.lock().unwrap();
        assert_eq!(s.csr_keys.len(), 3, "two lost answers, then granted");
        assert!(
            s.csr_keys.iter().all(|k| *k == s.csr_keys[0]),
            "one key pair"
        );
    }
    assert_eq!(state.config.unit_id.as_deref(), Some("kiosk-1"));
    assert_eq!(state.config.trust, Some(Trust::Pinned(pki.fingerprint())));
    assert_eq!(state.config.connectors, vec![mock.connector()]);
    let cred = state.credential().unwrap().expect("stored");
    assert_eq!(cred.unit_id, "kiosk-1");

    // Then it connects with the credential and stops after the first ready with `once`.
    let mut options = AgentOptions::fast();
    options.once = true;
    let (_stop, rx, t) = spawn_agent(state, options);
    match wait_for(&rx, "ready", ready_on(mock.addr.port())) {
        AgentEvent::Ready { unit_id, .. } => assert_eq!(unit_id, "kiosk-1"),
        _ => unreachable!(),
    }
    assert_eq!(t.join().unwrap().unwrap(), RunOutcome::Ready);
}

#[test]
fn the_pinned_root_refuses_another_gateway() {
    let pki = Pki::new();
    let mock = Mock::start(&pki, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut state = registered(dir.path(), &mock, "kiosk-2");
    let options = AgentOptions::fast();
    connect_session(&state, &mock.connector(), &options)
        .expect("the pinned gateway is accepted")
        .close();

    // Another gateway (another root) on another port: the same credential is not offered to
    // it, the handshake fails on the pin.
    let other = Mock::start(&Pki::new(), 0);
    let err = connect_session(&state, &other.connector(), &options).unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    // (Its chain lacks the pinned root, so the stored root.pem is the anchor, and the other
    // gateway's leaf does not verify under it.)
    assert_eq!(other.script.lock().unwrap().sessions, 0);

    // Without the stored root.pem, the chain must carry the pinned root itself.
    assert!(state.pinned_root().is_some());
    std::fs::remove_file(state.path("root.pem")).unwrap();
    let err = connect_session(&state, &other.connector(), &options).unwrap_err();
    assert!(err.to_string().contains("pinned root"), "{err}");
    connect_session(&state, &mock.connector(), &options)
        .expect("the real gateway sends its root")
        .close();
    // A wrong pin refuses the real gateway.
    state.config.trust = Some(Trust::Pinned(Fingerprint([7; 32])));
    let err = connect_session(&state, &mock.connector(), &options).unwrap_err();
    assert!(err.to_string().contains("pinned root"), "{err}");
}

#[test]
fn falls_back_and_returns_to_the_first_connector() {
    let pki = Pki::new();
    let second = Mock::start(&pki, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut state = registered(dir.path(), &second, "kiosk-3");
    let first_port = free_port();
    let first_connector = Connector::parse(&format!("localhost:{first_port}")).unwrap();
    state.config.connectors = vec![first_connector.clone(), second.connector()];
    state.save().unwrap();

    let (stop, rx, t) = spawn_agent(state, AgentOptions::fast());
    wait_for(&rx, "ready on the second", ready_on(second.addr.port()));

    // The first comes up: the agent re-probes it and moves back.
    let first = Mock::start(&pki, first_port);
    wait_for(&rx, "ready on the first", ready_on(first_port));
    // It left the second: its session there ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    while second.script.lock().unwrap().sessions != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    // The first goes away: back to the second...
    let script = first.shutdown();
    wait_for(
        &rx,
        "disconnect from the first",
        |e| matches!(e, AgentEvent::Disconnected { connector, .. } if *connector == first_connector),
    );
    wait_for(
        &rx,
        "ready on the second again",
        ready_on(second.addr.port()),
    );
    // ...and to the first once it is back.
    let _first = Mock::start_with(&pki, first_port, script);
    wait_for(&rx, "ready on the first again", ready_on(first_port));

    stop.stop();
    assert_eq!(t.join().unwrap().unwrap(), RunOutcome::Stopped);
}

#[test]
fn reconnects_after_a_gateway_restart_honouring_retry_after() {
    let pki = Pki::new();
    let mock = Mock::start(&pki, 0);
    let port = mock.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let state = registered(dir.path(), &mock, "kiosk-4");
    let (stop, rx, t) = spawn_agent(state, AgentOptions::fast());
    wait_for(&rx, "ready", ready_on(port));

    let script = mock.shutdown();
    wait_for(&rx, "disconnect", |e| {
        matches!(e, AgentEvent::Disconnected { .. })
    });
    wait_for(&rx, "failed attempt", |e| {
        matches!(e, AgentEvent::ConnectFailed { .. })
    });
    // Back, but full: limit_reached with a retry hint above the backoff cap (500 ms).
    script.lock().unwrap().refuse_sessions = Some(refused("limit_reached", Some(1200), false));
    let mock = Mock::start_with(&pki, port, script);
    wait_for(
        &rx,
        "limit refusal",
        |e| matches!(e, AgentEvent::Refused { refusal, .. } if refusal.reason == "limit_reached"),
    );
    match wait_for(&rx, "wait", |e| matches!(e, AgentEvent::Waiting { .. })) {
        AgentEvent::Waiting { delay } => assert!(delay >= Duration::from_millis(1200), "{delay:?}"),
        _ => unreachable!(),
    }
    let refused_at = Instant::now();
    mock.script.lock().unwrap().refuse_sessions = None;
    wait_for(&rx, "ready again", ready_on(port));
    assert!(refused_at.elapsed() >= Duration::from_millis(1000));

    stop.stop();
    assert_eq!(t.join().unwrap().unwrap(), RunOutcome::Stopped);
}

#[test]
fn a_superseded_credential_stops_the_agent_and_is_deleted() {
    let pki = Pki::new();
    let mock = Mock::start(&pki, 0);
    let dir = tempfile::tempdir().unwrap();
    let state = registered(dir.path(), &mock, "kiosk-5");
    let (_stop, rx, t) = spawn_agent(state, AgentOptions::fast());
    wait_for(&rx, "ready", ready_on(mock.addr.port()));
    mock.script.lock().unwrap().refuse_after_hello =
        Some(refused("credential_superseded", None, false));
    wait_for(&rx, "credential dropped", |e| {
        matches!(e, AgentEvent::CredentialDropped)
    });
    let err = t.join().unwrap().unwrap_err();
    let r = err.refusal().expect("a refusal");
    assert_eq!(r.reason, "credential_superseded");
    assert_eq!(r.message, "mock says credential_superseded");
    let state = AgentState::open(dir.path()).unwrap();
    assert!(!state.has_credential());
    assert_eq!(
        state.config.connectors,
        vec![mock.connector()],
        "settings kept"
    );
}

#[test]
fn a_removed_device_drops_its_gateway_settings() {
    let pki = Pki::new();
    let mock = Mock::start(&pki, 0);
    let dir = tempfile::tempdir().unwrap();
    let state = registered(dir.path(), &mock, "kiosk-6");
    mock.script.lock().unwrap().refuse_sessions = Some(refused("credential_revoked", None, true));
    let (_stop, rx, t) = spawn_agent(state, AgentOptions::fast());
    wait_for(&rx, "settings dropped", |e| {
        matches!(e, AgentEvent::SettingsDropped)
    });
    let err = t.join().unwrap().unwrap_err();
    assert_eq!(err.refusal().unwrap().reason, "credential_revoked");
    let state = AgentState::open(dir.path()).unwrap();
    assert!(!state.has_credential());
    assert!(state.config.connectors.is_empty());
    assert_eq!(state.config.trust, None);
    assert_eq!(state.config.unit_id.as_deref(), Some("kiosk-6"));
    assert!(state.config.enabled);
}
