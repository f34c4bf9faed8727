//! `[server]`, compiled: the listeners, the limits on what a client may
//! hold at the door (connections, header and request deadlines, body size),
//! payload URLs and TLS. Never binds or accepts: the server serves what this
//! describes.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::compiler::Compiler;
use super::{raw, tls};
use crate::payload::PayloadUrls;

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub max_body: u64,
    pub body_memory: u64,
    pub public_url: Option<String>,
    /// Set when payload URLs can be made: a public URL and a signing key.
    pub payload: Option<PayloadUrls>,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Headers (and a TLS handshake) must arrive within this; always at most
    /// `request_timeout`.
    pub header_timeout: Duration,
    /// Peers the per-address cap does not apply to: every source's
    /// `trusted_proxies`, since all clients behind a proxy share its address.
    pub unlimited_peers: Vec<IpNet>,
    /// Read when the config is built, so a reload serves a renewed certificate.
    pub tls: Option<Tls>,
}

#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Headers arrive in a packet or two; a client still sending them after
/// this is holding a connection, not using it.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) fn compile(raw: raw::RawServer, c: &mut Compiler) -> Server {
    let listen = raw.listen.into_vec();
    if listen.is_empty() {
        c.problem(
            "server.listen",
            "needs at least one address, like \"127.0.0.1:8080\"",
        );
    }
    if raw.max_body.as_u64() == 0 {
        c.problem("server.max_body", "must be more than 0 bytes");
    }
    if let Some(url) = &raw.public_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        c.problem("server.public_url", "must start with https:// or http://");
    }
    if raw.body_memory.as_u64() < raw.max_body.as_u64() {
        c.problem(
            "server.body_memory",
            format!(
                "is smaller than server.max_body ({}): a body of the largest size allowed must fit",
                raw.max_body
            ),
        );
    }
    if raw.request_timeout.is_zero() {
        c.problem("server.request_timeout", "must be longer than 0s");
    }
    if raw.max_connections == 0 {
        c.problem("server.max_connections", "must be at least 1");
    }
    if raw.max_connections_per_ip == 0 {
        c.problem("server.max_connections_per_ip", "must be at least 1");
    }
    let header_timeout = match raw.header_timeout {
        None => DEFAULT_HEADER_TIMEOUT.min(raw.request_timeout),
        Some(t) if t.is_zero() => {
            c.problem("server.header_timeout", "must be longer than 0s");
            t
        }
        Some(t) if t > raw.request_timeout => {
            c.problem(
                "server.header_timeout",
                format!(
                    "is longer than server.request_timeout ({}), which bounds the whole request",
                    humantime::format_duration(raw.request_timeout)
                ),
            );
            t
        }
        Some(t) => t,
    };
    let public_url = raw.public_url.map(|u| u.trim_end_matches('/').to_owned());
    let key = raw.payload_key.and_then(|k| c.secret("server.payload_key", &k));
    let payload = match (&public_url, key) {
        (Some(url), Some(key)) => Some(PayloadUrls {
            public_url: url.clone(),
            key,
            ttl: raw.payload_ttl,
        }),
        _ => None,
    };
    Server {
        listen,
        max_body: raw.max_body.as_u64(),
        body_memory: raw.body_memory.as_u64(),
        public_url,
        payload,
        request_timeout: raw.request_timeout,
        shutdown_timeout: raw.shutdown_timeout,
        max_connections: raw.max_connections,
        max_connections_per_ip: raw.max_connections_per_ip,
        header_timeout,
        unlimited_peers: Vec::new(),
        tls: raw.tls.and_then(|t| match tls::load_tls(&t.cert, &t.key) {
            Ok(acceptor) => Some(Tls {
                cert: t.cert,
                key: t.key,
                acceptor,
            }),
            Err((which, message)) => {
                c.problem(format!("server.tls.{which}"), message);
                None
            }
        }),
    }
}
