//! Committing webhooks on PostgreSQL. Each webhook's rows go as the
//! columns `relay_ingest` (schema V5) takes: one statement does the whole
//! ingest, the loop guard's store-side checks included. Webhooks that
//! arrive together share a transaction (group commit): their statements go
//! down one connection at once (pipelined) and one commit ends them, so
//! they share its WAL flush and the round trips between relay and the
//! server, as SQLite's writer batches them into one fsync.
//!
//! What this module must never do: answer a caller before its batch's
//! commit is known, let one webhook's failure refuse another's (a batch
//! whose statement failed is run again, each webhook in a statement of its
//! own), or take burst locks out of key order (two batches would deadlock).

use std::sync::Arc;

use deadpool_postgres::{GenericClient, Pool};
use futures_util::future::join_all;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::connect::pool_error;
use super::{col, micros, offset, unavailable};
use crate::guard::{Check, Dropped};
use crate::store::rows;
use crate::store::{HeldBack, Ingested, JobRow, NewEvent, StoreError};

/// The most webhooks in one transaction.
const MAX_BATCH: usize = 64;

/// Batches committing at once: while they run, the next gathers.
const BATCHES_IN_FLIGHT: usize = 2;

/// The first key of the per-target burst locks ("rly" in ASCII); the second
/// is a hash of the target's name.
const TARGET_LOCK_CLASS: i32 = 0x72_6c79;

const INGEST: &str =
    "SELECT original, held, held_by FROM relay_ingest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31,
     $32, $33, $34, $35, $36)";

/// The queue of webhooks waiting to be committed, as callers see it.
#[derive(Debug)]
pub(super) struct GroupCommit {
    waiting: mpsc::Sender<Waiting>,
}

/// A webhook waiting for its batch, and where its answer goes.
struct Waiting {
    event: NewEvent,
    columns: IngestColumns,
    answer: oneshot::Sender<Result<Ingested, StoreError>>,
}

impl GroupCommit {
    /// Starts gathering batches for connections from `pool`; ends when the
    /// last handle is gone.
    pub(super) fn spawn(pool: Pool) -> GroupCommit {
        let (waiting, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(gather(pool, queue));
        GroupCommit { waiting }
    }

    /// Commits `event` in the next batch; answers once that batch's fate is
    /// known. No deadline of its own: the accept path bounds the wait for
    /// every store alike (`accept::SENDERS_DEADLINE`), and the commit runs
    /// on without a caller.
    pub(super) async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        let columns = IngestColumns::of(&event)?;
        let (answer, answered) = oneshot::channel();
        self.waiting
            .send(Waiting {
                event,
                columns,
                answer,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

/// Takes what is waiting as one batch once a batch slot is free: idle, a
/// webhook is committed at once, alone; under load the webhooks that
/// arrive while both batches run form the next.
async fn gather(pool: Pool, mut queue: mpsc::Receiver<Waiting>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, batch).await;
            drop(slot);
        });
    }
}

/// Commits a batch and answers each webhook in it.
async fn commit(pool: &Pool, mut batch: Vec<Waiting>) {
    let mut client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            let error = StoreError::Unavailable(pool_error(&e));
            for waiting in batch {
                let _ = waiting.answer.send(Err(error.clone()));
            }
            return;
        }
    };
    if batch.len() > 1 {
        match together(&mut client, &batch).await {
            Ok(rows) => {
                for (waiting, row) in batch.into_iter().zip(rows) {
                    let answer = ingested(&waiting.event, waiting.columns, &row);
                    let _ = waiting.answer.send(answer);
                }
                return;
            }
            Err(Failed::Commit(error)) => {
                // Committed or not, nobody can say: the senders retry, and
                // a retry with a delivery id is taken for the duplicate it is.
                for waiting in batch {
                    let _ = waiting.answer.send(Err(error.clone()));
                }
                return;
            }
            // Rolled back: each again on its own, below.
            Err(Failed::Statement) => {}
        }
    }
    for waiting in batch.drain(..) {
        let answer = alone(&client, &waiting.event, waiting.columns).await;
        let _ = waiting.answer.send(answer);
    }
}

/// How a batch failed.
enum Failed {
    /// A statement failed: the transaction rolled back, nothing was written.
    Statement,
    /// The commit failed: what was written is unknown.
    Commit(StoreError),
}

/// The batch's statements pipelined in one transaction: every burst lock
/// of the batch first, in key order, then each webhook's ingest.
async fn together(client: &mut deadpool_postgres::Object, batch: &[Waiting]) -> Result<Vec<Row>, Failed> {
    let tx = client.transaction().await.map_err(|_| Failed::Statement)?;
    let (ingest, lock) = match tokio::try_join!(
        tx.prepare_cached(INGEST),
        tx.prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k")
    ) {
        Ok(statements) => statements,
        Err(_) => return Err(Failed::Statement),
    };
    let mut locks: Vec<i32> = batch
        .iter()
        .flat_map(|w| w.columns.locks.iter().copied())
        .collect();
    locks.sort_unstable();
    locks.dedup();
    let converted: Vec<Converted> = batch.iter().map(|w| Converted::of(&w.event)).collect();
    let params: Vec<[&(dyn ToSql + Sync); 36]> = batch
        .iter()
        .zip(&converted)
        .map(|(w, v)| params(&w.event, v, &w.columns))
        .collect();
    let locked = async {
        if locks.is_empty() {
            Ok(0)
        } else {
            tx.execute(&lock, &[&TARGET_LOCK_CLASS, &locks]).await
        }
    };
    let ingested = join_all(params.iter().map(|p| tx.query_one(&ingest, p)));
    let (locked, ingested) = tokio::join!(locked, ingested);
    let rows: Result<Vec<Row>, _> = locked.and_then(|_| ingested.into_iter().collect());
    let Ok(rows) = rows else {
        let _ = tx.rollback().await;
        return Err(Failed::Statement);
    };
    tx.commit().await.map_err(|e| Failed::Commit(unavailable(&e)))?;
    Ok(rows)
}

/// One webhook in a statement (and so a transaction) of its own.
async fn alone(
    client: &deadpool_postgres::Object,
    event: &NewEvent,
    columns: IngestColumns,
) -> Result<Ingested, StoreError> {
    let stmt = client.prepare_cached(INGEST).await.map_err(|e| unavailable(&e))?;
    let converted = Converted::of(event);
    let row = client
        .query_one(&stmt, &params(event, &converted, &columns))
        .await
        .map_err(|e| unavailable(&e))?;
    ingested(event, columns, &row)
}

/// The event's parameters that are not its fields as they stand.
struct Converted<'a> {
    body: &'a [u8],
    payload: Option<&'a [u8]>,
    hop: i64,
}

impl<'a> Converted<'a> {
    fn of(event: &'a NewEvent) -> Converted<'a> {
        Converted {
            body: &event.body[..],
            payload: event.payload.as_deref(),
            hop: i64::from(event.hop),
        }
    }
}

/// `relay_ingest`'s parameters for one webhook.
fn params<'a>(
    event: &'a NewEvent,
    v: &'a Converted<'a>,
    c: &'a IngestColumns,
) -> [&'a (dyn ToSql + Sync); 36] {
    [
        &event.id,
        &event.source,
        &event.delivery,
        &event.hook,
        &event.content_type,
        &v.body,
        &v.payload,
        &v.hop,
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
    ]
}

/// What `relay_ingest`'s row says became of the webhook.
fn ingested(event: &NewEvent, columns: IngestColumns, row: &Row) -> Result<Ingested, StoreError> {
    if let Some(original) = col::<Option<Uuid>>(row, 0)? {
        return Ok(Ingested::Duplicate(original));
    }
    let held: Vec<Uuid> = col(row, 1)?;
    let held_by: Vec<String> = col(row, 2)?;
    let mut held_back = Vec::new();
    let mut leased = Vec::new();
    for (job, drops) in event.jobs.iter().zip(columns.drops) {
        let Some(at) = held.iter().position(|id| *id == job.id) else {
            leased.extend(job.leased(event));
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

/// The advisory lock key of a target's burst count. FNV-1a, because the
/// key must be the same in every relay build on every host.
fn target_lock(target: &str) -> i32 {
    let hash = target.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}
