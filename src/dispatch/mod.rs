//! Dispatch: claim due jobs, have their targets send them, record each
//! attempt, and schedule a retry or declare the job dead; also the slots the
//! accept path reserves before a commit and the hand-over of what it leased.
//!
//! No database transaction is held across an HTTP call: a job is leased with
//! a claim id, sent with no lock held (its lease renewed while the send
//! runs), then completed only if the claim still holds. Per-target
//! semaphores cap sends in flight; a job handed over on commit may wait for
//! one in memory, leased and its lease renewed. At shutdown, sends in
//! flight and jobs waiting for a slot get the deadline; a job still waiting
//! then goes back to the queue, and a send not finished stays in the store
//! and is sent again after restart (or, on a shared store, once its lease
//! runs out).

pub mod retry;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::app::App;
use crate::clock::stopwatch;
use crate::config::Config;
use crate::sends::{Place, Sends, capacity};
use crate::store::{AttemptRecord, ClaimedJob, Completion, FollowFrom, Lease, NextState, Work};
use crate::targets::{AttemptResult, Outcome};
pub use retry::RetryPolicy;

/// The longest the dispatcher sleeps without looking at the store; wake-ups
/// from ingress and finished sends usually come much sooner.
const MAX_IDLE: Duration = Duration::from_secs(5);
/// A job due less than this long ago that was not claimed is taken for a
/// clock edge between relay and the store, and looked for again after
/// [`JUST_DUE_RETRY`].
const JUST_DUE: Duration = Duration::from_secs(1);
const JUST_DUE_RETRY: Duration = Duration::from_millis(20);

/// The most jobs one claim takes (the slots cap it lower, usually).
const MAX_CLAIM: usize = 256;

/// Places taken ahead of a commit (a send slot, or a seat in the waiting
/// room for one), with the lease each job is stored under, by job id.
#[derive(Debug, Default)]
pub struct Reservation {
    slots: HashMap<Uuid, (Lease, Place)>,
}

impl Reservation {
    /// The lease a job is to be stored under, if it has a place.
    pub fn lease(&self, job: &Uuid) -> Option<Lease> {
        self.slots.get(job).map(|(lease, _)| *lease)
    }
}

/// Takes a place for each job (`(id, target)`) whose target has one now:
/// those jobs are stored leased and sent after the commit with no claim,
/// at once in a send slot or in the first slot a send frees, waiting for it
/// in memory; the rest are queued for the dispatcher. A job queued costs a
/// claim and a row version more, and under load it waits behind the whole
/// queue: on SQLite at 32 connections with no waiting room, 46% of the
/// webhooks' triggers were still queued when a 5 s load ended, the last
/// sent 1.4 s later, and a webhook cost 9-17% more CPU and 19-28% more
/// disk counted to its trigger. Nothing is reserved once shutdown has begun.
pub fn reserve<'a>(
    app: &App,
    config: &Config,
    jobs: impl IntoIterator<Item = (Uuid, &'a str)>,
    now: SystemTime,
) -> Reservation {
    let mut reservation = Reservation::default();
    if app.shutdown.is_cancelled() {
        return reservation;
    }
    let until = now + config.delivery.lease;
    for (id, target) in jobs {
        if let Some(place) = app.sends.try_place(config, target) {
            let lease = Lease {
                claim: Uuid::now_v7(),
                until,
            };
            reservation.slots.insert(id, (lease, place));
        }
    }
    reservation
}

/// Sends the jobs the store committed leased, each in the place reserved
/// for it; the places of the rest (held back, a duplicate delivery, a
/// commit that failed: `leased` is then empty) are freed, and a dispatcher
/// waiting for a free slot hears of it, as it does when a send ends.
pub fn hand_over(app: &Arc<App>, leased: Vec<ClaimedJob>, mut reservation: Reservation) {
    for job in leased {
        match reservation.slots.remove(&job.id) {
            Some((_, Place::Slot(slot))) => start_send(app, job, slot),
            Some((_, seat)) => start_send_when_free(app, job, seat),
            None => {}
        }
    }
    let freed = !reservation.slots.is_empty();
    // Freed before the wake-up, so the dispatcher finds the slots free.
    drop(reservation);
    if freed && app.sends.starved() {
        app.wake_dispatch();
    }
}

/// Sends a leased job on the shared tracker; the permit is its slot.
fn start_send(app: &Arc<App>, job: ClaimedJob, permit: OwnedSemaphorePermit) {
    app.sends.tracker.spawn(deliver(app.clone(), job, permit));
}

/// Sends a leased job once its seat in the waiting room becomes a slot,
/// its lease renewed while it waits; if the lease is lost meanwhile
/// (another worker took the job), it is not sent here. A stop lets it wait
/// on until the shutdown's deadline; if that passes first, it goes back to
/// the queue, for another relay to send at once rather than after its
/// lease.
fn start_send_when_free(app: &Arc<App>, job: ClaimedJob, seat: Place) {
    let span = info_span!(
        "wait for a send slot",
        job_id = %job.id,
        event_id = %job.event_id,
        target = %job.target,
        route = %job.route,
    );
    let app = app.clone();
    app.sends.waiting.clone().spawn(
        async move {
            let lease = app.config().delivery.lease;
            tokio::select! {
                biased;
                () = app.sends.hand_back.cancelled() => give_back(&app, &job).await,
                slot = seat.slot() => start_send(&app, job, slot),
                () = lease_lost(&app, &job, lease) => warn!(
                    "the job's lease ran out and another worker took it while it waited for a send slot; it is not sent here"
                ),
            }
        }
        .instrument(span),
    );
}

/// Puts a job that never got its send slot back in the queue when
/// shutdown's deadline passes; should the store refuse, the job goes out
/// once its lease runs out.
async fn give_back(app: &App, job: &ClaimedJob) {
    match app.store.release(job.id, job.claim, app.now()).await {
        Ok(true) => info!(
            "shutdown's deadline passed while the job waited for a send slot; it is queued again, not sent"
        ),
        Ok(false) => {}
        Err(e) => warn!(
            error = %e,
            "shutdown's deadline passed while the job waited for a send slot, and the store did not take it back; it goes out once its lease runs out"
        ),
    }
}

/// How long the dispatcher sleeps when it has claimed all it could: until
/// the next job is due (`next`, from the store), at most [`MAX_IDLE`].
/// `starved` says some target is at capacity, so a finishing send wakes it.
fn idle_wait(next: Option<SystemTime>, now: SystemTime, starved: bool) -> Duration {
    let Some(at) = next else {
        return MAX_IDLE;
    };
    match at.duration_since(now) {
        Ok(wait) => wait.min(MAX_IDLE),
        // Due a moment ago but not claimed: the wait ended a hair before the
        // store's own clock said due (PostgreSQL decides with its `now()`),
        // so look again at once rather than idling MAX_IDLE past the
        // schedule.
        Err(late) if !starved && late.duration() < JUST_DUE => JUST_DUE_RETRY,
        // Due long ago but not claimed, or a target at capacity: a finishing
        // send wakes us (or the job's target is gone from the config).
        Err(_) => MAX_IDLE,
    }
}

/// Claims due jobs (retries, a backlog, what a crash left) until `shutdown`,
/// then lets every send in flight finish within `server.shutdown_timeout`.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let config = app.config();
        let lease = config.delivery.lease;
        let mut maybe_more = false;
        let mut starved = false;
        let mut some_slot_free = false;
        for (name, _) in config.job_targets() {
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
            some_slot_free = true;
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
        app.sends.set_starved(starved);
        if maybe_more {
            continue;
        }
        // Every target at capacity: nothing can be claimed before a send
        // finishes, and each finishing send wakes this loop (`starved`), so
        // when the next job is due does not matter yet. Under load that
        // spares the store a query on most turns (on PostgreSQL, 8% of its
        // statements' time at c32).
        let next = if some_slot_free {
            app.store.next_wakeup(app.now()).await
        } else {
            Ok(None)
        };
        let wait = match next {
            Ok(next) => idle_wait(next, app.now(), starved),
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
    let (sends, waiting) = (&app.sends.tracker, &app.sends.waiting);
    sends.close();
    waiting.close();
    let deadline = app.config().server.shutdown_timeout;
    if !sends.is_empty() || !waiting.is_empty() {
        info!(
            sends = sends.len(),
            waiting = waiting.len(),
            deadline_secs = deadline.as_secs(),
            "waiting for sends in flight and jobs waiting for a send slot"
        );
    }
    // A job that gets its slot moves its send to `sends` before it leaves
    // `waiting`.
    let all_done = async {
        waiting.wait().await;
        sends.wait().await;
    };
    if tokio::time::timeout(deadline, all_done).await.is_err() {
        app.sends.hand_back.cancel();
        if tokio::time::timeout(HAND_BACK_WAIT, waiting.wait())
            .await
            .is_err()
        {
            warn!(
                waiting = waiting.len(),
                "the store did not take back every job waiting for a send slot in time; those go out once their leases run out"
            );
        }
        warn!(
            sends = sends.len(),
            "shutdown deadline passed with sends in flight; their jobs stay in the store and are sent again after restart"
        );
    }
}

/// How long a stop waits, past its deadline, for the store to take back
/// the jobs still waiting for a send slot: one small write each.
const HAND_BACK_WAIT: Duration = Duration::from_secs(2);

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
        let clock = stopwatch();
        let (result, url) = tokio::select! {
            result = attempt(&config, &app.sends, &job, app.now()) => result,
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
        log_result(&result, &next, duration, ended, &url);
        app.metrics.attempt(&job.target, result.outcome);
        if result.outcome != Outcome::DryRun {
            app.metrics.send_took(&job.target, duration);
        }
        let follow = follow_from(&config, &job.target, &result);
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
            pipeline: result.pipeline,
            next,
            at: ended,
            follow,
            reported: job.reported,
        };
        let retry_scheduled = matches!(completion.next, NextState::Retry { .. });
        // A reported trigger that is done or dead has queued its report.
        let reported = job.reported && !retry_scheduled;
        record(&app, completion).await;
        if follow.is_some() {
            app.wake_follower();
        }
        if reported {
            app.wake_dispatch();
        }
        retry_scheduled
    }
    .instrument(span)
    .await;
    // Held until the attempt is recorded, not only for the HTTP exchange:
    // freeing it earlier measured 12-16% fewer webhooks/s on SQLite at c32
    // (more sends at once, competing with the writer for the same core).
    drop(permit);
    // The dispatcher sleeps until the earliest due job it knew of; a new
    // retry may be due sooner, and a starved target now has a free slot.
    if retry_scheduled || app.sends.starved() {
        app.wake_dispatch();
    }
}

/// Whether to follow the pipeline an attempt started by polling: its
/// target follows, and the answer named a pipeline that has not ended.
fn follow_from(config: &Config, target: &str, result: &AttemptResult) -> Option<FollowFrom> {
    let follow = config.target(target)?.follow.as_ref()?;
    let pipeline = result.pipeline.as_ref()?;
    (result.outcome == Outcome::Delivered && !pipeline.state.is_final()).then_some(FollowFrom {
        first_in: follow.first,
        deadline: follow.deadline,
    })
}

/// One attempt of the job, under the config in force now, and the URL it
/// went to (for the log).
async fn attempt(
    config: &Config,
    sends: &Sends,
    job: &ClaimedJob,
    now: SystemTime,
) -> (AttemptResult, String) {
    let Some(target) = config.target(&job.target) else {
        let message = format!(
            "target {} is no longer in the config; retry the job by hand once it is back",
            job.target
        );
        return (AttemptResult::dead_request(message), String::new());
    };
    // A report is rendered now, from what it reports; a trigger was
    // rendered when its webhook came.
    let rendered;
    let request = match &job.work {
        Work::Trigger(request) => request,
        Work::Report(report) => match target.render_status(report) {
            Ok(request) => {
                rendered = request;
                &rendered
            }
            Err(e) => return (AttemptResult::dead_request(e.to_string()), String::new()),
        },
    };
    let url = request.redacted_url();
    let outbound = match sends.outbound(&target.proxy) {
        Ok(outbound) => outbound,
        Err(e) => {
            let result = AttemptResult::without_answer(
                Outcome::RetryConnect,
                target.scrub(format!(
                    "cannot build the HTTP client for this target's proxy: {}",
                    crate::targets::outcome::transport_detail(&e)
                )),
            );
            return (result, url);
        }
    };
    let result = target
        .send(
            &outbound,
            request,
            job.payload.as_ref(),
            config.delivery.timeout,
            now,
        )
        .await;
    (result, url)
}

/// Renews the job's lease every third of `lease` for as long as its send
/// runs: a send may outlast the lease while its relay lives, and the jobs of
/// a relay that died are taken over one lease after its last renewal. The
/// claim id fences each renewal; once it is lost, renewing stops.
async fn keep_leased(app: &App, job: &ClaimedJob, lease: Duration) -> Infallible {
    lease_lost(app, job, lease).await;
    warn!(
        "the job's lease ran out and another worker took it while this send was running; this attempt will not be recorded"
    );
    std::future::pending().await
}

/// Renews the job's lease every third of `lease`; ends once a renewal finds
/// the claim lost.
async fn lease_lost(app: &App, job: &ClaimedJob, lease: Duration) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match app.store.renew(job.id, job.claim, lease, app.now()).await {
            Ok(true) => debug!(lease_secs = lease.as_secs_f64(), "lease renewed"),
            Ok(false) => return,
            Err(e) => warn!(error = %e, "cannot renew the job's lease; will try again"),
        }
    }
}

fn log_result(result: &AttemptResult, next: &NextState, duration: Duration, now: SystemTime, url: &str) {
    let outcome = result.outcome.code();
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let status = result.status.unwrap_or(0);
    match next {
        NextState::Done if result.outcome == Outcome::DryRun => {}
        NextState::Done => match &result.pipeline {
            Some(pipeline) => info!(
                outcome,
                status,
                duration_ms = ms,
                url,
                pipeline = %pipeline.id,
                pipeline_number = pipeline.number,
                pipeline_url = pipeline.url.as_deref().unwrap_or(""),
                pipeline_state = %pipeline.state,
                "delivered"
            ),
            None => info!(outcome, status, duration_ms = ms, url, "delivered"),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_wait_follows_the_next_due_job_and_never_idles_past_one_just_due() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ms = Duration::from_millis;
        assert_eq!(idle_wait(None, now, false), MAX_IDLE);
        assert_eq!(idle_wait(Some(now + ms(1_500)), now, false), ms(1_500));
        assert_eq!(idle_wait(Some(now + ms(60_000)), now, false), MAX_IDLE);
        // The store said not yet a moment ago: look again, soon.
        assert_eq!(idle_wait(Some(now - ms(3)), now, false), JUST_DUE_RETRY);
        // A target at capacity: its finishing send is the wake-up.
        assert_eq!(idle_wait(Some(now - ms(3)), now, true), MAX_IDLE);
        // Long overdue and unclaimed (its target is gone): no busy loop.
        assert_eq!(idle_wait(Some(now - ms(30_000)), now, false), MAX_IDLE);
    }
}
