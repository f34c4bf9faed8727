//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`,
//! so a commit is on disk when it returns.
//!
//! One writer thread owns the connection. It takes every command that is
//! waiting, runs them in one transaction (each inside its own savepoint, so
//! one failure spoils nothing else) and commits once: concurrent webhooks
//! share an fsync, and each caller hears back only after its own data is
//! durable. A lock file keeps a second relay off the same database.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};
use uuid::Uuid;

use super::{
    ClaimedJob, Completion, Ingested, JobState, NewEvent, NextState, Store, StoreError, from_millis,
    to_millis,
};
use crate::targets::PreparedRequest;

/// Commands waiting beyond this are left for the next transaction, which
/// bounds how long the first caller of a batch waits.
const MAX_BATCH: usize = 512;

/// Incremented whenever the schema changes; the store refuses newer files.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
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

/// The SQLite store. Cheap to share: it is a channel to the writer thread.
#[derive(Debug)]
pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    /// Held open for the store's life: the OS lock on it is what keeps a
    /// second relay from dispatching the same jobs.
    _lock: File,
    path: PathBuf,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Ingest(Box<NewEvent>, Reply<Ingested>),
    Claim {
        target: String,
        limit: usize,
        lease: Duration,
        reply: Reply<Vec<ClaimedJob>>,
    },
    Complete(Box<Completion>, Reply<bool>),
    NextWakeup(Reply<Option<SystemTime>>),
    Ping(Reply<()>),
}

/// A command's result, held until the batch's commit decides its fate.
enum Outcome {
    Ingest(Reply<Ingested>, Result<Ingested, StoreError>),
    Claim(Reply<Vec<ClaimedJob>>, Result<Vec<ClaimedJob>, StoreError>),
    Complete(Reply<bool>, Result<bool, StoreError>),
    NextWakeup(Reply<Option<SystemTime>>, Result<Option<SystemTime>, StoreError>),
    Ping(Reply<()>, Result<(), StoreError>),
}

impl SqliteStore {
    /// Opens (creating if needed) the database, takes its lock, and puts any
    /// job a previous run left in flight back in the queue.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
            open_error("another relay is using this database; each relay needs its own sqlite file (or share a postgres:// store)".to_owned())
        })?;
        let mut conn = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        prepare(&mut conn).map_err(open_error)?;
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
        let (commands, receiver) = mpsc::channel(4 * MAX_BATCH);
        std::thread::Builder::new()
            .name("relay-sqlite-writer".to_owned())
            .spawn(move || writer(conn, receiver))
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            commands,
            _lock: lock,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn prepare(conn: &mut Connection) -> Result<(), String> {
    prepare_schema(conn).map_err(|e| e.to_string())?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {version}, newer than this relay's {SCHEMA_VERSION}; run a newer relay"
        ));
    }
    Ok(())
}

fn prepare_schema(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version == 0 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

fn writer(mut conn: Connection, mut commands: mpsc::Receiver<Command>) {
    while let Some(first) = commands.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch);
    }
}

fn unavailable(e: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn run_batch(conn: &mut Connection, batch: Vec<Command>) {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            error!(error = %e, "store: cannot begin a transaction");
            let err = unavailable(&e);
            for cmd in batch {
                fail(cmd, err.clone());
            }
            return;
        }
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for cmd in batch {
        let outcome = match tx.savepoint() {
            Ok(sp) => {
                let outcome = apply(&sp, cmd);
                if outcome.is_ok()
                    && let Err(e) = sp.commit()
                {
                    outcomes.push(outcome.into_error(unavailable(&e)));
                    continue;
                }
                outcome
            }
            Err(e) => {
                let err = unavailable(&e);
                fail(cmd, err);
                continue;
            }
        };
        outcomes.push(outcome);
    }
    if let Err(e) = tx.commit() {
        error!(error = %e, "store: commit failed; the batch was rolled back");
        let err = unavailable(&e);
        for outcome in outcomes {
            outcome.into_error(err.clone()).send();
        }
        return;
    }
    for outcome in outcomes {
        outcome.send();
    }
}

fn fail(cmd: Command, err: StoreError) {
    let _ = match cmd {
        Command::Ingest(_, reply) => reply.send(Err(err)).is_ok(),
        Command::Claim { reply, .. } => reply.send(Err(err)).is_ok(),
        Command::Complete(_, reply) => reply.send(Err(err)).is_ok(),
        Command::NextWakeup(reply) => reply.send(Err(err)).is_ok(),
        Command::Ping(reply) => reply.send(Err(err)).is_ok(),
    };
}

impl Outcome {
    fn is_ok(&self) -> bool {
        match self {
            Outcome::Ingest(_, r) => r.is_ok(),
            Outcome::Claim(_, r) => r.is_ok(),
            Outcome::Complete(_, r) => r.is_ok(),
            Outcome::NextWakeup(_, r) => r.is_ok(),
            Outcome::Ping(_, r) => r.is_ok(),
        }
    }

    fn into_error(self, err: StoreError) -> Outcome {
        match self {
            Outcome::Ingest(tx, _) => Outcome::Ingest(tx, Err(err)),
            Outcome::Claim(tx, _) => Outcome::Claim(tx, Err(err)),
            Outcome::Complete(tx, _) => Outcome::Complete(tx, Err(err)),
            Outcome::NextWakeup(tx, _) => Outcome::NextWakeup(tx, Err(err)),
            Outcome::Ping(tx, _) => Outcome::Ping(tx, Err(err)),
        }
    }

    /// Answers the caller. A caller that stopped waiting (its client hung up)
    /// is no loss: what was committed stays committed and will be sent.
    fn send(self) {
        let _ = match self {
            Outcome::Ingest(tx, r) => tx.send(r).is_ok(),
            Outcome::Claim(tx, r) => tx.send(r).is_ok(),
            Outcome::Complete(tx, r) => tx.send(r).is_ok(),
            Outcome::NextWakeup(tx, r) => tx.send(r).is_ok(),
            Outcome::Ping(tx, r) => tx.send(r).is_ok(),
        };
    }
}

fn apply(conn: &Connection, cmd: Command) -> Outcome {
    match cmd {
        Command::Ingest(event, reply) => Outcome::Ingest(reply, ingest(conn, &event)),
        Command::Claim {
            target,
            limit,
            lease,
            reply,
        } => Outcome::Claim(reply, claim(conn, &target, limit, lease)),
        Command::Complete(completion, reply) => Outcome::Complete(reply, complete(conn, &completion)),
        Command::NextWakeup(reply) => Outcome::NextWakeup(reply, next_wakeup(conn)),
        Command::Ping(reply) => Outcome::Ping(
            reply,
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('ping', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![to_millis(SystemTime::now()).to_string()],
            )
            .map(|_| ())
            .map_err(|e| unavailable(&e)),
        ),
    }
}

fn ingest(conn: &Connection, event: &NewEvent) -> Result<Ingested, StoreError> {
    let received = to_millis(event.received_at);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
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
                &event.body[..],
                event.payload.as_deref(),
                event.hop,
                event.summary,
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
    let mut insert_job = conn
        .prepare_cached(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8, ?8)",
        )
        .map_err(|e| unavailable(&e))?;
    for job in &event.jobs {
        let (state, request, needs_payload, error) = match &job.request {
            Ok(request) => (
                JobState::Queued,
                Some(serde_json::to_string(request).map_err(|e| StoreError::Corrupt(e.to_string()))?),
                request.needs_payload(),
                None,
            ),
            Err(reason) => (JobState::Dead, None, false, Some(reason.as_str())),
        };
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
            ])
            .map_err(|e| unavailable(&e))?;
    }
    Ok(Ingested::Accepted)
}

fn claim(
    conn: &Connection,
    target: &str,
    limit: usize,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, StoreError> {
    let now = SystemTime::now();
    let claim = Uuid::now_v7();
    let lease_until = to_millis(now + lease);
    let mut stmt = conn
        .prepare_cached(
            "UPDATE jobs SET state = 'in_flight', claim_id = ?1, lease_until = ?2, updated_at = ?3
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE target = ?4
                   AND ((state = 'queued' AND due_at <= ?3) OR (state = 'in_flight' AND lease_until <= ?3))
                 ORDER BY due_at
                 LIMIT ?5)
             RETURNING id, event_id, route, target, attempts, maybe_attempts, request, needs_payload",
        )
        .map_err(|e| unavailable(&e))?;
    let rows = stmt
        .query_map(
            params![
                claim.to_string(),
                lease_until,
                to_millis(now),
                target,
                i64::try_from(limit).unwrap_or(i64::MAX)
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
    let mut payload_of = conn
        .prepare_cached("SELECT COALESCE(payload, body) FROM events WHERE id = ?1")
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
                .query_row(params![event_id], |row| row.get::<_, Vec<u8>>(0))
                .optional()
                .map_err(|e| unavailable(&e))?
                .map(Bytes::from)
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
    let now = to_millis(SystemTime::now());
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
    let number: Option<i64> = conn
        .prepare_cached(
            "UPDATE jobs SET state = ?1, attempts = attempts + 1, maybe_attempts = maybe_attempts + ?2,
                 due_at = ?3, claim_id = NULL, lease_until = NULL, last_error = ?4, updated_at = ?5
             WHERE id = ?6 AND claim_id = ?7 AND state = 'in_flight'
             RETURNING attempts",
        )
        .and_then(|mut stmt| {
            stmt.query_row(
                params![
                    state.as_str(),
                    maybe,
                    due_at,
                    error,
                    now,
                    c.job_id.to_string(),
                    c.claim.to_string()
                ],
                |row| row.get(0),
            )
            .optional()
        })
        .map_err(|e| unavailable(&e))?;
    let Some(number) = number else {
        return Ok(false);
    };
    conn.prepare_cached(
        "INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            c.job_id.to_string(),
            number,
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

fn parse_uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad id {text:?}: {e}")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        self.request(|reply| Command::Ingest(Box::new(event), reply))
            .await
    }

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let target = target.to_owned();
        self.request(|reply| Command::Claim {
            target,
            limit,
            lease,
            reply,
        })
        .await
    }

    async fn complete(&self, completion: Completion) -> Result<bool, StoreError> {
        self.request(|reply| Command::Complete(Box::new(completion), reply))
            .await
    }

    async fn next_wakeup(&self) -> Result<Option<SystemTime>, StoreError> {
        self.request(Command::NextWakeup).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.request(Command::Ping).await
    }
}
