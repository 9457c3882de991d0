//! Shared helpers for the integration tests: run the real `fleetgate` binary on a temporary
//! data dir and an ephemeral port, and talk to it over real TLS.
#![allow(dead_code)]

pub mod device;
pub mod dnsmasq;
pub mod mgmt;
pub mod peers;
pub mod tinyproxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Both backends, for tests that must run on each.
pub const DRIVERS: [&str; 2] = ["uring", "epoll"];

/// A running gateway process.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `fleetgate serve` with `--listen 127.0.0.1:0 --enable-echo` plus `extra` args and
    /// an optional TOML config, and waits for its "listening on" line.
    pub fn start(driver: &str, config: Option<&str>, extra: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, driver, config, extra)
    }

    pub fn start_in(
        dir: tempfile::TempDir,
        driver: &str,
        config: Option<&str>,
        extra: &[&str],
    ) -> Gateway {
        Self::start_with_env(dir, driver, config, extra, &[])
    }

    /// [`Gateway::start_in`] with extra environment variables, set after the defaults
    /// (`("RUST_LOG", "")` lets `log.level` from the config apply).
    pub fn start_with_env(
        dir: tempfile::TempDir,
        driver: &str,
        config: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let data = dir.path().join("data");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
        cmd.arg("serve").arg("--data-dir").arg(&data);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--enable-echo", "--driver", driver])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = config {
            let path = dir.path().join("fleetgate.toml");
            std::fs::write(&path, c).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("spawn fleetgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on ") {
                    let rest = &line[i + 13..];
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("gateway did not start:\n{}", log.lock().unwrap());
            }
        };
        Gateway {
            child,
            addr,
            dir,
            log,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn root_pem(&self) -> PathBuf {
        self.data_dir().join("root.pem")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGTERM and wait; returns the exit status and how long it took.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Duration) {
        let t = Instant::now();
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gateway did not exit after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A rustls client configuration trusting this gateway's root.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config_for(&self.root_pem(), None)
    }

    /// A TLS stream to the gateway (SNI "localhost").
    pub fn tls(&self) -> TlsStream {
        tls_connect(self.addr, self.client_config())
    }

    /// A metric from `GET /metrics`: the sum of its samples over all label sets (the value
    /// itself for an unlabelled one). Panics when the gateway does not report it.
    #[allow(dead_code)]
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let mut s = self.tls();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let values: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert!(!values.is_empty(), "metric {name} missing");
        values.iter().sum()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A client configuration trusting `root_pem`, optionally pinned to one TLS version.
pub fn client_config_for(
    root_pem: &Path,
    version: Option<&'static rustls::SupportedProtocolVersion>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(root_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS stream, or the handshake's error (refused client certificate, …).
pub fn tls_connect_result(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<TlsStream, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

pub fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    s
}

/// A WebSocket (tungstenite, the independent implementation) over TLS to `path`.
pub fn ws_connect(gw: &Gateway, path: &str) -> tungstenite::WebSocket<TlsStream> {
    let stream = gw.tls();
    let url = format!("wss://localhost:{}{}", gw.port(), path);
    let (ws, resp) = tungstenite::client::client(url.as_str(), stream).expect("upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends raw bytes over TLS and reads until the server closes or `timeout`; returns all bytes.
pub fn raw_exchange(gw: &Gateway, request: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = gw.tls();
    s.sock.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request).unwrap();
    s.flush().unwrap();
    read_all(&mut s)
}

/// Reads until EOF, error or read timeout.
pub fn read_all(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// A minimal valid upgrade request head for `path`, with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Runs a command and returns (status, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether a program is installed.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The values of a per-shard metric (`NAME{shard="i"} v` lines), by shard.
pub fn per_shard(metrics: &str, name: &str) -> Vec<u64> {
    let prefix = format!("{name}{{shard=");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}
