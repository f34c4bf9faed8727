//! What a person reads and asks for, in SQLite's SQL: jobs, one job with
//! its attempts, events with their drops, the queue's statistics and an
//! event's body; the manual retries; and retention's purge. The rows'
//! meaning is `store::rows`'; this only reads the columns.
//!
//! What this module must never do: decide by a clock of its own (times come
//! from the caller), begin or commit a transaction (the writer batches
//! these functions), or requeue a job that is not dead or has no request.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::tally::Tx;
use super::{collect, to_millis, unavailable};
use crate::store::rows::{self, JOB_COLUMN_COUNT, JOB_COLUMNS};
use crate::store::{
    Activity, EventFilter, EventView, JobDetail, JobFilter, JobState, JobView, QueueStats, Requeued,
    ShadowFilter, SourceActivity, StoreError, TargetActivity,
};

pub(super) fn jobs(conn: &Connection, filter: &JobFilter) -> Result<Vec<JobView>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR target = ?2) AND (?3 IS NULL OR event_id = ?3)
         ORDER BY updated_at DESC, id DESC
         LIMIT ?4"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    collect(
        &mut stmt,
        params![
            filter.state.map(JobState::as_str),
            filter.target,
            filter.event.map(|e| e.to_string()),
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        ],
        |row| rows::job_view(row),
    )
}

pub(super) fn held_deliveries(
    conn: &Connection,
    source: &str,
    deliveries: &[String],
) -> Result<Vec<String>, StoreError> {
    // One indexed lookup each (UNIQUE (source, delivery)); a page of
    // deliveries is at most a hundred.
    let mut stmt = conn
        .prepare_cached("SELECT 1 FROM events WHERE source = ?1 AND delivery = ?2")
        .map_err(|e| unavailable(&e))?;
    let mut held = Vec::new();
    for delivery in deliveries {
        if stmt
            .exists(params![source, delivery])
            .map_err(|e| unavailable(&e))?
        {
            held.push(delivery.clone());
        }
    }
    Ok(held)
}

pub(super) fn shadow_jobs(conn: &Connection, filter: &ShadowFilter) -> Result<Vec<JobView>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs j
         WHERE report_of IS NULL AND created_at >= ?1 AND (?2 IS NULL OR route = ?2)
           AND (?3 IS NULL OR (repo = ?3 AND sha = ?4))
           AND EXISTS (SELECT 1 FROM jobs s WHERE s.shadow = 1 AND s.route = j.route
                           AND s.repo = j.repo AND s.sha = j.sha AND s.created_at >= ?1)
         ORDER BY created_at DESC, id DESC
         LIMIT ?5"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    let (repo, sha) = filter.commit.clone().unzip();
    collect(
        &mut stmt,
        params![
            to_millis(filter.since),
            filter.route,
            repo,
            sha,
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        ],
        |row| rows::job_view(row),
    )
}

pub(super) fn job(conn: &Connection, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS}, request FROM jobs WHERE id = ?1");
    let mut stmt = conn.prepare(&sql).map_err(|e| unavailable(&e))?;
    let found = collect(&mut stmt, params![id.to_string()], |row| {
        Ok((
            rows::job_view(row)?,
            row.get::<_, Option<String>>(JOB_COLUMN_COUNT)
                .map_err(|e| unavailable(&e))?,
        ))
    })?;
    let Some((view, request)) = found.into_iter().next() else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT number, started_at, duration_ms, status, outcome, excerpt
             FROM attempts WHERE job_id = ?1 ORDER BY number",
        )
        .map_err(|e| unavailable(&e))?;
    let history = collect(&mut stmt, params![id.to_string()], |row| rows::attempt_view(row))?;
    Ok(Some(rows::job_detail(view, request, history)))
}

/// The event columns [`rows::event_view`] reads, with its job counts, for
/// the events `e` a query names.
const EVENT_COLUMNS: &str = "e.id, e.source, e.delivery, e.hook, e.received_at, e.summary,
     (SELECT COUNT(*) FROM jobs j WHERE j.event_id = e.id),
     (SELECT COUNT(*) FROM jobs j WHERE j.event_id = e.id AND (j.state = 'queued' OR j.state = 'in_flight')),
     (SELECT COUNT(*) FROM jobs j WHERE j.event_id = e.id AND j.state = 'done'),
     (SELECT COUNT(*) FROM jobs j WHERE j.event_id = e.id AND j.state = 'dead')";

/// One page of events, newest first. The page walks `events_received`
/// from the newest (or from the cursor) and stops at `limit`: the
/// filters are checked row by row on the way, so a page costs its rows,
/// not the table (a filter that matches little walks further).
pub(super) fn events(conn: &Connection, filter: &EventFilter) -> Result<Vec<EventView>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events e
         WHERE (?1 IS NULL OR e.source = ?1)
           AND (?2 IS NULL OR EXISTS (SELECT 1 FROM json_each(e.summary, '$.events') WHERE json_extract(value, '$.repo') = ?2))
           AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(e.summary, '$.events') WHERE json_extract(value, '$.kind') = ?3))
           AND (?4 IS NULL OR EXISTS (SELECT 1 FROM jobs s WHERE s.event_id = e.id AND s.state = ?4))
           AND (?5 IS NULL OR e.received_at >= ?5)
           AND (?6 IS NULL OR e.received_at < ?6)
           AND (?7 IS NULL OR (e.received_at, e.id) < (SELECT c.received_at, c.id FROM events c WHERE c.id = ?7))
         ORDER BY e.received_at DESC, e.id DESC
         LIMIT ?8"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    let mut events = collect(
        &mut stmt,
        params![
            filter.source,
            filter.repo,
            filter.kind,
            filter.state.map(JobState::as_str),
            filter.since.map(to_millis),
            filter.until.map(to_millis),
            filter.before.map(|id| id.to_string()),
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        ],
        |row| rows::event_view(row),
    )?;
    for event in &mut events {
        event.dropped = drops(conn, &event.id)?;
    }
    Ok(events)
}

fn drops(conn: &Connection, event_id: &str) -> Result<Vec<crate::guard::Dropped>, StoreError> {
    let mut drops_of = conn
        .prepare_cached("SELECT route, target, rule, reason FROM drops WHERE event_id = ?1 ORDER BY rowid")
        .map_err(|e| unavailable(&e))?;
    collect(&mut drops_of, params![event_id], |row| rows::dropped(row, 0))
}

/// An event, its request as stored (packed: see `codec`), and its drops.
pub(super) type Stored = (EventView, String, u32, Vec<u8>, Option<Vec<u8>>, i64);

pub(super) fn event(conn: &Connection, id: Uuid) -> Result<Option<Stored>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, e.content_type, e.hop, e.body, e.payload, e.codec FROM events e WHERE e.id = ?1"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    let found = collect(&mut stmt, params![id.to_string()], |row| {
        let get = |e: rusqlite::Error| unavailable(&e);
        Ok((
            rows::event_view(row)?,
            row.get::<_, String>(10).map_err(get)?,
            row.get::<_, u32>(11).map_err(get)?,
            row.get::<_, Vec<u8>>(12).map_err(get)?,
            row.get::<_, Option<Vec<u8>>>(13).map_err(get)?,
            row.get::<_, i64>(14).map_err(get)?,
        ))
    })?;
    let Some(mut stored) = found.into_iter().next() else {
        return Ok(None);
    };
    stored.0.dropped = drops(conn, &stored.0.id)?;
    Ok(Some(stored))
}

/// Each source's newest delivery and its deliveries since `since`; each
/// target's queue, and its jobs created since `since`: how they ended,
/// the newest error, the mean attempt. Every query is one source's or one
/// target's, so it reads a range of an index (`events_received`,
/// `jobs_queued`, `jobs_created`), but for the jobs in flight, read from
/// `jobs_lease`, which holds only those of every target.
pub(super) fn activity(
    conn: &Connection,
    sources: &[String],
    targets: &[String],
    since: SystemTime,
) -> Result<Activity, StoreError> {
    let since = to_millis(since);
    let mut activity = Activity::default();
    for source in sources {
        let last: Option<i64> = conn
            .prepare_cached(
                "SELECT received_at FROM events WHERE source = ?1 ORDER BY received_at DESC LIMIT 1",
            )
            .and_then(|mut stmt| stmt.query_row(params![source], |row| row.get(0)).optional())
            .map_err(|e| unavailable(&e))?;
        let recent = count(
            conn,
            "SELECT COUNT(*) FROM events WHERE received_at >= ?2 AND source = ?1",
            params![source, since],
        )?;
        activity.sources.push(SourceActivity {
            source: source.clone(),
            last_received: last.map(super::from_millis),
            recent,
        });
    }
    for target in targets {
        let queued = count(
            conn,
            "SELECT COUNT(*) FROM jobs WHERE target = ?1 AND state = 'queued'",
            params![target],
        )?;
        let in_flight = count(
            conn,
            // The in-flight jobs of every target, few, not this target's
            // history through `jobs_created` (schema V12).
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_lease WHERE target = ?1 AND state = 'in_flight'",
            params![target],
        )?;
        let done = count(
            conn,
            "SELECT COUNT(*) FROM jobs WHERE target = ?1 AND created_at >= ?2 AND state = 'done'",
            params![target, since],
        )?;
        let dead = count(
            conn,
            "SELECT COUNT(*) FROM jobs WHERE target = ?1 AND created_at >= ?2 AND state = 'dead'",
            params![target, since],
        )?;
        let error: Option<(String, i64)> = conn
            .prepare_cached(
                "SELECT last_error, updated_at FROM jobs
                 WHERE target = ?1 AND created_at >= ?2 AND last_error IS NOT NULL
                 ORDER BY created_at DESC LIMIT 1",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![target, since], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(|e| unavailable(&e))?;
        let mean: Option<f64> = conn
            .prepare_cached(
                "SELECT AVG(a.duration_ms) FROM jobs j JOIN attempts a ON a.job_id = j.id
                 WHERE j.target = ?1 AND j.created_at >= ?2",
            )
            .and_then(|mut stmt| stmt.query_row(params![target, since], |row| row.get(0)))
            .map_err(|e| unavailable(&e))?;
        activity.targets.push(TargetActivity {
            target: target.clone(),
            queued,
            in_flight,
            done,
            dead,
            last_error_at: error.as_ref().map(|(_, at)| super::from_millis(*at)),
            last_error: error.map(|(e, _)| e),
            mean_send_ms: mean.map(|m| m.round() as u64),
        });
    }
    Ok(activity)
}

fn count(conn: &Connection, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<u64, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |row| row.get::<_, i64>(0)))
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(|e| unavailable(&e))
}

pub(super) fn requeue(conn: &Tx<'_>, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError> {
    let found: Option<(String, bool)> = conn
        .query_row(
            "SELECT state, (request IS NOT NULL OR report_of IS NOT NULL) FROM jobs WHERE id = ?1",
            params![id.to_string()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(|e| unavailable(&e))?;
    match found {
        None => Ok(Requeued::NotFound),
        Some((state, true)) if state == JobState::Dead.as_str() => {
            requeue_where(conn, "id = ?2", params![to_millis(now), id.to_string()])?;
            Ok(Requeued::Requeued)
        }
        Some((state, _)) => Ok(rows::not_requeued(&state)),
    }
}

/// Puts dead jobs matching `condition` (whose parameters start at ?2) back
/// in the queue with a fresh attempt budget; their history stays.
pub(super) fn requeue_where(
    conn: &Tx<'_>,
    condition: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<u64, StoreError> {
    let sql = format!(
        "UPDATE jobs SET state = 'queued', attempts = 0, maybe_attempts = 0, due_at = ?1, updated_at = ?1,
             last_error = NULL
         WHERE state = 'dead' AND (request IS NOT NULL OR report_of IS NOT NULL) AND {condition}"
    );
    let requeued = conn.execute(&sql, params).map_err(|e| unavailable(&e))?;
    conn.count_moved(JobState::Dead, JobState::Queued, requeued)?;
    Ok(requeued as u64)
}

/// Deletes up to `limit` finished events received before `before`, with
/// their jobs, attempts and drops.
pub(super) fn purge(conn: &Connection, before: SystemTime, limit: usize) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "DELETE FROM events WHERE id IN (
             SELECT id FROM events e
             WHERE e.received_at < ?1
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state IN ('queued', 'in_flight'))
             LIMIT ?2)",
    )
    .and_then(|mut stmt| stmt.execute(params![to_millis(before), i64::try_from(limit).unwrap_or(i64::MAX)]))
    .map(|n| n as u64)
    .map_err(|e| unavailable(&e))
}

pub(super) fn queue_stats(conn: &Connection, now: SystemTime) -> Result<QueueStats, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT state, n FROM job_counts")
        .map_err(|e| unavailable(&e))?;
    let counts = collect(&mut stmt, [], |row| {
        Ok((
            row.get::<_, String>(0).map_err(|e| unavailable(&e))?,
            row.get::<_, i64>(1).map_err(|e| unavailable(&e))?,
        ))
    })?;
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT MIN(due_at) FROM jobs WHERE state = 'queued' AND due_at <= ?1")
        .and_then(|mut stmt| stmt.query_row(params![to_millis(now)], |row| row.get(0)))
        .map_err(|e| unavailable(&e))?;
    Ok(rows::queue_stats(counts, oldest.map(super::from_millis)))
}

/// An event's content type and body as stored (packed: see `codec`).
pub(super) fn event_body(conn: &Connection, id: Uuid) -> Result<Option<(String, Vec<u8>, i64)>, StoreError> {
    conn.query_row(
        "SELECT content_type, body, codec FROM events WHERE id = ?1",
        params![id.to_string()],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, i64>(2)?,
            ))
        },
    )
    .optional()
    .map_err(|e| unavailable(&e))
}
