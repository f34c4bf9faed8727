//! Polls of followed pipelines on PostgreSQL: leasing the due ones of a
//! target (`SKIP LOCKED`, so relays sharing the store never poll the same
//! pipeline at once), writing what a poll learned, and the next one due.
//!
//! What this module must never do: decide with the host's clock (the
//! database's `now()` decides; the caller's lengths of time arrive as
//! microseconds), or decide when to poll (the follower does).

use std::time::{Duration, SystemTime};

use super::connect::{OPERATION_TIMEOUT, within};
use super::{PostgresStore, col, micros, next_moment, unavailable, unsynced};
use crate::report::{STATUS_TARGET_PREFIX, SUPERSEDED};
use crate::store::rows::{self, POLL_COLUMNS};
use crate::store::{DuePoll, PollRecord, StoreError};

pub(super) async fn due_polls(
    store: &PostgresStore,
    target: &str,
    limit: usize,
    lease: Duration,
) -> Result<Vec<DuePoll>, StoreError> {
    within("due_polls", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let sql = format!(
            "WITH due AS (
                 SELECT id FROM jobs
                 WHERE target = $1 AND follow_due IS NOT NULL AND follow_due <= now()
                 ORDER BY follow_due LIMIT $2
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE jobs SET follow_due = now() + $3::int8 * interval '1 microsecond'
             WHERE id IN (SELECT id FROM due)
             RETURNING GREATEST(0, (EXTRACT(EPOCH FROM follow_until - now()) * 1000)::int8), {POLL_COLUMNS}"
        );
        let stmt = client.prepare_cached(&sql).await.map_err(|e| unavailable(&e))?;
        let (limit, lease) = (i64::try_from(limit).unwrap_or(i64::MAX), micros(lease));
        let rows = unsynced(&client, client.query(&stmt, &[&target, &limit, &lease])).await?;
        rows.iter().map(rows::due_poll).collect()
    })
    .await
}

pub(super) async fn record_poll(store: &PostgresStore, poll: PollRecord) -> Result<bool, StoreError> {
    within("record_poll", OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        // One statement: the old state is read under the row's lock, and a
        // pipeline no longer followed (its CI's webhook ended it meanwhile)
        // matches no row, so this older answer writes nothing. The job is
        // found by its id alone and the follow checked after: with the
        // check in the lookup, the planner read every followed job's entry
        // in `jobs_follow` instead of one key.
        let stmt = client
            .prepare_cached(concat!(
                "WITH locked AS (
                     SELECT id, pipeline_state, follow_due FROM jobs WHERE id = $1 FOR UPDATE
                 ), old AS (
                     SELECT id, pipeline_state FROM locked WHERE follow_due IS NOT NULL
                 ), moved AS (
                 UPDATE jobs j SET
                     pipeline_state = COALESCE($2::text, j.pipeline_state),
                     pipeline_updated_at = CASE WHEN $2::text IS NOT NULL
                         AND old.pipeline_state IS DISTINCT FROM $2::text
                         THEN now() ELSE j.pipeline_updated_at END,
                     follow_polls = j.follow_polls + 1,
                     follow_due = CASE WHEN $3::int8 IS NULL THEN NULL
                         ELSE now() + $3::int8 * interval '1 microsecond' END,
                     follow_note = $4::text
                 FROM old WHERE j.id = old.id
                 RETURNING $2::text IS NOT NULL AND old.pipeline_state IS DISTINCT FROM $2::text AS changed,
                     j.id, j.event_id, j.route, j.repo, j.sha, j.report, j.report_of, j.pipeline_state,
                     j.pipeline_number, j.pipeline_url
                 ",
                report_ctes!(id: "$5", prefix: "$6", error: "NULL", superseded: "$7", when: "changed"),
                "
                 SELECT changed FROM moved"
            ))
            .await
            .map_err(|e| unavailable(&e))?;
        let state = poll.state.map(|s| s.as_str());
        let next_in = poll.next_in.map(micros);
        let report_id = uuid::Uuid::now_v7();
        let row = unsynced(
            &client,
            client.query_opt(
                &stmt,
                &[
                    &poll.job_id,
                    &state,
                    &next_in,
                    &poll.note,
                    &report_id,
                    &STATUS_TARGET_PREFIX,
                    &SUPERSEDED,
                ],
            ),
        )
        .await?;
        row.map(|row| col::<bool>(&row, 0))
            .transpose()
            .map(|changed| changed.unwrap_or(false))
    })
    .await
}

pub(super) async fn next_poll(
    store: &PostgresStore,
    now: SystemTime,
) -> Result<Option<SystemTime>, StoreError> {
    next_moment(
        store,
        "next_poll",
        "SELECT (SELECT min(follow_due) FROM jobs WHERE follow_due IS NOT NULL), now()",
        now,
    )
    .await
}
