//! Fuzz entry point for the record layer after the handshake (`tls/records.rs`).

use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

use crate::tls::TlsSession;

struct Configs {
    server: Arc<ServerConfig>,
    /// TLS 1.3, TLS 1.2.
    clients: [Arc<ClientConfig>; 2],
}

fn configs() -> &'static Configs {
    static C: OnceLock<Configs> = OnceLock::new();
    C.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["gw.fuzz".into()]).expect("cert");
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(crate::tls::provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = |v: &'static rustls::SupportedProtocolVersion| {
            Arc::new(
                ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[v])
                    .expect("versions")
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            )
        };
        Configs {
            server: Arc::new(server),
            clients: [
                client(&rustls::version::TLS13),
                client(&rustls::version::TLS12),
            ],
        }
    })
}

/// Completes a handshake in memory with a rustls client (TLS 1.3 or 1.2, by `data[0]`), lets
/// the client send one genuine record so the record layer has taken over, then feeds the rest
/// of `data` to the server as received bytes, in pieces of `data[1]` bytes (records cut
/// anywhere). Checks: no panic and no hang; the plaintext handed on never exceeds the bytes
/// fed; after an error the session is not used again (as the shard does).
pub fn records(data: &[u8]) {
    let [mode, piece, rest @ ..] = data else {
        return;
    };
    let c = configs();
    let mut client = ClientConnection::new(
        c.clients[usize::from(mode & 1)].clone(),
        ServerName::try_from("gw.fuzz").expect("name"),
    )
    .expect("client");
    let mut server = TlsSession::new(c.server.clone()).expect("session");
    let (mut out, mut staged, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let mut spares = crate::buf::VecPool::new(4, 1 << 20);
    let mut plain = 0usize;
    // Handshake, then one genuine application record.
    let mut sent_data = false;
    for _ in 0..8 {
        if !client.is_handshaking() && !sent_data {
            client.writer().write_all(b"hello").expect("write");
            sent_data = true;
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write_tls");
        }
        out.clear();
        server
            .receive(
                &mut wire,
                &mut out,
                &mut staged,
                &mut scratch,
                &mut spares,
                |p, _, _| plain += p.len(),
            )
            .expect("a genuine peer is accepted");
        let mut back = &out[..];
        while !back.is_empty() {
            client.read_tls(&mut back).expect("read_tls");
            client
                .process_new_packets()
                .expect("server records are valid");
        }
        if sent_data && plain > 0 {
            break;
        }
    }
    assert_eq!(plain, 5, "the genuine record arrives");
    // Now the fuzzer's bytes.
    let mut fed = rest.to_vec();
    let mut handed = 0usize;
    for chunk in fed.chunks_mut(usize::from(*piece).max(1)) {
        out.clear();
        let r = server.receive(
            chunk,
            &mut out,
            &mut staged,
            &mut scratch,
            &mut spares,
            |p, _, _| handed += p.len(),
        );
        if r.is_err() {
            break;
        }
    }
    assert!(
        handed <= rest.len(),
        "{handed} plaintext bytes from {} fed",
        rest.len()
    );
}
