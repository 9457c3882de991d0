//! Sans-IO protocol layer: HTTP/1.1 request heads, the WebSocket upgrade and the RFC 6455
//! frame codec. Bytes (and, where a deadline matters, `now`) go in; bytes and events come out.
//! Nothing in here opens a socket, reads a clock or uses `unsafe`.

#![forbid(unsafe_code)]

pub mod device;
pub mod envelope;
pub mod http;
pub mod ws;
