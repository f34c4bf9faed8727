//! The shared store: PostgreSQL, for several relays behind a load balancer
//! on one queue.
//!
//! Everything a relay decides with the queue's clock (is a job due, has a
//! lease run out, is a dedupe key or a burst window still open) is decided
//! with the database's `now()`, never the host's: relays on different hosts
//! share these rows, and their clocks need not agree. The role traits hand
//! in the caller's times; each is translated by its offset from the
//! caller's own `now`, and the times the queue hands back (the next
//! wake-up, the oldest due job) are translated the other way. The views of
//! jobs, attempts and events show the database's own timestamps.
//!
//! What this module must never do: trust the host clock for a queue
//! decision; hold a row lock across an HTTP call (a claim is one short
//! statement, and completion is fenced by the claim id instead of a lock);
//! put the database password into an error or a log line (only
//! `PostgresSettings::shown`, the masked URL, is ever printed, and
//! tokio-postgres's own messages never carry it).
//!
//! The folder, by concern: `connect` (connection settings, TLS, pool
//! errors, deadlines), `listen` (the LISTEN connection), `schema`
//! (migrations), `ingest` (webhooks committed, together under load),
//! `queue` (the rest of the delivery path's SQL), `views` (what a person
//! reads, the manual retries, retention). This file opens the store, says
//! how a column reads and how times translate, and wires the role traits.

/// The two CTEs that queue a report of each trigger in `moved` (which must
/// return `id, event_id, route, repo, sha, report, report_of,
/// pipeline_state, pipeline_number, pipeline_url`, as they stand after the
/// change) where `$when` holds, and mark its still-waiting older reports
/// superseded: SQLite's `reports::queue_report`, inside one statement. The
/// arguments name the statement's parameters: the new report's id, the
/// status target prefix, the trigger's error, the superseded note.
macro_rules! report_ctes {
    (id: $id:literal, prefix: $prefix:literal, error: $error:literal, superseded: $note:literal, when: $when:literal) => {
        concat!(
            "), reported AS (
                 INSERT INTO jobs (id, event_id, route, target, state, needs_payload, due_at, created_at,
                                   updated_at, repo, sha, report_of, report)
                 SELECT ",
            $id,
            ", event_id, route, ",
            $prefix,
            " || (report::jsonb ->> 'source'), 'queued', false,
                        now(), now(), now(), repo, sha, id,
                        jsonb_build_object('spec', report::jsonb, 'state', pipeline_state,
                            'number', pipeline_number, 'url', pipeline_url, 'error', ",
            $error,
            ")::text
                 FROM moved WHERE (",
            $when,
            ") AND report IS NOT NULL AND report_of IS NULL
             ), superseded AS (
                 UPDATE jobs SET state = 'done', updated_at = now(), last_error = ",
            $note,
            "
                 WHERE report_of IN (SELECT id FROM moved WHERE ",
            $when,
            ") AND state = 'queued'
             )"
        )
    };
}

mod batch;
mod connect;
mod finish;
mod ingest;
mod listen;
mod migrations;
mod polls;
mod queue;
mod schema;
mod views;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use self::connect::{POOL_TIMEOUT, connection_config, describe, pool_error, tls_connector};
use self::listen::{keep_listening, listen_on};
pub(crate) use self::migrations::SCHEMA_VERSION;
pub(crate) use self::schema::schema_status;
use super::rows::Columns;
use super::{
    Activity, ClaimedJob, Completion, DuePoll, EventFilter, EventView, ForgottenKeys, Ingested, Inspect,
    JobDetail, JobFilter, JobView, Maintain, NewEvent, PollRecord, Polls, Queue, QueueStats, Requeued,
    ShadowFilter, StoreError, StoredEvent,
};
use crate::config::PostgresSettings;
use crate::event::Upstream;
use crate::pipeline::PipelineState;

/// Every bound the caller can hand in ends up here or below: intervals this
/// far out are "never" for a queue, and PostgreSQL's interval arithmetic
/// stays exact and in range.
const MAX_OFFSET_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// The PostgreSQL store: a connection pool for the queue, and one dedicated
/// connection listening for work other relays queued.
pub struct PostgresStore {
    pool: Pool,
    /// Webhooks committed together (see `ingest`).
    group_commit: ingest::GroupCommit,
    /// Finished sends recorded together (see `finish`).
    group_complete: finish::GroupComplete,
    shown: String,
    wake: Arc<Notify>,
    /// Stops the listener task when the store goes away.
    _listener: DropGuard,
}

impl fmt::Debug for PostgresStore {
    // By hand: the pool's own Debug would print the connection config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date (safely when several relays
    /// start at once), and starts listening for work queued elsewhere. Jobs
    /// left in flight stay leased: another relay may be sending them, so
    /// they are claimed again only once their lease runs out.
    pub async fn open(settings: &PostgresSettings) -> Result<PostgresStore, StoreError> {
        let fail = |reason: String| StoreError::Connect {
            url: settings.shown.clone(),
            reason,
        };
        let tls = tls_connector(settings).map_err(fail)?;
        let manager = Manager::from_config(
            connection_config(&settings.connect),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let mut client = pool.get().await.map_err(|e| fail(pool_error(&e)))?;
        schema::migrate(&mut client).await.map_err(fail)?;
        drop(client);

        let wake = Arc::new(Notify::new());
        let connect = connection_config(&settings.connect);
        // Listening before `open` returns: work queued from here on is heard.
        let session = listen_on(&connect, &tls, &wake).await.map_err(fail)?;
        let stop = CancellationToken::new();
        let listener = keep_listening(session, connect, tls, wake.clone(), settings.shown.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stopped.cancelled() => {}
                () = listener => {}
            }
        });
        Ok(PostgresStore {
            group_commit: ingest::GroupCommit::spawn(pool.clone()),
            group_complete: finish::GroupComplete::spawn(pool.clone()),
            pool,
            shown: settings.shown.clone(),
            wake,
            _listener: stop.drop_guard(),
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(pool_error(&e)))
    }
}

fn unavailable(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

/// Runs `request` (a statement's future, made but not yet polled) in a
/// transaction that commits without waiting for its WAL flush
/// (`synchronous_commit = off`): SQLite's `Durability::Committed` here, and
/// for the same records, those whose loss only repeats work (a claim, a
/// renewal, an attempt's outcome, a poll, a purge). relay's own crash takes none of
/// them back; a crash of the database server may take back its last
/// fraction of a second (three `wal_writer_delay`s at most), and the next
/// flushed commit makes them durable with it. BEGIN, the request and COMMIT
/// go down the connection together (tokio-postgres sends a request when it
/// is first polled, and `join!` polls in order): one round trip, as the
/// request alone was. A failed request leaves the transaction aborted, and
/// the COMMIT then rolls it back.
async fn unsynced<T>(
    client: &Object,
    request: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    begun_with(client, "BEGIN; SET LOCAL synchronous_commit = off", request).await
}

/// [`unsynced`], its transaction begun with `begin` (which says BEGIN and
/// sets `synchronous_commit = off` itself, and may set more).
async fn begun_with<T>(
    client: &Object,
    begin: &'static str,
    request: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    let (began, answer, committed) = tokio::join!(
        client.batch_execute(begin),
        request,
        client.batch_execute("COMMIT"),
    );
    began.map_err(|e| unavailable(&e))?;
    let answer = answer.map_err(|e| unavailable(&e))?;
    committed.map_err(|e| unavailable(&e))?;
    Ok(answer)
}

/// A column read that reports a type surprise instead of panicking.
fn col<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| StoreError::Corrupt(describe(&e)))
}

/// The moment `sql` selects beside the database's `now()`, on the caller's
/// clock, whose reading is `now`: when the caller is to wake up. A moment
/// already past reads as `now`.
async fn next_moment(
    store: &PostgresStore,
    operation: &'static str,
    sql: &'static str,
    now: SystemTime,
) -> Result<Option<SystemTime>, StoreError> {
    connect::within(operation, connect::OPERATION_TIMEOUT, async {
        let client = store.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(|e| unavailable(&e))?;
        let row = client.query_one(&stmt, &[]).await.map_err(|e| unavailable(&e))?;
        let next: Option<SystemTime> = col(&row, 0)?;
        let db_now: SystemTime = col(&row, 1)?;
        Ok(next.map(|t| now + t.duration_since(db_now).unwrap_or(Duration::ZERO)))
    })
    .await
}

/// `t - base` in microseconds, signed and bounded: the form in which a
/// caller's time reaches the database (`now() + offset`).
fn offset(t: SystemTime, base: SystemTime) -> i64 {
    match t.duration_since(base) {
        Ok(ahead) => micros(ahead),
        Err(behind) => -micros(behind.duration()),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_OFFSET_MICROS)
}

/// A database time as the caller's clock reads it: `caller_now` stands for
/// `db_now`.
fn on_caller_clock(t: SystemTime, db_now: SystemTime, caller_now: SystemTime) -> SystemTime {
    match t.duration_since(db_now) {
        Ok(ahead) => caller_now + ahead,
        Err(behind) => caller_now.checked_sub(behind.duration()).unwrap_or(caller_now),
    }
}

/// PostgreSQL's columns in their native types; a column of another type
/// than expected is reported as corrupt data.
impl Columns for Row {
    fn uuid(&self, index: usize) -> Result<Uuid, StoreError> {
        col(self, index)
    }

    fn id(&self, index: usize) -> Result<String, StoreError> {
        Ok(col::<Uuid>(self, index)?.to_string())
    }

    fn maybe_id(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(col::<Option<Uuid>>(self, index)?.map(|id| id.to_string()))
    }

    fn text(&self, index: usize) -> Result<String, StoreError> {
        col(self, index)
    }

    fn maybe_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        col(self, index)
    }

    fn number(&self, index: usize) -> Result<u32, StoreError> {
        Ok(u32::try_from(col::<i32>(self, index)?).unwrap_or(0))
    }

    fn count(&self, index: usize) -> Result<u32, StoreError> {
        Ok(u32::try_from(col::<i64>(self, index)?).unwrap_or(0))
    }

    fn millis(&self, index: usize) -> Result<u64, StoreError> {
        Ok(u64::try_from(col::<i64>(self, index)?).unwrap_or(0))
    }

    fn status(&self, index: usize) -> Result<Option<u16>, StoreError> {
        Ok(col::<Option<i32>>(self, index)?.and_then(|s| u16::try_from(s).ok()))
    }

    fn time(&self, index: usize) -> Result<SystemTime, StoreError> {
        col(self, index)
    }

    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        col(self, index)
    }

    fn maybe_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        col(self, index)
    }

    fn maybe_time(&self, index: usize) -> Result<Option<SystemTime>, StoreError> {
        col(self, index)
    }
}

#[async_trait]
impl Queue for PostgresStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        self.group_commit.ingest(event).await
    }

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        queue::claim(self, target, limit, lease, now).await
    }

    async fn complete(&self, completion: Completion, now: SystemTime) -> Result<bool, StoreError> {
        if finish::GroupComplete::takes(&completion) {
            self.group_complete.complete(completion, now).await
        } else {
            queue::complete(self, completion, now).await
        }
    }

    async fn renew(
        &self,
        job: Uuid,
        claim: Uuid,
        lease: Duration,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        queue::renew(self, job, claim, lease, now).await
    }

    async fn release(&self, job: Uuid, claim: Uuid, now: SystemTime) -> Result<bool, StoreError> {
        queue::release(self, job, claim, now).await
    }

    async fn next_wakeup(&self, now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        queue::next_wakeup(self, now).await
    }

    async fn work_arrived(&self) {
        self.wake.notified().await;
    }

    async fn ping(&self, now: SystemTime) -> Result<(), StoreError> {
        queue::ping(self, now).await
    }

    async fn event_body(&self, id: Uuid) -> Result<Option<(String, Bytes)>, StoreError> {
        views::event_body(self, id).await
    }

    async fn correlate(
        &self,
        pipeline_id: &str,
        pipeline_number: u64,
        state: PipelineState,
        _now: SystemTime,
    ) -> Result<Option<Upstream>, StoreError> {
        queue::correlate(self, pipeline_id, pipeline_number, state).await
    }
}

#[async_trait]
impl Inspect for PostgresStore {
    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobView>, StoreError> {
        views::jobs(self, filter).await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
        views::job(self, id).await
    }

    async fn held_deliveries(
        &self,
        source: &str,
        deliveries: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        views::held_deliveries(self, source, deliveries).await
    }

    async fn shadow_jobs(&self, filter: ShadowFilter) -> Result<Vec<JobView>, StoreError> {
        views::shadow_jobs(self, filter).await
    }

    async fn events(&self, filter: EventFilter, now: SystemTime) -> Result<Vec<EventView>, StoreError> {
        views::events(self, filter, now).await
    }

    async fn event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        views::event(self, id).await
    }

    async fn activity(
        &self,
        sources: Vec<String>,
        targets: Vec<String>,
        since: SystemTime,
        now: SystemTime,
    ) -> Result<Activity, StoreError> {
        views::activity(self, sources, targets, since, now).await
    }

    async fn queue_stats(&self, now: SystemTime) -> Result<QueueStats, StoreError> {
        views::queue_stats(self, now).await
    }

    async fn requeue(&self, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError> {
        views::requeue(self, id, now).await
    }

    async fn requeue_dead(
        &self,
        target: &str,
        since: SystemTime,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        views::requeue_dead(self, target, since, until, now).await
    }
}

#[async_trait]
impl Polls for PostgresStore {
    async fn due_polls(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        _now: SystemTime,
    ) -> Result<Vec<DuePoll>, StoreError> {
        polls::due_polls(self, target, limit, lease).await
    }

    async fn record_poll(&self, poll: PollRecord, _now: SystemTime) -> Result<bool, StoreError> {
        polls::record_poll(self, poll).await
    }

    async fn next_poll(&self, now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        polls::next_poll(self, now).await
    }
}

#[async_trait]
impl Maintain for PostgresStore {
    async fn purge(&self, before: SystemTime, now: SystemTime, limit: usize) -> Result<u64, StoreError> {
        views::purge(self, before, now, limit).await
    }

    async fn forget_dedupe_keys(&self, _now: SystemTime, limit: usize) -> Result<ForgottenKeys, StoreError> {
        // The server's clock decides, as it did when the key was taken.
        views::forget_dedupe_keys(self, limit).await
    }
}
