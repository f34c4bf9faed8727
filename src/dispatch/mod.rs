//! Dispatch: claim due jobs, add credentials, send, classify the outcome,
//! record the attempt, and schedule a retry or declare the job dead.
//!
//! No database transaction is held across an HTTP call: a job is leased with
//! a claim id, sent with no lock held, then completed only if the claim still
//! holds. Per-target semaphores cap sends in flight. Jobs not finished when
//! shutdown's deadline passes stay in the store and are sent after restart.

pub mod outcome;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, Delivery};
use crate::daemon::App;
use crate::store::{AttemptRecord, ClaimedJob, Completion, NextState};
use crate::targets::{USER_AGENT, response_message};
pub use outcome::Outcome;
pub use retry::RetryPolicy;

/// The longest the dispatcher sleeps without looking at the store; wake-ups
/// from ingress and finished sends usually come much sooner.
const MAX_IDLE: Duration = Duration::from_secs(5);

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

/// How long a claim lasts: long enough for one attempt and its recording, so
/// only a worker that died (or stalled) loses its jobs.
fn lease(delivery: &Delivery) -> Duration {
    delivery.timeout * 2 + Duration::from_secs(30)
}

/// Runs until `shutdown`, then lets in-flight sends finish within
/// `server.shutdown_timeout`.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let config = app.config();
    let client = match http_client(config.delivery.timeout) {
        Ok(client) => client,
        Err(e) => {
            error!(error = %e, "cannot build the HTTP client; nothing will be sent");
            return;
        }
    };
    let tracker = TaskTracker::new();
    // (capacity, semaphore) per target; rebuilt when a reload changes the capacity.
    let mut slots: HashMap<String, (usize, Arc<Semaphore>)> = HashMap::new();
    while !shutdown.is_cancelled() {
        let config = app.config();
        let lease = lease(&config.delivery);
        let mut maybe_more = false;
        for (name, target) in &config.targets {
            let capacity = target.concurrency.unwrap_or(config.delivery.concurrency);
            let slot = slots
                .entry(name.clone())
                .or_insert_with(|| (capacity, Arc::new(Semaphore::new(capacity))));
            if slot.0 != capacity {
                *slot = (capacity, Arc::new(Semaphore::new(capacity)));
            }
            let semaphore = slot.1.clone();
            let free = semaphore.available_permits();
            if free == 0 {
                continue;
            }
            match app.store.claim(name, free, lease, app.now()).await {
                Ok(jobs) => {
                    maybe_more |= jobs.len() == free;
                    for job in jobs {
                        // Only this loop takes permits, so one is free for each job.
                        let Ok(permit) = semaphore.clone().try_acquire_owned() else {
                            break;
                        };
                        tracker.spawn(deliver(app.clone(), client.clone(), job, permit));
                    }
                }
                Err(e) => warn!(target = %name, error = %e, "cannot claim jobs; will try again"),
            }
        }
        if maybe_more {
            continue;
        }
        let wait = match app.store.next_wakeup().await {
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
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }
    tracker.close();
    let deadline = config.server.shutdown_timeout;
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

async fn deliver(app: Arc<App>, client: reqwest::Client, job: ClaimedJob, permit: OwnedSemaphorePermit) {
    let span = info_span!(
        "send",
        job_id = %job.id,
        event_id = %job.event_id,
        target = %job.target,
        route = %job.route,
        attempt = job.attempts + 1,
    );
    async {
        let config = app.config();
        let started_at = app.now();
        let clock = tokio::time::Instant::now();
        let result = attempt(&config, &client, &job, app.now()).await;
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
        record(&app, completion).await;
    }
    .instrument(span)
    .await;
    drop(permit);
    app.wake_dispatch();
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
    let mut request = client.post(&wire.url).body(wire.body);
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
    let mut wait = Duration::from_millis(100);
    for _ in 0..10 {
        match app.store.complete(completion.clone()).await {
            Ok(true) => return,
            Ok(false) => {
                warn!(
                    "the job's lease expired during the send and another worker took it; this attempt is not recorded"
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "cannot record the attempt; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    error!("gave up recording the attempt; the job will be sent again after its lease expires");
}
