//! The running relay: `run` opens the store, builds the shared state
//! (`app::App`), starts dispatch, retention and reloads, and serves each
//! listener what it serves (the accept path, payload URLs, the admin API)
//! until shutdown.
//!
//! Shutdown has one path: the caller's `CancellationToken`. Listeners close,
//! open requests finish, sends in flight get their deadline, and whatever is
//! left stays in the store for the next start.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use sd_notify::NotifyState;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::app::App;
use crate::config::Config;
use crate::server::{self, Listeners, Role, Service, TurnedAway};
use crate::store::{self, Store, StoreError};
use crate::web::Body;
use crate::{accept, admin, catchup, dispatch, follower, payload};

/// What each listener serves: webhooks and payload URLs on the ingress
/// listener, the admin API on the admin one.
#[derive(Debug)]
struct Handlers {
    app: Arc<App>,
}

impl Service for Handlers {
    fn config(&self) -> Arc<Config> {
        self.app.config()
    }

    fn turned_away(&self, role: Role, why: TurnedAway) {
        self.app.metrics.turned_away(role.as_str(), why.as_str());
    }

    async fn handle(
        &self,
        role: Role,
        request: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> http::Response<Body> {
        let app = &self.app;
        match role {
            Role::Ingress if request.uri().path().starts_with(payload::PATH_PREFIX) => {
                payload::serve::handle(app, &request).await
            }
            Role::Ingress => accept::handle(app, request, peer).await,
            Role::Admin => admin::handle(app, request).await,
        }
    }
}

/// How the outside (signals, tests) steers a running relay.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// The one shutdown path: cancel to drain and stop.
    pub shutdown: CancellationToken,
    /// Each notification re-reads the config file (SIGHUP).
    pub reload: Arc<Notify>,
}

/// Why relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Listen(#[from] std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Opens the configured store and runs until `control.shutdown` is cancelled.
pub async fn run(config: Config, listeners: Listeners, control: Control) -> Result<(), RunError> {
    let store = store::open(&config.store).await?;
    run_with_store(config, store, listeners, control).await
}

/// Runs with a store the caller opened.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listeners: Listeners,
    control: Control,
) -> Result<(), RunError> {
    for warning in &config.warnings {
        warn!("{warning}");
    }
    info!(
        sources = config.sources.len(),
        routes = config.routes.len(),
        targets = config.targets.len(),
        config = %config.file,
        "relay starting"
    );
    let app = Arc::new(
        App::new(Arc::new(config), store, control.shutdown.clone())
            .map_err(|e| RunError::Client(e.to_string()))?,
    );
    let shutdown = control.shutdown.clone();
    let dispatcher = tokio::spawn(dispatch::run(app.clone(), shutdown.clone()));
    let follower = tokio::spawn(follower::run(app.clone(), shutdown.clone()));
    let catch_up = tokio::spawn(catchup::run(app.clone(), shutdown.clone()));
    let retention = tokio::spawn(purge_finished(app.clone(), shutdown.clone()));
    let reloads = tokio::spawn(reload_on_request(app.clone(), control.clone()));
    let watchdog = tokio::spawn(watchdog());
    // Listeners are bound and the store is open: ready for systemd.
    notify(&[NotifyState::Ready]);
    let stopping = shutdown.clone();
    let announce = tokio::spawn(async move {
        stopping.cancelled().await;
        notify(&[NotifyState::Stopping]);
    });
    server::serve(
        Arc::new(Handlers { app: app.clone() }),
        listeners,
        shutdown.clone(),
    )
    .await;
    if dispatcher.await.is_err() {
        warn!("the dispatcher ended abnormally");
    }
    // Awaited, not just aborted: they hold the store, and its lock must be
    // free when this returns (a restart in the same process reopens it).
    for task in [follower, catch_up, retention, reloads, watchdog, announce] {
        task.abort();
        let _ = task.await;
    }
    info!("relay stopped");
    Ok(())
}

/// Tells systemd (if it is listening: `NOTIFY_SOCKET`) how relay stands.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval while the runtime runs.
async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// Re-reads the config file on each request: a valid one replaces the old
/// for new requests and sends; an invalid one is refused, logged with the
/// key at fault, and the old one keeps running. Queued jobs keep their
/// rendered requests; their credentials come from whichever config is
/// current when they are sent.
async fn reload_on_request(app: Arc<App>, control: Control) {
    loop {
        tokio::select! {
            () = control.reload.notified() => {}
            () = control.shutdown.cancelled() => return,
        }
        notify(&[NotifyState::Reloading]);
        let current = app.config();
        let path = std::path::PathBuf::from(&current.file);
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        match loaded {
            Ok(Ok(new)) => {
                for note in restart_needed(&current, &new) {
                    warn!("{note} changed in the config; it takes effect when relay restarts");
                }
                for warning in &new.warnings {
                    warn!("{warning}");
                }
                info!(
                    sources = new.sources.len(),
                    routes = new.routes.len(),
                    targets = new.targets.len(),
                    config = %new.file,
                    "config reloaded"
                );
                app.replace_config(Arc::new(new));
                app.metrics.reload(true);
                app.wake_dispatch();
            }
            Ok(Err(e)) => {
                error!(error = %e, "config reload refused; the running config stays");
                app.metrics.reload(false);
            }
            Err(e) => error!(error = %e, "config reload failed; the running config stays"),
        }
        notify(&[NotifyState::Ready]);
    }
}

/// Settings a running relay cannot change in place.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut notes = Vec::new();
    if old.server.listen != new.server.listen {
        notes.push("server.listen");
    }
    if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
        notes.push("admin.listen");
    }
    if old.store.location != new.store.location {
        notes.push("store.url");
    }
    notes
}

/// Deletes finished events (and their jobs and attempts) older than
/// `store.retention`, a bounded batch at a time so ingest never waits long:
/// on SQLite a batch holds the writer, and every webhook waiting on it,
/// while it runs.
async fn purge_finished(app: Arc<App>, shutdown: CancellationToken) {
    const BATCH: usize = 200;
    loop {
        let retention = app.config().store.retention;
        let before = app.now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut purged = 0;
        loop {
            let started = crate::clock::stopwatch();
            match app.store.purge(before, app.now(), BATCH).await {
                Ok(n) => {
                    purged += n;
                    if n < BATCH as u64 {
                        break;
                    }
                    // Half the store's time at most: a webhook arriving
                    // meanwhile waits for one batch, never for a run of them.
                    let took = started.elapsed().min(Duration::from_secs(1));
                    tokio::select! {
                        () = tokio::time::sleep(took) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot purge finished events; will try again");
                    break;
                }
            }
        }
        if purged > 0 {
            info!(events = purged, retention = %humantime::format_duration(retention), "finished events purged");
        }
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
