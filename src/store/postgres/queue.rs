//! The queue's SQL on PostgreSQL: committing a webhook with the loop
//! guard's store-side checks (under per-target advisory locks), claiming
//! due jobs with `SKIP LOCKED`, recording attempts fenced by the claim id,
//! renewing leases, the next wake-up and the readiness write; and the
//! `NOTIFY` that tells every relay of new work.
//!
//! What this module must never do: decide with the host's clock (the
//! database's `now()` decides; the caller's times arrive as offsets), hold
//! a lock beyond its own statement or transaction (never across an HTTP
//! call: completion is fenced by the claim id), or decide a loop-guard
//! rule's order or wording (the guard does).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::connect::{OPERATION_TIMEOUT, within};
use super::{PostgresStore, col, micros, next_moment, offset, unavailable};
use crate::event::Upstream;
use crate::guard::{Check, Dropped};
use crate::pipeline::PipelineState;
use crate::report::{STATUS_TARGET_PREFIX, SUPERSEDED};
use crate::store::rows;
use crate::store::{
    ClaimedJob, Completion, HeldBack, Ingested, JobRow, JobState, NewEvent, NextState, StoreError,
};

/// The first key of the per-target burst locks ("rly" in ASCII); the second
/// is a hash of the target's name.
const TARGET_LOCK_CLASS: i32 = 0x72_6c79;

pub(super) async fn ingest(store: &PostgresStore, event: NewEvent) -> Result<Ingested, StoreError> {
    // No deadline of its own: the accept path bounds the wait for every
    // store alike (`accept::SENDERS_DEADLINE`), and lets the commit run on.
    let columns = IngestColumns::of(&event)?;
    let client = store.client().await?;
    // One statement, one round trip: `relay_ingest` (schema V5) does what a
    // transaction of a statement per row did, in the same order.
    let stmt = client
        .prepare_cached(
            "SELECT original, held, held_by FROM relay_ingest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                 $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31,
                 $32, $33, $34, $35, $36)",
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let c = &columns;
    let params: [&(dyn ToSql + Sync); 36] = [
        &event.id,
        &event.source,
        &event.delivery,
        &event.hook,
        &event.content_type,
        &&event.body[..],
        &event.payload.as_deref(),
        &i64::from(event.hop),
        &event.summary,
        &c.drop_route,
        &c.drop_target,
        &c.drop_rule,
        &c.drop_reason,
        &TARGET_LOCK_CLASS,
        &c.locks,
        &c.id,
        &c.route,
        &c.target,
        &c.state,
        &c.request,
        &c.needs_payload,
        &c.error,
        &c.claim,
        &c.lease,
        &c.repo,
        &c.sha,
        &c.shadow,
        &c.report,
        &c.burst_limit,
        &c.burst_per,
        &c.burst_rule,
        &c.burst_reason,
        &c.dedupe_key,
        &c.dedupe_window,
        &c.dedupe_rule,
        &c.dedupe_reason,
    ];
    let row = client
        .query_one(&stmt, &params)
        .await
        .map_err(|e| unavailable(&e))?;
    if let Some(original) = col::<Option<Uuid>>(&row, 0)? {
        return Ok(Ingested::Duplicate(original));
    }
    let held: Vec<Uuid> = col(&row, 1)?;
    let held_by: Vec<String> = col(&row, 2)?;
    let mut held_back = Vec::new();
    let mut leased = Vec::new();
    for (job, drops) in event.jobs.iter().zip(columns.drops) {
        let Some(at) = held.iter().position(|id| *id == job.id) else {
            leased.extend(job.leased(&event));
            continue;
        };
        let rule = held_by.get(at).map(String::as_str);
        let dropped = drops
            .into_iter()
            .find(|d| Some(d.rule.as_str()) == rule)
            .ok_or_else(|| {
                StoreError::Corrupt(format!("job {} held back by an unknown rule {rule:?}", job.id))
            })?;
        held_back.push(HeldBack {
            job_id: job.id,
            dropped,
        });
    }
    Ok(Ingested::Accepted { held_back, leased })
}

/// One webhook's rows as the columns `relay_ingest` takes: the event's
/// drops, then each job's row with, for each loop-guard check it is
/// subject to, the drop it becomes if the check holds it back (worded by
/// the guard; a burst that holds counted exactly its limit, as the count
/// stops there).
struct IngestColumns {
    drop_route: Vec<Option<String>>,
    drop_target: Vec<Option<String>>,
    drop_rule: Vec<String>,
    drop_reason: Vec<String>,
    locks: Vec<i32>,
    id: Vec<Uuid>,
    route: Vec<String>,
    target: Vec<String>,
    state: Vec<&'static str>,
    request: Vec<Option<String>>,
    needs_payload: Vec<bool>,
    error: Vec<Option<String>>,
    claim: Vec<Option<Uuid>>,
    lease: Vec<Option<i64>>,
    repo: Vec<String>,
    sha: Vec<String>,
    shadow: Vec<bool>,
    report: Vec<Option<String>>,
    burst_limit: Vec<Option<i64>>,
    burst_per: Vec<Option<i64>>,
    burst_rule: Vec<Option<String>>,
    burst_reason: Vec<Option<String>>,
    dedupe_key: Vec<Option<String>>,
    dedupe_window: Vec<Option<i64>>,
    dedupe_rule: Vec<Option<String>>,
    dedupe_reason: Vec<Option<String>>,
    /// Per job, the drops it would become, in the order they are checked.
    drops: Vec<Vec<Dropped>>,
}

impl IngestColumns {
    fn of(event: &NewEvent) -> Result<IngestColumns, StoreError> {
        let n = event.jobs.len();
        let mut c = IngestColumns {
            drop_route: event.drops.iter().map(|d| d.route.clone()).collect(),
            drop_target: event.drops.iter().map(|d| d.target.clone()).collect(),
            drop_rule: event.drops.iter().map(|d| d.rule.clone()).collect(),
            drop_reason: event.drops.iter().map(|d| d.reason.clone()).collect(),
            locks: Vec::new(),
            id: Vec::with_capacity(n),
            route: Vec::with_capacity(n),
            target: Vec::with_capacity(n),
            state: Vec::with_capacity(n),
            request: Vec::with_capacity(n),
            needs_payload: Vec::with_capacity(n),
            error: Vec::with_capacity(n),
            claim: Vec::with_capacity(n),
            lease: Vec::with_capacity(n),
            repo: Vec::with_capacity(n),
            sha: Vec::with_capacity(n),
            shadow: Vec::with_capacity(n),
            report: Vec::with_capacity(n),
            burst_limit: Vec::with_capacity(n),
            burst_per: Vec::with_capacity(n),
            burst_rule: Vec::with_capacity(n),
            burst_reason: Vec::with_capacity(n),
            dedupe_key: Vec::with_capacity(n),
            dedupe_window: Vec::with_capacity(n),
            dedupe_rule: Vec::with_capacity(n),
            dedupe_reason: Vec::with_capacity(n),
            drops: Vec::with_capacity(n),
        };
        for job in &event.jobs {
            let JobRow {
                state,
                request,
                needs_payload,
                error,
            } = job.row()?;
            c.id.push(job.id);
            c.route.push(job.route.clone());
            c.target.push(job.target.clone());
            c.state.push(state.as_str());
            c.request.push(request);
            c.needs_payload.push(needs_payload);
            c.error.push(error.map(str::to_owned));
            c.claim.push(job.lease.map(|l| l.claim));
            c.lease
                .push(job.lease.map(|l| offset(l.until, event.received_at)));
            c.repo.push(job.repo.clone());
            c.sha.push(job.sha.clone());
            c.shadow.push(job.shadow);
            c.report.push(rows::report_json(job.report.as_ref()));
            let trigger = job.trigger();
            let (mut burst, mut dedupe) = (None, None);
            let mut drops = Vec::new();
            for check in job.limits.checks() {
                match check {
                    Check::Burst { limit, per } => {
                        if let Some(d) = trigger.burst(i64::from(limit), limit, per) {
                            burst = Some((i64::from(limit), micros(per), d.clone()));
                            drops.push(d);
                        }
                    }
                    Check::Dedupe { key, window } => {
                        if let Some(d) = trigger.dedupe(false, window) {
                            dedupe = Some((key.to_owned(), micros(window), d.clone()));
                            drops.push(d);
                        }
                    }
                }
            }
            if burst.is_some() {
                c.locks.push(target_lock(&job.target));
            }
            let (limit, per, rule, reason) = match burst {
                Some((limit, per, d)) => (Some(limit), Some(per), Some(d.rule), Some(d.reason)),
                None => (None, None, None, None),
            };
            c.burst_limit.push(limit);
            c.burst_per.push(per);
            c.burst_rule.push(rule);
            c.burst_reason.push(reason);
            let (key, window, rule, reason) = match dedupe {
                Some((key, window, d)) => (Some(key), Some(window), Some(d.rule), Some(d.reason)),
                None => (None, None, None, None),
            };
            c.dedupe_key.push(key);
            c.dedupe_window.push(window);
            c.dedupe_rule.push(rule);
            c.dedupe_reason.push(reason);
            c.drops.push(drops);
        }
        // The burst count is only right if no other relay is adding jobs for
        // the target meanwhile: a per-target lock, held to the commit. All
        // are taken up front, in key order, so two ingests for the same
        // targets queue rather than deadlock. Dedupe needs no lock of its
        // own: its row decides.
        c.locks.sort_unstable();
        c.locks.dedup();
        Ok(c)
    }
}

pub(super) async fn claim(
    store: &PostgresStore,
    target: &str,
    limit: usize,
    lease: Duration,
    _now: SystemTime,
) -> Result<Vec<ClaimedJob>, StoreError> {
    within("claim", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        // One statement, so one short transaction: expired leases first (a
        // worker died holding them), then due jobs, each walking its own
        // partial index in order. Rows another relay is claiming right now
        // are skipped, not waited for.
        let stmt = client
            .prepare_cached(
                "WITH expired AS (
                     SELECT id FROM jobs
                     WHERE target = $1 AND state = 'in_flight' AND lease_until <= now()
                     ORDER BY lease_until LIMIT $2
                     FOR UPDATE SKIP LOCKED
                 ), due AS (
                     SELECT id FROM jobs
                     WHERE target = $1 AND state = 'queued' AND due_at <= now()
                     ORDER BY due_at LIMIT $2 - (SELECT count(*) FROM expired)
                     FOR UPDATE SKIP LOCKED
                 ), claimed AS (
                     UPDATE jobs SET state = 'in_flight', claim_id = $3,
                         lease_until = now() + $4::int8 * interval '1 microsecond', updated_at = now()
                     WHERE id IN (SELECT id FROM expired UNION ALL SELECT id FROM due)
                     RETURNING id, event_id, route, target, attempts, maybe_attempts, request, needs_payload,
                         report, report_of, created_at
                 )
                 SELECT c.id, c.event_id, c.route, c.target, c.attempts, c.maybe_attempts, c.request,
                        CASE WHEN c.needs_payload THEN COALESCE(e.payload, e.body) END,
                        c.report, c.report_of IS NOT NULL, c.created_at,
                        c.report IS NOT NULL AND c.report_of IS NULL
                 FROM claimed c JOIN events e ON e.id = c.event_id",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let claim = Uuid::now_v7();
        let rows = client
            .query(
                &stmt,
                &[
                    &target,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    &claim,
                    &micros(lease),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut job = rows::claimed_job(row, claim)?;
            job.payload = col::<Option<Vec<u8>>>(row, 7)?.map(Bytes::from);
            jobs.push(job);
        }
        Ok(jobs)
    })
    .await
}

pub(super) async fn complete(
    store: &PostgresStore,
    c: Completion,
    now: SystemTime,
) -> Result<bool, StoreError> {
    within("complete", OPERATION_TIMEOUT, async {
        let mut client = store.client().await?;
        // Times are translated from the moment of writing, not from `c.at`:
        // a completion recorded late (the database was away) keeps the
        // attempt's real start, and a retry's backoff counts from the
        // attempt's end.
        let written_at = now;
        let (state, due_in, maybe, error) = match &c.next {
            NextState::Done => (JobState::Done, 0, 0, None),
            NextState::Retry {
                due_at,
                maybe_delivered,
            } => (
                JobState::Queued,
                offset(*due_at, written_at),
                i32::from(*maybe_delivered),
                Some(c.attempt.excerpt.as_str()),
            ),
            NextState::Dead { reason } => (JobState::Dead, 0, 0, Some(reason.as_str())),
        };
        // The attempt is written only where the claim still holds: a stale
        // worker's completion matches no row and so records nothing.
        // Attempts are numbered across manual retries, which reset the job's
        // own counter.
        const COMPLETE: &str = concat!(
            "WITH moved AS (
                 UPDATE jobs SET state = $1, attempts = attempts + 1, maybe_attempts = maybe_attempts + $2,
                     due_at = now() + $3::int8 * interval '1 microsecond', claim_id = NULL,
                     lease_until = NULL, last_error = $4, updated_at = now(),
                     pipeline_id = COALESCE($12::text, pipeline_id),
                     pipeline_number = CASE WHEN $12::text IS NULL THEN pipeline_number ELSE $13::int8 END,
                     pipeline_url = CASE WHEN $12::text IS NULL THEN pipeline_url ELSE $14::text END,
                     pipeline_state = CASE WHEN $12::text IS NULL THEN pipeline_state ELSE $15::text END,
                     pipeline_updated_at = CASE WHEN $12::text IS NULL THEN pipeline_updated_at ELSE now() END,
                     follow_due = CASE WHEN $16::int8 IS NULL THEN follow_due
                         ELSE now() + $16::int8 * interval '1 microsecond' END,
                     follow_until = CASE WHEN $16::int8 IS NULL THEN follow_until
                         ELSE now() + $17::int8 * interval '1 microsecond' END,
                     follow_polls = CASE WHEN $16::int8 IS NULL THEN follow_polls ELSE 0 END,
                     follow_note = CASE WHEN $16::int8 IS NULL THEN follow_note ELSE NULL END
                 WHERE id = $5 AND claim_id = $6 AND state = 'in_flight'
                 RETURNING id, event_id, route, repo, sha, report, report_of, pipeline_state,
                     pipeline_number, pipeline_url
             ",
            report_ctes!(id: "$18", prefix: "$19", error: "$4::text", superseded: "$20",
                         when: "$1 IN ('done', 'dead')"),
            "
             INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
             SELECT moved.id,
                    (SELECT COALESCE(max(number), 0) + 1 FROM attempts WHERE job_id = moved.id),
                    now() + $7::int8 * interval '1 microsecond', $8, $9, $10, $11
             FROM moved"
        );
        let state_name = state.as_str();
        let started = offset(c.attempt.started_at, written_at);
        let duration_ms = micros(c.attempt.duration) / 1000;
        let status = c.attempt.status.map(i32::from);
        let pipeline = c.pipeline.as_ref();
        let pipeline_id = pipeline.map(|p| p.id.as_str());
        let pipeline_number = pipeline
            .and_then(|p| p.number)
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let pipeline_url = pipeline.and_then(|p| p.url.as_deref());
        let pipeline_state = pipeline.map(|p| p.state.as_str());
        let follow_first = c.follow.map(|f| micros(f.first_in));
        let follow_deadline = c.follow.map(|f| micros(f.deadline));
        let report_id = Uuid::now_v7();
        let params: [&(dyn ToSql + Sync); 20] = [
            &state_name,
            &maybe,
            &due_in,
            &error,
            &c.job_id,
            &c.claim,
            &started,
            &duration_ms,
            &status,
            &c.attempt.outcome,
            &c.attempt.excerpt,
            &pipeline_id,
            &pipeline_number,
            &pipeline_url,
            &pipeline_state,
            &follow_first,
            &follow_deadline,
            &report_id,
            &STATUS_TARGET_PREFIX,
            &SUPERSEDED,
        ];
        if state != JobState::Queued {
            // One statement is its own transaction: no BEGIN and COMMIT
            // round trips on the busiest path.
            let stmt = client
                .prepare_cached(COMPLETE)
                .await
                .map_err(|e| unavailable(&e))?;
            let recorded = client
                .execute(&stmt, &params)
                .await
                .map_err(|e| unavailable(&e))?;
            return Ok(recorded > 0);
        }
        // A retry is news for every relay's dispatcher once it commits.
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let stmt = tx.prepare_cached(COMPLETE).await.map_err(|e| unavailable(&e))?;
        if tx.execute(&stmt, &params).await.map_err(|e| unavailable(&e))? == 0 {
            return Ok(false);
        }
        notify(&tx).await?;
        tx.commit().await.map_err(|e| unavailable(&e))?;
        Ok(true)
    })
    .await
}

pub(super) async fn renew(
    store: &PostgresStore,
    job: Uuid,
    claim: Uuid,
    lease: Duration,
    _now: SystemTime,
) -> Result<bool, StoreError> {
    within("renew", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE jobs SET lease_until = now() + $3::int8 * interval '1 microsecond'
                 WHERE id = $1 AND claim_id = $2 AND state = 'in_flight'",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let renewed = client
            .execute(&stmt, &[&job, &claim, &micros(lease)])
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(renewed > 0)
    })
    .await
}

pub(super) async fn next_wakeup(
    store: &PostgresStore,
    now: SystemTime,
) -> Result<Option<SystemTime>, StoreError> {
    next_moment(
        store,
        "next_wakeup",
        "SELECT LEAST((SELECT min(due_at) FROM jobs WHERE state = 'queued'),
                      (SELECT min(lease_until) FROM jobs WHERE state = 'in_flight')),
                now()",
        now,
    )
    .await
}

pub(super) async fn ping(store: &PostgresStore, _now: SystemTime) -> Result<(), StoreError> {
    within("ping", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        // A write, not a SELECT 1: a read-only standby or a full disk must
        // count as not ready.
        let stmt = client
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('ping', now()::text)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        client
            .execute(&stmt, &[])
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    })
    .await
}

/// The loop guard's store-side checks, in the guard's order and relative
/// to the database's `now()`; `Some` when one holds the job back.
/// The caller holds the target's advisory lock when a burst limit is set,
/// so the count cannot race another relay's ingest for the same target.
/// Wakes every relay's dispatcher when this transaction commits (and not if
/// it rolls back).
pub(super) async fn notify(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.batch_execute("NOTIFY relay_jobs")
        .await
        .map_err(|e| unavailable(&e))
}

/// The advisory lock key of a target's burst count. FNV-1a, because the
/// key must be the same in every relay build on every host.
fn target_lock(target: &str) -> i32 {
    let hash = target.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Records a pipeline's state on the job that started it, and answers what
/// started it (see `Queue::correlate`). One statement; the state changes at
/// most once for the same answer, and a final one ends polling for it.
pub(super) async fn correlate(
    store: &PostgresStore,
    pipeline_id: &str,
    state: PipelineState,
) -> Result<Option<Upstream>, StoreError> {
    within("correlate", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(concat!(
                "WITH job AS (
                     SELECT id FROM jobs WHERE pipeline_id = $1 ORDER BY created_at LIMIT 1
                 ), moved AS (
                     UPDATE jobs SET pipeline_state = $2, pipeline_updated_at = now(),
                         follow_due = CASE WHEN $3 THEN NULL ELSE follow_due END
                     WHERE id IN (SELECT id FROM job) AND pipeline_state IS DISTINCT FROM $2
                     RETURNING id, event_id, route, repo, sha, report, report_of, pipeline_state,
                         pipeline_number, pipeline_url
                 ",
                report_ctes!(id: "$4", prefix: "$5", error: "NULL", superseded: "$6", when: "true"),
                "
                 SELECT j.event_id, j.route, j.target, e.hop::int4, e.summary, j.created_at,
                        EXISTS (SELECT 1 FROM moved)
                 FROM jobs j JOIN events e ON e.id = j.event_id
                 WHERE j.id IN (SELECT id FROM job)"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let row = client
            .query_opt(
                &stmt,
                &[
                    &pipeline_id,
                    &state.as_str(),
                    &state.is_final(),
                    &Uuid::now_v7(),
                    &STATUS_TARGET_PREFIX,
                    &SUPERSEDED,
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        row.as_ref()
            .map(|row| rows::upstream(row, col(row, 6)?))
            .transpose()
    })
    .await
}
