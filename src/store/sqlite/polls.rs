//! Polls of followed pipelines on SQLite: leasing the due ones of a target,
//! writing what a poll learned, and the next one due.
//!
//! What this module must never do: decide by a clock of its own (every time
//! it stores or compares comes from the caller), begin or commit a
//! transaction (the writer batches these functions), or decide when to poll
//! (the follower does; this stores its answer).

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, params};

use super::tally::Tx;
use super::{collect, from_millis, to_millis, unavailable};
use crate::store::rows::{self, POLL_COLUMNS};
use crate::store::{DuePoll, PollRecord, StoreError};

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn due_polls(
    conn: &Connection,
    target: &str,
    limit: usize,
    lease: Duration,
    now: SystemTime,
) -> Result<Vec<DuePoll>, StoreError> {
    let sql = format!(
        "UPDATE jobs SET follow_due = ?1 + ?2
         WHERE rowid IN (
             SELECT rowid FROM jobs
             WHERE target = ?3 AND follow_due IS NOT NULL AND follow_due <= ?1
             ORDER BY follow_due LIMIT ?4)
         RETURNING MAX(follow_until - ?1, 0), {POLL_COLUMNS}"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    collect(
        &mut stmt,
        params![
            to_millis(now),
            millis(lease),
            target,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |row| rows::due_poll(row),
    )
}

pub(super) fn record_poll(conn: &Tx<'_>, poll: &PollRecord, now: SystemTime) -> Result<bool, StoreError> {
    let now = to_millis(now);
    let state = poll.state.map(|s| s.as_str());
    let changed = conn
        .statement(
            "SELECT pipeline_state IS NOT ?2 AND ?2 IS NOT NULL FROM jobs
             WHERE id = ?1 AND follow_due IS NOT NULL",
        )
        .and_then(|mut stmt| {
            let mut rows = stmt.query(params![poll.job_id.to_string(), state])?;
            rows.next()?.map(|row| row.get::<_, bool>(0)).transpose()
        })
        .map_err(|e| unavailable(&e))?;
    let Some(changed) = changed else {
        // Ended by the CI's own webhook (or no longer followed) meanwhile:
        // this poll's answer is older than what the job already says.
        return Ok(false);
    };
    conn.statement(
        "UPDATE jobs SET
             pipeline_state = COALESCE(?2, pipeline_state),
             pipeline_updated_at = CASE WHEN ?3 THEN ?4 ELSE pipeline_updated_at END,
             follow_polls = follow_polls + 1,
             follow_due = CASE WHEN ?5 IS NULL THEN NULL ELSE ?4 + ?5 END,
             follow_note = ?6
         WHERE id = ?1 AND follow_due IS NOT NULL",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            poll.job_id.to_string(),
            state,
            changed,
            now,
            poll.next_in.map(millis),
            poll.note,
        ])
    })
    .map_err(|e| unavailable(&e))?;
    if changed {
        super::reports::queue_report(conn, &poll.job_id.to_string(), None, now)?;
    }
    Ok(changed)
}

pub(super) fn next_poll(conn: &Connection) -> Result<Option<SystemTime>, StoreError> {
    conn.prepare_cached("SELECT MIN(follow_due) FROM jobs WHERE follow_due IS NOT NULL")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, Option<i64>>(0)))
        .map(|t| t.map(from_millis))
        .map_err(|e| unavailable(&e))
}
