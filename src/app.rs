//! The running relay's shared state: the config in force, the store, the
//! clock, the metrics, the send slots, and the signals between tasks.
//!
//! The accept path, dispatch, the follower, the admin API and payload URLs
//! each take what they need from here; nothing in it decides anything.
//! Built once by `daemon::run`; a reload swaps the config and nothing else.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::ingress::BodyBudget;
use crate::metrics::Metrics;
use crate::sends::Sends;
use crate::store::Store;

/// What the accept path, dispatch and admin share.
#[derive(Debug)]
pub struct App {
    /// The current config; a reload swaps in a new one, and each request or
    /// send keeps the one it started with.
    config: RwLock<Arc<Config>>,
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
    /// `server.body_memory`: sized at start, so a reload does not change it.
    pub body_budget: BodyBudget,
}

impl App {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<App, reqwest::Error> {
        Ok(App {
            store,
            wake: Notify::new(),
            wake_follower: Notify::new(),
            clock: Clock::new(),
            metrics: Metrics::new(),
            sends: Sends::new()?,
            body_budget: BodyBudget::new(config.server.body_memory),
            config: RwLock::new(config),
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

    pub fn wake_follower(&self) {
        self.wake_follower.notify_one();
    }

    pub async fn follower_wakeup(&self) {
        self.wake_follower.notified().await;
    }
}
