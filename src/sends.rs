//! The send slots and the HTTP client every trigger goes out through.
//!
//! Both the dispatcher (for jobs it claims) and the accept path (for jobs it
//! hands over on commit) take a target's slots here, so a target's
//! `concurrency` counts all of its sends. Sends run on the one tracker that
//! shutdown waits for. Nothing here decides what to send or when.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::targets::USER_AGENT;

/// The outbound HTTP client: rustls with the ring provider, no redirects (a
/// redirected POST would become a GET), the attempt timeout on every request.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(USER_AGENT)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

/// Sends in flight at once for a target.
pub fn capacity(config: &Config, target: &str) -> usize {
    config
        .targets
        .get(target)
        .and_then(|t| t.concurrency)
        .unwrap_or(config.delivery.concurrency)
}

/// What every send shares: the HTTP client, the tracker that shutdown waits
/// on, and each target's send slots. Both the dispatcher (for jobs it
/// claims) and ingress (for jobs it hands over on commit) send through it,
/// so a target's capacity counts all of them.
#[derive(Debug)]
pub struct Sends {
    pub client: reqwest::Client,
    pub tracker: TaskTracker,
    /// (capacity, semaphore) per target; replaced when a reload changes the capacity.
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    /// Set when the dispatcher left due jobs for lack of a slot: then, and
    /// only then, a finishing send is worth waking it for.
    starved: AtomicBool,
}

impl Sends {
    pub fn new() -> Result<Sends, reqwest::Error> {
        Ok(Sends {
            // Each request sets the attempt timeout of the config it runs under.
            client: http_client(Duration::from_secs(300))?,
            tracker: TaskTracker::new(),
            slots: Mutex::new(HashMap::new()),
            starved: AtomicBool::new(false),
        })
    }

    pub fn semaphore(&self, target: &str, capacity: usize) -> Arc<Semaphore> {
        let mut slots = match self.slots.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let slot = slots
            .entry(target.to_owned())
            .or_insert_with(|| (capacity, Arc::new(Semaphore::new(capacity))));
        if slot.0 != capacity {
            *slot = (capacity, Arc::new(Semaphore::new(capacity)));
        }
        slot.1.clone()
    }

    /// A send slot for `target`, if one is free right now.
    pub fn try_slot(&self, config: &Config, target: &str) -> Option<OwnedSemaphorePermit> {
        self.semaphore(target, capacity(config, target))
            .try_acquire_owned()
            .ok()
    }

    /// Records whether the dispatcher left due jobs for lack of a slot.
    pub fn set_starved(&self, starved: bool) {
        self.starved.store(starved, Ordering::Relaxed);
    }

    /// Whether a finishing send should wake the dispatcher (see `set_starved`).
    pub fn starved(&self) -> bool {
        self.starved.load(Ordering::Relaxed)
    }
}
