//! The running relay's shared state: the config in force, the store, the
//! clock, the metrics, the send slots, and the signals between tasks.
//!
//! The accept path, dispatch, the follower, the admin API and payload URLs
//! each take what they need from here; nothing in it decides anything.
//! Built once by `daemon::run`; a reload swaps the config (with its routes
//! indexed) and nothing else.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::RouteIndex;
use crate::sends::Sends;
use crate::store::Store;

/// What the accept path, dispatch and admin share.
#[derive(Debug)]
pub struct App {
    /// The current config; a reload swaps in a new one, and each request or
    /// send keeps the one it started with. Beside it, its routes indexed
    /// (built once per config, never per request), swapped with it.
    config: RwLock<(Arc<Config>, Arc<RouteIndex>)>,
    pub store: Arc<dyn Store>,
    /// Wakes the dispatcher: new jobs were committed or a send finished.
    wake: Notify,
    /// Wakes the follower: a pipeline is to be followed, or a poll finished.
    wake_follower: Notify,
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
    ) -> Result<App, reqwest::Error> {
        Ok(App {
            config: RwLock::new(in_force(config)),
            store,
            wake: Notify::new(),
            wake_follower: Notify::new(),
            clock: Clock::new(),
            metrics: Metrics::new(),
            sends: Sends::new()?,
            shutdown,
        })
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// The routes of `config` indexed, while it is the config in force. A
    /// request that began before a reload gets `None` (and asks every route
    /// of its own config): an index is only ever used with its own routes.
    pub fn route_index(&self, config: &Arc<Config>) -> Option<Arc<RouteIndex>> {
        let guard = match self.config.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // `config` is held, so its allocation cannot be another config's.
        Arc::ptr_eq(&guard.0, config).then(|| guard.1.clone())
    }

    pub fn replace_config(&self, config: Arc<Config>) {
        let new = in_force(config);
        match self.config.write() {
            Ok(mut guard) => *guard = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    pub fn wake_dispatch(&self) {
        self.wake.notify_one();
    }

    pub async fn dispatch_wakeup(&self) {
        self.wake.notified().await;
    }

    pub fn wake_follower(&self) {
        self.wake_follower.notify_one();
    }

    pub async fn follower_wakeup(&self) {
        self.wake_follower.notified().await;
    }
}

/// A config and its routes indexed, to be in force together.
fn in_force(config: Arc<Config>) -> (Arc<Config>, Arc<RouteIndex>) {
    let index = Arc::new(RouteIndex::new(&config.routes));
    (config, index)
}
