//! The queue's SQL on SQLite: committing a webhook with the loop guard's
//! store-side checks, claiming due jobs, recording attempts, renewing
//! leases, the next wake-up, the readiness write, and putting back what a
//! previous run left in flight.
//!
//! What this module must never do: decide by a clock of its own (every time
//! it stores or compares comes from the caller), begin or commit a
//! transaction (the writer batches these functions), or decide a loop-guard
//! rule's order or wording (the guard does; this only counts and takes
//! keys).
//!
//! The claims and the completion say `OR FAIL`. With SQLite's default
//! `ABORT`, a statement that may write several rows (a claim; before schema
//! V16, one that fired the job counts' trigger) keeps a journal of its own,
//! a copy of every page it touches that the transaction had already
//! changed, to undo itself alone on a constraint error: 5-7% of relay's CPU
//! when draining a backlog. The statements here count the jobs they insert
//! (V11) and the states they change (V16) themselves; only retention's
//! deletes are still counted by a trigger.
//! Here nothing needs undoing a statement at a time. These functions run
//! only inside the writer's transaction, every error leaves them, and the
//! writer rolls back the failed operation whole: the batch, or the
//! operation's savepoint when it runs them one by one.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::tally::Tx;
use super::{collect, from_millis, parse_uuid, to_millis, unavailable};
use super::{dedupe, reports};
use crate::event::Upstream;
use crate::guard::{Check, Dropped};
use crate::pipeline::PipelineState;
use crate::store::codec::{Codec, Packed};
use crate::store::rows::{self, CLAIM_COLUMNS};
use crate::store::{
    ClaimedJob, Completion, HeldBack, Ingested, JobRow, JobState, NewEvent, NewJob, NextState, StoreError,
};

/// Puts the jobs a previous run left in flight back in the queue; how many.
/// Only right under the database's lock: it proves no other process holds
/// them. In a transaction of the caller's, which the job counts move in too.
pub(super) fn recover(tx: &rusqlite::Transaction<'_>) -> Result<usize, StoreError> {
    let requeued = tx
        .execute(
            "UPDATE jobs SET state = 'queued', claim_id = NULL, lease_until = NULL WHERE state = 'in_flight'",
            [],
        )
        .map_err(|e| unavailable(&e))?;
    Tx::immediate(tx).count_moved(JobState::InFlight, JobState::Queued, requeued)?;
    Ok(requeued)
}

pub(super) fn ingest(conn: &Tx<'_>, event: &NewEvent, packed: &Packed) -> Result<Ingested, StoreError> {
    let received = to_millis(event.received_at);
    let inserted = conn
        .statement(
            "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary, codec)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (source, delivery) DO NOTHING",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                event.id.to_string(),
                event.source,
                event.delivery,
                event.hook,
                received,
                event.content_type,
                &packed.body[..],
                packed.payload.as_deref(),
                event.hop,
                event.summary,
                packed.codec as i64,
            ])
        })
        .map_err(|e| unavailable(&e))?;
    if inserted == 0 {
        let original: String = conn
            .query_row(
                "SELECT id FROM events WHERE source = ?1 AND delivery = ?2",
                params![event.source, event.delivery],
                |row| row.get(0),
            )
            .map_err(|e| unavailable(&e))?;
        return Ok(Ingested::Duplicate(parse_uuid(&original)?));
    }
    for drop in &event.drops {
        insert_drop(conn, &event.id, drop)?;
    }
    let mut insert_job = conn
        .statement(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                               claim_id, lease_until, created_at, updated_at, repo, sha, shadow, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?8, ?8, ?12, ?13, ?14, ?15)",
        )
        .map_err(|e| unavailable(&e))?;
    let mut held_back = Vec::new();
    let mut leased = Vec::new();
    // Jobs inserted, by the state they start in: counted once a state.
    let mut inserted: Vec<(JobState, usize)> = Vec::new();
    for job in &event.jobs {
        if let Some(drop) = hold_back(conn, job, event.received_at)? {
            insert_drop(conn, &event.id, &drop)?;
            held_back.push(HeldBack {
                job_id: job.id,
                dropped: drop,
            });
            continue;
        }
        let JobRow {
            state,
            request,
            needs_payload,
            error,
        } = job.row()?;
        insert_job
            .execute(params![
                job.id.to_string(),
                event.id.to_string(),
                job.route,
                job.target,
                state.as_str(),
                request,
                needs_payload,
                received,
                error,
                job.lease.map(|l| l.claim.to_string()),
                job.lease.map(|l| to_millis(l.until)),
                job.repo,
                job.sha,
                job.shadow,
                rows::report_json(job.report.as_ref()),
            ])
            .map_err(|e| unavailable(&e))?;
        leased.extend(job.leased(event));
        match inserted.iter_mut().find(|(counted, _)| *counted == state) {
            Some((_, jobs)) => *jobs += 1,
            None => inserted.push((state, 1)),
        }
    }
    for (state, jobs) in inserted {
        conn.count_inserted(state, jobs)?;
    }
    Ok(Ingested::Accepted { held_back, leased })
}

/// The loop guard's store-side checks, in the guard's order; `Some` when
/// one holds the job back.
fn hold_back(conn: &Tx<'_>, job: &NewJob, now: SystemTime) -> Result<Option<Dropped>, StoreError> {
    let trigger = job.trigger();
    for check in job.limits.checks() {
        let held = match check {
            Check::Burst { limit, per } => {
                let recent: i64 = conn
                    .statement(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE target = ?1 AND created_at > ?2 LIMIT ?3)",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_row(
                            params![
                                job.target,
                                to_millis(now.checked_sub(per).unwrap_or(now)),
                                i64::from(limit)
                            ],
                            |r| r.get(0),
                        )
                    })
                    .map_err(|e| unavailable(&e))?;
                trigger.burst(recent, limit, per)
            }
            Check::Dedupe { key, window } => {
                let taken = dedupe::take(conn, &job.target, key, now, window)?;
                trigger.dedupe(taken, window)
            }
        };
        if held.is_some() {
            return Ok(held);
        }
    }
    Ok(None)
}

fn insert_drop(conn: &Tx<'_>, event: &Uuid, drop: &Dropped) -> Result<(), StoreError> {
    conn.statement("INSERT INTO drops (event_id, route, target, rule, reason) VALUES (?1, ?2, ?3, ?4, ?5)")
        .and_then(|mut stmt| {
            stmt.execute(params![
                event.to_string(),
                drop.route,
                drop.target,
                drop.rule,
                drop.reason
            ])
        })
        .map(|_| ())
        .map_err(|e| unavailable(&e))
}

/// Claims of expired leases and of due jobs, made once: the claim runs
/// for every batch the dispatcher takes. Lapsed leases are read through
/// `jobs_lease` by name: left to itself, SQLite takes `jobs_created` for
/// `target = ?` and reads the target's whole history (schema V12).
static CLAIM_EXPIRED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE OR FAIL jobs SET state = 'in_flight', claim_id = ?1, lease_until = ?2, updated_at = ?3
         WHERE rowid IN (
             SELECT rowid FROM jobs INDEXED BY jobs_lease
             WHERE state = 'in_flight' AND lease_until <= ?3 AND target = ?4
             ORDER BY lease_until LIMIT ?5)
         RETURNING {CLAIM_COLUMNS}"
    )
});
static CLAIM_DUE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE OR FAIL jobs SET state = 'in_flight', claim_id = ?1, lease_until = ?2, updated_at = ?3
         WHERE rowid IN (
             SELECT rowid FROM jobs
             WHERE target = ?4 AND state = 'queued' AND due_at <= ?3
             ORDER BY due_at LIMIT ?5)
         RETURNING {CLAIM_COLUMNS}"
    )
});

pub(super) fn claim(
    conn: &Tx<'_>,
    target: &str,
    limit: usize,
    lease: Duration,
    now: SystemTime,
) -> Result<Vec<ClaimedJob>, StoreError> {
    let claim = Uuid::now_v7();
    // Expired leases first (a worker died holding them), then due jobs, each
    // walking its own partial index in order and stopping at the limit.
    let mut claimed = Vec::new();
    let (lapsed, due) = claimable(conn, target, now)?;
    for (sql, from, any) in [
        (&*CLAIM_EXPIRED, JobState::InFlight, lapsed),
        (&*CLAIM_DUE, JobState::Queued, due),
    ] {
        let wanted = limit.saturating_sub(claimed.len());
        if wanted == 0 {
            break;
        }
        if !any {
            continue;
        }
        let before = claimed.len();
        let mut stmt = conn.statement(sql).map_err(|e| unavailable(&e))?;
        let mut returned = stmt
            .query(params![
                claim.to_string(),
                to_millis(now + lease),
                to_millis(now),
                target,
                i64::try_from(wanted).unwrap_or(i64::MAX)
            ])
            .map_err(|e| unavailable(&e))?;
        while let Some(row) = returned.next().map_err(|e| unavailable(&e))? {
            let needs_payload: bool = row.get(7).map_err(|e| unavailable(&e))?;
            claimed.push((rows::claimed_job(row, claim)?, needs_payload));
        }
        drop(returned);
        conn.count_moved(from, JobState::InFlight, claimed.len() - before)?;
    }
    // Prepared only when wanted: most jobs send a body of their own.
    let mut payload_of = if claimed.iter().any(|(_, needs_payload)| *needs_payload) {
        Some(
            conn.statement("SELECT COALESCE(payload, body), codec FROM events WHERE id = ?1")
                .map_err(|e| unavailable(&e))?,
        )
    } else {
        None
    };
    let mut jobs = Vec::with_capacity(claimed.len());
    for (mut job, needs_payload) in claimed {
        if needs_payload && let Some(payload_of) = payload_of.as_mut() {
            job.payload = payload_of
                .query_row(params![job.event_id.to_string()], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()
                .map_err(|e| unavailable(&e))?
                .map(|(stored, codec)| Codec::of(codec)?.unpack(stored))
                .transpose()?;
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// Whether `target` has a lease run out, and a queued job due: asked
/// before each claim, because an `UPDATE … RETURNING` that changes
/// nothing still builds and drops its temporary tables, where this is a
/// lookup in an index for each. The lapsed lease is almost never there,
/// and the due job is often not, when the dispatcher looks at every
/// target with a free slot on each turn. Draining a backlog from one
/// target, the claims' statements went from 39,164 to 35,182 instructions
/// a trigger (callgrind), 2% of relay's.
fn claimable(conn: &Tx<'_>, target: &str, now: SystemTime) -> Result<(bool, bool), StoreError> {
    conn.statement(
        "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_lease
                        WHERE state = 'in_flight' AND lease_until <= ?1 AND target = ?2),
                EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queued
                        WHERE target = ?2 AND state = 'queued' AND due_at <= ?1)",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![to_millis(now), target], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
    })
    .map_err(|e| unavailable(&e))
}

pub(super) fn complete(conn: &Tx<'_>, c: &Completion) -> Result<bool, StoreError> {
    let now = to_millis(c.at);
    let (state, due_at, maybe, error) = match &c.next {
        NextState::Done => (JobState::Done, now, 0, None),
        NextState::Retry {
            due_at,
            maybe_delivered,
        } => (
            JobState::Queued,
            to_millis(*due_at),
            i64::from(*maybe_delivered),
            Some(c.attempt.excerpt.as_str()),
        ),
        NextState::Dead { reason } => (JobState::Dead, now, 0, Some(reason.as_str())),
    };
    let updated = conn
        .statement(
            "UPDATE OR FAIL jobs SET state = ?1, attempts = attempts + 1, maybe_attempts = maybe_attempts + ?2,
                 due_at = ?3, claim_id = NULL, lease_until = NULL, last_error = ?4, updated_at = ?5,
                 pipeline_id = COALESCE(?8, pipeline_id),
                 pipeline_number = CASE WHEN ?8 IS NULL THEN pipeline_number ELSE ?9 END,
                 pipeline_url = CASE WHEN ?8 IS NULL THEN pipeline_url ELSE ?10 END,
                 pipeline_state = CASE WHEN ?8 IS NULL THEN pipeline_state ELSE ?11 END,
                 pipeline_updated_at = CASE WHEN ?8 IS NULL THEN pipeline_updated_at ELSE ?5 END,
                 follow_due = CASE WHEN ?12 IS NULL THEN follow_due ELSE ?5 + ?12 END,
                 follow_until = CASE WHEN ?12 IS NULL THEN follow_until ELSE ?5 + ?13 END,
                 follow_polls = CASE WHEN ?12 IS NULL THEN follow_polls ELSE 0 END,
                 follow_note = CASE WHEN ?12 IS NULL THEN follow_note ELSE NULL END
             WHERE id = ?6 AND claim_id = ?7 AND state = 'in_flight'",
        )
        .and_then(|mut stmt| {
            let pipeline = c.pipeline.as_ref();
            let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            stmt.execute(params![
                state.as_str(),
                maybe,
                due_at,
                error,
                now,
                c.job_id.to_string(),
                c.claim.to_string(),
                pipeline.map(|p| p.id.as_str()),
                pipeline
                    .and_then(|p| p.number)
                    .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                pipeline.and_then(|p| p.url.as_deref()),
                pipeline.map(|p| p.state.as_str()),
                c.follow.map(|f| ms(f.first_in)),
                c.follow.map(|f| ms(f.deadline)),
            ])
        })
        .map_err(|e| unavailable(&e))?;
    if updated == 0 {
        return Ok(false);
    }
    conn.count_moved(JobState::InFlight, state, updated)?;
    match &c.next {
        _ if !c.reported => {}
        NextState::Done => reports::queue_report(conn, &c.job_id.to_string(), None, now)?,
        NextState::Dead { reason } => reports::queue_report(conn, &c.job_id.to_string(), Some(reason), now)?,
        NextState::Retry { .. } => {}
    }
    // Numbered across manual retries, which reset the job's own counter.
    conn.statement(
        "INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
         VALUES (?1, (SELECT COALESCE(MAX(number), 0) + 1 FROM attempts WHERE job_id = ?1), ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            c.job_id.to_string(),
            to_millis(c.attempt.started_at),
            i64::try_from(c.attempt.duration.as_millis()).unwrap_or(i64::MAX),
            c.attempt.status,
            c.attempt.outcome,
            c.attempt.excerpt,
        ])
    })
    .map_err(|e| unavailable(&e))?;
    Ok(true)
}

pub(super) fn next_wakeup(conn: &Connection) -> Result<Option<SystemTime>, StoreError> {
    conn.prepare_cached(
        "SELECT MIN(t) FROM (
             SELECT MIN(due_at) AS t FROM jobs WHERE state = 'queued'
             UNION ALL
             SELECT MIN(lease_until) FROM jobs WHERE state = 'in_flight')",
    )
    .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, Option<i64>>(0)))
    .map(|t| t.map(from_millis))
    .map_err(|e| unavailable(&e))
}

/// Extends a lease still held by `claim` to `until`; false when it is not.
pub(super) fn renew(
    conn: &Connection,
    job: Uuid,
    claim: Uuid,
    until: SystemTime,
) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND claim_id = ?3 AND state = 'in_flight'",
    )
    .and_then(|mut stmt| stmt.execute(params![to_millis(until), job.to_string(), claim.to_string()]))
    .map(|renewed| renewed > 0)
    .map_err(|e| unavailable(&e))
}

/// Puts a leased job back in the queue if `claim` still holds (see
/// `Queue::release`).
pub(super) fn release(conn: &Tx<'_>, job: Uuid, claim: Uuid, now: SystemTime) -> Result<bool, StoreError> {
    let now = to_millis(now);
    let released = conn
        .statement(
            "UPDATE jobs SET state = 'queued', claim_id = NULL, lease_until = NULL, updated_at = ?1
             WHERE id = ?2 AND claim_id = ?3 AND state = 'in_flight'",
        )
        .and_then(|mut stmt| stmt.execute(params![now, job.to_string(), claim.to_string()]))
        .map_err(|e| unavailable(&e))?;
    conn.count_moved(JobState::InFlight, JobState::Queued, released)?;
    Ok(released > 0)
}

/// The readiness probe's write: the store answers and can write.
pub(super) fn ping(conn: &Connection, now: SystemTime) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('ping', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![to_millis(now).to_string()],
    )
    .map(|_| ())
    .map_err(|e| unavailable(&e))
}

/// Records a pipeline's state on the job that started it, and answers what
/// started it (see `Queue::correlate`).
pub(super) fn correlate(
    conn: &Tx<'_>,
    pipeline_id: &str,
    pipeline_number: u64,
    state: PipelineState,
    now: SystemTime,
) -> Result<Option<Upstream>, StoreError> {
    // Each half repeats its partial index's condition (schema V15), which
    // is how SQLite knows the index holds every row the half asks for.
    let job: Option<String> = conn
        .statement(
            "SELECT id FROM (
                 SELECT id, created_at FROM jobs
                 WHERE pipeline_number = ?2 AND pipeline_id = ?1
                     AND pipeline_id GLOB '*[^0-9]*' AND pipeline_number IS NOT NULL
                 UNION ALL
                 SELECT id, created_at FROM jobs
                 WHERE pipeline_id = ?1
                     AND NOT (pipeline_id GLOB '*[^0-9]*' AND pipeline_number IS NOT NULL)
             ) ORDER BY created_at LIMIT 1",
        )
        .and_then(|mut stmt| {
            let number = i64::try_from(pipeline_number).unwrap_or(i64::MAX);
            stmt.query_row(params![pipeline_id, number], |row| row.get(0))
                .optional()
        })
        .map_err(|e| unavailable(&e))?;
    let Some(job) = job else {
        return Ok(None);
    };
    let changed = conn
        .statement(
            "UPDATE jobs SET pipeline_state = ?2, pipeline_updated_at = ?3,
                 follow_due = CASE WHEN ?4 THEN NULL ELSE follow_due END
             WHERE id = ?1 AND pipeline_state IS NOT ?2",
        )
        .and_then(|mut stmt| {
            // A CI's own word that the pipeline ended ends polling for it.
            stmt.execute(params![job, state.as_str(), to_millis(now), state.is_final()])
        })
        .map_err(|e| unavailable(&e))?;
    if changed > 0 {
        reports::queue_report(conn, &job, None, to_millis(now))?;
    }
    let mut stmt = conn
        .statement(
            "SELECT j.event_id, j.route, j.target, e.hop, e.summary, j.created_at
             FROM jobs j JOIN events e ON e.id = j.event_id
             WHERE j.id = ?1",
        )
        .map_err(|e| unavailable(&e))?;
    let found = collect(&mut stmt, params![job], |row| rows::upstream(row, changed > 0))?;
    Ok(found.into_iter().next())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;

    use super::super::queue_cost::{Counter, event, job, queue_elsewhere};
    use super::super::tally::Tx;
    use crate::clock::wall_time;
    use crate::guard::JobLimits;
    use crate::store::codec;

    /// A webhook's statements, the loop guard's among them (asked while the
    /// job's insert is in use), are the batch's kept ones: the second
    /// webhook of a batch prepares none of its own.
    #[test]
    fn a_batchs_webhooks_run_the_statements_it_keeps() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::prepare(&mut conn, wall_time()).unwrap();
        let tx = Tx::immediate(&conn);
        let webhook = || {
            let limits = JobLimits {
                dedupe: Some((uuid::Uuid::new_v4().to_string(), Duration::from_secs(60))),
                burst: Some((1_000, Duration::from_secs(60))),
            };
            event(vec![job("live", limits, None)])
        };
        let first = webhook();
        super::ingest(&tx, &first, &codec::pack(&first)).unwrap();
        // The event, the job, the burst count, and the dedupe index and log.
        assert_eq!(tx.kept(), 5);
        let second = webhook();
        super::ingest(&tx, &second, &codec::pack(&second)).unwrap();
        assert_eq!(tx.kept(), 5, "the second webhook prepared statements of its own");
    }

    /// The dispatcher claims for every target with a free send slot on each
    /// turn, and most have nothing due then: such a claim only looks, two
    /// lookups in an index (34 of SQLite's instructions), where its two
    /// `UPDATE … RETURNING`s, changing nothing, ran 76 and built and dropped
    /// their temporary tables.
    #[test]
    fn a_claim_with_nothing_to_claim_only_looks() {
        let counter = Counter::new();
        counter.count(|conn| queue_elsewhere(conn, 1_000));
        let lease = Duration::from_secs(60);
        let claim = |conn: &Connection| {
            let claimed = super::claim(&Tx::immediate(conn), "live", 8, lease, wall_time()).unwrap();
            assert!(claimed.is_empty(), "{claimed:?}");
        };
        // The first prepares and caches the statements.
        counter.count(claim);
        let looked = counter.count(claim);
        assert!(
            looked <= 50,
            "a claim with nothing due and no lease run out took {looked} SQLite instructions"
        );
        // Once a job is due, the claim takes it.
        counter.count(|conn| {
            let due = event(vec![job("live", JobLimits::default(), None)]);
            super::ingest(&Tx::immediate(conn), &due, &codec::pack(&due)).unwrap();
        });
        let claimed = counter.count(|conn| {
            let jobs = super::claim(&Tx::immediate(conn), "live", 8, lease, wall_time()).unwrap();
            assert_eq!(jobs.len(), 1);
        });
        assert!(claimed > looked, "{claimed} against {looked}");
    }
}
