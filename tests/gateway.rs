//! The gateway core end to end: the real binary on loopback, real TLS, tungstenite (an
//! independent WebSocket implementation), curl and openssl s_client. Every test runs on both
//! backends (io_uring and epoll).

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// Declares `mod NAME { fn uring(); fn epoll(); }` running `body(driver)` on each backend.
macro_rules! both_drivers {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn uring() {
                ($body)("uring");
            }
            #[test]
            fn epoll() {
                ($body)("epoll");
            }
        }
    };
}

fn status_text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

both_drivers!(check_status_and_metrics_over_curl, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let root = gw.root_pem();
    for (tls, max) in [("--tlsv1.2", "1.2"), ("--tlsv1.3", "1.3")] {
        let (ok, body, err) = run(Command::new("curl").args([
            "-sS",
            "--cacert",
            root.to_str().unwrap(),
            tls,
            "--tls-max",
            max,
            "-w",
            "\n%{http_code} %{content_type}",
            &format!("https://localhost:{}/usg/check-status", gw.port()),
        ]));
        assert!(ok, "curl failed: {err}");
        // No management server is connected yet: warn (SPEC.md).
        assert_eq!(
            body, "{\"status\":\"warn\"}\n200 application/json",
            "TLS {max}"
        );
    }
    let (ok, body, _) = run(Command::new("curl").args([
        "-sS",
        "--cacert",
        root.to_str().unwrap(),
        &format!("https://localhost:{}/metrics", gw.port()),
    ]));
    assert!(ok);
    assert!(
        body.contains("fleetgate_connections{shard=\"0\"}"),
        "{body}"
    );
    // Each shard's CPU time: it did a TLS handshake or two already.
    let cpu: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("fleetgate_shard_cpu_seconds_total{shard="))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    let shards = body
        .lines()
        .filter(|l| l.starts_with("fleetgate_connections{shard="))
        .count();
    assert_eq!(cpu.len(), shards, "{body}");
    assert!(cpu.iter().all(|c| *c >= 0.0), "{body}");
    assert!(
        body.contains("fleetgate_tls_handshakes_total{version=\"1.2\"} 1"),
        "{body}"
    );
    assert!(body.contains(&format!("driver=\"{driver}\"")), "{body}");
    let (_, code, _) = run(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        root.to_str().unwrap(),
        &format!("https://localhost:{}/no/such/path", gw.port()),
    ]));
    assert_eq!(code, "404");
    let (_, code, _) = run(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        "-w",
        "%{http_code}",
        "--cacert",
        root.to_str().unwrap(),
        &format!("https://localhost:{}/usg/check-status", gw.port()),
    ]));
    assert_eq!(code, "405");
});

/// The `openssl s_client` command line to the gateway, verifying its certificate against the
/// root, with `extra` arguments.
fn s_client_command(gw: &Gateway, extra: &[&str]) -> Command {
    let mut c = Command::new("openssl");
    c.args([
        "s_client",
        "-connect",
        &gw.addr.to_string(),
        "-servername",
        "localhost",
    ])
    .args([
        "-CAfile",
        gw.root_pem().to_str().unwrap(),
        "-verify_return_error",
    ])
    .args(extra);
    c
}

/// `openssl s_client` to the gateway (verifying its certificate against the root), with
/// `extra` arguments and all three standard streams piped.
fn s_client(gw: &Gateway, extra: &[&str]) -> std::process::Child {
    s_client_command(gw, extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

// After the handshake the gateway protects records itself (src/tls/records.rs): a TLS 1.3
// KeyUpdate from a real, non-rustls client — openssl's `K` (asks for one back) and `k` —
// re-keys the connection, and requests keep being answered on it under the new keys.
both_drivers!(openssl_key_updates_keep_the_connection_working, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let mut child = s_client(&gw, &["-tls1_3", "-crlf"]);
    let mut stdin = child.stdin.take().unwrap();
    let get = b"GET /usg/check-status HTTP/1.1\nHost: localhost\n\n";
    // s_client reads its commands from the start of a line; pauses let each take effect.
    for step in [&get[..], b"K\n", get, b"k\n", get] {
        stdin.write_all(step).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("HTTP/1.1 200 OK").count(),
        3,
        "three answers on one connection:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("KEYUPDATE").count(), 2, "{stderr}");
    assert!(
        !stdout.contains("alert") && !stdout.contains(":error:"),
        "{stdout}"
    );
});

both_drivers!(openssl_s_client_tls12_and_tls13, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    for v in ["-tls1_2", "-tls1_3"] {
        let mut child = s_client(&gw, &[v, "-quiet"]);
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("HTTP/1.1 200 OK") && stdout.ends_with("{\"status\":\"warn\"}"),
            "{v}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // TLS 1.1 is refused.
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &gw.addr.to_string(), "-tls1_1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
});

both_drivers!(echo_text_binary_large_and_fragmented, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let mut ws = ws_connect(&gw, "/usg/echo");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
    ws.send(Message::binary(big.clone())).unwrap();
    let mut got = Vec::new();
    // The echo streams: a big message comes back as one message (tungstenite reassembles).
    match ws.read().unwrap() {
        Message::Binary(b) => got.extend_from_slice(&b),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(got.len(), big.len());
    assert!(got == big, "echoed bytes differ");
    // A fragmented text message, sent frame by frame.
    use tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let parts = ["frag", "ment", "ed ✓"];
    for (i, p) in parts.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(p.as_bytes().to_vec(), op, i == parts.len() - 1);
        ws.write(Message::Frame(frame)).unwrap();
    }
    ws.flush().unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("fragmented ✓"));
    // Ping → pong with the same payload.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected pong, got {other:?}"),
    }
    // Close handshake: the server echoes our code.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Normal);
            }
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
});

/// Upgrades by hand and returns the TLS stream positioned after the 101 head.
fn raw_ws(gw: &Gateway, path: &str) -> TlsStream {
    let mut s = gw.tls();
    s.write_all(upgrade_request(path, "").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    s
}

/// Reads one server frame (unmasked, short) and returns (opcode, payload).
fn read_frame(s: &mut TlsStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut l = [0u8; 2];
        s.read_exact(&mut l).unwrap();
        len = u64::from(u16::from_be_bytes(l));
    } else if len == 127 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l).unwrap();
        len = u64::from_be_bytes(l);
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).unwrap();
    (h[0] & 0x0f, p)
}

fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

fn expect_close(s: &mut TlsStream, code: u16) {
    loop {
        let (op, p) = read_frame(s);
        if op == 0x8 {
            assert!(p.len() >= 2, "close without code");
            assert_eq!(u16::from_be_bytes([p[0], p[1]]), code);
            return;
        }
    }
}

both_drivers!(protocol_violations_get_their_close_codes, |driver| {
    let cfg = "[websocket]\nmax_frame_size = 1024\nmax_message_size = 4096\n";
    let gw = Gateway::start(driver, Some(cfg), &[]);
    // Unmasked client frame → 1002.
    let mut s = raw_ws(&gw, "/usg/echo");
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    expect_close(&mut s, 1002);
    // Invalid UTF-8 in a text frame → 1007.
    let mut s = raw_ws(&gw, "/usg/echo");
    s.write_all(&masked(0x1, true, &[0xce, 0xba, 0xff, 0xfe]))
        .unwrap();
    expect_close(&mut s, 1007);
    // Frame above max_frame_size → 1009.
    let mut s = raw_ws(&gw, "/usg/echo");
    s.write_all(&masked(0x2, true, &[0u8; 2000])).unwrap();
    expect_close(&mut s, 1009);
    // Message above max_message_size (in small frames) → 1009.
    let mut s = raw_ws(&gw, "/usg/echo");
    for i in 0..5 {
        let op = if i == 0 { 0x2 } else { 0x0 };
        s.write_all(&masked(op, false, &[0u8; 1000])).unwrap();
    }
    expect_close(&mut s, 1009);
    // Fragmented ping → 1002; reserved opcode → 1002.
    let mut s = raw_ws(&gw, "/usg/echo");
    s.write_all(&masked(0x9, false, b"x")).unwrap();
    expect_close(&mut s, 1002);
    let mut s = raw_ws(&gw, "/usg/echo");
    s.write_all(&masked(0x3, true, b"x")).unwrap();
    expect_close(&mut s, 1002);
    // The gateway still serves.
    let mut ws = ws_connect(&gw, "/usg/echo");
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
});

both_drivers!(bad_upgrades_are_refused_with_the_right_status, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let t = Duration::from_secs(5);
    let cases: [(&str, &str); 6] = [
        // Missing key.
        (
            "GET /usg/endpoint HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "HTTP/1.1 400",
        ),
        // Wrong version.
        (
            "GET /usg/endpoint HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
            "HTTP/1.1 426",
        ),
        // No upgrade headers at all on a WebSocket path.
        (
            "GET /usg/endpoint HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 426",
        ),
        // POST on the WebSocket path.
        (
            "POST /usg/endpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405",
        ),
        // Garbage instead of HTTP.
        ("\x00\x01\x02 nonsense\r\n\r\n", "HTTP/1.1 400"),
        // Echo is a 404 when disabled? (enabled here) — an unknown path is 404.
        (
            "GET /usg/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 404",
        ),
    ];
    for (req, want) in cases {
        let got = status_text(&raw_exchange(&gw, req.as_bytes(), t));
        assert!(got.starts_with(want), "request {req:?}: got {got:?}");
    }
    // Oversize head → 431.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let got = status_text(&raw_exchange(&gw, huge.as_bytes(), t));
    assert!(got.starts_with("HTTP/1.1 431"), "{got:?}");
});

both_drivers!(
    plain_http_and_garbage_on_the_tls_port_are_dropped,
    |driver| {
        use std::net::TcpStream;
        let gw = Gateway::start(driver, None, &[]);
        for junk in [
            &b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
            &[0xffu8; 600][..],
            &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..],
        ] {
            let mut s = TcpStream::connect(gw.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(junk).unwrap();
            let got = read_all(&mut s);
            // Either nothing or a TLS alert record (content type 21), then the connection closes.
            assert!(got.is_empty() || got[0] == 21, "{got:?}");
        }
        // Still serving.
        let got = raw_exchange(
            &gw,
            b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        assert!(status_text(&got).starts_with("HTTP/1.1 200"));
    }
);

both_drivers!(
    slow_loris_head_times_out_while_others_are_served,
    |driver| {
        let cfg = "[http]\nhead_timeout_ms = 700\n[tls]\nhandshake_timeout_ms = 700\n";
        let gw = Gateway::start(driver, Some(cfg), &[]);
        // A client that sends half a head and stalls.
        let mut slow = gw.tls();
        slow.write_all(b"GET /usg/endpoint HTTP/1.1\r\nHost: loc")
            .unwrap();
        // A TCP client that never even starts TLS.
        let mut idle = std::net::TcpStream::connect(gw.addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Meanwhile a well-behaved client is served.
        let mut ws = ws_connect(&gw, "/usg/echo");
        ws.send(Message::text("fine")).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text("fine"));
        // The slow one gets 408 and is closed; the silent one is closed.
        slow.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let got = status_text(&read_all(&mut slow));
        assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
        let mut b = [0u8; 16];
        assert_eq!(
            idle.read(&mut b).unwrap_or(0),
            0,
            "handshake timeout closes"
        );
        std::thread::sleep(Duration::from_millis(300));
        let (ok, body, _) = run(Command::new("curl").args([
            "-sS",
            "--cacert",
            gw.root_pem().to_str().unwrap(),
            &format!("https://localhost:{}/metrics", gw.port()),
        ]));
        assert!(ok);
        assert!(
            body.contains("fleetgate_errors_total{kind=\"head_timeout\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("fleetgate_errors_total{kind=\"handshake_timeout\"} 1"),
            "{body}"
        );
    }
);

both_drivers!(idle_websocket_is_pinged_then_closed, |driver| {
    let cfg = "[websocket]\nping_after_secs = 1\nidle_timeout_secs = 2\n";
    let gw = Gateway::start(driver, Some(cfg), &[]);
    let mut s = raw_ws(&gw, "/usg/echo");
    // Say nothing: after 1 s a ping, after 2 s of silence a 1001 close.
    let (op, _) = read_frame(&mut s);
    assert_eq!(op, 0x9, "expected a ping");
    expect_close(&mut s, 1001);
    // A device that answers pings stays.
    let mut ws = ws_connect(&gw, "/usg/echo");
    ws.get_mut()
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // tungstenite answers each ping (queued, flushed on the next read/write); for 3.5 s (past
    // the idle timeout) nothing but pings arrives.
    let until = std::time::Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while std::time::Instant::now() < until {
        match ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = ws.flush();
            }
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert!(pings >= 1, "the gateway pings a silent device");
    ws.send(Message::text("still alive")).unwrap();
});

both_drivers!(sigterm_closes_websockets_with_1001_and_exits_0, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let mut clients: Vec<_> = (0..20).map(|_| ws_connect(&gw, "/usg/echo")).collect();
    let mut raw = raw_ws(&gw, "/usg/echo");
    let (status, took) = {
        let handle = std::thread::spawn(move || {
            // The raw client reads the 1001 close while the gateway drains.
            expect_close(&mut raw, 1001);
        });
        let r = gw.terminate();
        handle.join().unwrap();
        r
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    for ws in &mut clients {
        match ws.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
});

both_drivers!(tls_sessions_resume_with_tickets, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let sess = gw.dir.path().join("session.pem");
    for v in ["-tls1_2", "-tls1_3"] {
        let mut out = String::new();
        for (i, flag) in ["-sess_out", "-sess_in"].iter().enumerate() {
            let o = s_client_command(
                &gw,
                &[
                    v,
                    // Wait for the server to close (after the response): a TLS 1.3 ticket
                    // arrives after the handshake, and s_client must still be reading.
                    "-ign_eof",
                    flag,
                    sess.to_str().unwrap(),
                ],
            )
            .stdin(std::process::Stdio::piped())
            .output_with_input(
                b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            );
            if i == 1 {
                out = o;
            }
        }
        assert!(
            out.contains("Reused,"),
            "{v}: the second connection did not resume:\n{out}"
        );
    }
});

/// Runs a command with `input` on stdin and returns stdout.
trait OutputWithInput {
    fn output_with_input(&mut self, input: &[u8]) -> String;
}

impl OutputWithInput for Command {
    fn output_with_input(&mut self, input: &[u8]) -> String {
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

both_drivers!(subprotocol_is_negotiated_from_our_list, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let got = status_text(&raw_exchange(
        &gw,
        upgrade_request(
            "/usg/endpoint",
            "Sec-WebSocket-Protocol: chat, fleetgate.v1\r\nConnection: close\r\n",
        )
        .as_bytes(),
        Duration::from_secs(2),
    ));
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(
        got.contains("Sec-WebSocket-Protocol: fleetgate.v1\r\n"),
        "{got}"
    );
    let got = status_text(&raw_exchange(
        &gw,
        upgrade_request("/usg/endpoint", "Sec-WebSocket-Protocol: chat\r\n").as_bytes(),
        Duration::from_secs(2),
    ));
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    assert!(
        !got.contains("Sec-WebSocket-Protocol"),
        "unknown protocols are not echoed: {got}"
    );
});

both_drivers!(a_head_trickled_byte_by_byte_is_served, |driver| {
    let gw = Gateway::start(driver, None, &[]);
    let mut s = gw.tls();
    // Each byte is its own TLS record.
    for b in b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
        s.flush().unwrap();
    }
    let got = status_text(&read_all(&mut s));
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert!(got.ends_with("{\"status\":\"warn\"}"), "{got}");
});

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_unavailable() {
    // As in a container whose seccomp profile blocks io_uring (simulated by the probe's
    // switch): auto starts on epoll and says why; uring refuses to start with the reason.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--driver",
            "uring",
            "--data-dir",
        ])
        .arg(&data)
        .env("FLEETGATE_DISABLE_URING", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io_uring is not usable here (disabled by FLEETGATE_DISABLE_URING)"),
        "{err}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--driver",
            "auto",
            "--data-dir",
        ])
        .arg(&data)
        .env("FLEETGATE_DISABLE_URING", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0 {
        log.push_str(&line);
        if line.contains("listening on") {
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    let gw = log;
    assert!(
        gw.contains("io_uring unavailable (disabled by FLEETGATE_DISABLE_URING); using epoll"),
        "{gw}"
    );
    assert!(gw.contains("shards (epoll)"), "{gw}");
}

both_drivers!(aes_128_gcm_is_preferred_over_the_clients_order, |driver| {
    // openssl offers AES-256-GCM first; the gateway picks AES-128-GCM (cheaper here).
    let gw = Gateway::start(driver, None, &[]);
    for (v, want) in [
        ("-tls1_3", "TLS_AES_128_GCM_SHA256"),
        ("-tls1_2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ] {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &gw.addr.to_string(),
                "-servername",
                "localhost",
            ])
            .args([v, "-brief", "-CAfile", gw.root_pem().to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&format!("Ciphersuite: {want}")),
            "{v}: {text}"
        );
    }
});
