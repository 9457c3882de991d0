//! Small stand-ins the relay tests share: a file of known content, a TCP echo server (the
//! device's VNC server in shadowing tests), and a process check.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `len` pseudo-random bytes to `path`; returns their SHA-256 (hex).
pub fn write_file(path: &Path, len: usize) -> String {
    let mut f = std::fs::File::create(path).unwrap();
    let mut h = Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n;
    }
    hex(&h.finalize())
}

/// A TCP echo server on 127.0.0.1 for one connection; returns its port. After that connection
/// the listener is gone and the port refuses.
pub fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 8192];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    port
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
