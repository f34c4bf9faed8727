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
//! same database. Times come from the caller; the store reads no clock of its
//! own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use uuid::Uuid;

use super::{
    AttemptView, ClaimedJob, Completion, EventView, HeldBack, Ingested, JobDetail, JobFilter, JobState,
    JobView, NewEvent, NewJob, NextState, QueueStats, Requeued, Store, StoreError, from_millis, to_millis,
};
use crate::guard::{Check, Dropped};
use crate::request::PreparedRequest;

/// Operations waiting beyond this are left for the next transaction, which
/// bounds how long the first caller of a batch waits.
pub const MAX_BATCH: usize = 512;

/// The schema, one migration per version, applied in order; `user_version`
/// records how far a database has come. Never edit a released entry: add one.
const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

const V1: &str = "
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    delivery     TEXT,
    hook         TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    body         BLOB NOT NULL,
    payload      BLOB,
    hop          INTEGER NOT NULL,
    summary      TEXT NOT NULL,
    UNIQUE (source, delivery)
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    event_id       TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route          TEXT NOT NULL,
    target         TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('queued', 'in_flight', 'done', 'dead')),
    request        TEXT,
    needs_payload  INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    maybe_attempts INTEGER NOT NULL DEFAULT 0,
    due_at         INTEGER NOT NULL,
    claim_id       TEXT,
    lease_until    INTEGER,
    last_error     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX jobs_due ON jobs (target, state, due_at);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE TABLE attempts (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    outcome     TEXT NOT NULL,
    excerpt     TEXT NOT NULL,
    PRIMARY KEY (job_id, number)
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The loop guard's memory: drops by rule, dedupe keys, and the index the
/// burst count reads.
const V2: &str = "
CREATE TABLE drops (
    event_id TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route    TEXT,
    target   TEXT,
    rule     TEXT NOT NULL,
    reason   TEXT NOT NULL
);
CREATE INDEX drops_event ON drops (event_id);
CREATE TABLE dedupe (
    target     TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (target, key)
);
CREATE INDEX jobs_created ON jobs (target, created_at);
";

/// Indexes over pending jobs only: claims and the dispatcher's wake-up
/// read these, and they stay small however much history the table holds.
/// (Every index costs each job a write; none is kept that only a metrics
/// scrape would read.)
const V3: &str = "
DROP INDEX jobs_due;
CREATE INDEX jobs_queued ON jobs (target, due_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (target, lease_until) WHERE state = 'in_flight';
";

/// Event bodies may be stored compressed; `codec` says how (see [`Codec`]).
/// Rows written before it are plain.
const V4: &str = "
ALTER TABLE events ADD COLUMN codec INTEGER NOT NULL DEFAULT 0;
";

/// `jobs.state`'s check as comparisons: SQLite evaluates `state IN (four
/// values)` by building a temporary b-tree of the list on every insert and
/// every state change (a tenth of the store's CPU time under load). A
/// CHECK cannot be altered, so the table is rebuilt, as SQLite's manual
/// describes (foreign keys are off while migrations run).
const V5: &str = "
CREATE TABLE jobs_v5 (
    id             TEXT PRIMARY KEY,
    event_id       TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route          TEXT NOT NULL,
    target         TEXT NOT NULL,
    state          TEXT NOT NULL
                   CHECK (state = 'queued' OR state = 'in_flight' OR state = 'done' OR state = 'dead'),
    request        TEXT,
    needs_payload  INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    maybe_attempts INTEGER NOT NULL DEFAULT 0,
    due_at         INTEGER NOT NULL,
    claim_id       TEXT,
    lease_until    INTEGER,
    last_error     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
INSERT INTO jobs_v5 (id, event_id, route, target, state, request, needs_payload, attempts, maybe_attempts,
                     due_at, claim_id, lease_until, last_error, created_at, updated_at)
    SELECT id, event_id, route, target, state, request, needs_payload, attempts, maybe_attempts,
           due_at, claim_id, lease_until, last_error, created_at, updated_at
    FROM jobs ORDER BY rowid;
DROP TABLE jobs;
ALTER TABLE jobs_v5 RENAME TO jobs;
CREATE INDEX jobs_event ON jobs (event_id);
CREATE INDEX jobs_created ON jobs (target, created_at);
CREATE INDEX jobs_queued ON jobs (target, due_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (target, lease_until) WHERE state = 'in_flight';
";

/// How an event's `body` and `payload` columns hold the bytes. Webhook JSON
/// compresses three to eight times, and the bytes a webhook writes (to the
/// WAL, then again at the checkpoint, and the fsync over them) were a third
/// of the store's CPU time; LZ4 costs a few microseconds for a 7 KB push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Plain = 0,
    /// LZ4 block format, with the plain length in front.
    Lz4 = 1,
}

impl Codec {
    /// Bodies below this are stored as they are: nothing worth saving.
    const MIN_LEN: usize = 512;

    fn of(stored: i64) -> Result<Codec, StoreError> {
        match stored {
            0 => Ok(Codec::Plain),
            1 => Ok(Codec::Lz4),
            other => Err(StoreError::Corrupt(format!(
                "an event body is stored with codec {other}, which this relay does not know; run a newer relay"
            ))),
        }
    }

    /// Undoes what [`pack`] did to a column.
    fn unpack(self, stored: Vec<u8>) -> Result<Bytes, StoreError> {
        match self {
            Codec::Plain => Ok(Bytes::from(stored)),
            Codec::Lz4 => lz4_flex::block::decompress_size_prepended(&stored)
                .map(Bytes::from)
                .map_err(|e| {
                    StoreError::Corrupt(format!("a compressed event body does not decompress: {e}"))
                }),
        }
    }
}

/// An event's body and JSON payload as the columns hold them.
struct Packed {
    codec: Codec,
    body: Bytes,
    payload: Option<Bytes>,
}

/// Compresses the body (and the payload of a form post) when that saves a
/// quarter or more; otherwise stores them as received.
fn pack(event: &NewEvent) -> Packed {
    let plain = || Packed {
        codec: Codec::Plain,
        body: event.body.clone(),
        payload: event.payload.clone(),
    };
    if event.body.len() < Codec::MIN_LEN {
        return plain();
    }
    let body = lz4_flex::block::compress_prepend_size(&event.body);
    if body.len() > event.body.len() / 4 * 3 {
        return plain();
    }
    Packed {
        codec: Codec::Lz4,
        body: Bytes::from(body),
        payload: event
            .payload
            .as_ref()
            .map(|p| Bytes::from(lz4_flex::block::compress_prepend_size(p))),
    }
}

/// The SQLite store. Cheap to share: it is a channel to the writer task.
#[derive(Debug)]
pub struct SqliteStore {
    operations: mpsc::Sender<Operation>,
    /// Held open for the store's life: the OS lock on it is what keeps a
    /// second relay from dispatching the same jobs.
    _lock: File,
    path: PathBuf,
}

/// One operation for the writer, boxed so that every kind of call shares
/// one queue.
type Operation = Box<dyn Pending>;

/// An operation waiting in the writer's queue. It may run twice: when one
/// operation of a batch fails, the whole batch is rolled back and run again
/// with each operation in its own savepoint, so that one failure spoils
/// nothing else. (Savepoints around every operation, always, cost a tenth
/// of ingest's time under load; failures are rare.)
trait Pending: Send {
    /// Does the work; false when it failed (its error is kept for the answer).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Whether the caller may be answered only once the work is on disk.
    fn durable(&self) -> bool;
    /// Answers the caller once the batch's fate is known (`Some` = it failed).
    fn answer(self: Box<Self>, batch_error: Option<StoreError>);
}

/// A closure and the channel its caller waits on.
struct Call<T, F> {
    work: F,
    durable: bool,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Pending for Call<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.work)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn answer(self: Box<Self>, batch_error: Option<StoreError>) {
        let answer = match (batch_error, self.result) {
            (Some(e), _) => Err(e),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Unavailable("the operation did not run".to_owned())),
        };
        // A caller that stopped waiting (its client hung up) is no loss:
        // what was committed stays committed.
        let _ = self.reply.send(answer);
    }
}

/// Whether a caller hears back before or after the fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Answered once the work is on disk: anything a sender or a person
    /// was told happened.
    Synced,
    /// Answered once committed, before the fsync (WAL with
    /// `synchronous=NORMAL`): lost only with the machine, never with the
    /// process, and on disk within [`MAX_UNSYNCED`] (the next synced commit,
    /// or the writer's own sync once idle or once that long has passed).
    /// Only for records whose loss repeats a send: a claim, a renewal, an
    /// attempt's outcome.
    Committed,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, takes its lock, and puts any
    /// job a previous run left in flight back in the queue.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with_batch(path, MAX_BATCH)
    }

    /// As [`SqliteStore::open`], with at most `max_batch` operations per
    /// transaction; 1 turns group commit off (one fsync per operation), which
    /// the benchmark uses as its baseline.
    pub fn open_with_batch(path: &Path, max_batch: usize) -> Result<SqliteStore, StoreError> {
        let open_error = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        let lock_path = lock_path(path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_error(format!("cannot create lock file {}: {e}", lock_path.display())))?;
        lock.try_lock().map_err(|_| {
            open_error(
                "another relay is using this database; each relay needs its own sqlite file (or share a postgres:// store)"
                    .to_owned(),
            )
        })?;
        let mut conn = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        prepare(&mut conn).map_err(open_error)?;
        // The lock proves no other process holds these jobs: whatever was in
        // flight belonged to a run that is gone.
        let recovered = conn
            .execute(
                "UPDATE jobs SET state = 'queued', claim_id = NULL, lease_until = NULL WHERE state = 'in_flight'",
                [],
            )
            .map_err(|e| open_error(e.to_string()))?;
        if recovered > 0 {
            info!(
                jobs = recovered,
                "jobs left in flight by the previous run are queued again"
            );
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| open_error("the store must be opened inside a tokio runtime".to_owned()))?;
        let (operations, receiver) = mpsc::channel(4 * MAX_BATCH);
        runtime.spawn(writer(conn, receiver, max_batch.max(1)));
        Ok(SqliteStore {
            operations,
            _lock: lock,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` inside the writer's next batch; answers once the batch
    /// committed (with `durability`) or with the error that stopped it.
    async fn run<T: Send + 'static>(
        &self,
        durability: Durability,
        work: impl FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            work,
            durable: durability == Durability::Synced,
            result: None,
            reply,
        };
        self.operations
            .send(Box::new(call))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn prepare(conn: &mut Connection) -> Result<(), String> {
    let fail = |e: rusqlite::Error| e.to_string();
    conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    // 16 MiB of page cache: the pending-job indexes and recent pages stay in
    // memory; older history is read from disk only by the admin API.
    conn.pragma_update(None, "cache_size", -16 * 1024).map_err(fail)?;
    // Statement journals stay in memory: on disk they cost a pwrite for
    // every page a batch touches (measured: a quarter of ingest's time).
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(fail)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Plan each cached statement once. Without this, SQLite plans a
    // statement again whenever a newly bound value might change its plan (a
    // bound LIMIT, a partial index's condition): measured at an eighth of
    // relay's CPU time under load.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(fail)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(fail)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(format!(
            "the database has schema version {version}, newer than this relay's {known}; run a newer relay"
        ));
    }
    // Off while migrating (rusqlite's bundled SQLite turns them on by
    // default): rebuilding a table must not cascade deletes through the
    // tables that refer to it.
    conn.pragma_update(None, "foreign_keys", "OFF").map_err(fail)?;
    for (index, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(fail)?;
        tx.execute_batch(migration).map_err(fail)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON").map_err(fail)?;
    Ok(())
}

/// The schema version of the database at `path`, read-only: a running
/// relay's lock is not needed and not disturbed.
pub fn schema_status(path: &Path) -> Result<super::SchemaStatus, StoreError> {
    let latest = MIGRATIONS.len() as u32;
    if !path.exists() {
        return Ok(super::SchemaStatus { version: 0, latest });
    }
    let open_error = |e: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(open_error)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_error)?;
    Ok(super::SchemaStatus {
        version: u32::try_from(version).unwrap_or(0),
        latest,
    })
}

/// How long the writer waits, after committing work it has not synced, for
/// more before it syncs on its own (see [`Durability::Committed`]).
const IDLE_SYNC: Duration = Duration::from_millis(50);

/// The longest unsynced work waits for a sync while the writer stays busy
/// with more of the same: the bound on what a power cut can take back.
const MAX_UNSYNCED: Duration = Duration::from_millis(200);

/// Gathers what is waiting into a batch and runs it on the blocking pool;
/// operations that arrive meanwhile form the next batch. Ends, closing the
/// database, when every handle to the store is gone.
async fn writer(mut conn: Connection, mut operations: mpsc::Receiver<Operation>, max_batch: usize) {
    // Since when committed pages may be only in the OS's cache.
    let mut unsynced_since: Option<std::time::Instant> = None;
    loop {
        let next = if unsynced_since.is_some() {
            tokio::time::timeout(IDLE_SYNC, operations.recv()).await
        } else {
            Ok(operations.recv().await)
        };
        let first = match next {
            Ok(Some(op)) => op,
            Ok(None) => break,
            Err(_idle) => {
                conn = match on_blocking_pool(conn, sync).await {
                    Some((conn, synced)) => {
                        if synced {
                            unsynced_since = None;
                        }
                        conn
                    }
                    None => return,
                };
                continue;
            }
        };
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        take_waiting(&mut operations, &mut batch, max_batch);
        // Let the tasks about to hand in work do so before the batch runs:
        // every batch costs the same fsync and page writes however small,
        // so under load a yield that adds a few operations pays for itself;
        // when nothing else is ready it costs nothing (this task runs again
        // at once).
        while batch.len() < max_batch {
            let before = batch.len();
            tokio::task::yield_now().await;
            take_waiting(&mut operations, &mut batch, max_batch);
            if batch.len() == before {
                break;
            }
        }
        let overdue = unsynced_since.is_some_and(|since| since.elapsed() >= MAX_UNSYNCED);
        let ran = on_blocking_pool(conn, move |conn| {
            let synced_first = overdue && sync(conn);
            (synced_first, run_batch(conn, batch))
        })
        .await;
        conn = match ran {
            Some((conn, (synced_first, committed))) => {
                if synced_first {
                    unsynced_since = None;
                }
                match committed {
                    Some(Durability::Synced) => unsynced_since = None,
                    Some(Durability::Committed) => {
                        unsynced_since.get_or_insert_with(std::time::Instant::now);
                    }
                    None => {}
                }
                conn
            }
            None => return,
        };
    }
    if unsynced_since.is_some() {
        let _ = on_blocking_pool(conn, sync).await;
    }
}

/// Moves what is waiting in the queue into the batch, up to `max_batch`.
fn take_waiting(operations: &mut mpsc::Receiver<Operation>, batch: &mut Vec<Operation>, max_batch: usize) {
    while batch.len() < max_batch {
        match operations.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Runs `work` on the connection on tokio's blocking pool and hands the
/// connection back; `None` when the work panicked (the store is then closed:
/// the callers of that batch saw their reply channels close).
async fn on_blocking_pool<T: Send + 'static>(
    mut conn: Connection,
    work: impl FnOnce(&mut Connection) -> T + Send + 'static,
) -> Option<(Connection, T)> {
    match tokio::task::spawn_blocking(move || {
        let out = work(&mut conn);
        (conn, out)
    })
    .await
    {
        Ok(back) => Some(back),
        Err(e) => {
            error!(error = %e, "store: the writer failed; the store is closed");
            None
        }
    }
}

/// Puts committed pages on disk: a checkpoint syncs the WAL first, in any
/// `synchronous` mode. False if it could not.
fn sync(conn: &mut Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "store: cannot sync the write-ahead log; will try again");
            false
        }
    }
}

fn unavailable(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Runs a batch in one transaction and answers every caller; returns how
/// the batch was committed, or `None` if nothing was.
fn run_batch(conn: &mut Connection, mut batch: Vec<Operation>) -> Option<Durability> {
    let durability = if batch.iter().any(|op| op.durable()) {
        Durability::Synced
    } else {
        Durability::Committed
    };
    // BEGIN, SAVEPOINT, RELEASE and COMMIT all run as cached statements:
    // parsed once, not once per batch and operation.
    let began = set_synchronous(conn, durability).and_then(|()| run_cached(conn, "BEGIN IMMEDIATE"));
    if let Err(e) = began {
        error!(error = %e, "store: cannot begin a transaction");
        for op in batch {
            op.answer(Some(unavailable(&e)));
        }
        return None;
    }
    if !batch.iter_mut().all(|op| op.run(conn)) {
        // Something failed: undo the whole batch and run it again with each
        // operation isolated, so only the failing ones are refused.
        rollback(conn);
        return run_isolated(conn, batch, durability);
    }
    commit(conn, batch, durability)
}

/// The slow path: every operation in its own savepoint.
fn run_isolated(conn: &mut Connection, batch: Vec<Operation>, durability: Durability) -> Option<Durability> {
    if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
        error!(error = %e, "store: cannot begin a transaction");
        for op in batch {
            op.answer(Some(unavailable(&e)));
        }
        return None;
    }
    let mut finished = Vec::with_capacity(batch.len());
    for mut op in batch {
        if let Err(e) = run_cached(conn, "SAVEPOINT op") {
            op.answer(Some(unavailable(&e)));
            continue;
        }
        let keep = op.run(conn);
        let closed = if keep {
            run_cached(conn, "RELEASE op")
        } else {
            run_cached(conn, "ROLLBACK TO op").and_then(|()| run_cached(conn, "RELEASE op"))
        };
        match closed {
            Ok(()) => finished.push(op),
            Err(e) => op.answer(Some(unavailable(&e))),
        }
    }
    commit(conn, finished, durability)
}

/// Commits and answers: each operation with its own result, or all with
/// the commit's error.
fn commit(conn: &mut Connection, batch: Vec<Operation>, durability: Durability) -> Option<Durability> {
    match run_cached(conn, "COMMIT") {
        Ok(()) => {
            for op in batch {
                op.answer(None);
            }
            Some(durability)
        }
        Err(e) => {
            error!(error = %e, "store: commit failed; the batch was rolled back");
            rollback(conn);
            for op in batch {
                op.answer(Some(unavailable(&e)));
            }
            None
        }
    }
}

fn rollback(conn: &Connection) {
    // SQLite may have rolled back already (a full disk, an I/O error).
    if !conn.is_autocommit() {
        let _ = run_cached(conn, "ROLLBACK");
    }
}

/// `synchronous=FULL` makes a commit fsync the WAL; `NORMAL` leaves that to
/// the next synced commit or checkpoint.
fn set_synchronous(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    run_cached(
        conn,
        match durability {
            Durability::Synced => "PRAGMA synchronous = FULL",
            Durability::Committed => "PRAGMA synchronous = NORMAL",
        },
    )
}

fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn ingest(conn: &Connection, event: &NewEvent, packed: &Packed) -> Result<Ingested, StoreError> {
    let received = to_millis(event.received_at);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary, codec)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (source, delivery) DO NOTHING",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                event.id.to_string(),
                event.source,
                event.delivery,
                event.hook,
                received,
                event.content_type,
                &packed.body[..],
                packed.payload.as_deref(),
                event.hop,
                event.summary,
                packed.codec as i64,
            ])
        })
        .map_err(|e| unavailable(&e))?;
    if inserted == 0 {
        let original: String = conn
            .query_row(
                "SELECT id FROM events WHERE source = ?1 AND delivery = ?2",
                params![event.source, event.delivery],
                |row| row.get(0),
            )
            .map_err(|e| unavailable(&e))?;
        return Ok(Ingested::Duplicate(parse_uuid(&original)?));
    }
    for drop in &event.drops {
        insert_drop(conn, &event.id, drop)?;
    }
    let mut insert_job = conn
        .prepare_cached(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                               claim_id, lease_until, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?8, ?8)",
        )
        .map_err(|e| unavailable(&e))?;
    let mut held_back = Vec::new();
    let mut leased = Vec::new();
    for job in &event.jobs {
        if let Some(drop) = hold_back(conn, job, event.received_at)? {
            insert_drop(conn, &event.id, &drop)?;
            held_back.push(HeldBack {
                job_id: job.id,
                dropped: drop,
            });
            continue;
        }
        let super::JobRow {
            state,
            request,
            needs_payload,
            error,
        } = job.row()?;
        insert_job
            .execute(params![
                job.id.to_string(),
                event.id.to_string(),
                job.route,
                job.target,
                state.as_str(),
                request,
                needs_payload,
                received,
                error,
                job.lease.map(|l| l.claim.to_string()),
                job.lease.map(|l| to_millis(l.until)),
            ])
            .map_err(|e| unavailable(&e))?;
        leased.extend(job.leased(event));
    }
    Ok(Ingested::Accepted { held_back, leased })
}

/// The loop guard's store-side checks, in the guard's order; `Some` when
/// one holds the job back.
fn hold_back(conn: &Connection, job: &NewJob, now: SystemTime) -> Result<Option<Dropped>, StoreError> {
    let trigger = job.trigger();
    for check in job.limits.checks() {
        let held = match check {
            Check::Burst { limit, per } => {
                let recent: i64 = conn
                    .prepare_cached(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE target = ?1 AND created_at > ?2 LIMIT ?3)",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_row(
                            params![
                                job.target,
                                to_millis(now.checked_sub(per).unwrap_or(now)),
                                i64::from(limit)
                            ],
                            |r| r.get(0),
                        )
                    })
                    .map_err(|e| unavailable(&e))?;
                trigger.burst(recent, limit, per)
            }
            Check::Dedupe { key, window } => {
                let taken = conn
                    .prepare_cached(
                        "INSERT INTO dedupe (target, key, expires_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (target, key) DO UPDATE SET expires_at = excluded.expires_at
                         WHERE dedupe.expires_at <= ?4",
                    )
                    .and_then(|mut stmt| {
                        stmt.execute(params![job.target, key, to_millis(now + window), to_millis(now)])
                    })
                    .map_err(|e| unavailable(&e))?;
                trigger.dedupe(taken > 0, window)
            }
        };
        if held.is_some() {
            return Ok(held);
        }
    }
    Ok(None)
}

fn insert_drop(conn: &Connection, event: &Uuid, drop: &Dropped) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO drops (event_id, route, target, rule, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            event.to_string(),
            drop.route,
            drop.target,
            drop.rule,
            drop.reason
        ])
    })
    .map(|_| ())
    .map_err(|e| unavailable(&e))
}

fn claim(
    conn: &Connection,
    target: &str,
    limit: usize,
    lease: Duration,
    now: SystemTime,
) -> Result<Vec<ClaimedJob>, StoreError> {
    let claim = Uuid::now_v7();
    // Expired leases first (a worker died holding them), then due jobs, each
    // walking its own partial index in order and stopping at the limit.
    let mut rows = Vec::new();
    for sql in [
        "UPDATE jobs SET state = 'in_flight', claim_id = ?1, lease_until = ?2, updated_at = ?3
         WHERE rowid IN (
             SELECT rowid FROM jobs
             WHERE state = 'in_flight' AND lease_until <= ?3 AND target = ?4
             ORDER BY lease_until LIMIT ?5)
         RETURNING id, event_id, route, target, attempts, maybe_attempts, request, needs_payload",
        "UPDATE jobs SET state = 'in_flight', claim_id = ?1, lease_until = ?2, updated_at = ?3
         WHERE rowid IN (
             SELECT rowid FROM jobs
             WHERE target = ?4 AND state = 'queued' AND due_at <= ?3
             ORDER BY due_at LIMIT ?5)
         RETURNING id, event_id, route, target, attempts, maybe_attempts, request, needs_payload",
    ] {
        let wanted = limit.saturating_sub(rows.len());
        if wanted == 0 {
            break;
        }
        let mut stmt = conn.prepare_cached(sql).map_err(|e| unavailable(&e))?;
        let claimed = stmt
            .query_map(
                params![
                    claim.to_string(),
                    to_millis(now + lease),
                    to_millis(now),
                    target,
                    i64::try_from(wanted).unwrap_or(i64::MAX)
                ],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, u32>(4)?,
                        row.get::<_, u32>(5)?,
                        row.get::<_, Option<String>>(6)?,
                        row.get::<_, bool>(7)?,
                    ))
                },
            )
            .map_err(|e| unavailable(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unavailable(&e))?;
        rows.extend(claimed);
    }
    let mut payload_of = conn
        .prepare_cached("SELECT COALESCE(payload, body), codec FROM events WHERE id = ?1")
        .map_err(|e| unavailable(&e))?;
    let mut jobs = Vec::with_capacity(rows.len());
    for (id, event_id, route, target, attempts, maybe_attempts, request, needs_payload) in rows {
        let request: PreparedRequest = request
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?
            .ok_or_else(|| StoreError::Corrupt(format!("job {id} is queued without a request")))?;
        let payload = if needs_payload {
            payload_of
                .query_row(params![event_id], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()
                .map_err(|e| unavailable(&e))?
                .map(|(stored, codec)| Codec::of(codec)?.unpack(stored))
                .transpose()?
        } else {
            None
        };
        jobs.push(ClaimedJob {
            id: parse_uuid(&id)?,
            event_id: parse_uuid(&event_id)?,
            route,
            target,
            attempts,
            maybe_attempts,
            claim,
            request,
            payload,
        });
    }
    Ok(jobs)
}

fn complete(conn: &Connection, c: &Completion) -> Result<bool, StoreError> {
    let now = to_millis(c.at);
    let (state, due_at, maybe, error) = match &c.next {
        NextState::Done => (JobState::Done, now, 0, None),
        NextState::Retry {
            due_at,
            maybe_delivered,
        } => (
            JobState::Queued,
            to_millis(*due_at),
            i64::from(*maybe_delivered),
            Some(c.attempt.excerpt.as_str()),
        ),
        NextState::Dead { reason } => (JobState::Dead, now, 0, Some(reason.as_str())),
    };
    let updated = conn
        .prepare_cached(
            "UPDATE jobs SET state = ?1, attempts = attempts + 1, maybe_attempts = maybe_attempts + ?2,
                 due_at = ?3, claim_id = NULL, lease_until = NULL, last_error = ?4, updated_at = ?5
             WHERE id = ?6 AND claim_id = ?7 AND state = 'in_flight'",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                state.as_str(),
                maybe,
                due_at,
                error,
                now,
                c.job_id.to_string(),
                c.claim.to_string()
            ])
        })
        .map_err(|e| unavailable(&e))?;
    if updated == 0 {
        return Ok(false);
    }
    // Numbered across manual retries, which reset the job's own counter.
    conn.prepare_cached(
        "INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
         VALUES (?1, (SELECT COALESCE(MAX(number), 0) + 1 FROM attempts WHERE job_id = ?1), ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            c.job_id.to_string(),
            to_millis(c.attempt.started_at),
            i64::try_from(c.attempt.duration.as_millis()).unwrap_or(i64::MAX),
            c.attempt.status,
            c.attempt.outcome,
            c.attempt.excerpt,
        ])
    })
    .map_err(|e| unavailable(&e))?;
    Ok(true)
}

fn next_wakeup(conn: &Connection) -> Result<Option<SystemTime>, StoreError> {
    conn.prepare_cached(
        "SELECT MIN(t) FROM (
             SELECT MIN(due_at) AS t FROM jobs WHERE state = 'queued'
             UNION ALL
             SELECT MIN(lease_until) FROM jobs WHERE state = 'in_flight')",
    )
    .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, Option<i64>>(0)))
    .map(|t| t.map(from_millis))
    .map_err(|e| unavailable(&e))
}

const JOB_COLUMNS: &str = "id, event_id, route, target, state, attempts, last_error, created_at, updated_at, due_at, request IS NOT NULL";

fn job_view(row: &Row<'_>) -> rusqlite::Result<JobView> {
    let state: String = row.get(4)?;
    Ok(JobView {
        id: row.get(0)?,
        event_id: row.get(1)?,
        route: row.get(2)?,
        target: row.get(3)?,
        state: JobState::parse(&state).unwrap_or(JobState::Dead),
        attempts: row.get(5)?,
        last_error: row.get(6)?,
        created_at: from_millis(row.get(7)?),
        updated_at: from_millis(row.get(8)?),
        due_at: from_millis(row.get(9)?),
        retryable: row.get(10)?,
    })
}

fn jobs(conn: &Connection, filter: &JobFilter) -> Result<Vec<JobView>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR target = ?2) AND (?3 IS NULL OR event_id = ?3)
         ORDER BY updated_at DESC, id DESC
         LIMIT ?4"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| unavailable(&e))?;
    let rows = stmt
        .query_map(
            params![
                filter.state.map(JobState::as_str),
                filter.target,
                filter.event.map(|e| e.to_string()),
                i64::try_from(filter.limit).unwrap_or(i64::MAX)
            ],
            job_view,
        )
        .map_err(|e| unavailable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    Ok(rows)
}

fn job(conn: &Connection, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS}, request FROM jobs WHERE id = ?1");
    let found = conn
        .query_row(&sql, params![id.to_string()], |row| {
            Ok((job_view(row)?, row.get::<_, Option<String>>(11)?))
        })
        .optional()
        .map_err(|e| unavailable(&e))?;
    let Some((view, request)) = found else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT number, started_at, duration_ms, status, outcome, excerpt
             FROM attempts WHERE job_id = ?1 ORDER BY number",
        )
        .map_err(|e| unavailable(&e))?;
    let attempts = stmt
        .query_map(params![id.to_string()], |row| {
            Ok(AttemptView {
                number: row.get(0)?,
                started_at: from_millis(row.get(1)?),
                duration_ms: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                status: row.get(3)?,
                outcome: row.get(4)?,
                excerpt: row.get(5)?,
            })
        })
        .map_err(|e| unavailable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    Ok(Some(JobDetail {
        job: view,
        request: request.and_then(|r| serde_json::from_str(&r).ok()),
        history: attempts,
    }))
}

fn events(conn: &Connection, limit: usize) -> Result<Vec<EventView>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT e.id, e.source, e.delivery, e.hook, e.received_at, e.summary,
                    COUNT(j.id),
                    COALESCE(SUM(j.state IN ('queued', 'in_flight')), 0),
                    COALESCE(SUM(j.state = 'done'), 0),
                    COALESCE(SUM(j.state = 'dead'), 0)
             FROM events e LEFT JOIN jobs j ON j.event_id = e.id
             GROUP BY e.id
             ORDER BY e.received_at DESC, e.id DESC
             LIMIT ?1",
        )
        .map_err(|e| unavailable(&e))?;
    let rows = stmt
        .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            Ok(EventView {
                id: row.get(0)?,
                source: row.get(1)?,
                delivery: row.get(2)?,
                hook: row.get(3)?,
                received_at: from_millis(row.get(4)?),
                summary: serde_json::from_str(&row.get::<_, String>(5)?).unwrap_or_default(),
                jobs: row.get(6)?,
                pending: row.get(7)?,
                done: row.get(8)?,
                dead: row.get(9)?,
                dropped: Vec::new(),
            })
        })
        .map_err(|e| unavailable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unavailable(&e))?;
    let mut rows = rows;
    let mut drops_of = conn
        .prepare_cached("SELECT route, target, rule, reason FROM drops WHERE event_id = ?1")
        .map_err(|e| unavailable(&e))?;
    for event in &mut rows {
        event.dropped = drops_of
            .query_map(params![event.id], |row| {
                Ok(Dropped {
                    route: row.get(0)?,
                    target: row.get(1)?,
                    rule: row.get(2)?,
                    reason: row.get(3)?,
                })
            })
            .map_err(|e| unavailable(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unavailable(&e))?;
    }
    Ok(rows)
}

fn requeue(conn: &Connection, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError> {
    let found: Option<(String, bool)> = conn
        .query_row(
            "SELECT state, request IS NOT NULL FROM jobs WHERE id = ?1",
            params![id.to_string()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(|e| unavailable(&e))?;
    match found {
        None => Ok(Requeued::NotFound),
        Some((state, _)) if state != "dead" => Ok(Requeued::NotDead(
            JobState::parse(&state).unwrap_or(JobState::Done),
        )),
        Some((_, false)) => Ok(Requeued::NoRequest),
        Some(_) => {
            requeue_where(conn, "id = ?2", params![to_millis(now), id.to_string()])?;
            Ok(Requeued::Requeued)
        }
    }
}

/// Puts dead jobs matching `condition` (whose parameters start at ?2) back
/// in the queue with a fresh attempt budget; their history stays.
fn requeue_where(
    conn: &Connection,
    condition: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<u64, StoreError> {
    let sql = format!(
        "UPDATE jobs SET state = 'queued', attempts = 0, maybe_attempts = 0, due_at = ?1, updated_at = ?1,
             last_error = NULL
         WHERE state = 'dead' AND request IS NOT NULL AND {condition}"
    );
    conn.execute(&sql, params)
        .map(|n| n as u64)
        .map_err(|e| unavailable(&e))
}

fn purge(conn: &Connection, before: SystemTime, now: SystemTime, limit: usize) -> Result<u64, StoreError> {
    conn.prepare_cached("DELETE FROM dedupe WHERE expires_at <= ?1")
        .and_then(|mut stmt| stmt.execute(params![to_millis(now)]))
        .map_err(|e| unavailable(&e))?;
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

fn parse_uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad id {text:?}: {e}")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        // Compressed here, on the caller's task: the writer is one thread
        // for every caller.
        let packed = pack(&event);
        self.run(Durability::Synced, move |conn| ingest(conn, &event, &packed))
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
            claim(conn, &target, limit, lease, now)
        })
        .await
    }

    async fn complete(&self, completion: Completion, _now: SystemTime) -> Result<bool, StoreError> {
        // Times are stored as given, on the caller's clock: nothing to translate.
        self.run(Durability::Committed, move |conn| complete(conn, &completion))
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
            conn.prepare_cached(
                "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND claim_id = ?3 AND state = 'in_flight'",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    to_millis(now + lease),
                    job.to_string(),
                    claim.to_string()
                ])
            })
            .map(|renewed| renewed > 0)
            .map_err(|e| unavailable(&e))
        })
        .await
    }

    async fn next_wakeup(&self, _now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        // Stored times were the caller's clock already.
        self.run(Durability::Committed, next_wakeup).await
    }

    async fn ping(&self, now: SystemTime) -> Result<(), StoreError> {
        self.run(Durability::Synced, move |conn| {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('ping', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![to_millis(now).to_string()],
            )
            .map(|_| ())
            .map_err(|e| unavailable(&e))
        })
        .await
    }

    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobView>, StoreError> {
        self.run(Durability::Committed, move |conn| jobs(conn, &filter))
            .await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
        self.run(Durability::Committed, move |conn| job(conn, id)).await
    }

    async fn events(&self, limit: usize) -> Result<Vec<EventView>, StoreError> {
        self.run(Durability::Committed, move |conn| events(conn, limit))
            .await
    }

    async fn requeue(&self, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError> {
        self.run(Durability::Synced, move |conn| requeue(conn, id, now))
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
            requeue_where(
                conn,
                "target = ?2 AND updated_at >= ?3 AND updated_at <= ?4",
                params![to_millis(now), target, to_millis(since), to_millis(until)],
            )
        })
        .await
    }

    async fn purge(&self, before: SystemTime, now: SystemTime, limit: usize) -> Result<u64, StoreError> {
        self.run(Durability::Synced, move |conn| purge(conn, before, now, limit))
            .await
    }

    async fn queue_stats(&self, now: SystemTime) -> Result<QueueStats, StoreError> {
        self.run(Durability::Committed, move |conn| {
            let mut jobs: Vec<(JobState, u64)> = [
                JobState::Queued,
                JobState::InFlight,
                JobState::Done,
                JobState::Dead,
            ]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
            let mut stmt = conn
                .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .map_err(|e| unavailable(&e))?;
            let counts = stmt
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                .map_err(|e| unavailable(&e))?;
            for count in counts {
                let (state, n) = count.map_err(|e| unavailable(&e))?;
                if let Some(slot) = jobs.iter_mut().find(|(s, _)| s.as_str() == state) {
                    slot.1 = u64::try_from(n).unwrap_or(0);
                }
            }
            let oldest: Option<i64> = conn
                .prepare_cached("SELECT MIN(due_at) FROM jobs WHERE state = 'queued' AND due_at <= ?1")
                .and_then(|mut stmt| stmt.query_row(params![to_millis(now)], |row| row.get(0)))
                .map_err(|e| unavailable(&e))?;
            Ok(QueueStats {
                jobs,
                oldest_due: oldest.map(from_millis),
            })
        })
        .await
    }

    async fn event_body(&self, id: Uuid) -> Result<Option<(String, Bytes)>, StoreError> {
        let stored = self
            .run(Durability::Committed, move |conn| {
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
            })
            .await?;
        // Decompressed here, off the writer.
        stored
            .map(|(content_type, body, codec)| Ok((content_type, Codec::of(codec)?.unpack(body)?)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: Vec<u8>, payload: Option<Vec<u8>>) -> NewEvent {
        NewEvent {
            id: Uuid::now_v7(),
            source: "github".to_owned(),
            delivery: None,
            hook: "push".to_owned(),
            content_type: "application/json".to_owned(),
            body: Bytes::from(body),
            payload: payload.map(Bytes::from),
            hop: 0,
            received_at: SystemTime::UNIX_EPOCH,
            summary: "{}".to_owned(),
            jobs: Vec::new(),
            drops: Vec::new(),
        }
    }

    #[test]
    fn compressible_bodies_are_packed_and_come_back_byte_for_byte() {
        let json = format!(
            r#"{{"commits":[{}]}}"#,
            vec![r#"{"id":"abc","message":"fix"}"#; 40].join(",")
        );
        let form = format!("payload={}", json.replace('"', "%22"));
        let packed = pack(&event(form.clone().into_bytes(), Some(json.clone().into_bytes())));
        assert_eq!(packed.codec, Codec::Lz4);
        assert!(packed.body.len() < form.len() / 4);
        let unpack = |b: &Bytes| {
            Codec::of(packed.codec as i64)
                .unwrap()
                .unpack(b.to_vec())
                .unwrap()
        };
        assert_eq!(unpack(&packed.body), form.as_bytes());
        assert_eq!(packed.payload.as_ref().map(unpack).unwrap(), json.as_bytes());
    }

    #[test]
    fn small_or_incompressible_bodies_are_stored_as_received() {
        let small = pack(&event(br#"{"ref":"refs/heads/main"}"#.to_vec(), None));
        assert_eq!(
            (small.codec, &small.body[..]),
            (Codec::Plain, &br#"{"ref":"refs/heads/main"}"#[..])
        );
        // Bytes with no repetition (xorshift): compression would not pay.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let packed = pack(&event(noise.clone(), None));
        assert_eq!(packed.codec, Codec::Plain);
        assert!(packed.body == noise, "stored as received");
    }

    /// Operations queued while the writer is busy share the next batch;
    /// one that fails leaves no trace and spoils none of the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_operation_spoils_nothing_else_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(&dir.path().join("relay.db")).unwrap());
        let write = |key: String| {
            move |conn: &Connection| {
                conn.execute("INSERT INTO meta (key, value) VALUES (?1, 'x')", params![key])
                    .map_err(|e| unavailable(&e))
            }
        };
        // Holds the writer, so the calls below queue up into one batch.
        let busy = store.run(Durability::Synced, |_| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        });
        let mut calls = Vec::new();
        for n in 0..6 {
            let store = store.clone();
            let key = format!("k{n}");
            calls.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if n == 3 {
                    // Writes, then fails: its row must not survive.
                    store
                        .run(Durability::Synced, move |conn| {
                            write(key.clone())(conn)?;
                            Err::<usize, _>(StoreError::Corrupt("refused on purpose".to_owned()))
                        })
                        .await
                } else {
                    store.run(Durability::Committed, write(key)).await
                }
            }));
        }
        busy.await.unwrap();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        for (n, answer) in answers.iter().enumerate() {
            match (n, answer) {
                (3, Err(StoreError::Corrupt(reason))) => assert_eq!(reason, "refused on purpose"),
                (3, other) => panic!("the failing operation answered {other:?}"),
                (_, Ok(1)) => {}
                (_, other) => panic!("operation {n} answered {other:?}"),
            }
        }
        let keys = store
            .run(Durability::Committed, |conn| {
                let mut stmt = conn
                    .prepare("SELECT key FROM meta WHERE key LIKE 'k%' ORDER BY key")
                    .unwrap();
                let keys = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
                Ok(keys.map(Result::unwrap).collect::<Vec<_>>())
            })
            .await
            .unwrap();
        assert_eq!(keys, ["k0", "k1", "k2", "k4", "k5"]);
    }

    /// A database written by a relay at schema 4 comes through the jobs
    /// table's rebuild whole: rows, attempts, and the foreign keys that tie
    /// them to their event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_jobs_rebuild_keeps_every_row_and_its_ties() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            for (index, migration) in MIGRATIONS[..4].iter().enumerate() {
                conn.execute_batch(migration).unwrap();
                conn.pragma_update(None, "user_version", index as i64 + 1)
                    .unwrap();
            }
            conn.execute_batch(
                "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary)
                     VALUES ('e1', 'github', 'd1', 'push', 5, 'application/json', X'7B7D', 0, '{}');
                 INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, attempts,
                                   maybe_attempts, due_at, claim_id, lease_until, last_error, created_at, updated_at)
                     VALUES ('j1', 'e1', 'r', 'ci', 'dead', '{\"url\":\"x\"}', 0, 3, 1, 9, NULL, NULL, 'gone', 5, 9),
                            ('j2', 'e1', 'r', 'ci', 'queued', NULL, 1, 0, 0, 7, NULL, NULL, NULL, 5, 5);
                 INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
                     VALUES ('j1', 1, 6, 12, 503, 'retry_status', '503: busy');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let rows: Vec<String> = conn
            .prepare(
                "SELECT id || '|' || event_id || '|' || state || '|' || COALESCE(request, '-') || '|' || needs_payload
                        || '|' || attempts || '|' || maybe_attempts || '|' || due_at || '|' || COALESCE(last_error, '-')
                        || '|' || created_at || '|' || updated_at
                 FROM jobs ORDER BY id",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            [
                r#"j1|e1|dead|{"url":"x"}|0|3|1|9|gone|5|9"#,
                "j2|e1|queued|-|1|0|0|7|-|5|5"
            ]
        );
        let attempts: i64 = conn
            .query_row("SELECT COUNT(*) FROM attempts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(attempts, 1, "the rebuild cascaded nothing away");
        let schema: String = conn
            .query_row("SELECT sql FROM sqlite_schema WHERE name = 'jobs'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(!schema.contains(" IN ("), "{schema}");
        assert!(
            conn.execute("UPDATE jobs SET state = 'lost' WHERE id = 'j2'", [])
                .is_err(),
            "the state check still holds"
        );
        let indexes: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 4, "jobs_event, jobs_created, jobs_queued, jobs_leased");
        // The event still owns its jobs, and they their attempts.
        conn.execute("DELETE FROM events WHERE id = 'e1'", []).unwrap();
        let left: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM jobs) + (SELECT COUNT(*) FROM attempts)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
    }

    /// Whether `marker` has reached the database file itself, which only a
    /// checkpoint (a sync of the WAL, then a copy) writes to.
    fn in_main_file(path: &Path, marker: &str) -> bool {
        std::fs::read(path).is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
    }

    async fn write_unsynced(store: &SqliteStore, key: String) {
        store
            .run(Durability::Committed, move |conn| {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, 'x') ON CONFLICT (key) DO NOTHING",
                    params![key],
                )
                .map_err(|e| unavailable(&e))
            })
            .await
            .unwrap();
    }

    /// Work answered before its fsync is put on disk by the writer once it
    /// has nothing else to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsynced_work_is_synced_once_the_writer_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path).unwrap();
        write_unsynced(&store, "marker-idle-5c1e".to_owned()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !in_main_file(&path, "marker-idle-5c1e") {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A writer that never goes idle still syncs unsynced work within
    /// MAX_UNSYNCED.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsynced_work_is_synced_in_time_under_steady_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let store = SqliteStore::open(&path).unwrap();
        write_unsynced(&store, "marker-busy-0000".to_owned()).await;
        // A write every 10 ms: never the 50 ms the idle sync waits for.
        let started = std::time::Instant::now();
        let mut n = 0;
        while !in_main_file(&path, "marker-busy-0000") {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "never synced while busy"
            );
            n += 1;
            write_unsynced(&store, format!("steady-{n}")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            n >= 5,
            "synced after only {n} writes: the test did not keep the writer busy"
        );
    }

    #[test]
    fn unknown_codecs_and_broken_data_are_reported_not_guessed() {
        assert!(matches!(Codec::of(7), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            Codec::Lz4.unpack(vec![200, 0, 0, 0, 1, 2]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
