//! Recording finished sends on PostgreSQL together (group commit, as
//! `ingest` does for webhooks): the sends that finish while the batches in
//! flight run are recorded by the next, one statement for all of them, so
//! the server starts its executor (and relay makes its round trip) once a
//! batch rather than once a send.
//!
//! Only the busiest kind is batched: a trigger done or dead whose route
//! does not report it, which moves its own row and writes its attempt and
//! nothing else. A retry (news for every relay's dispatcher) and a
//! reported trigger (a report to queue, one to supersede) are recorded one
//! by one (`queue::complete`).
//!
//! What this module must never do: answer a caller before its batch's
//! commit is known, record a completion whose claim no longer holds, or let
//! one completion's failure refuse another's (a batch that failed is
//! recorded again one by one: safe even if it did commit, as a completion
//! whose claim it ended then matches no row and answers `false`).

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use tracing::debug;
use uuid::Uuid;

use super::batch::Batches;
use super::connect::{OPERATION_TIMEOUT, pool_error, within};
use super::{begun_with, col, micros, offset, unavailable};
use crate::store::{Completion, JobState, NextState, StoreError};

/// The most completions in one statement.
const MAX_BATCH: usize = 64;

/// Batches recording at once: while one runs, the next gathers. One, not
/// two as for webhooks: no sender's answer waits on a completion, and the
/// larger batches cost the server 6-10% less CPU a webhook at 32
/// connections (and a seventh less a trigger drained from a backlog).
const BATCHES_IN_FLIGHT: usize = 1;

/// The batch's completions as arrays, one element each; answers the ids of
/// the jobs whose claim still held (and so were recorded).
const COMPLETE_MANY: &str = "
WITH c AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int8[], $6::int8[],
                         $7::int4[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::text[],
                         $13::text[], $14::int8[], $15::int8[])
        AS c(id, claim, state, error, started, duration_ms, status, outcome, excerpt,
             p_id, p_number, p_url, p_state, follow_first, follow_deadline)
), moved AS (
    UPDATE jobs SET state = c.state, attempts = jobs.attempts + 1, due_at = now(), claim_id = NULL,
        lease_until = NULL, last_error = c.error, updated_at = now(),
        pipeline_id = COALESCE(c.p_id, jobs.pipeline_id),
        pipeline_number = CASE WHEN c.p_id IS NULL THEN jobs.pipeline_number ELSE c.p_number END,
        pipeline_url = CASE WHEN c.p_id IS NULL THEN jobs.pipeline_url ELSE c.p_url END,
        pipeline_state = CASE WHEN c.p_id IS NULL THEN jobs.pipeline_state ELSE c.p_state END,
        pipeline_updated_at = CASE WHEN c.p_id IS NULL THEN jobs.pipeline_updated_at ELSE now() END,
        follow_due = CASE WHEN c.follow_first IS NULL THEN jobs.follow_due
            ELSE now() + c.follow_first * interval '1 microsecond' END,
        follow_until = CASE WHEN c.follow_first IS NULL THEN jobs.follow_until
            ELSE now() + c.follow_deadline * interval '1 microsecond' END,
        follow_polls = CASE WHEN c.follow_first IS NULL THEN jobs.follow_polls ELSE 0 END,
        follow_note = CASE WHEN c.follow_first IS NULL THEN jobs.follow_note ELSE NULL END
    FROM c
    WHERE jobs.id = c.id AND jobs.claim_id = c.claim
    RETURNING jobs.id, c.started, c.duration_ms, c.status, c.outcome, c.excerpt
)
INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
SELECT m.id, (SELECT COALESCE(max(a.number), 0) + 1 FROM attempts a WHERE a.job_id = m.id),
       now() + m.started * interval '1 microsecond', m.duration_ms, m.status, m.outcome, m.excerpt
FROM moved m
RETURNING job_id";

/// The queue of finished sends waiting to be recorded, as callers see it.
#[derive(Debug)]
pub(super) struct GroupComplete {
    batches: Batches<Finished>,
}

/// A finished send waiting for its batch, the moment its times count from
/// (as `queue::complete` has them), and where its answer goes.
struct Finished {
    completion: Completion,
    now: SystemTime,
    answer: oneshot::Sender<Result<bool, StoreError>>,
}

impl GroupComplete {
    pub(super) fn spawn(pool: Pool) -> GroupComplete {
        GroupComplete {
            batches: Batches::spawn(pool, MAX_BATCH, BATCHES_IN_FLIGHT, |pool, batch| async move {
                record(&pool, batch).await;
            }),
        }
    }

    /// Whether `c` is of the kind recorded here (see the module's note).
    pub(super) fn takes(c: &Completion) -> bool {
        !c.reported && !matches!(c.next, NextState::Retry { .. })
    }

    /// Records `c` (which [`GroupComplete::takes`]) in the next batch:
    /// `true` if its claim still held. Gives up after the delivery path's
    /// deadline, as a statement of its own would.
    pub(super) async fn complete(&self, c: Completion, now: SystemTime) -> Result<bool, StoreError> {
        within("complete", OPERATION_TIMEOUT, async {
            let (answer, answered) = oneshot::channel();
            self.batches
                .enqueue(Finished {
                    completion: c,
                    now,
                    answer,
                })
                .await?;
            answered.await.map_err(|_| StoreError::Closed)?
        })
        .await
    }
}

/// Records a batch and answers each completion in it.
async fn record(pool: &Pool, batch: Vec<Finished>) {
    let client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            let error = StoreError::Unavailable(pool_error(&e));
            for finished in batch {
                let _ = finished.answer.send(Err(error.clone()));
            }
            return;
        }
    };
    match run(&client, &batch).await {
        Ok(recorded) => {
            for finished in batch {
                let _ = finished
                    .answer
                    .send(Ok(recorded.contains(&finished.completion.job_id)));
            }
        }
        Err(error) if batch.len() > 1 => {
            debug!(completions = batch.len(), %error, "a batch of completions failed; recording them one by one");
            for finished in batch {
                let answer = run(&client, std::slice::from_ref(&finished))
                    .await
                    .map(|recorded| recorded.contains(&finished.completion.job_id));
                let _ = finished.answer.send(answer);
            }
        }
        Err(error) => {
            for finished in batch {
                let _ = finished.answer.send(Err(error.clone()));
            }
        }
    }
}

/// `COMPLETE_MANY`'s transaction: committed without waiting for the WAL
/// flush (see `unsynced`), and planned as one primary-key lookup per
/// completion, the only plan whose cost is the batch's size. Left to
/// itself, the planner joined the batch to a scan of the whole table when
/// it planned on a young table's figures (a fresh database's first minute,
/// before autovacuum counts its rows: 6,837 rows read for 22 completions),
/// and kept that plan for the connection's life. The plan is generic, made
/// once a connection: with those settings PostgreSQL otherwise planned the
/// statement afresh on every run (0.2 ms each, a fifth fewer webhooks/s at
/// one connection).
const BEGIN_BY_KEY: &str = "BEGIN; SET LOCAL synchronous_commit = off; SET LOCAL enable_seqscan = off;
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;
    SET LOCAL plan_cache_mode = force_generic_plan";

/// The batch as one statement (see `BEGIN_BY_KEY`); the ids of the jobs it
/// recorded.
async fn run(client: &deadpool_postgres::Object, batch: &[Finished]) -> Result<Vec<Uuid>, StoreError> {
    let stmt = client
        .prepare_cached(COMPLETE_MANY)
        .await
        .map_err(|e| unavailable(&e))?;
    let columns = Columns::of(batch);
    let recorded = begun_with(client, BEGIN_BY_KEY, client.query(&stmt, &columns.params())).await?;
    recorded.iter().map(|row| col::<Uuid>(row, 0)).collect()
}

/// A batch's completions as `COMPLETE_MANY`'s arrays.
#[derive(Default)]
struct Columns<'a> {
    id: Vec<Uuid>,
    claim: Vec<Uuid>,
    state: Vec<&'static str>,
    error: Vec<Option<&'a str>>,
    started: Vec<i64>,
    duration_ms: Vec<i64>,
    status: Vec<Option<i32>>,
    outcome: Vec<&'static str>,
    excerpt: Vec<&'a str>,
    pipeline_id: Vec<Option<&'a str>>,
    pipeline_number: Vec<Option<i64>>,
    pipeline_url: Vec<Option<&'a str>>,
    pipeline_state: Vec<Option<&'static str>>,
    follow_first: Vec<Option<i64>>,
    follow_deadline: Vec<Option<i64>>,
}

impl<'a> Columns<'a> {
    /// Times as offsets from each completion's moment of writing.
    fn of(batch: &'a [Finished]) -> Columns<'a> {
        let mut columns = Columns::default();
        for Finished {
            completion: c, now, ..
        } in batch
        {
            let (state, error) = match &c.next {
                NextState::Dead { reason } => (JobState::Dead, Some(reason.as_str())),
                // Retries are not batched (`GroupComplete::takes`).
                NextState::Done | NextState::Retry { .. } => (JobState::Done, None),
            };
            let pipeline = c.pipeline.as_ref();
            columns.id.push(c.job_id);
            columns.claim.push(c.claim);
            columns.state.push(state.as_str());
            columns.error.push(error);
            columns.started.push(offset(c.attempt.started_at, *now));
            columns.duration_ms.push(micros(c.attempt.duration) / 1000);
            columns.status.push(c.attempt.status.map(i32::from));
            columns.outcome.push(c.attempt.outcome);
            columns.excerpt.push(&c.attempt.excerpt);
            columns.pipeline_id.push(pipeline.map(|p| p.id.as_str()));
            columns.pipeline_number.push(
                pipeline
                    .and_then(|p| p.number)
                    .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            );
            columns.pipeline_url.push(pipeline.and_then(|p| p.url.as_deref()));
            columns.pipeline_state.push(pipeline.map(|p| p.state.as_str()));
            columns.follow_first.push(c.follow.map(|f| micros(f.first_in)));
            columns.follow_deadline.push(c.follow.map(|f| micros(f.deadline)));
        }
        columns
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        [
            &self.id,
            &self.claim,
            &self.state,
            &self.error,
            &self.started,
            &self.duration_ms,
            &self.status,
            &self.outcome,
            &self.excerpt,
            &self.pipeline_id,
            &self.pipeline_number,
            &self.pipeline_url,
            &self.pipeline_state,
            &self.follow_first,
            &self.follow_deadline,
        ]
    }
}
