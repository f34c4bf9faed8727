//! The queue's SQL on PostgreSQL after a webhook is committed (that is
//! `ingest`): claiming due jobs with `SKIP LOCKED`, recording attempts
//! fenced by the claim id, renewing leases, the next wake-up and the
//! readiness write; and the `NOTIFY` that tells every relay of new work.
//!
//! What this module must never do: decide with the host's clock (the
//! database's `now()` decides; the caller's times arrive as offsets), hold
//! a lock beyond its own statement or transaction (never across an HTTP
//! call: completion is fenced by the claim id), or decide a loop-guard
//! rule's order or wording (the guard does).

use std::time::{Duration, SystemTime};

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::connect::{OPERATION_TIMEOUT, within};
use super::{PostgresStore, col, micros, next_moment, offset, unavailable, unsynced};
use crate::event::Upstream;
use crate::pipeline::PipelineState;
use crate::report::{STATUS_TARGET_PREFIX, SUPERSEDED};
use crate::store::codec::Codec;
use crate::store::rows;
use crate::store::{ClaimedJob, Completion, JobState, NextState, StoreError};

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
        // are skipped, not waited for. A payload is looked up per job that
        // forwards one, by its event's key: joined instead, the planner
        // took the claim for thousands of rows (it cannot know the limit)
        // and hashed the whole events table on every claim, 6-13 ms at
        // 20,000 events and growing with the store. Its codec (schema V15)
        // is a second lookup of the same key, on the page the first just
        // read: one subquery returning both would build a new value around
        // the payload, a copy of up to a megabyte, to save a probe.
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
                        CASE WHEN c.needs_payload THEN
                            (SELECT COALESCE(e.payload, e.body) FROM events e WHERE e.id = c.event_id)
                        END,
                        c.report, c.report_of IS NOT NULL, c.created_at,
                        c.report IS NOT NULL AND c.report_of IS NULL,
                        CASE WHEN c.needs_payload THEN
                            (SELECT e.codec FROM events e WHERE e.id = c.event_id)
                        END
                 FROM claimed c",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let claim = Uuid::now_v7();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let lease = micros(lease);
        let rows = unsynced(&client, client.query(&stmt, &[&target, &limit, &claim, &lease])).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut job = rows::claimed_job(row, claim)?;
            job.payload = match (col::<Option<Vec<u8>>>(row, 7)?, col::<Option<i32>>(row, 12)?) {
                (Some(document), Some(stored)) => Some(Codec::of(i64::from(stored))?.unpack(document)?),
                _ => None,
            };
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
        // A trigger its route does not report has no report to queue and
        // none waiting to supersede: its statement leaves those two steps
        // out, and so does not open `jobs` (and its dozen indexes) twice more
        // on every send (a third of the statement's time).
        macro_rules! complete {
            ($($reports:tt)*) => {
                concat!(
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
                         WHERE id = $5 AND claim_id = $6
                         RETURNING id, event_id, route, repo, sha, report, report_of, pipeline_state,
                             pipeline_number, pipeline_url
                     ",
                    $($reports)*,
                    "
                     INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
                     SELECT moved.id,
                            (SELECT COALESCE(max(number), 0) + 1 FROM attempts WHERE job_id = moved.id),
                            now() + $7::int8 * interval '1 microsecond', $8, $9, $10, $11
                     FROM moved"
                )
            };
        }
        const COMPLETE_REPORTED: &str = complete!(report_ctes!(
            id: "$18", prefix: "$19", error: "$4::text", superseded: "$20", when: "$1 IN ('done', 'dead')"
        ));
        const COMPLETE: &str = complete!(")");
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
        let (statement, params) = if c.reported {
            (COMPLETE_REPORTED, &params[..])
        } else {
            (COMPLETE, &params[..17])
        };
        if state != JobState::Queued {
            // One statement is its own transaction: no BEGIN and COMMIT
            // round trips on the busiest path.
            let stmt = client
                .prepare_cached(statement)
                .await
                .map_err(|e| unavailable(&e))?;
            let recorded = unsynced(&client, client.execute(&stmt, params)).await?;
            return Ok(recorded > 0);
        }
        // A retry is news for every relay's dispatcher once it commits.
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let stmt = tx.prepare_cached(statement).await.map_err(|e| unavailable(&e))?;
        let (unsync, recorded) = tokio::join!(
            tx.batch_execute("SET LOCAL synchronous_commit = off"),
            tx.execute(&stmt, params)
        );
        unsync.map_err(|e| unavailable(&e))?;
        if recorded.map_err(|e| unavailable(&e))? == 0 {
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
                 WHERE id = $1 AND claim_id = $2",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let lease = micros(lease);
        let renewed = unsynced(&client, client.execute(&stmt, &[&job, &claim, &lease])).await?;
        Ok(renewed > 0)
    })
    .await
}

/// Puts a leased job back in the queue if `claim` still holds (see
/// `Queue::release`), and wakes every relay's dispatcher when that commits.
pub(super) async fn release(
    store: &PostgresStore,
    job: Uuid,
    claim: Uuid,
    _now: SystemTime,
) -> Result<bool, StoreError> {
    within("release", OPERATION_TIMEOUT, async {
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let stmt = tx
            .prepare_cached(
                "UPDATE jobs SET state = 'queued', claim_id = NULL, lease_until = NULL, updated_at = now()
                 WHERE id = $1 AND claim_id = $2",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if tx
            .execute(&stmt, &[&job, &claim])
            .await
            .map_err(|e| unavailable(&e))?
            == 0
        {
            return Ok(false);
        }
        notify(&tx).await?;
        tx.commit().await.map_err(|e| unavailable(&e))?;
        Ok(true)
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
        // `claim_id` is said only so that `jobs_due` and `jobs_lease` serve
        // (schema V12): it holds of every such job.
        "SELECT LEAST((SELECT min(due_at) FROM jobs WHERE state = 'queued' AND claim_id IS NULL),
                      (SELECT min(lease_until) FROM jobs WHERE state = 'in_flight' AND claim_id IS NOT NULL)),
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

/// Records a pipeline's state on the job that started it, and answers what
/// started it (see `Queue::correlate`). One statement; the state changes at
/// most once for the same answer, and a final one ends polling for it.
pub(super) async fn correlate(
    store: &PostgresStore,
    pipeline_id: &str,
    pipeline_number: u64,
    state: PipelineState,
) -> Result<Option<Upstream>, StoreError> {
    within("correlate", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(concat!(
                // Each half repeats its partial index's condition (schema
                // V14), which is how the planner knows it may use the index.
                "WITH job AS (
                     SELECT id FROM (
                         SELECT id, created_at FROM jobs
                         WHERE pipeline_number = $7 AND pipeline_id = $1
                             AND pipeline_id ~ '[^0-9]' AND pipeline_number IS NOT NULL
                         UNION ALL
                         SELECT id, created_at FROM jobs
                         WHERE pipeline_id = $1
                             AND NOT (pipeline_id ~ '[^0-9]' AND pipeline_number IS NOT NULL)
                     ) found ORDER BY created_at LIMIT 1
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
        let (state_name, last, report_id) = (state.as_str(), state.is_final(), Uuid::now_v7());
        let number = i64::try_from(pipeline_number).unwrap_or(i64::MAX);
        let row = unsynced(
            &client,
            client.query_opt(
                &stmt,
                &[
                    &pipeline_id,
                    &state_name,
                    &last,
                    &report_id,
                    &STATUS_TARGET_PREFIX,
                    &SUPERSEDED,
                    &number,
                ],
            ),
        )
        .await?;
        row.as_ref()
            .map(|row| rows::upstream(row, col(row, 6)?))
            .transpose()
    })
    .await
}
