//! The send slots and the HTTP clients every trigger goes out through.
//!
//! Both the dispatcher (for jobs it claims) and the accept path (for jobs it
//! hands over on commit) take a target's slots here, so a target's
//! `concurrency` counts all of its sends. Sends run on the one tracker that
//! shutdown waits for. Nothing here decides what to send or when.
//!
//! There is one client per distinct proxy setting (`targets::proxy`): the
//! environment's, direct, and each named proxy with its credentials. Each is
//! built the first time a target with that setting sends, reading the
//! environment then (never changing it), and kept for every later send and
//! config with the same setting; a reload that names a new proxy gets a new
//! client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::targets::{Outbound, ProxySetting, USER_AGENT};

/// The outbound HTTP client, with the environment's proxy settings: rustls
/// with the ring provider, no redirects (a redirected POST would become a
/// GET), the attempt timeout on every request.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    client_builder(timeout).build()
}

fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(USER_AGENT)
        .pool_idle_timeout(Duration::from_secs(60))
}

/// The outbound client for one proxy setting. The environment's settings
/// are read by reqwest now; a named proxy gets `NO_PROXY` from the
/// environment too (curl's rule) and its credentials as `Proxy-Authorization`.
pub fn http_client_via(timeout: Duration, setting: &ProxySetting) -> Result<reqwest::Client, reqwest::Error> {
    let builder = client_builder(timeout);
    match setting {
        ProxySetting::Environment => builder.build(),
        ProxySetting::Direct => builder.no_proxy().build(),
        ProxySetting::Explicit(p) => {
            let no_proxy =
                crate::targets::proxy::no_proxy_from_env().and_then(|s| reqwest::NoProxy::from_string(&s));
            let mut proxy = reqwest::Proxy::all(p.url.as_str())?.no_proxy(no_proxy);
            if let Some(username) = &p.username {
                let password = p
                    .password
                    .as_ref()
                    .map(|s| String::from_utf8_lossy(s.expose()).into_owned())
                    .unwrap_or_default();
                proxy = proxy.basic_auth(username, &password);
            }
            builder.proxy(proxy).build()
        }
    }
}

/// What tells two proxy settings' clients apart; the password only as a
/// digest, and `Debug` shows neither it nor the user.
#[derive(Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Environment,
    Direct,
    Explicit {
        url: String,
        username: Option<String>,
        password: Option<[u8; 32]>,
    },
}

impl ClientKey {
    fn of(setting: &ProxySetting) -> ClientKey {
        match setting {
            ProxySetting::Environment => ClientKey::Environment,
            ProxySetting::Direct => ClientKey::Direct,
            ProxySetting::Explicit(p) => ClientKey::Explicit {
                url: p.url.clone(),
                username: p.username.clone(),
                password: p.password.as_ref().map(|s| Sha256::digest(s.expose()).into()),
            },
        }
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Environment => f.write_str("Environment"),
            ClientKey::Direct => f.write_str("Direct"),
            ClientKey::Explicit { url, .. } => write!(f, "Explicit({url})"),
        }
    }
}

/// Each request sets the attempt timeout of the config it runs under; this
/// only bounds a client's requests that set none.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends in flight at once for a target.
pub fn capacity(config: &Config, target: &str) -> usize {
    config
        .target(target)
        .and_then(|t| t.concurrency)
        .unwrap_or(config.delivery.concurrency)
}

/// What every send shares: the HTTP clients, the tracker that shutdown waits
/// on, and each target's send slots. Both the dispatcher (for jobs it
/// claims) and ingress (for jobs it hands over on commit) send through it,
/// so a target's capacity counts all of them.
#[derive(Debug)]
pub struct Sends {
    /// One client per distinct proxy setting, built on first use.
    clients: Mutex<HashMap<ClientKey, Arc<Outbound>>>,
    pub tracker: TaskTracker,
    /// (capacity, semaphore) per target; replaced when a reload changes the capacity.
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    /// Set when the dispatcher left due jobs for lack of a slot: then, and
    /// only then, a finishing send is worth waking it for.
    starved: AtomicBool,
}

impl Sends {
    pub fn new() -> Result<Sends, reqwest::Error> {
        let sends = Sends {
            clients: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            slots: Mutex::new(HashMap::new()),
            starved: AtomicBool::new(false),
        };
        // The common client is built now, so a client that cannot be built
        // stops relay at start rather than failing every send.
        sends.outbound(&ProxySetting::Environment)?;
        Ok(sends)
    }

    /// The client for a target's proxy setting, built the first time it is asked for.
    pub fn outbound(&self, setting: &ProxySetting) -> Result<Arc<Outbound>, reqwest::Error> {
        let key = ClientKey::of(setting);
        let mut clients = match self.clients.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(outbound) = clients.get(&key) {
            return Ok(outbound.clone());
        }
        let outbound = Arc::new(Outbound::new(http_client_via(CLIENT_TIMEOUT, setting)?, setting));
        clients.insert(key, outbound.clone());
        Ok(outbound)
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
