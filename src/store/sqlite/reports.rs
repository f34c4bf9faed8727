//! Queuing a report on SQLite: when a reported trigger is done or dead, or
//! its pipeline changes state, a report job is queued in the same
//! transaction, holding the trigger's report spec and its pipeline as it
//! stands (see `crate::report`).
//!
//! What this module must never do: render a status (the status target does,
//! when the report is sent), or begin or commit a transaction (the writer
//! batches these functions).

use rusqlite::params;
use uuid::Uuid;

use super::tally::Tx;
use super::unavailable;
use crate::report::{STATUS_TARGET_PREFIX, SUPERSEDED};
use crate::store::{JobState, StoreError};

/// Queues a report of trigger job `job` as it stands, if its route reports
/// it; `error` says why the trigger died. `now` in milliseconds.
pub(super) fn queue_report(
    conn: &Tx<'_>,
    job: &str,
    error: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    // A report still waiting says less than this one: it must not land
    // after it and put an older state back on the commit.
    conn.statement(
        "UPDATE jobs SET state = 'done', updated_at = ?2, last_error = ?3
         WHERE report_of = ?1 AND state = 'queued'",
    )
    .and_then(|mut stmt| stmt.execute(params![job, now, SUPERSEDED]))
    .map_err(|e| unavailable(&e))
    .and_then(|superseded| conn.count_moved(JobState::Queued, JobState::Done, superseded))?;
    conn.statement(
        "INSERT INTO jobs (id, event_id, route, target, state, needs_payload, due_at, created_at, updated_at,
                           repo, sha, report_of, report)
         SELECT ?1, event_id, route, ?5 || json_extract(report, '$.source'), 'queued', 0, ?3, ?3, ?3,
                repo, sha, id,
                json_object('spec', json(report), 'state', pipeline_state, 'number', pipeline_number,
                            'url', pipeline_url, 'error', ?4)
         FROM jobs WHERE id = ?2 AND report IS NOT NULL AND report_of IS NULL",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            Uuid::now_v7().to_string(),
            job,
            now,
            error,
            STATUS_TARGET_PREFIX
        ])
    })
    .map_err(|e| unavailable(&e))
    .and_then(|inserted| conn.count_inserted(JobState::Queued, inserted))
}
