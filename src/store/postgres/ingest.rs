//! Committing webhooks on PostgreSQL. Webhooks that arrive together are
//! committed together (group commit), as SQLite's writer batches them into
//! one fsync: their rows go as the columns `relay_ingest_many` (schema V15)
//! takes, one statement for the whole batch, the loop guard's store-side
//! checks included. One statement is one transaction, one round trip and
//! one WAL flush, and its INSERTs are multi-row. Each body is packed
//! (`store::codec`) on its webhook's own task, before it waits for a batch.
//!
//! What this module must never do: answer a caller before its batch's
//! commit is known, let one webhook's failure refuse another's (a batch
//! whose statement failed is run again, each webhook in a statement of its
//! own), or take burst locks out of key order (two batches would deadlock).

use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::oneshot;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tracing::debug;
use uuid::Uuid;

use super::batch::Batches;
use super::connect::pool_error;
use super::{col, micros, offset, unavailable};
use crate::guard::{Check, Dropped};
use crate::store::codec::{self, Packed};
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
    "SELECT original, held, held_by FROM relay_ingest_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
     $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31,
     $32, $33, $34, $35, $36, $37, $38, $39)";

/// The queue of webhooks waiting to be committed, as callers see it.
#[derive(Debug)]
pub(super) struct GroupCommit {
    batches: Batches<Waiting>,
}

/// A webhook waiting for its batch, and where its answer goes.
struct Waiting {
    event: NewEvent,
    prepared: Prepared,
    answer: oneshot::Sender<Result<Ingested, StoreError>>,
}

impl GroupCommit {
    /// Starts gathering batches for connections from `pool`; ends when the
    /// last handle is gone.
    pub(super) fn spawn(pool: Pool) -> GroupCommit {
        GroupCommit {
            batches: Batches::spawn(pool, MAX_BATCH, BATCHES_IN_FLIGHT, |pool, batch| async move {
                commit(&pool, batch).await;
            }),
        }
    }

    /// Commits `event` in the next batch; answers once that batch's fate is
    /// known. No deadline of its own: the accept path bounds the wait for
    /// every store alike (`accept::SENDERS_DEADLINE`), and the commit runs
    /// on without a caller.
    pub(super) async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        let prepared = Prepared::of(&event)?;
        let (answer, answered) = oneshot::channel();
        self.batches
            .enqueue(Waiting {
                event,
                prepared,
                answer,
            })
            .await?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

/// Commits a batch and answers each webhook in it.
async fn commit(pool: &Pool, batch: Vec<Waiting>) {
    let client = match pool.get().await {
        Ok(client) => client,
        Err(e) => {
            let error = StoreError::Unavailable(pool_error(&e));
            for waiting in batch {
                let _ = waiting.answer.send(Err(error.clone()));
            }
            return;
        }
    };
    match run(&client, &batch).await {
        Ok(rows) => {
            for (waiting, row) in batch.into_iter().zip(rows) {
                let answer = ingested(&waiting.event, &waiting.prepared, &row);
                let _ = waiting.answer.send(answer);
            }
        }
        Err(Failed::Statement(error)) if batch.len() > 1 => {
            // Rolled back: each again on its own, so that one webhook's
            // failure refuses only that webhook.
            debug!(webhooks = batch.len(), %error, "a batch's ingest failed; committing its webhooks one by one");
            for waiting in batch {
                let answer = match run(&client, std::slice::from_ref(&waiting)).await {
                    Ok(rows) => rows
                        .first()
                        .ok_or_else(|| StoreError::Corrupt("relay_ingest_many answered no row".to_owned()))
                        .and_then(|row| ingested(&waiting.event, &waiting.prepared, row)),
                    Err(Failed::Statement(error) | Failed::Unknown(error)) => Err(error),
                };
                let _ = waiting.answer.send(answer);
            }
        }
        Err(Failed::Statement(error) | Failed::Unknown(error)) => {
            // Unknown: committed or not, nobody can say. The senders retry,
            // and a retry with a delivery id is taken for the duplicate it is.
            for waiting in batch {
                let _ = waiting.answer.send(Err(error.clone()));
            }
        }
    }
}

/// How a batch failed.
enum Failed {
    /// The server refused the statement: its transaction rolled back,
    /// nothing was written.
    Statement(StoreError),
    /// The connection failed on the way: what was written is unknown.
    Unknown(StoreError),
}

/// The batch's ingest as one statement (and so one transaction), one row
/// per webhook in the batch's order.
async fn run(client: &deadpool_postgres::Object, batch: &[Waiting]) -> Result<Vec<Row>, Failed> {
    let failed = |e: tokio_postgres::Error| {
        if e.as_db_error().is_some() {
            Failed::Statement(unavailable(&e))
        } else {
            Failed::Unknown(unavailable(&e))
        }
    };
    let stmt = client.prepare_cached(INGEST).await.map_err(failed)?;
    let columns = BatchColumns::of(batch);
    let rows = client.query(&stmt, &columns.params()).await.map_err(failed)?;
    if rows.len() != batch.len() {
        // Committed, yet the answer cannot be matched to the webhooks.
        return Err(Failed::Unknown(StoreError::Corrupt(format!(
            "relay_ingest_many answered {} rows for {} webhooks",
            rows.len(),
            batch.len()
        ))));
    }
    Ok(rows)
}

/// A batch's webhooks as the columns `relay_ingest_many` takes: each
/// webhook's rows one after another, every drop and job with the (1-based)
/// place of its event, and the burst locks of the whole batch in key order
/// (taken first, so two batches queue rather than deadlock).
#[derive(Default)]
struct BatchColumns<'a> {
    id: Vec<Uuid>,
    source: Vec<&'a str>,
    delivery: Vec<Option<&'a str>>,
    hook: Vec<&'a str>,
    content_type: Vec<&'a str>,
    body: Vec<&'a [u8]>,
    payload: Vec<Option<&'a [u8]>>,
    codec: Vec<i32>,
    hop: Vec<i64>,
    summary: Vec<&'a str>,
    drop_event: Vec<i32>,
    drop_route: Vec<Option<&'a str>>,
    drop_target: Vec<Option<&'a str>>,
    drop_rule: Vec<&'a str>,
    drop_reason: Vec<&'a str>,
    locks: Vec<i32>,
    job_event: Vec<i32>,
    job_id: Vec<Uuid>,
    route: Vec<&'a str>,
    target: Vec<&'a str>,
    state: Vec<&'static str>,
    request: Vec<Option<&'a str>>,
    needs_payload: Vec<bool>,
    error: Vec<Option<&'a str>>,
    claim: Vec<Option<Uuid>>,
    lease: Vec<Option<i64>>,
    repo: Vec<&'a str>,
    sha: Vec<&'a str>,
    shadow: Vec<bool>,
    report: Vec<Option<&'a str>>,
    burst_limit: Vec<Option<i64>>,
    burst_per: Vec<Option<i64>>,
    burst_rule: Vec<Option<&'a str>>,
    burst_reason: Vec<Option<&'a str>>,
    dedupe_key: Vec<Option<&'a str>>,
    dedupe_window: Vec<Option<i64>>,
    dedupe_rule: Vec<Option<&'a str>>,
    dedupe_reason: Vec<Option<&'a str>>,
}

impl<'a> BatchColumns<'a> {
    fn of(batch: &'a [Waiting]) -> BatchColumns<'a> {
        let mut b = BatchColumns::default();
        for (place, Waiting { event, prepared, .. }) in (1_i32..).zip(batch) {
            b.id.push(event.id);
            b.source.push(&event.source);
            b.delivery.push(event.delivery.as_deref());
            b.hook.push(&event.hook);
            b.content_type.push(&event.content_type);
            b.body.push(&prepared.packed.body);
            b.payload.push(prepared.packed.payload.as_deref());
            b.codec.push(prepared.packed.codec as i32);
            b.hop.push(i64::from(event.hop));
            b.summary.push(&event.summary);
            for d in &event.drops {
                b.drop_event.push(place);
                b.drop_route.push(d.route.as_deref());
                b.drop_target.push(d.target.as_deref());
                b.drop_rule.push(&d.rule);
                b.drop_reason.push(&d.reason);
            }
            b.locks.extend(&prepared.locks);
            for (job, p) in event.jobs.iter().zip(&prepared.jobs) {
                b.job_event.push(place);
                b.job_id.push(job.id);
                b.route.push(&job.route);
                b.target.push(&job.target);
                b.state.push(p.state);
                b.request.push(p.request.as_deref());
                b.needs_payload.push(p.needs_payload);
                b.error.push(p.error.as_deref());
                b.claim.push(job.lease.map(|l| l.claim));
                b.lease.push(p.lease);
                b.repo.push(&job.repo);
                b.sha.push(&job.sha);
                b.shadow.push(job.shadow);
                b.report.push(p.report.as_deref());
                let burst = p.burst.as_ref();
                b.burst_limit.push(burst.map(|(limit, _)| *limit));
                b.burst_per.push(burst.map(|(_, c)| c.micros));
                b.burst_rule.push(burst.map(|(_, c)| c.held.rule.as_str()));
                b.burst_reason.push(burst.map(|(_, c)| c.held.reason.as_str()));
                let dedupe = p.dedupe.as_ref();
                b.dedupe_key.push(dedupe.map(|(key, _)| key.as_str()));
                b.dedupe_window.push(dedupe.map(|(_, c)| c.micros));
                b.dedupe_rule.push(dedupe.map(|(_, c)| c.held.rule.as_str()));
                b.dedupe_reason.push(dedupe.map(|(_, c)| c.held.reason.as_str()));
            }
        }
        b.locks.sort_unstable();
        b.locks.dedup();
        b
    }

    /// `relay_ingest_many`'s parameters, in its order.
    fn params(&self) -> [&(dyn ToSql + Sync); 39] {
        [
            &self.id,
            &self.source,
            &self.delivery,
            &self.hook,
            &self.content_type,
            &self.body,
            &self.payload,
            &self.codec,
            &self.hop,
            &self.summary,
            &self.drop_event,
            &self.drop_route,
            &self.drop_target,
            &self.drop_rule,
            &self.drop_reason,
            &TARGET_LOCK_CLASS,
            &self.locks,
            &self.job_event,
            &self.job_id,
            &self.route,
            &self.target,
            &self.state,
            &self.request,
            &self.needs_payload,
            &self.error,
            &self.claim,
            &self.lease,
            &self.repo,
            &self.sha,
            &self.shadow,
            &self.report,
            &self.burst_limit,
            &self.burst_per,
            &self.burst_rule,
            &self.burst_reason,
            &self.dedupe_key,
            &self.dedupe_window,
            &self.dedupe_rule,
            &self.dedupe_reason,
        ]
    }
}

/// What the webhook's row of `relay_ingest_many` says became of it.
fn ingested(event: &NewEvent, prepared: &Prepared, row: &Row) -> Result<Ingested, StoreError> {
    if let Some(original) = col::<Option<Uuid>>(row, 0)? {
        return Ok(Ingested::Duplicate(original));
    }
    let held: Vec<Uuid> = col(row, 1)?;
    let held_by: Vec<String> = col(row, 2)?;
    let mut held_back = Vec::new();
    let mut leased = Vec::new();
    for (job, p) in event.jobs.iter().zip(&prepared.jobs) {
        let Some(at) = held.iter().position(|id| *id == job.id) else {
            leased.extend(job.leased(event));
            continue;
        };
        let rule = held_by.get(at).map(String::as_str);
        let dropped = p
            .burst
            .iter()
            .map(|(_, check)| check)
            .chain(p.dedupe.iter().map(|(_, check)| check))
            .map(|check| &check.held)
            .find(|d| Some(d.rule.as_str()) == rule)
            .cloned()
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

/// What a webhook's rows need beyond the event's own fields, worked out on
/// the caller's task before it waits for a batch (a job whose row cannot be
/// made fails that webhook alone): its body and payload as stored, its
/// jobs' rows, and the burst locks it takes.
struct Prepared {
    packed: Packed,
    jobs: Vec<PreparedJob>,
    locks: Vec<i32>,
}

/// A job's row as stored, and the loop guard's store-side checks it is
/// subject to.
struct PreparedJob {
    state: &'static str,
    request: Option<String>,
    needs_payload: bool,
    error: Option<String>,
    /// The lease's end as an offset from the webhook's arrival.
    lease: Option<i64>,
    report: Option<String>,
    /// With the burst's limit.
    burst: Option<(i64, GuardCheck)>,
    /// With the dedupe key.
    dedupe: Option<(String, GuardCheck)>,
}

/// One loop-guard check: its window in microseconds, and the drop the job
/// becomes if the check holds it back, worded by the guard (a burst that
/// holds counted exactly its limit, as the count stops there).
struct GuardCheck {
    micros: i64,
    held: Dropped,
}

impl Prepared {
    fn of(event: &NewEvent) -> Result<Prepared, StoreError> {
        let mut prepared = Prepared {
            packed: codec::pack(event),
            jobs: Vec::with_capacity(event.jobs.len()),
            locks: Vec::new(),
        };
        for job in &event.jobs {
            let JobRow {
                state,
                request,
                needs_payload,
                error,
            } = job.row()?;
            let trigger = job.trigger();
            let (mut burst, mut dedupe) = (None, None);
            for check in job.limits.checks() {
                match check {
                    Check::Burst { limit, per } => {
                        burst = trigger.burst(i64::from(limit), limit, per).map(|held| {
                            let check = GuardCheck {
                                micros: micros(per),
                                held,
                            };
                            (i64::from(limit), check)
                        });
                    }
                    Check::Dedupe { key, window } => {
                        dedupe = trigger.dedupe(false, window).map(|held| {
                            let check = GuardCheck {
                                micros: micros(window),
                                held,
                            };
                            (key.to_owned(), check)
                        });
                    }
                }
            }
            if burst.is_some() {
                prepared.locks.push(target_lock(&job.target));
            }
            prepared.jobs.push(PreparedJob {
                state: state.as_str(),
                request,
                needs_payload,
                error: error.map(str::to_owned),
                lease: job.lease.map(|l| offset(l.until, event.received_at)),
                report: rows::report_json(job.report.as_ref()),
                burst,
                dedupe,
            });
        }
        // The burst count is only right if no other relay is adding jobs for
        // the target meanwhile: a per-target lock, held to the commit, taken
        // for the whole batch up front and in key order (`BatchColumns`), so
        // two batches for the same targets queue rather than deadlock.
        // Dedupe needs no lock of its own: its row decides.
        Ok(prepared)
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
