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
use crate::store::{self, Maintain, Store, StoreError};
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
    // Read before the app's own clock starts, so no later decision's `now`
    // is earlier than the one the store opened at.
    let store = store::open(&config.store, crate::clock::Clock::new().now()).await?;
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

/// Events deleted, or dedupe keys looked at, per batch of the retention
/// purge.
const PURGE_BATCH: usize = 200;

/// What one pass of the retention purge deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Purged {
    events: u64,
    dedupe_keys: u64,
}

/// One pass of the retention purge: batches of finished events until one
/// comes back short, then batches of expired dedupe keys until the store
/// has seen them all, or until the store fails (said, and left for the
/// next pass). After each batch it waits as long as the batch took, so
/// the purge has half the store's time at most: a webhook arriving
/// meanwhile waits for one batch, never for a run of them. What it
/// deleted; `None` at shutdown.
async fn purge_pass(
    store: &dyn Maintain,
    before: SystemTime,
    now: impl Fn() -> SystemTime,
    shutdown: &CancellationToken,
) -> Option<Purged> {
    let mut purged = Purged::default();
    loop {
        let started = crate::clock::stopwatch();
        match store.purge(before, now(), PURGE_BATCH).await {
            Ok(events) => {
                purged.events += events;
                if !pause(started, shutdown).await {
                    return None;
                }
                if events < PURGE_BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot purge finished events; will try again");
                return Some(purged);
            }
        }
    }
    loop {
        let started = crate::clock::stopwatch();
        match store.forget_dedupe_keys(now(), PURGE_BATCH).await {
            Ok(batch) => {
                purged.dedupe_keys += batch.forgotten;
                if !batch.more {
                    return Some(purged);
                }
                if !pause(started, shutdown).await {
                    return None;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot forget expired dedupe keys; will try again");
                return Some(purged);
            }
        }
    }
}

/// Leaves the store to webhooks for as long as the batch begun at
/// `started` took (a second at most); `false` if shutdown came first.
async fn pause(started: tokio::time::Instant, shutdown: &CancellationToken) -> bool {
    let took = started.elapsed().min(Duration::from_secs(1));
    tokio::select! {
        () = tokio::time::sleep(took) => true,
        () = shutdown.cancelled() => false,
    }
}

/// Deletes finished events (and their jobs and attempts) older than
/// `store.retention`, and forgets the dedupe keys whose window closed, a
/// bounded batch at a time so ingest never waits long: on SQLite a batch
/// holds the writer, and every webhook waiting on it, while it runs.
async fn purge_finished(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        let retention = app.config().store.retention;
        let before = app.now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
        let Some(purged) = purge_pass(&*app.store, before, || app.now(), &shutdown).await else {
            return;
        };
        if purged.events > 0 || purged.dedupe_keys > 0 {
            info!(
                events = purged.events,
                dedupe_keys = purged.dedupe_keys,
                retention = %humantime::format_duration(retention),
                "finished events purged"
            );
        }
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::ForgottenKeys;

    /// A store whose every batch takes 40 ms and deletes what `events` and
    /// `keys` say, in turn (three full batches of events, and no keys,
    /// unless told), then nothing; it notes when each batch began, and of
    /// what.
    #[derive(Debug, Default)]
    struct SlowPurge {
        events: Vec<u64>,
        keys: Vec<ForgottenKeys>,
        calls: Mutex<Vec<(tokio::time::Instant, &'static str)>>,
    }

    impl SlowPurge {
        /// Notes a batch of `what`; how many of those it has been asked.
        async fn batch(&self, what: &'static str) -> usize {
            let asked = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((crate::clock::stopwatch(), what));
                calls.iter().filter(|(_, w)| *w == what).count()
            };
            tokio::time::sleep(Duration::from_millis(40)).await;
            asked
        }

        fn kinds(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().iter().map(|(_, what)| *what).collect()
        }
    }

    #[async_trait::async_trait]
    impl Maintain for SlowPurge {
        async fn purge(&self, _: SystemTime, _: SystemTime, limit: usize) -> Result<u64, StoreError> {
            assert_eq!(limit, PURGE_BATCH);
            let asked = self.batch("events").await;
            let full = [limit as u64; 3];
            let planned = if self.events.is_empty() {
                &full[..]
            } else {
                &self.events[..]
            };
            Ok(planned.get(asked - 1).copied().unwrap_or(0))
        }

        async fn forget_dedupe_keys(&self, _: SystemTime, limit: usize) -> Result<ForgottenKeys, StoreError> {
            assert_eq!(limit, PURGE_BATCH);
            let asked = self.batch("keys").await;
            Ok(self.keys.get(asked - 1).copied().unwrap_or_default())
        }
    }

    /// One pass of the purge on `store`, never shut down.
    async fn one_pass(store: &SlowPurge) -> Option<Purged> {
        purge_pass(
            store,
            SystemTime::UNIX_EPOCH,
            crate::clock::wall_time,
            &CancellationToken::new(),
        )
        .await
    }

    /// After the events, the keys: batches while the store says more may
    /// wait, though one forgot none; counted apart from the events.
    #[tokio::test(start_paused = true)]
    async fn the_purge_forgets_dedupe_keys_while_more_may_wait() {
        let keys = |forgotten: u64, more: bool| ForgottenKeys { forgotten, more };
        let store = SlowPurge {
            events: vec![3],
            keys: vec![keys(200, true), keys(0, true), keys(7, false)],
            ..SlowPurge::default()
        };
        let purged = one_pass(&store).await;
        assert_eq!(
            purged,
            Some(Purged {
                events: 3,
                dedupe_keys: 207
            })
        );
        assert_eq!(store.kinds(), ["events", "keys", "keys", "keys"]);
    }

    /// The purge leaves the store to webhooks between its batches, for as
    /// long as each batch took, events and keys alike.
    #[tokio::test(start_paused = true)]
    async fn the_purge_pauses_as_long_as_each_batch_took() {
        let store = SlowPurge::default();
        let purged = one_pass(&store).await;
        assert_eq!(
            purged,
            Some(Purged {
                events: 3 * PURGE_BATCH as u64,
                dedupe_keys: 0
            })
        );
        assert_eq!(
            store.kinds(),
            ["events", "events", "events", "events", "keys"],
            "three full batches of events, a short one, then the keys"
        );
        let calls = store.calls.lock().unwrap().clone();
        for pair in calls.windows(2) {
            assert_eq!(
                pair[1].0 - pair[0].0,
                Duration::from_millis(80),
                "a 40 ms batch, then 40 ms left to webhooks"
            );
        }
    }

    /// Shutdown ends a pass between batches.
    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_purge_between_batches() {
        let store = SlowPurge::default();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let purged = purge_pass(&store, SystemTime::UNIX_EPOCH, crate::clock::wall_time, &shutdown).await;
        assert_eq!(purged, None);
        assert_eq!(store.calls.lock().unwrap().len(), 1);
    }
}
