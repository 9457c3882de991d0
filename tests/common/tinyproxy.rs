//! A real HTTP CONNECT proxy for the management client's proxy path: Debian's tinyproxy with
//! Basic auth (`.ci/run` installs it). A missing tinyproxy fails the test with a clear message.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running tinyproxy; killed on drop.
pub struct Tinyproxy {
    child: Child,
    /// Where it listens (127.0.0.1).
    pub port: u16,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tinyproxy with Basic auth `user`/`pass` that tunnels only to `allow_port`.
pub fn tinyproxy(dir: &Path, allow_port: u16) -> Tinyproxy {
    let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("tinyproxy is not installed (apt-get install tinyproxy; .ci/run installs it)");
    for _ in 0..5 {
        let port = free_port();
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nAllow 127.0.0.1\n\
                 ConnectPort {allow_port}\nBasicAuth user pass\nLogLevel Info\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut t = Tinyproxy { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return t;
            }
            if t.child.try_wait().unwrap().is_some() {
                break; // port taken meanwhile: try another
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("tinyproxy did not start");
}
