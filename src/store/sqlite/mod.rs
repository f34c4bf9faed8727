//! The embedded store: one SQLite file in WAL mode. A webhook's commit is
//! on disk (`synchronous=FULL`) before its sender hears back.
//!
//! One writer task owns the connection. It takes every operation that is
//! waiting, runs them in one transaction on tokio's blocking pool and commits
//! once: concurrent webhooks share an fsync, and each caller hears back only
//! after its own data is durable. Should one operation fail, the batch runs
//! again with each in its own savepoint, so one failure spoils nothing else.
//! Claims, renewals and attempt records are answered once committed and put
//! on disk within `MAX_UNSYNCED` (see [`Durability`]); event bodies are stored
//! LZ4-compressed where that pays. A lock file keeps a second relay off the
//! same database. Times come from the caller: the store decides nothing by a
//! clock of its own (the writer's clock only times its own syncs). What a
//! person reads (the admin API, the pages, `/metrics`) runs on read-only
//! connections beside the writer, so a long read never holds a commit.
//!
//! The folder, by concern: `schema` (migrations, connection settings, the
//! lock file), `writer` (the group commit and its durability), `queue`
//! (the delivery path's SQL), `dedupe` (the loop
//! guard's keys: an index off the file, a log on it), `views` (what a
//! person reads, the manual retries, retention), `reader` (the read-only
//! connections). This file opens the store,
//! says how a column reads (ids as text, times as milliseconds) and wires
//! the role traits to the rest.
//!
//! What this module must never do: answer a caller before its work is
//! committed (and, for what a sender or a person is told, synced), let a
//! second relay use the same file, or decide by a clock of its own.

mod dedupe;
#[cfg(test)]
mod pipeline_cost;
mod polls;
mod queue;
#[cfg(test)]
mod queue_cost;
mod reader;
mod reports;
mod schema;
mod shelf;
mod tally;
mod views;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, Params, Row, Statement};
use tracing::info;
use uuid::Uuid;

use reader::Readers;
pub(crate) use schema::{SCHEMA_VERSION, schema_status};
use tally::Tx;
#[cfg(feature = "bench")]
pub use writer::MAX_BATCH;
#[cfg(not(feature = "bench"))]
use writer::MAX_BATCH;
use writer::{Durability, Writer};

use super::codec;
use super::rows::Columns;
use super::{
    Activity, ClaimedJob, Completion, DuePoll, EventFilter, EventView, ForgottenKeys, Ingested, Inspect,
    JobDetail, JobFilter, JobView, Maintain, NewEvent, PollRecord, Polls, Queue, QueueStats, Requeued,
    ShadowFilter, StoreError, StoredEvent,
};
use crate::event::Upstream;
use crate::pipeline::PipelineState;

/// The SQLite store. Cheap to share: it is a channel to the writer task.
#[derive(Debug)]
pub struct SqliteStore {
    writer: Writer,
    /// What a person reads runs here, beside the writer.
    readers: Readers,
    /// Held open for the store's life: the OS lock on it is what keeps a
    /// second relay from dispatching the same jobs.
    _lock: File,
    path: PathBuf,
    /// Where the retention purge's sweep of dedupe keys goes on from.
    dedupe_sweep: Mutex<dedupe::SweepFrom>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, takes its lock, and puts any
    /// job a previous run left in flight back in the queue. `now` is the
    /// caller's clock as it opens the store: the loop guard's dedupe keys
    /// closed by then are not read back.
    pub fn open(path: &Path, now: SystemTime) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_batched(path, MAX_BATCH, now)
    }

    /// As [`SqliteStore::open`], with at most `max_batch` operations per
    /// transaction; 1 turns group commit off (one fsync per operation), which
    /// the benchmark uses as its baseline.
    #[cfg(feature = "bench")]
    pub fn open_with_batch(
        path: &Path,
        max_batch: usize,
        now: SystemTime,
    ) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_batched(path, max_batch, now)
    }

    fn open_batched(path: &Path, max_batch: usize, now: SystemTime) -> Result<SqliteStore, StoreError> {
        let open_error = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        let lock = schema::lock(path).map_err(open_error)?;
        let mut conn = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        let file = file_identity(path).map_err(|e| open_error(e.to_string()))?;
        schema::prepare(&mut conn, now).map_err(open_error)?;
        // The lock proves no other process holds these jobs: whatever was in
        // flight belonged to a run that is gone.
        let recovered = conn
            .transaction()
            .map_err(|e| open_error(e.to_string()))
            .and_then(|tx| {
                let recovered = queue::recover(&tx).map_err(|e| open_error(e.to_string()))?;
                tx.commit().map_err(|e| open_error(e.to_string()))?;
                Ok(recovered)
            })?;
        if recovered > 0 {
            info!(
                jobs = recovered,
                "jobs left in flight by the previous run are queued again"
            );
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| open_error("the store must be opened inside a tokio runtime".to_owned()))?;
        Ok(SqliteStore {
            writer: Writer::spawn(&runtime, conn, max_batch, still_in_place(path.to_owned(), file)),
            readers: Readers::new(path),
            _lock: lock,
            path: path.to_owned(),
            dedupe_sweep: Mutex::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` inside the writer's next batch (see [`Writer::run`]).
    async fn run<T: Send + 'static>(
        &self,
        durability: Durability,
        work: impl FnMut(&Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer.run(durability, work).await
    }

    /// Runs `work`, which only reads, on a read-only connection beside the
    /// writer (see [`Readers`]).
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.readers.read(work).await
    }
}

/// Whether the database file at `path` is still the one relay opened (its
/// device and inode were `opened`): a file removed or replaced under a
/// running relay would take what it acknowledges with it. One `stat` per
/// batch with synced work, in the writer (see [`writer::Precondition`]).
fn still_in_place(path: PathBuf, opened: (u64, u64)) -> writer::Precondition {
    Arc::new(move || match file_identity(&path) {
        Ok(file) if file == opened => Ok(()),
        _ => Err(StoreError::Unavailable(format!(
            "the store file {} was removed or replaced while relay runs; nothing more is acknowledged until it is back, or relay is restarted on a new one",
            path.display()
        ))),
    })
}

fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

fn unavailable(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn parse_uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad id {text:?}: {e}")))
}

/// Milliseconds since the Unix epoch, SQLite's time unit.
fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Every row a statement returns, each made by `make`.
fn collect<T>(
    stmt: &mut Statement<'_>,
    params: impl Params,
    mut make: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(|e| unavailable(&e))?;
    let mut made = Vec::new();
    while let Some(row) = rows.next().map_err(|e| unavailable(&e))? {
        made.push(make(row)?);
    }
    Ok(made)
}

/// SQLite's columns: ids as text, times as milliseconds; a column that
/// does not read is reported as the database being unavailable.
impl Columns for Row<'_> {
    fn uuid(&self, index: usize) -> Result<Uuid, StoreError> {
        parse_uuid(&self.text(index)?)
    }

    fn id(&self, index: usize) -> Result<String, StoreError> {
        self.text(index)
    }

    fn maybe_id(&self, index: usize) -> Result<Option<String>, StoreError> {
        self.maybe_text(index)
    }

    fn text(&self, index: usize) -> Result<String, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn maybe_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn number(&self, index: usize) -> Result<u32, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn count(&self, index: usize) -> Result<u32, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn millis(&self, index: usize) -> Result<u64, StoreError> {
        let ms: i64 = self.get(index).map_err(|e| unavailable(&e))?;
        Ok(u64::try_from(ms).unwrap_or(0))
    }

    fn status(&self, index: usize) -> Result<Option<u16>, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn time(&self, index: usize) -> Result<SystemTime, StoreError> {
        Ok(from_millis(self.get(index).map_err(|e| unavailable(&e))?))
    }

    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn maybe_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        self.get(index).map_err(|e| unavailable(&e))
    }

    fn maybe_time(&self, index: usize) -> Result<Option<SystemTime>, StoreError> {
        let ms: Option<i64> = self.get(index).map_err(|e| unavailable(&e))?;
        Ok(ms.map(from_millis))
    }
}

#[async_trait]
impl Queue for SqliteStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        // Compressed here, on the caller's task: the writer is one thread
        // for every caller.
        let packed = codec::pack(&event);
        self.run(Durability::Synced, move |conn| {
            queue::ingest(conn, &event, &packed)
        })
        .await
    }

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let target = target.to_owned();
        self.run(Durability::Committed, move |conn| {
            queue::claim(conn, &target, limit, lease, now)
        })
        .await
    }

    async fn complete(&self, completion: Completion, _now: SystemTime) -> Result<bool, StoreError> {
        // Times are stored as given, on the caller's clock: nothing to translate.
        self.run(Durability::Committed, move |conn| {
            queue::complete(conn, &completion)
        })
        .await
    }

    async fn renew(
        &self,
        job: Uuid,
        claim: Uuid,
        lease: Duration,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        // Losing a renewal to a power cut costs nothing: the process that
        // held the lease is gone with it.
        self.run(Durability::Committed, move |conn| {
            queue::renew(conn, job, claim, now + lease)
        })
        .await
    }

    async fn release(&self, job: Uuid, claim: Uuid, now: SystemTime) -> Result<bool, StoreError> {
        // Lost to a power cut, the job waits out its lease instead.
        self.run(Durability::Committed, move |conn| {
            queue::release(conn, job, claim, now)
        })
        .await
    }

    async fn next_wakeup(&self, _now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        // Stored times were the caller's clock already.
        self.run(Durability::Committed, |tx| queue::next_wakeup(tx)).await
    }

    async fn ping(&self, now: SystemTime) -> Result<(), StoreError> {
        self.run(Durability::Synced, move |conn| queue::ping(conn, now))
            .await
    }

    async fn event_body(&self, id: Uuid) -> Result<Option<(String, Bytes)>, StoreError> {
        let stored = self.read(move |conn| views::event_body(conn, id)).await?;
        // Decompressed here, off the writer.
        stored
            .map(|(content_type, body, codec)| Ok((content_type, codec::Codec::of(codec)?.unpack(body)?)))
            .transpose()
    }

    async fn correlate(
        &self,
        pipeline_id: &str,
        pipeline_number: u64,
        state: PipelineState,
        now: SystemTime,
    ) -> Result<Option<Upstream>, StoreError> {
        let pipeline_id = pipeline_id.to_owned();
        self.run(Durability::Committed, move |conn| {
            queue::correlate(conn, &pipeline_id, pipeline_number, state, now)
        })
        .await
    }
}

#[async_trait]
impl Inspect for SqliteStore {
    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobView>, StoreError> {
        self.read(move |conn| views::jobs(conn, &filter)).await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
        self.read(move |conn| views::job(conn, id)).await
    }

    async fn held_deliveries(
        &self,
        source: &str,
        deliveries: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        let source = source.to_owned();
        self.read(move |conn| views::held_deliveries(conn, &source, &deliveries))
            .await
    }

    async fn shadow_jobs(&self, filter: ShadowFilter) -> Result<Vec<JobView>, StoreError> {
        self.read(move |conn| views::shadow_jobs(conn, &filter)).await
    }

    async fn events(&self, filter: EventFilter, _now: SystemTime) -> Result<Vec<EventView>, StoreError> {
        // Stored times were the caller's clock already.
        self.read(move |conn| views::events(conn, &filter)).await
    }

    async fn event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        let stored = self.read(move |conn| views::event(conn, id)).await?;
        // Decompressed here, off the writer.
        let Some((view, content_type, hop, body, payload, codec)) = stored else {
            return Ok(None);
        };
        let codec = codec::Codec::of(codec)?;
        Ok(Some(StoredEvent {
            view,
            content_type,
            hop,
            body: codec.unpack(body)?,
            payload: payload.map(|p| codec.unpack(p)).transpose()?,
        }))
    }

    async fn activity(
        &self,
        sources: Vec<String>,
        targets: Vec<String>,
        since: SystemTime,
        _now: SystemTime,
    ) -> Result<Activity, StoreError> {
        self.read(move |conn| views::activity(conn, &sources, &targets, since))
            .await
    }

    async fn queue_stats(&self, now: SystemTime) -> Result<QueueStats, StoreError> {
        self.read(move |conn| views::queue_stats(conn, now)).await
    }

    async fn requeue(&self, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError> {
        self.run(Durability::Synced, move |conn| views::requeue(conn, id, now))
            .await
    }

    async fn requeue_dead(
        &self,
        target: &str,
        since: SystemTime,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let target = target.to_owned();
        self.run(Durability::Synced, move |conn| {
            views::requeue_where(
                conn,
                "target = ?2 AND updated_at >= ?3 AND updated_at <= ?4",
                rusqlite::params![to_millis(now), target, to_millis(since), to_millis(until)],
            )
        })
        .await
    }
}

#[async_trait]
impl Polls for SqliteStore {
    async fn due_polls(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Vec<DuePoll>, StoreError> {
        let target = target.to_owned();
        self.run(Durability::Committed, move |conn| {
            polls::due_polls(conn, &target, limit, lease, now)
        })
        .await
    }

    async fn record_poll(&self, poll: PollRecord, now: SystemTime) -> Result<bool, StoreError> {
        self.run(Durability::Committed, move |conn| {
            polls::record_poll(conn, &poll, now)
        })
        .await
    }

    async fn next_poll(&self, _now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        // Stored times were the caller's clock already.
        self.run(Durability::Committed, |tx| polls::next_poll(tx)).await
    }
}

#[async_trait]
impl Maintain for SqliteStore {
    async fn purge(&self, before: SystemTime, _now: SystemTime, limit: usize) -> Result<u64, StoreError> {
        // A purge a power cut takes back is done again: it need not wait
        // for the disk.
        self.run(Durability::Committed, move |conn| {
            views::purge(conn, before, limit)
        })
        .await
    }

    async fn forget_dedupe_keys(&self, now: SystemTime, limit: usize) -> Result<ForgottenKeys, StoreError> {
        let from = self
            .dedupe_sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Forgetting a key a power cut takes back is done again.
        let (batch, next) = self
            .run(Durability::Committed, move |conn| {
                dedupe::forget(conn, now, limit, &from)
            })
            .await?;
        // Moved on only once the batch is committed: a failed one is looked
        // at again.
        *self.dedupe_sweep.lock().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::queue_cost::Counter;
    use super::*;
    use crate::store::JobState;

    /// A state change moves the kept counts with two one-row updates by key.
    /// One statement over both rows (`WHERE state IN (?1, ?2)`) costs SQLite a
    /// temporary table of the list's keys on every call: more than the two.
    #[test]
    fn moving_a_count_costs_two_one_row_updates() {
        let counter = Counter::new();
        let moved = || {
            counter.count(|conn| {
                Tx::immediate(conn)
                    .count_moved(JobState::Queued, JobState::InFlight, 3)
                    .unwrap()
            })
        };
        let added = || counter.count(|conn| Tx::immediate(conn).count_inserted(JobState::Queued, 3).unwrap());
        // The first calls prepare and cache the statements.
        moved();
        added();
        let (moved, added) = (moved(), added());
        assert!(
            moved <= 2 * added,
            "moving a count took {moved} SQLite instructions, adding to one {added}"
        );
    }
}
