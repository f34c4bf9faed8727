//! The running relay: the shared state every task reads, and `run`, which
//! opens the store, starts dispatch and serves until shutdown.
//!
//! Shutdown has one path: the caller's `CancellationToken`. Listeners close,
//! open requests finish, sends in flight get their deadline, and whatever is
//! left stays in the store for the next start.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sd_notify::NotifyState;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dispatch::{self, Sends};
use crate::metrics::Metrics;
use crate::server::{self, Listeners};
use crate::store::{self, Store, StoreError};

/// Wall-clock time that advances with tokio's clock: the system time at
/// start plus the monotonic time since. Tests that pause tokio's clock move
/// it; in production it is the system time without the jumps a clock
/// adjustment would put into retry schedules.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What ingress, dispatch and admin share.
#[derive(Debug)]
pub struct App {
    /// The current config; a reload swaps in a new one, and each request or
    /// send keeps the one it started with.
    config: RwLock<Arc<Config>>,
    pub store: Arc<dyn Store>,
    /// Wakes the dispatcher: new jobs were committed or a send finished.
    wake: Notify,
    /// Every time decision (due times, leases, retention) reads this clock.
    clock: Clock,
    pub metrics: Metrics,
    /// The HTTP client, send slots and in-flight sends, shared by dispatch
    /// and ingress.
    pub sends: Sends,
    /// Cancelled when shutdown begins: nothing new is handed to a send then.
    pub shutdown: CancellationToken,
}

impl App {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<App, RunError> {
        Ok(App {
            config: RwLock::new(config),
            store,
            wake: Notify::new(),
            clock: Clock::new(),
            metrics: Metrics::new(),
            sends: Sends::new().map_err(|e| RunError::Client(e.to_string()))?,
            shutdown,
        })
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace_config(&self, config: Arc<Config>) {
        match self.config.write() {
            Ok(mut guard) => *guard = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    pub fn wake_dispatch(&self) {
        self.wake.notify_one();
    }

    pub async fn dispatch_wakeup(&self) {
        self.wake.notified().await;
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
    let app = Arc::new(App::new(Arc::new(config), store, control.shutdown.clone())?);
    let shutdown = control.shutdown.clone();
    let dispatcher = tokio::spawn(dispatch::run(app.clone(), shutdown.clone()));
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
    server::serve(app.clone(), listeners, shutdown.clone()).await;
    if dispatcher.await.is_err() {
        warn!("the dispatcher ended abnormally");
    }
    // Awaited, not just aborted: they hold the store, and its lock must be
    // free when this returns (a restart in the same process reopens it).
    for task in [retention, reloads, watchdog, announce] {
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
/// `store.retention`, a bounded batch at a time so ingest never waits long.
async fn purge_finished(app: Arc<App>, shutdown: CancellationToken) {
    const BATCH: usize = 500;
    loop {
        let retention = app.config().store.retention;
        let before = app.now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut purged = 0;
        loop {
            match app.store.purge(before, app.now(), BATCH).await {
                Ok(n) => {
                    purged += n;
                    if n < BATCH as u64 {
                        break;
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
