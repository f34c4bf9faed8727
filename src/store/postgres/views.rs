//! What a person reads and asks for, in PostgreSQL's SQL: jobs, one job
//! with its attempts, events with their drops, the queue's statistics (the
//! kept job counts, their deltas folded in as they are read) and an event's
//! body; the manual retries; and retention's purge. The rows' meaning is
//! `store::rows`'; this only reads the columns.
//!
//! What this module must never do: decide with the host's clock (times are
//! offsets from the database's `now()`), or queue a job twice when relays
//! retry it at once (the update's own condition decides).

use std::time::SystemTime;

use bytes::Bytes;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::connect::{ADMIN_TIMEOUT, OPERATION_TIMEOUT, within};
use super::queue::notify;
use super::{PostgresStore, col, offset, on_caller_clock, unavailable, unsynced};
use crate::store::codec::Codec;
use crate::store::rows::{self, JOB_COLUMN_COUNT, JOB_COLUMNS};
use crate::store::{
    Activity, EventFilter, EventView, ForgottenKeys, JobDetail, JobFilter, JobState, JobView, QueueStats,
    Requeued, ShadowFilter, SourceActivity, StoreError, StoredEvent, TargetActivity,
};

pub(super) async fn jobs(store: &PostgresStore, filter: JobFilter) -> Result<Vec<JobView>, StoreError> {
    within("jobs", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS}
                 FROM jobs
                 WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR target = $2)
                   AND ($3::uuid IS NULL OR event_id = $3)
                 ORDER BY updated_at DESC, id DESC
                 LIMIT $4"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        client
            .query(
                &stmt,
                &[
                    &filter.state.map(JobState::as_str),
                    &filter.target,
                    &filter.event,
                    &i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .map(rows::job_view)
            .collect()
    })
    .await
}

pub(super) async fn held_deliveries(
    store: &PostgresStore,
    source: &str,
    deliveries: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    within("held_deliveries", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached("SELECT delivery FROM events WHERE source = $1 AND delivery = ANY($2)")
            .await
            .map_err(|e| unavailable(&e))?;
        client
            .query(&stmt, &[&source, &deliveries])
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .map(|row| col::<String>(row, 0))
            .collect()
    })
    .await
}

pub(super) async fn shadow_jobs(
    store: &PostgresStore,
    filter: ShadowFilter,
) -> Result<Vec<JobView>, StoreError> {
    within("shadow_jobs", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs j
                 WHERE report_of IS NULL AND created_at >= $1 AND ($2::text IS NULL OR route = $2)
                   AND ($3::text IS NULL OR (repo = $3 AND sha = $4))
                   AND EXISTS (SELECT 1 FROM jobs s WHERE s.shadow AND s.route = j.route
                                   AND s.repo = j.repo AND s.sha = j.sha AND s.created_at >= $1)
                 ORDER BY created_at DESC, id DESC
                 LIMIT $5"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let (repo, sha) = filter.commit.clone().unzip();
        client
            .query(
                &stmt,
                &[
                    &filter.since,
                    &filter.route,
                    &repo,
                    &sha,
                    &i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .map(rows::job_view)
            .collect()
    })
    .await
}

pub(super) async fn job(store: &PostgresStore, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
    within("job", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {JOB_COLUMNS}, request FROM jobs WHERE id = $1"))
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(row) = client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Ok(None);
        };
        let view = rows::job_view(&row)?;
        let request: Option<String> = col(&row, JOB_COLUMN_COUNT)?;
        let stmt = client
            .prepare_cached(
                "SELECT number, started_at, duration_ms, status, outcome, excerpt
                 FROM attempts WHERE job_id = $1 ORDER BY number",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let history = client
            .query(&stmt, &[&id])
            .await
            .map_err(|e| unavailable(&e))?
            .iter()
            .map(rows::attempt_view)
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(rows::job_detail(view, request, history)))
    })
    .await
}

/// The event columns [`rows::event_view`] reads, with its job counts, for
/// the events `e` a query names.
const EVENT_COLUMNS: &str = "e.id, e.source, e.delivery, e.hook, e.received_at, e.summary,
     c.jobs, c.pending, c.done, c.dead";

/// Each event `e`'s job counts, as `c`.
const EVENT_COUNTS: &str = "CROSS JOIN LATERAL (
     SELECT count(*) AS jobs,
            count(*) FILTER (WHERE state IN ('queued', 'in_flight')) AS pending,
            count(*) FILTER (WHERE state = 'done') AS done,
            count(*) FILTER (WHERE state = 'dead') AS dead
     FROM jobs WHERE event_id = e.id) c";

/// One page of events, newest first: `events_received` walked from the
/// newest (or the cursor), the filters checked on the way, `limit` rows.
pub(super) async fn events(
    store: &PostgresStore,
    filter: EventFilter,
    now: SystemTime,
) -> Result<Vec<EventView>, StoreError> {
    within("events", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS}
                 FROM (SELECT ev.id, ev.source, ev.delivery, ev.hook, ev.received_at, ev.summary FROM events ev
                       WHERE ($1::text IS NULL OR ev.source = $1)
                         AND ($2::text IS NULL
                              OR ev.summary::jsonb -> 'events' @> jsonb_build_array(jsonb_build_object('repo', $2::text)))
                         AND ($3::text IS NULL
                              OR ev.summary::jsonb -> 'events' @> jsonb_build_array(jsonb_build_object('kind', $3::text)))
                         AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM jobs s WHERE s.event_id = ev.id AND s.state = $4))
                         AND ($5::int8 IS NULL OR ev.received_at >= now() + $5::int8 * interval '1 microsecond')
                         AND ($6::int8 IS NULL OR ev.received_at < now() + $6::int8 * interval '1 microsecond')
                         AND ($7::uuid IS NULL
                              OR (ev.received_at, ev.id) < (SELECT c.received_at, c.id FROM events c WHERE c.id = $7))
                       ORDER BY ev.received_at DESC, ev.id DESC
                       LIMIT $8) e
                 {EVENT_COUNTS}
                 ORDER BY e.received_at DESC, e.id DESC"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let rows = client
            .query(
                &stmt,
                &[
                    &filter.source,
                    &filter.repo,
                    &filter.kind,
                    &filter.state.map(JobState::as_str),
                    &filter.since.map(|t| offset(t, now)),
                    &filter.until.map(|t| offset(t, now)),
                    &filter.before,
                    &i64::try_from(filter.limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = col(row, 0)?;
            ids.push(id);
            events.push(rows::event_view(row)?);
        }
        if ids.is_empty() {
            return Ok(events);
        }
        let stmt = client
            .prepare_cached(
                "SELECT event_id, route, target, rule, reason FROM drops WHERE event_id = ANY($1) ORDER BY id",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        for row in client.query(&stmt, &[&ids]).await.map_err(|e| unavailable(&e))? {
            let event_id: Uuid = col(&row, 0)?;
            if let Some(index) = ids.iter().position(|id| *id == event_id) {
                events[index].dropped.push(rows::dropped(&row, 1)?);
            }
        }
        Ok(events)
    })
    .await
}

pub(super) async fn event(store: &PostgresStore, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
    within("event", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS}, e.content_type, e.hop, e.body, e.payload, e.codec
                 FROM events e {EVENT_COUNTS} WHERE e.id = $1"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(row) = client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Ok(None);
        };
        let mut view = rows::event_view(&row)?;
        let stmt = client
            .prepare_cached("SELECT route, target, rule, reason FROM drops WHERE event_id = $1 ORDER BY id")
            .await
            .map_err(|e| unavailable(&e))?;
        for drop in client.query(&stmt, &[&id]).await.map_err(|e| unavailable(&e))? {
            view.dropped.push(rows::dropped(&drop, 0)?);
        }
        let codec = Codec::of(i64::from(col::<i32>(&row, 14)?))?;
        Ok(Some(StoredEvent {
            view,
            content_type: col(&row, 10)?,
            hop: u32::try_from(col::<i64>(&row, 11)?).unwrap_or(0),
            body: codec.unpack(col::<Vec<u8>>(&row, 12)?)?,
            payload: col::<Option<Vec<u8>>>(&row, 13)?
                .map(|p| codec.unpack(p))
                .transpose()?,
        }))
    })
    .await
}

/// As SQLite's: one source's or one target's range of an index per query.
pub(super) async fn activity(
    store: &PostgresStore,
    sources: Vec<String>,
    targets: Vec<String>,
    since: SystemTime,
    now: SystemTime,
) -> Result<Activity, StoreError> {
    within("activity", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let since = offset(since, now);
        let source_stmt = client
            .prepare_cached(
                "SELECT (SELECT received_at FROM events WHERE source = $1 ORDER BY received_at DESC LIMIT 1),
                        (SELECT count(*) FROM events
                         WHERE source = $1 AND received_at >= now() + $2::int8 * interval '1 microsecond'),
                        now()",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let mut activity = Activity::default();
        for source in sources {
            let row = client
                .query_one(&source_stmt, &[&source, &since])
                .await
                .map_err(|e| unavailable(&e))?;
            let last: Option<SystemTime> = col(&row, 0)?;
            let db_now: SystemTime = col(&row, 2)?;
            activity.sources.push(SourceActivity {
                source,
                last_received: last.map(|t| on_caller_clock(t, db_now, now)),
                recent: u64::try_from(col::<i64>(&row, 1)?).unwrap_or(0),
            });
        }
        let target_stmt = client
            .prepare_cached(
                "WITH recent AS (
                     SELECT id, state, last_error, updated_at, created_at FROM jobs
                     WHERE target = $1 AND created_at >= now() + $2::int8 * interval '1 microsecond')
                 SELECT (SELECT count(*) FROM jobs WHERE target = $1 AND state = 'queued'),
                        (SELECT count(*) FROM jobs WHERE target = $1 AND state = 'in_flight'),
                        (SELECT count(*) FROM recent WHERE state = 'done'),
                        (SELECT count(*) FROM recent WHERE state = 'dead'),
                        e.last_error, e.updated_at,
                        (SELECT avg(a.duration_ms)::float8 FROM recent r JOIN attempts a ON a.job_id = r.id),
                        now()
                 FROM (SELECT 1) one
                 LEFT JOIN LATERAL (SELECT last_error, updated_at FROM recent WHERE last_error IS NOT NULL
                                    ORDER BY created_at DESC LIMIT 1) e ON true",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        for target in targets {
            let row = client
                .query_one(&target_stmt, &[&target, &since])
                .await
                .map_err(|e| unavailable(&e))?;
            let n = |i: usize| -> Result<u64, StoreError> {
                Ok(u64::try_from(col::<i64>(&row, i)?).unwrap_or(0))
            };
            let error_at: Option<SystemTime> = col(&row, 5)?;
            let mean: Option<f64> = col(&row, 6)?;
            let db_now: SystemTime = col(&row, 7)?;
            activity.targets.push(TargetActivity {
                queued: n(0)?,
                in_flight: n(1)?,
                done: n(2)?,
                dead: n(3)?,
                last_error: col(&row, 4)?,
                last_error_at: error_at.map(|t| on_caller_clock(t, db_now, now)),
                mean_send_ms: mean.map(|m| m.round() as u64),
                target,
            });
        }
        Ok(activity)
    })
    .await
}

pub(super) async fn requeue(
    store: &PostgresStore,
    id: Uuid,
    _now: SystemTime,
) -> Result<Requeued, StoreError> {
    within("requeue", ADMIN_TIMEOUT, async {
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        // Try first, explain after: the update's own condition decides, so
        // a requeue racing another relay's cannot queue a job twice.
        let requeued = requeue_where(&tx, "id = $1", &[&id]).await?;
        if requeued > 0 {
            notify(&tx).await?;
            tx.commit().await.map_err(|e| unavailable(&e))?;
            return Ok(Requeued::Requeued);
        }
        let found = tx
            .query_opt(
                "SELECT state, (request IS NOT NULL OR report_of IS NOT NULL) FROM jobs WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(row) = found else {
            return Ok(Requeued::NotFound);
        };
        // Not requeued: not dead, or dead without a request.
        Ok(rows::not_requeued(&col::<String>(&row, 0)?))
    })
    .await
}

pub(super) async fn requeue_dead(
    store: &PostgresStore,
    target: &str,
    since: SystemTime,
    until: SystemTime,
    now: SystemTime,
) -> Result<u64, StoreError> {
    within("requeue_dead", ADMIN_TIMEOUT, async {
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
        let requeued = requeue_where(
            &tx,
            "target = $1 AND updated_at >= now() + $2::int8 * interval '1 microsecond'
                 AND updated_at <= now() + $3::int8 * interval '1 microsecond'",
            &[&target, &offset(since, now), &offset(until, now)],
        )
        .await?;
        if requeued > 0 {
            notify(&tx).await?;
            tx.commit().await.map_err(|e| unavailable(&e))?;
        }
        Ok(requeued)
    })
    .await
}

/// Forgets up to `limit` dedupe keys whose window closed, the oldest first
/// (through `dedupe_expiry`): the heap holds them in the order they were
/// taken, so a batch's rows are neighbours there.
pub(super) async fn forget_dedupe_keys(
    store: &PostgresStore,
    limit: usize,
) -> Result<ForgottenKeys, StoreError> {
    within("forget dedupe keys", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // The outer condition is checked again on a row an ingest has just
        // taken back (its key expired, its window begun anew): that key is
        // kept.
        let stmt = client
            .prepare_cached(
                "DELETE FROM dedupe WHERE expires_at <= now() AND (target, key) IN (
                     SELECT target, key FROM dedupe WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        // Like SQLite's, this commits without waiting for the flush: a key
        // a crash of the server takes back is forgotten again.
        let forgotten = unsynced(&client, client.execute(&stmt, &[&limit])).await?;
        Ok(ForgottenKeys {
            forgotten,
            more: forgotten >= limit as u64,
        })
    })
    .await
}

/// Deletes up to `limit` finished events received before `before` (on the
/// caller's clock, `now`), with their jobs, attempts and drops.
pub(super) async fn purge(
    store: &PostgresStore,
    before: SystemTime,
    now: SystemTime,
    limit: usize,
) -> Result<u64, StoreError> {
    within("purge", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM events WHERE id IN (
                     SELECT id FROM events e
                     WHERE e.received_at < now() + $1::int8 * interval '1 microsecond'
                       AND NOT EXISTS (SELECT 1 FROM jobs j
                                       WHERE j.event_id = e.id AND j.state IN ('queued', 'in_flight'))
                     LIMIT $2)",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let (before, limit) = (offset(before, now), i64::try_from(limit).unwrap_or(i64::MAX));
        // Like SQLite's purge, these commit without waiting for the flush:
        // a purge a crash of the server takes back is simply done again.
        let purged = unsynced(&client, client.execute(&stmt, &[&before, &limit])).await?;
        // The counts' deltas are folded here as well as on each read, so
        // they stay few where nothing reads the counts.
        let stmt = client
            .prepare_cached(FOLD_JOB_COUNTS)
            .await
            .map_err(|e| unavailable(&e))?;
        unsynced(&client, client.execute(&stmt, &[])).await?;
        Ok(purged)
    })
    .await
}

/// Folds the job-count deltas the writers' triggers appended (schema V10)
/// into the kept counts, and answers the counts. Concurrent folds queue on
/// the one `job_counts` row; each answer includes every fold committed
/// before it.
const FOLD_JOB_COUNTS: &str = "WITH folded AS (DELETE FROM job_count_deltas RETURNING *),
     moved AS (
         SELECT COALESCE(sum(queued), 0) AS queued, COALESCE(sum(in_flight), 0) AS in_flight,
                COALESCE(sum(done), 0) AS done, COALESCE(sum(dead), 0) AS dead
         FROM folded)
 UPDATE job_counts c
 SET queued = c.queued + m.queued, in_flight = c.in_flight + m.in_flight,
     done = c.done + m.done, dead = c.dead + m.dead
 FROM moved m
 RETURNING c.queued, c.in_flight, c.done, c.dead";

pub(super) async fn queue_stats(store: &PostgresStore, now: SystemTime) -> Result<QueueStats, StoreError> {
    within("queue_stats", ADMIN_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached(FOLD_JOB_COUNTS)
            .await
            .map_err(|e| unavailable(&e))?;
        let row = unsynced(&client, client.query_one(&stmt, &[])).await?;
        let states = [
            JobState::Queued,
            JobState::InFlight,
            JobState::Done,
            JobState::Dead,
        ];
        let mut counts = Vec::with_capacity(states.len());
        for (i, state) in states.into_iter().enumerate() {
            counts.push((state.as_str().to_owned(), col::<i64>(&row, i)?));
        }
        let stmt = client
            .prepare_cached(
                // `claim_id IS NULL`, true of every queued job, lets
                // `jobs_due` answer (schema V12).
                "SELECT min(due_at), now() FROM jobs WHERE state = 'queued' AND claim_id IS NULL AND due_at <= now()",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let row = client.query_one(&stmt, &[]).await.map_err(|e| unavailable(&e))?;
        let oldest: Option<SystemTime> = col(&row, 0)?;
        let db_now: SystemTime = col(&row, 1)?;
        Ok(rows::queue_stats(
            counts,
            oldest.map(|t| on_caller_clock(t, db_now, now)),
        ))
    })
    .await
}

pub(super) async fn event_body(
    store: &PostgresStore,
    id: Uuid,
) -> Result<Option<(String, Bytes)>, StoreError> {
    within("event_body", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client
            .prepare_cached("SELECT content_type, body, codec FROM events WHERE id = $1")
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(row) = client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(|e| unavailable(&e))?
        else {
            return Ok(None);
        };
        let codec = Codec::of(i64::from(col::<i32>(&row, 2)?))?;
        Ok(Some((col(&row, 0)?, codec.unpack(col::<Vec<u8>>(&row, 1)?)?)))
    })
    .await
}

/// Puts dead jobs matching `condition` (whose parameters start at $1) back in
/// the queue with a fresh attempt budget; their history stays.
pub(super) async fn requeue_where(
    tx: &deadpool_postgres::Transaction<'_>,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let sql = format!(
        "UPDATE jobs SET state = 'queued', attempts = 0, maybe_attempts = 0, due_at = now(), updated_at = now(),
             last_error = NULL
         WHERE state = 'dead' AND (request IS NOT NULL OR report_of IS NOT NULL) AND {condition}"
    );
    let stmt = tx.prepare_cached(&sql).await.map_err(|e| unavailable(&e))?;
    tx.execute(&stmt, params).await.map_err(|e| unavailable(&e))
}
