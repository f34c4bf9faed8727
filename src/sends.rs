//! The send slots and the HTTP clients every trigger goes out through.
//!
//! Both the dispatcher (for jobs it claims) and the accept path (for jobs it
//! hands over on commit) take a target's slots here, so a target's
//! `concurrency` counts all of its sends. Beside each target's slots is a
//! waiting room, twice as many seats, for jobs handed over on commit that
//! wait in memory for the next slot a send frees rather than in the queue
//! for a claim (`Place`). Sends, and the jobs waiting for a slot, run on
//! the trackers that shutdown waits for. Nothing here decides what to send
//! or when.
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
use tokio_util::sync::CancellationToken;
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

/// Seats in a target's waiting room per send slot. Under load a slot is
/// held by a webhook waiting for its commit and then by its send, so twice
/// the slots is where nearly every job finds a place (at 32 connections and
/// `concurrency = 32`: on PostgreSQL one job in five claimed from the queue
/// with as many seats as slots, three in four with none; on SQLite one in
/// fifty with two, 46% with none); the bound keeps a job's wait in memory
/// to about two sends ahead of it.
const SEATS_PER_SLOT: usize = 2;

/// A target's send slots and the waiting room beside them.
#[derive(Debug, Clone)]
struct Slots {
    capacity: usize,
    sends: Arc<Semaphore>,
    seats: Arc<Semaphore>,
}

impl Slots {
    fn new(capacity: usize) -> Slots {
        Slots {
            capacity,
            sends: Arc::new(Semaphore::new(capacity)),
            seats: Arc::new(Semaphore::new(SEATS_PER_SLOT * capacity)),
        }
    }
}

/// Where a job handed over on commit waits to be sent (`Sends::try_place`).
#[derive(Debug)]
pub enum Place {
    /// A send slot, held.
    Slot(OwnedSemaphorePermit),
    /// A seat in the target's waiting room: the job takes the first slot a
    /// send frees. A target's slots go to those waiting for one in the
    /// order they began to wait, before the dispatcher, which only takes a
    /// slot that is free.
    Seat {
        seat: OwnedSemaphorePermit,
        sends: Arc<Semaphore>,
    },
}

impl Place {
    /// The send slot: at once, or once a send frees one (the seat is given
    /// up then).
    pub async fn slot(self) -> OwnedSemaphorePermit {
        match self {
            Place::Slot(slot) => slot,
            Place::Seat { seat, sends } => match sends.acquire_owned().await {
                Ok(slot) => {
                    drop(seat);
                    slot
                }
                // Nothing closes a target's slots.
                Err(_) => std::future::pending().await,
            },
        }
    }
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
    /// The jobs waiting in memory for a send slot: once one has its slot
    /// its send moves to `tracker`.
    pub waiting: TaskTracker,
    /// Cancelled when shutdown's deadline passes: the jobs still waiting
    /// for a slot then go back to the store's queue.
    pub hand_back: CancellationToken,
    /// Each target's slots and waiting room; replaced when a reload changes
    /// the capacity.
    slots: Mutex<HashMap<String, Slots>>,
    /// Set when the dispatcher left due jobs for lack of a slot: then, and
    /// only then, a finishing send is worth waking it for.
    starved: AtomicBool,
}

impl Sends {
    pub fn new() -> Result<Sends, reqwest::Error> {
        let sends = Sends {
            clients: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            waiting: TaskTracker::new(),
            hand_back: CancellationToken::new(),
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

    /// A target's send slots, `capacity` of them.
    pub fn semaphore(&self, target: &str, capacity: usize) -> Arc<Semaphore> {
        self.slots(target, capacity).sends
    }

    fn slots(&self, target: &str, capacity: usize) -> Slots {
        let mut slots = match self.slots.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let slot = slots
            .entry(target.to_owned())
            .or_insert_with(|| Slots::new(capacity));
        if slot.capacity != capacity {
            *slot = Slots::new(capacity);
        }
        slot.clone()
    }

    /// A place for one of `target`'s jobs that a webhook's commit hands
    /// over: a send slot if one is free right now, else a seat in the
    /// waiting room if one is free; `None` when there is neither, and the
    /// job is to wait in the store's queue.
    pub fn try_place(&self, config: &Config, target: &str) -> Option<Place> {
        let slots = self.slots(target, capacity(config, target));
        if let Ok(slot) = slots.sends.clone().try_acquire_owned() {
            return Some(Place::Slot(slot));
        }
        let seat = slots.seats.try_acquire_owned().ok()?;
        Some(Place::Seat {
            seat,
            sends: slots.sends,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One target, `hook`, with room for `concurrency` sends.
    fn config(concurrency: usize) -> Config {
        Config::from_toml(&format!(
            r#"
[delivery]
concurrency = {concurrency}

[targets.hook]
kind = "http"
url = "http://127.0.0.1:9/"
"#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_job_finds_a_slot_then_a_seat_then_the_queue() {
        let (sends, config) = (Sends::new().expect("a client"), config(2));
        let mut places = Vec::new();
        for _ in 0..2 {
            places.push(sends.try_place(&config, "hook").expect("a free slot"));
        }
        assert!(places.iter().all(|p| matches!(p, Place::Slot(_))));
        for _ in 0..SEATS_PER_SLOT * 2 {
            let seat = sends.try_place(&config, "hook").expect("a seat");
            assert!(matches!(seat, Place::Seat { .. }));
            places.push(seat);
        }
        assert!(
            sends.try_place(&config, "hook").is_none(),
            "every slot and seat taken: the job waits in the queue"
        );
        // A finished send frees a slot; the seat it leaves is free again.
        places.remove(0);
        let first_seat = places.remove(1);
        let slot = tokio::time::timeout(Duration::from_secs(5), first_seat.slot())
            .await
            .expect("the freed slot goes to the seat");
        assert!(matches!(
            sends.try_place(&config, "hook"),
            Some(Place::Seat { .. })
        ));
        drop(slot);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_job_that_waited_longest_not_to_whoever_asks_next() {
        let (sends, config) = (Sends::new().expect("a client"), config(1));
        let running = sends.try_place(&config, "hook").expect("the slot");
        let (first, second) = (
            sends.try_place(&config, "hook").expect("a seat"),
            sends.try_place(&config, "hook").expect("a seat"),
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiting: Vec<_> = [(1, first), (2, second)]
            .into_iter()
            .map(|(n, seat)| {
                let order = order.clone();
                tokio::spawn(async move {
                    let slot = seat.slot().await;
                    order.lock().expect("unpoisoned").push(n);
                    tokio::task::yield_now().await;
                    drop(slot);
                })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(running);
        // The dispatcher takes only a free slot: the waiting jobs come first.
        assert!(
            sends
                .semaphore("hook", capacity(&config, "hook"))
                .try_acquire()
                .is_err(),
            "a slot a send freed went to the dispatcher past two waiting jobs"
        );
        for task in waiting {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("each waiting job gets a slot in turn")
                .expect("no panic");
        }
        assert_eq!(*order.lock().expect("unpoisoned"), vec![1, 2]);
    }
}
