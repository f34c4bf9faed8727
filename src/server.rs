//! Listeners and HTTP serving: the accept loops for the ingress and admin
//! listeners, per-connection limits, and graceful shutdown.
//!
//! The accept loop only accepts; each connection is served in its own task.
//! On shutdown the listeners close first (new connections are refused), then
//! open requests get `server.shutdown_timeout` to finish. Nothing here knows
//! about webhooks: requests go to `ingress::handle` or `admin::handle`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::daemon::App;
use crate::{admin, ingress, payload};

/// Every response body relay sends is small and complete.
pub type Body = Full<Bytes>;

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The sockets relay serves on, bound before [`crate::daemon::run`] so that
/// tests can bind port 0 and read the address.
#[derive(Debug)]
pub struct Listeners {
    pub ingress: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the config's `server.listen` and `admin.listen` addresses.
    pub async fn bind(config: &crate::config::Config) -> std::io::Result<Listeners> {
        let mut ingress = Vec::new();
        for addr in &config.server.listen {
            ingress.push(bind(*addr).await?);
        }
        let admin = match &config.admin {
            Some(admin) => Some(bind(admin.listen).await?),
            None => None,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Ingress,
    Admin,
}

/// Serves every listener until `shutdown`, then drains open connections.
pub async fn serve(app: Arc<App>, listeners: Listeners, shutdown: CancellationToken) {
    let graceful = Arc::new(GracefulShutdown::new());
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners.ingress {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening for webhooks");
        }
        loops.spawn(accept_loop(
            listener,
            Role::Ingress,
            app.clone(),
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
            app.clone(),
            graceful.clone(),
            shutdown.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    // The accept loops have ended and dropped their handles, so this is the last.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return;
    };
    let deadline = app.config().server.shutdown_timeout;
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        warn!("open connections did not finish within server.shutdown_timeout; closing them");
    }
}

async fn accept_loop(
    listener: TcpListener,
    role: Role,
    app: Arc<App>,
    graceful: Arc<GracefulShutdown>,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let request_timeout = app.config().server.request_timeout;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(request_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move {
                let response = match role {
                    Role::Ingress if request.uri().path().starts_with(payload::PATH_PREFIX) => {
                        payload::handle(&app, &request).await
                    }
                    Role::Ingress => ingress::handle(&app, request, peer).await,
                    Role::Admin => admin::handle(&app, request).await,
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
