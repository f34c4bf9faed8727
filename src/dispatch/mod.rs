//! Dispatch: claim due jobs, add credentials, send, classify the outcome,
//! record the attempt, and schedule a retry or declare the job dead.
//!
//! No database transaction is held across an HTTP call: a job is leased with
//! a claim id, sent with no lock held (its lease renewed while the send
//! runs), then completed only if the claim still holds. Per-target
//! semaphores cap sends in flight. Jobs not finished when
//! shutdown's deadline passes stay in the store and are sent after restart.

pub mod outcome;
pub mod retry;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::Config;
use crate::daemon::App;
use crate::store::{AttemptRecord, ClaimedJob, Completion, NextState};
use crate::targets::{USER_AGENT, response_message};
pub use outcome::Outcome;
pub use retry::RetryPolicy;

/// The longest the dispatcher sleeps without looking at the store; wake-ups
/// from ingress and finished sends usually come much sooner.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// The most jobs one claim takes (the slots cap it lower, usually).
const MAX_CLAIM: usize = 256;

/// How much of a target's answer is kept for the attempt record.
const RESPONSE_READ_LIMIT: usize = 64 * 1024;

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub status: Option<u16>,
    /// The target's `Retry-After`, already turned into a wait.
    pub retry_after: Option<Duration>,
    /// The target's message, or what went wrong on the way.
    pub message: String,
}

impl AttemptResult {
    fn dead_request(message: String) -> AttemptResult {
        AttemptResult {
            outcome: Outcome::DeadRequest,
            status: None,
            retry_after: None,
            message,
        }
    }
}

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
    client: reqwest::Client,
    tracker: TaskTracker,
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

    fn semaphore(&self, target: &str, capacity: usize) -> Arc<Semaphore> {
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
}

/// Sends a leased job on the shared tracker; the permit is its slot.
pub fn start_send(app: &Arc<App>, job: ClaimedJob, permit: OwnedSemaphorePermit) {
    app.sends.tracker.spawn(deliver(app.clone(), job, permit));
}

/// Claims due jobs (retries, a backlog, what a crash left) until `shutdown`,
/// then lets every send in flight finish within `server.shutdown_timeout`.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let config = app.config();
        let lease = config.delivery.lease;
        let mut maybe_more = false;
        let mut starved = false;
        for name in config.targets.keys() {
            // Slots first, then claims: ingress takes slots too, and a job
            // claimed without one would sit out its lease.
            let semaphore = app.sends.semaphore(name, capacity(&config, name));
            let mut permits = Vec::new();
            while permits.len() < MAX_CLAIM {
                match semaphore.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            if permits.is_empty() {
                starved = true;
                continue;
            }
            let asked = permits.len();
            match app.store.claim(name, asked, lease, app.now()).await {
                Ok(jobs) => {
                    maybe_more |= jobs.len() == asked;
                    starved |= jobs.len() == asked;
                    for (job, permit) in jobs.into_iter().zip(permits) {
                        start_send(&app, job, permit);
                    }
                }
                Err(e) => warn!(target = %name, error = %e, "cannot claim jobs; will try again"),
            }
        }
        app.sends.starved.store(starved, Ordering::Relaxed);
        if maybe_more {
            continue;
        }
        let wait = match app.store.next_wakeup(app.now()).await {
            Ok(Some(at)) => match at.duration_since(app.now()) {
                Ok(wait) => wait.min(MAX_IDLE),
                // Due already but not claimed: its target is at capacity, and
                // a finishing send will wake us.
                Err(_) => MAX_IDLE,
            },
            Ok(None) => MAX_IDLE,
            Err(e) => {
                warn!(error = %e, "cannot read the queue; will try again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = app.dispatch_wakeup() => {}
            () = app.store.work_arrived() => {}
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }
    let tracker = &app.sends.tracker;
    tracker.close();
    let deadline = app.config().server.shutdown_timeout;
    let in_flight = tracker.len();
    if in_flight > 0 {
        info!(
            sends = in_flight,
            deadline_secs = deadline.as_secs(),
            "waiting for sends in flight"
        );
    }
    if tokio::time::timeout(deadline, tracker.wait()).await.is_err() {
        warn!(
            sends = tracker.len(),
            "shutdown deadline passed with sends in flight; their jobs stay in the store and are sent again after restart"
        );
    }
}

async fn deliver(app: Arc<App>, job: ClaimedJob, permit: OwnedSemaphorePermit) {
    let span = info_span!(
        "send",
        job_id = %job.id,
        event_id = %job.event_id,
        target = %job.target,
        route = %job.route,
        attempt = job.attempts + 1,
    );
    let retry_scheduled = async {
        let config = app.config();
        let started_at = app.now();
        let clock = tokio::time::Instant::now();
        let result = tokio::select! {
            result = attempt(&config, &app.sends.client, &job, app.now()) => result,
            never = keep_leased(&app, &job, config.delivery.lease) => match never {},
        };
        let duration = clock.elapsed();
        let ended = app.now();
        let next = RetryPolicy::new(&config.delivery).decide(
            job.attempts,
            job.maybe_attempts,
            &result,
            rand::random::<f64>(),
            ended,
        );
        log_result(&result, &next, duration, ended, &job.request.redacted_url());
        app.metrics.attempt(&job.target, result.outcome);
        if result.outcome != Outcome::DryRun {
            app.metrics.send_took(&job.target, duration);
        }
        let completion = Completion {
            job_id: job.id,
            claim: job.claim,
            attempt: AttemptRecord {
                started_at,
                duration,
                status: result.status,
                outcome: result.outcome.code(),
                excerpt: result.message,
            },
            next,
            at: ended,
        };
        let retry_scheduled = matches!(completion.next, NextState::Retry { .. });
        record(&app, completion).await;
        retry_scheduled
    }
    .instrument(span)
    .await;
    drop(permit);
    // The dispatcher sleeps until the earliest due job it knew of; a new
    // retry may be due sooner, and a starved target now has a free slot.
    if retry_scheduled || app.sends.starved.load(Ordering::Relaxed) {
        app.wake_dispatch();
    }
}

/// Renews the job's lease every third of `lease` for as long as its send
/// runs: a send may outlast the lease while its relay lives, and the jobs of
/// a relay that died are taken over one lease after its last renewal. The
/// claim id fences each renewal; once it is lost, renewing stops.
async fn keep_leased(app: &App, job: &ClaimedJob, lease: Duration) -> Infallible {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match app.store.renew(job.id, job.claim, lease, app.now()).await {
            Ok(true) => debug!(lease_secs = lease.as_secs_f64(), "lease renewed"),
            Ok(false) => {
                warn!(
                    "the job's lease ran out and another worker took it while this send was running; this attempt will not be recorded"
                );
                return std::future::pending().await;
            }
            Err(e) => warn!(error = %e, "cannot renew the job's lease; will try again"),
        }
    }
}

async fn attempt(
    config: &Config,
    client: &reqwest::Client,
    job: &ClaimedJob,
    now: SystemTime,
) -> AttemptResult {
    let Some(target) = config.targets.get(&job.target) else {
        return AttemptResult::dead_request(format!(
            "target {} is no longer in the config; retry the job by hand once it is back",
            job.target
        ));
    };
    if target.dry_run {
        let text = job.request.redacted(job.payload.as_ref());
        info!(request = %text, "dry run: this request was recorded, not sent");
        return AttemptResult {
            outcome: Outcome::DryRun,
            status: None,
            retry_after: None,
            message: text,
        };
    }
    let wire = match target.authorize(&job.request, job.payload.as_ref()) {
        Ok(wire) => wire,
        Err(e) => return AttemptResult::dead_request(e.to_string()),
    };
    let mut request = client
        .post(&wire.url)
        .timeout(config.delivery.timeout)
        .body(wire.body);
    for (name, value) in &wire.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let mut result = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let header = |name: http::HeaderName| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let retry_after =
                header(http::header::RETRY_AFTER).and_then(|v| retry::parse_retry_after(&v, now));
            let location = header(http::header::LOCATION);
            let body = read_limited(response).await;
            let outcome = Outcome::of_status(status);
            let message = match (status, location) {
                (300..=399, Some(location)) => format!(
                    "{status}: redirected to {location}; relay does not follow redirects for triggers, so point the target at the final address"
                ),
                _ => format!("{status}: {}", response_message(&body)),
            };
            AttemptResult {
                outcome,
                status: Some(status),
                retry_after,
                message,
            }
        }
        Err(e) => {
            let (outcome, message) = outcome::of_transport_error(&e, config.delivery.timeout);
            AttemptResult {
                outcome,
                status: None,
                retry_after: None,
                message,
            }
        }
    };
    result.message = target.scrub(result.message);
    result
}

/// The start of the response body; the rest is not needed for the record.
async fn read_limited(mut response: reqwest::Response) -> Bytes {
    let mut buffer = BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.extend_from_slice(&chunk);
        if buffer.len() >= RESPONSE_READ_LIMIT {
            break;
        }
    }
    buffer.freeze()
}

fn log_result(result: &AttemptResult, next: &NextState, duration: Duration, now: SystemTime, url: &str) {
    let outcome = result.outcome.code();
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let status = result.status.unwrap_or(0);
    match next {
        NextState::Done if result.outcome == Outcome::DryRun => {}
        NextState::Done => info!(outcome, status, duration_ms = ms, url, "delivered"),
        NextState::Retry { due_at, .. } => {
            let wait = due_at.duration_since(now).unwrap_or_default();
            warn!(
                outcome,
                status,
                duration_ms = ms,
                retry_in_secs = wait.as_secs(),
                url,
                message = %result.message,
                "attempt failed; will retry"
            );
        }
        NextState::Dead { reason } => {
            error!(outcome, status, duration_ms = ms, url, reason = %reason, "job is dead")
        }
    }
}

/// Records a completion, retrying while the store is briefly unavailable. A
/// completion that cannot be recorded leaves the job leased; it is sent
/// again when the lease expires (at least once, never lost).
async fn record(app: &App, completion: Completion) {
    // The claim id, not the lease, decides whether a completion counts: a
    // store that is down for a while is waited out, and the attempt still
    // lands unless another relay took the job meanwhile. Only shutdown stops
    // the wait; the job is then sent again once its lease runs out.
    let mut wait = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match app.store.complete(completion.clone(), app.now()).await {
            Ok(true) => {
                if failures > 0 {
                    info!(failures, "attempt recorded once the store answered again");
                }
                return;
            }
            Ok(false) => {
                warn!(
                    "the job's lease expired during the send and another worker took it; this attempt is not recorded"
                );
                return;
            }
            Err(e) => {
                if failures == 0 {
                    warn!(error = %e, "cannot record the attempt; retrying until the store answers");
                }
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = app.shutdown.cancelled() => {
                        error!(error = %e, "shutting down before the attempt could be recorded; the job will be sent again after its lease runs out");
                        return;
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}
