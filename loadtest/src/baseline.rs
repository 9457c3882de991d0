//! `loadtest baseline-server`: the reference point for side-by-side runs — a WebSocket echo
//! server built the obvious way (tokio multi-thread runtime + tokio-rustls +
//! tokio-tungstenite, all with their defaults), so `loadtest idle --gateway-pid` measures its
//! bytes per idle connection exactly as it measures fleetgate's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Debug, Clone, Args)]
pub struct BaselineArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,
    /// PEM certificate chain (with --key: wss://; without both: plain ws://)
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1)
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// tungstenite read buffer per connection, bytes (default: tungstenite's 128 KiB)
    #[arg(long)]
    pub read_buffer: Option<usize>,
    /// tungstenite write buffer target per connection, bytes (default: tungstenite's 128 KiB)
    #[arg(long)]
    pub write_buffer: Option<usize>,
    /// Listen backlog. tokio's `TcpListener::bind` gives 128 here, which overflows during a
    /// fast ramp and turns into 1 s SYN retransmits that would be charged to the server
    #[arg(long, default_value_t = 1024)]
    pub backlog: u32,
    /// Runtime worker threads (default: tokio's, one per CPU)
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Entry point of `loadtest baseline-server`.
pub fn main(args: BaselineArgs) -> ExitCode {
    if let Err(e) = crate::sys::raise_fd_limit() {
        eprintln!("baseline-server: cannot raise the open-file limit: {e}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let result = builder
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(serve(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline-server: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    failed_handshakes: AtomicU64,
}

async fn serve(args: BaselineArgs) -> Result<()> {
    let acceptor = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(TlsAcceptor::from(crate::tls::server_config(cert, key)?)),
        _ => None,
    };
    let config = (args.read_buffer.is_some() || args.write_buffer.is_some()).then(|| {
        let mut c = WebSocketConfig::default();
        if let Some(n) = args.read_buffer {
            c = c.read_buffer_size(n);
        }
        if let Some(n) = args.write_buffer {
            c = c.write_buffer_size(n);
        }
        c
    });
    let listener = listen(args.listen, args.backlog)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let scheme = if acceptor.is_some() { "wss" } else { "ws" };
    eprintln!(
        "baseline-server: echo on {scheme}://{}/ (any path), pid {}, read buffer {}",
        listener.local_addr()?,
        std::process::id(),
        args.read_buffer
            .map_or("default (128 KiB)".to_owned(), |n| format!("{n} B"))
    );

    let counters = Arc::new(Counters::default());
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut report = tokio::time::interval(Duration::from_secs(10));
    let mut last_reported = u64::MAX;
    let mut last_accept_error = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(handle(tcp, acceptor.clone(), config, counters.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: say so now and then, back off briefly, go on.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        eprintln!("baseline-server: accept failed: {e}");
                        last_accept_error = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = report.tick() => {
                let open = counters.open.load(Ordering::Relaxed);
                if open != last_reported {
                    last_reported = open;
                    eprintln!(
                        "baseline-server: {open} open, {} accepted, {} failed handshakes",
                        counters.accepted.load(Ordering::Relaxed),
                        counters.failed_handshakes.load(Ordering::Relaxed)
                    );
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    eprintln!(
        "baseline-server: stopping; {} accepted",
        counters.accepted.load(Ordering::Relaxed)
    );
    Ok(())
}

/// What `TcpListener::bind` does (SO_REUSEADDR, bind, listen), with a chosen backlog.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn handle(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    config: Option<WebSocketConfig>,
    counters: Arc<Counters>,
) {
    match acceptor {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(tls) => echo(tls, config, &counters).await,
            Err(_) => {
                counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            }
        },
        None => echo(tcp, config, &counters).await,
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Option<WebSocketConfig>,
    counters: &Counters,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, config).await else {
        counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
        return;
    };
    counters.open.fetch_add(1, Ordering::Relaxed);
    // tungstenite answers pings and the close handshake itself; data messages go back.
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
}
