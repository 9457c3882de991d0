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
    // The device answers every request and swallows data.
    let device = std::thread::spawn(move || {
        loop {
            let msg = match d.read() {
                Ok(Message::Binary(b)) => b,
                Ok(_) => continue,
                Err(_) => return,
            };
            let (h, _) = Header::parse(&msg).unwrap();
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

    // Stream data: 16 KiB pieces management -> device.
    let piece = vec![0x5a_u8; 16 * 1024];
    let data_env = env(Kind::Data, 1, 0, "BENCH-1", &piece);
    for _ in 0..500 {
        m.send(Message::binary(data_env.clone())).unwrap();
    }
    m.send(Message::binary(request.clone())).unwrap();
    while next_binary(&mut m)[0] != Kind::Response as u8 {}
    CountingAlloc::reset();
    let pieces = 5_000u32;
    let t = Instant::now();
    for i in 0..pieces {
        m.send(Message::binary(data_env.clone())).unwrap();
        if i % 64 == 63 {
            // Stay inside a window: a request behind the data proves it arrived.
            m.send(Message::binary(request.clone())).unwrap();
            while next_binary(&mut m)[0] != Kind::Response as u8 {}
        }
    }
    let took = t.elapsed();
    let allocs = CountingAlloc::allocations();
    let msgs = pieces + 2 * (pieces / 64);
    println!(
        "data: {pieces} x 16 KiB in {:.2} s ({:.0} MB/s through the gateway, TLS both legs, one stream); \
         shard allocations: {allocs} = {:.3} per relayed message",
        took.as_secs_f64(),
        f64::from(pieces) * 16384.0 / took.as_secs_f64() / 1e6,
        allocs as f64 / f64::from(msgs)
    );
    drop(m);
    running.shutdown();
    let _ = device.join();
}
