//! `shadow` streams (`docs/protocol.md` §6.6): bytes both ways to the local VNC server at
//! 127.0.0.1:`vnc_port`. Nothing listening: `reset` with `connect_failed`. The VNC server
//! closing its side sends `close`; the management side's `close` shuts the socket's write
//! side; a reset or the end of the session shuts the socket down.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde_json::json;

use super::RelayConfig;
use super::flow::{CancelHook, DATA_PIECE, Inbound, StreamCtx};
use crate::proto::envelope::ErrorBody;

/// Connects to the VNC port and starts the stream's threads; the hook shuts the socket down.
pub(crate) fn start(
    config: &RelayConfig,
    mut ctx: StreamCtx,
    inbound: Receiver<Inbound>,
) -> Result<Option<CancelHook>, ErrorBody> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.vnc_port));
    let sock =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| ErrorBody {
            code: "connect_failed".into(),
            message: format!("cannot connect to {addr}: {e}"),
        })?;
    let _ = sock.set_nodelay(true);
    let io = |e: std::io::Error| ErrorBody {
        code: "io_error".into(),
        message: format!("shadow: {e}"),
    };
    let mut reader = sock.try_clone().map_err(io)?;
    let mut writer = sock.try_clone().map_err(io)?;
    let hook: CancelHook = Box::new(move || {
        let _ = sock.shutdown(Shutdown::Both);
    });
    if !ctx.accept() {
        hook();
        return Err(ErrorBody {
            code: "link_closed".into(),
            message: "session gone".into(),
        });
    }
    let sender = ctx.sender();
    std::thread::Builder::new()
        .name("agent-vnc-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; DATA_PIECE];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => {
                        sender.close(json!({ "ok": true }));
                        return;
                    }
                    Ok(n) => {
                        if !sender.send_data(&buf[..n]) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        sender.reset("io_error", format!("VNC connection: {e}"));
                        return;
                    }
                }
            }
        })
        .map_err(io)?;
    std::thread::Builder::new()
        .name("agent-vnc-in".into())
        .spawn(move || {
            while let Ok(m) = inbound.recv() {
                match m {
                    Inbound::Data(bytes) => {
                        if let Err(e) = writer.write_all(&bytes) {
                            ctx.reset("io_error", format!("VNC connection: {e}"));
                            return;
                        }
                        ctx.consumed(bytes.len());
                    }
                    Inbound::Close => {
                        let _ = writer.shutdown(Shutdown::Write);
                    }
                    Inbound::Resize { .. } => {}
                }
            }
        })
        .map_err(io)?;
    Ok(Some(hook))
}
