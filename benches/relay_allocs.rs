//! Heap allocations per relayed message, counted in the gateway's shard threads.
//!
//! Starts the gateway in this process (2 shards, the counting allocator installed and
//! `COUNT_SHARD_THREADS` set, so only shard threads are counted), connects one management
//! client and one device over real TLS on loopback, warms up, then relays requests and their
//! responses (management → device → management) and stream data, and prints allocations per
//! relayed message. Run: `cargo bench --bench relay_allocs` (optionally `-- N`, default 20000
//! round trips).

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use fleetgate::config::Config;
use fleetgate::proto::envelope::{self, Header, Kind};
use fleetgate::registry::{RegistrationRequest, Registry, unix_now};
use fleetgate::sys::{COUNT_SHARD_THREADS, CountingAlloc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::Message;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

type Ws = tungstenite::WebSocket<StreamOwned<ClientConnection, TcpStream>>;

fn client(
    addr: std::net::SocketAddr,
    root: &std::path::Path,
    cert: CertificateDer<'static>,
    key: &rcgen::KeyPair,
    path: &str,
) -> Ws {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![cert],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let stream = StreamOwned::new(conn, tcp);
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (mut ws, _) = tungstenite::client::client(url.as_str(), stream).unwrap();
    match ws.read().unwrap() {
        Message::Text(t) => assert!(t.as_str().contains("\"hello\""), "{t}"),
        other => panic!("no hello: {other:?}"),
    }
    ws
}

fn env(kind: Kind, channel: u32, route: u64, unit: &str, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    envelope::write(
        &mut v,
        &Header {
            kind,
            channel,
            route,
            unit,
        },
        body,
    );
    v
}

/// The stream window in 16 KiB pieces: the protocol's default 256 KiB.
const WINDOW_PIECES: u32 = 16;

/// Pieces the device reads before it grants credit for them (half the window).
const CREDIT_PIECES: u32 = WINDOW_PIECES / 2;

fn next_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        match ws.read().unwrap() {
            Message::Binary(b) => return b.to_vec(),
            _ => continue,
        }
    }
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let mut config = Config::default();
    config.server.data_dir = data.clone();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.shards = 2;
    COUNT_SHARD_THREADS.store(true, std::sync::atomic::Ordering::Relaxed);
    let running = fleetgate::server::start(config).unwrap();
    let addr = running.local_addr;
    let root = data.join("root.pem");

    // A registered device (credential recorded as a registration would) and a management cert.
    let now = time::OffsetDateTime::now_utc();
    let dkey = rcgen::KeyPair::generate().unwrap();
    let issued = fleetgate::pki::device::ensure_device_ca(&data)
        .unwrap()
        .issue(
            "BENCH-1",
            &rcgen::PublicKeyData::subject_public_key_info(&dkey),
            30,
            now,
        )
        .unwrap();
    let mut reg = Registry::open_in(&data).unwrap();
    let mass = reg.create_mass_key(None, unix_now()).unwrap();
    reg.consume_key(&RegistrationRequest {
        key: &mass.value,
        unit_id: "BENCH-1",
        source: None,
        credential: &issued.credential(),
        root: None,
        now: unix_now(),
    })
    .unwrap();
    let mkey = rcgen::KeyPair::generate().unwrap();
    let mcert = fleetgate::pki::device::ensure_mgmt_ca(&data)
        .unwrap()
        .issue(
            "bench",
            &rcgen::PublicKeyData::subject_public_key_info(&mkey),
            30,
            now,
        )
        .unwrap();

    let mut m = client(addr, &root, mcert.cert_der, &mkey, "/usg/management");
    let mut d = client(addr, &root, issued.cert_der, &dkey, "/usg/endpoint");
    // The device answers every request, swallows data and grants credit for it.
    let device = std::thread::spawn(move || {
        let mut data_pieces = 0u32;
        loop {
            let msg = match d.read() {
                Ok(Message::Binary(b)) => b,
                Ok(_) => continue,
                Err(_) => return,
            };
            let (h, _) = Header::parse(&msg).unwrap();
            if h.kind == Kind::Data {
                data_pieces += 1;
                if data_pieces % CREDIT_PIECES == 0 {
                    let grant = (CREDIT_PIECES * 16 * 1024).to_be_bytes();
                    let credit = env(Kind::Credit, h.channel, h.route, "", &grant);
                    if d.send(Message::binary(credit)).is_err() {
                        return;
                    }
                }
            }
            if h.kind == Kind::Request {
                let reply = env(
                    Kind::Response,
                    h.channel,
                    h.route,
                    "",
                    br#"{"ok":true,"result":{}}"#,
                );
                if d.send(Message::binary(reply)).is_err() {
                    return;
                }
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let request = env(
        Kind::Request,
        0,
        0,
        "BENCH-1",
        br#"{"method":"ping","params":{}}"#,
    );
    let mut round_trips = |count: u32| {
        for i in 0..count {
            let mut r = request.clone();
            r[4..8].copy_from_slice(&i.to_be_bytes());
            m.send(Message::binary(r)).unwrap();
            loop {
                let b = next_binary(&mut m);
                if b[0] == Kind::Response as u8 {
                    break;
                }
            }
        }
    };
    round_trips(2_000); // warm-up: pools fill
    CountingAlloc::reset();
    let t = Instant::now();
    round_trips(n);
    let took = t.elapsed();
    let allocs = CountingAlloc::allocations();
    println!(
        "requests: {n} round trips (management -> device -> management) in {:.2} s ({:.0}/s, {:.1} us each); \
         shard allocations: {allocs} = {:.3} per relayed message",
        took.as_secs_f64(),
        f64::from(n) / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(n),
        allocs as f64 / (2.0 * f64::from(n))
    );

    // Stream data: 16 KiB pieces management -> device, paced by credit as the protocol says:
    // a 256 KiB window, the device granting half of it back each time it has read that much.
    let piece = vec![0x5a_u8; 16 * 1024];
    let data_env = env(Kind::Data, 1, 0, "BENCH-1", &piece);
    let mut send_data = |pieces: u32| {
        let mut outstanding = 0;
        let mut sent = 0;
        while sent < pieces || outstanding > 0 {
            if sent < pieces && outstanding < WINDOW_PIECES {
                m.send(Message::binary(data_env.clone())).unwrap();
                sent += 1;
                outstanding += 1;
                continue;
            }
            let b = next_binary(&mut m);
            assert_eq!(b[0], Kind::Credit as u8, "only credit comes back");
            outstanding -= CREDIT_PIECES;
        }
    };
    send_data(25 * CREDIT_PIECES); // warm-up: pools fill
    CountingAlloc::reset();
    let pieces = 640 * CREDIT_PIECES;
    let t = Instant::now();
    send_data(pieces);
    let took = t.elapsed();
    let allocs = CountingAlloc::allocations();
    let msgs = pieces + pieces / CREDIT_PIECES;
    println!(
        "data: {pieces} x 16 KiB in {:.2} s ({:.0} MB/s through the gateway, TLS both legs, one \
         stream, 256 KiB window); shard allocations: {allocs} = {:.3} per relayed message (data \
         and credit)",
        took.as_secs_f64(),
        f64::from(pieces) * 16384.0 / took.as_secs_f64() / 1e6,
        allocs as f64 / f64::from(msgs)
    );
    drop(m);
    running.shutdown();
    let _ = device.join();
}
