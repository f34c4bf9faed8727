//! Listeners and HTTP serving: the accept loops for the ingress and admin
//! listeners, per-connection limits, and graceful shutdown.
//!
//! The accept loop only accepts and asks the [`door`] whether the connection
//! may stay; each connection is served in its own task, its headers (and TLS
//! handshake) within `server.header_timeout`.
//! On shutdown the listeners close first (new connections are refused), then
//! open requests get `server.shutdown_timeout` to finish. Nothing here knows
//! about webhooks: every request goes to the [`Service`] the caller hands in,
//! with the [`Role`] of the listener it came in on.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::web::Body;
use door::{Counted, Door, Refused};

pub mod door;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `server.listen`: webhooks, and payload URLs.
    Ingress,
    /// `admin.listen`: probes, metrics and the API.
    Admin,
}

/// Why a connection was closed before it was served to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    /// Its address held `server.max_connections_per_ip` already.
    PerIp,
    /// It had sent the least when a new one needed room.
    Shed,
}

impl TurnedAway {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnedAway::PerIp => "per_ip",
            TurnedAway::Shed => "shed",
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingress => "ingress",
            Role::Admin => "admin",
        }
    }
}

/// What the server hands every request to.
pub trait Service: Send + Sync + 'static {
    /// The config in force; each new connection reads its limits and TLS from it.
    fn config(&self) -> Arc<Config>;

    /// A connection on the `role` listener was closed at the door.
    fn turned_away(&self, role: Role, why: TurnedAway);

    /// Answers one request that came in on the `role` listener from `peer`.
    fn handle(
        &self,
        role: Role,
        request: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = http::Response<Body>> + Send;
}

/// The sockets relay serves on, bound before the daemon runs so that
/// tests can bind port 0 and read the address.
#[derive(Debug)]
pub struct Listeners {
    pub ingress: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Sockets systemd passed in (socket activation, `LISTEN_FDS`), named by
/// `FileDescriptorName=`: `admin` for the admin listener, anything else
/// serves webhooks.
#[derive(Debug)]
pub struct Inherited {
    ingress: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

impl Inherited {
    /// Takes the passed sockets, if any. Call before any thread starts:
    /// it removes `LISTEN_FDS` from the environment, as the protocol asks.
    pub fn take() -> std::io::Result<Option<Inherited>> {
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(None);
        }
        let mut inherited = Inherited {
            ingress: Vec::new(),
            admin: None,
        };
        for index in 0..fds.len() {
            let Some(listener) = fds.take_tcp_listener(index)? else {
                continue;
            };
            listener.set_nonblocking(true)?;
            match names.get(index).map(String::as_str) {
                Some("admin") => inherited.admin = Some(listener),
                _ => inherited.ingress.push(listener),
            }
        }
        Ok(Some(inherited))
    }
}

impl Listeners {
    /// Binds the config's `server.listen` and `admin.listen` addresses.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Listeners::bind_with(config, None).await
    }

    /// Serves on inherited sockets where systemd passed them, and binds the
    /// config's addresses for the rest.
    pub async fn bind_with(config: &Config, inherited: Option<Inherited>) -> std::io::Result<Listeners> {
        let (inherited_ingress, inherited_admin) = match inherited {
            Some(i) => (i.ingress, i.admin),
            None => (Vec::new(), None),
        };
        let mut ingress = Vec::new();
        if inherited_ingress.is_empty() {
            for addr in &config.server.listen {
                ingress.push(bind(*addr).await?);
            }
        } else {
            for listener in inherited_ingress {
                ingress.push(TcpListener::from_std(listener)?);
            }
        }
        let admin = match (inherited_admin, &config.admin) {
            (Some(listener), _) => Some(TcpListener::from_std(listener)?),
            (None, Some(admin)) => Some(bind(admin.listen).await?),
            (None, None) => None,
        };
        Ok(Listeners { ingress, admin })
    }
    pub fn ingress_addrs(&self) -> Vec<SocketAddr> {
        self.ingress.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves every listener until `shutdown`, then drains open connections.
pub async fn serve<S: Service>(service: Arc<S>, listeners: Listeners, shutdown: CancellationToken) {
    let graceful = Arc::new(GracefulShutdown::new());
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners.ingress {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening for webhooks");
        }
        loops.spawn(accept_loop(
            listener,
            Role::Ingress,
            service.clone(),
            graceful.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = listeners.admin {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "admin listening");
        }
        loops.spawn(accept_loop(
            listener,
            Role::Admin,
            service.clone(),
            graceful.clone(),
            shutdown.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    // The accept loops have ended and dropped their handles; connections
    // hold watchers, not the handle, so this is the last one.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        warn!("cannot wait for open connections to finish");
        return;
    };
    let deadline = service.config().server.shutdown_timeout;
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        warn!("open connections did not finish within server.shutdown_timeout; closing them");
    }
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    role: Role,
    service: Arc<S>,
    graceful: Arc<GracefulShutdown>,
    shutdown: CancellationToken,
) {
    let door = Door::new();
    let mut warned = Warned::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let config = service.config();
        let limits = door::Limits {
            total: config.server.max_connections,
            per_ip: match role {
                Role::Ingress => config.server.max_connections_per_ip,
                // The admin listener is for operators and scrapers.
                Role::Admin => usize::MAX,
            },
            unlimited: config.server.unlimited_peers.clone(),
        };
        // At the cap this waits (at most door::GRACE) or sheds; the kernel's
        // backlog holds whoever arrives meanwhile.
        let entered = tokio::select! {
            entered = door.enter(peer.ip(), &limits) => entered,
            () = shutdown.cancelled() => break,
        };
        let pass = match entered {
            Ok((pass, shed)) => {
                if let Some(shed) = shed {
                    service.turned_away(role, TurnedAway::Shed);
                    debug!(
                        peer = %shed.ip, bytes = shed.received, open_ms = shed.open_for.as_millis() as u64,
                        "at server.max_connections: closed the connection that had sent the least to make room"
                    );
                }
                pass
            }
            Err(Refused::PerIp { held }) => {
                service.turned_away(role, TurnedAway::PerIp);
                if warned.due() {
                    warn!(
                        %peer, held, suppressed = warned.take_suppressed(),
                        "refusing connections from an address at server.max_connections_per_ip; if it is a reverse proxy, list it in the source's trusted_proxies"
                    );
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let stream = Counted::new(stream, pass.received.clone());
        // Each connection has its own watcher, so shutdown waits for exactly
        // the connections open when it begins.
        let (service, watcher) = (service.clone(), graceful.watcher());
        // The TLS handshake runs here, in the connection's own task, under a
        // deadline: a client that never finishes it holds up nothing else.
        tokio::spawn(async move {
            let config = service.config();
            let tls = match role {
                Role::Ingress => config.server.tls.as_ref().map(|t| t.acceptor.clone()),
                Role::Admin => None,
            };
            let deadline = config.server.header_timeout;
            let served = async {
                match tls {
                    None => serve_connection(stream, peer, role, service, watcher).await,
                    Some(acceptor) => match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            serve_connection(tls_stream, peer, role, service, watcher).await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake did not finish within server.header_timeout"),
                    },
                }
            };
            tokio::select! {
                () = served => {}
                () = pass.shed.cancelled() => {}
            }
            drop(pass);
        });
    }
}

/// A warning about refused connections at most every [`Warned::EVERY`]: an
/// address that keeps reconnecting must not flood the log.
#[derive(Debug, Default)]
struct Warned {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Warned {
    const EVERY: Duration = Duration::from_secs(10);

    fn due(&mut self) -> bool {
        let now = crate::clock::stopwatch();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::EVERY)
        {
            self.suppressed += 1;
            return false;
        }
        self.last = Some(now);
        true
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it closes.
async fn serve_connection<I, S>(io: I, peer: SocketAddr, role: Role, service: Arc<S>, watcher: Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service,
{
    let config = service.config();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let handler = service_fn(move |request| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.handle(role, request, peer).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(io), handler);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Header bytes one request may send (all headers together).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Header fields one request may send.
const MAX_HEADERS: usize = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refusals_are_warned_of_once_every_ten_seconds_with_the_count_left_out() {
        let mut warned = Warned::default();
        assert!(warned.due());
        assert_eq!(warned.take_suppressed(), 0);
        for _ in 0..5 {
            assert!(!warned.due());
        }
        tokio::time::advance(Warned::EVERY).await;
        assert!(warned.due());
        assert_eq!(warned.take_suppressed(), 5, "the five left out are counted");
        assert!(!warned.due());
    }
}
