//! Bytes per idle connection, measured on the gateway's own connection code (TLS session +
//! HTTP/WebSocket state), with a counting allocator. No sockets: an in-memory rustls client
//! does the TLS 1.3 (or 1.2) handshake and the WebSocket upgrade against `shard::conn::Conn`,
//! exactly as the shard drives it, then both sides go idle.
//!
//! The device is a registered one: it presents its device certificate (mutual TLS) and gets a
//! session, as every device does after its registration.
//!
//! Run: `cargo bench --bench idle_memory` (optionally `-- N`, default 2000 connections).
//! It prints, per idle connection: heap bytes held by the connection (what the counting
//! allocator saw the server side keep), the slab slot (`size_of::<Conn>()`), and the sum.

use std::io::{Read, Write};
use std::sync::Arc;

use fleetgate::buf::VecPool;
use fleetgate::config::Config;
use fleetgate::control::Revocations;
use fleetgate::metrics::{Onboarding, ShardStats};
use fleetgate::shard::conn::{ClientCas, Conn, Cx, Settings};
use fleetgate::status::StatusCell;
use fleetgate::sys::CountingAlloc;
use fleetgate::tls::{TlsSession, server_config};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` with the server-side allocations counted.
fn server<T>(f: impl FnOnce() -> T) -> T {
    CountingAlloc::count(f)
}

struct Side {
    settings: Settings,
    stats: Vec<ShardStats>,
    status: StatusCell,
    scratch: Vec<u8>,
    staged: Vec<u8>,
    pool: VecPool,
    frame_pool: VecPool,
    onboarding: Onboarding,
    revocations: Revocations,
    client_cas: ClientCas,
}

impl Side {
    fn feed(&mut self, conn: &mut Conn, bytes: &mut [u8]) -> Vec<u8> {
        let mut cx = Cx {
            now_ms: 0,
            settings: &self.settings,
            stats: &self.stats[0],
            all_stats: &self.stats,
            status: &self.status,
            driver: "bench",
            scratch: &mut self.scratch,
            staged: &mut self.staged,
            pool: &mut self.pool,
            frame_pool: &mut self.frame_pool,
            onboarding: &self.onboarding,
            revocations: &self.revocations,
            client_cas: &self.client_cas,
        };
        server(|| conn.on_data(bytes, &mut cx));
        // What the shard would send; the buffer goes back to the pool afterwards.
        let out = std::mem::take(&mut conn.out);
        let copy = out.clone();
        server(|| self.pool.give(out));
        copy
    }
}

fn pump(side: &mut Side, conn: &mut Conn, client: &mut rustls::ClientConnection) {
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        if to_server.is_empty() {
            break;
        }
        let back = side.feed(conn, &mut to_server);
        if !back.is_empty() {
            client.read_tls(&mut &back[..]).unwrap();
            client.process_new_packets().unwrap();
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    let boot = fleetgate::pki::bootstrap(dir.path(), &["localhost".into()]).unwrap();
    let ks = fleetgate::pki::Keystore::load(&boot.keystore_path).unwrap();
    let cfg = Config::default();
    let device_ca = fleetgate::pki::device::ensure_device_ca(dir.path()).unwrap();
    let scfg = server_config(&ks, &cfg.tls, &[device_ca.cert_der()], None).unwrap();
    // One device credential (all simulated devices share it; the server keeps a copy per
    // session either way).
    let device_key = rcgen::KeyPair::generate().unwrap();
    let issued = device_ca
        .issue(
            "00E0C5A1B2C3",
            &rcgen::PublicKeyData::subject_public_key_info(&device_key),
            1825,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let device_chain = vec![issued.cert_der.clone()];
    let device_pkcs8 = device_key.serialize_der();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&boot.root_pem_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    for (label, version) in [
        ("TLS 1.3", &rustls::version::TLS13),
        ("TLS 1.2", &rustls::version::TLS12),
    ] {
        let ccfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                device_chain.clone(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(device_pkcs8.clone().into()),
            )
            .unwrap(),
        );
        let mut side = Side {
            settings: Settings::from_config(&cfg),
            stats: vec![ShardStats::default()],
            status: StatusCell::default(),
            scratch: Vec::with_capacity(16384),
            staged: Vec::with_capacity(16384),
            pool: VecPool::new(16, 256 * 1024),
            frame_pool: VecPool::new(16, 128 * 1024),
            onboarding: Onboarding::default(),
            revocations: Revocations::default(),
            // The device CA, so that the credential opens a session (not a refusal).
            client_cas: ClientCas::new(device_ca.cert_der(), None),
        };
        CountingAlloc::reset();
        let mut conns = Vec::with_capacity(n);
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let mut conn = server(|| Conn::new(TlsSession::new(scfg.clone()).unwrap(), 0));
            let mut client = rustls::ClientConnection::new(
                ccfg.clone(),
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap();
            pump(&mut side, &mut conn, &mut client);
            assert!(!client.is_handshaking(), "handshake did not complete");
            client
                .writer()
                .write_all(
                    b"GET /usg/endpoint HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                      Sec-WebSocket-Version: 13\r\n\r\n",
                )
                .unwrap();
            pump(&mut side, &mut conn, &mut client);
            let mut resp = [0u8; 12];
            client.reader().read_exact(&mut resp).unwrap();
            assert_eq!(&resp, b"HTTP/1.1 101");
            // One 32-byte ping from the device, answered with a pong, as the idle load does.
            let mut ping = vec![0x89, 0x80 | 32, 1, 2, 3, 4];
            ping.extend((0..32u8).map(|i| i ^ [1, 2, 3, 4][usize::from(i) % 4]));
            client.writer().write_all(&ping).unwrap();
            pump(&mut side, &mut conn, &mut client);
            assert!(conn.is_open());
            conns.push(conn);
            clients.push(client);
        }
        let heap = CountingAlloc::net_bytes() as f64 / n as f64;
        let slot = size_of::<Conn>() as f64;
        println!(
            "{label}: {n} idle WebSocket connections: heap {heap:.0} B + slab slot {slot:.0} B = {:.0} B per connection (size_of TlsSession = {} B)",
            heap + slot,
            size_of::<TlsSession>()
        );
        drop(conns);
        drop(clients);
    }
}
