//! The shared store: PostgreSQL, for several relays behind a load balancer
//! on one queue.
//!
//! Everything a relay decides with the queue's clock (is a job due, has a
//! lease run out, is a dedupe key or a burst window still open) is decided
//! with the database's `now()`, never the host's: relays on different hosts
//! share these rows, and their clocks need not agree. The trait hands in the
//! caller's times; each is translated by its offset from the caller's own
//! `now`, and times handed back are translated the other way.
//!
//! What this module must never do: trust the host clock for a queue
//! decision; hold a row lock across an HTTP call (a claim is one short
//! statement, and completion is fenced by the claim id instead of a lock);
//! put the database password into an error or a log line (only
//! `PostgresSettings::shown`, the masked URL, is ever printed, and
//! tokio-postgres's own messages never carry it).

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::Notify;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, Client, Connection, Row, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    AttemptView, ClaimedJob, Completion, EventView, HeldBack, Ingested, JobDetail, JobFilter, JobState,
    JobView, NewEvent, NewJob, NextState, QueueStats, Requeued, SchemaStatus, Store, StoreError,
};
use crate::config::PostgresSettings;
use crate::guard::{Check, Dropped};
use crate::request::PreparedRequest;

/// The schema, one migration per version, applied in order inside one
/// transaction; `relay_schema` records how far a database has come. Never
/// edit a released entry: add one.
const MIGRATIONS: &[&str] = &[V1];

/// The tables and semantics of the SQLite schema (its V1 to V3), in native
/// types. `drops.id` only keeps a drop list in the order it was written.
const V1: &str = "
CREATE TABLE events (
    id           uuid PRIMARY KEY,
    source       text NOT NULL,
    delivery     text,
    hook         text NOT NULL,
    received_at  timestamptz NOT NULL,
    content_type text NOT NULL,
    body         bytea NOT NULL,
    payload      bytea,
    hop          bigint NOT NULL,
    summary      text NOT NULL,
    UNIQUE (source, delivery)
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    event_id       uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route          text NOT NULL,
    target         text NOT NULL,
    state          text NOT NULL CHECK (state IN ('queued', 'in_flight', 'done', 'dead')),
    request        text,
    needs_payload  boolean NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    maybe_attempts integer NOT NULL DEFAULT 0,
    due_at         timestamptz NOT NULL,
    claim_id       uuid,
    lease_until    timestamptz,
    last_error     text,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE INDEX jobs_created ON jobs (target, created_at);
CREATE INDEX jobs_queued ON jobs (target, due_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (target, lease_until) WHERE state = 'in_flight';
CREATE TABLE attempts (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number      integer NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms bigint NOT NULL,
    status      integer,
    outcome     text NOT NULL,
    excerpt     text NOT NULL,
    PRIMARY KEY (job_id, number)
);
CREATE TABLE drops (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    route    text,
    target   text,
    rule     text NOT NULL,
    reason   text NOT NULL
);
CREATE INDEX drops_event ON drops (event_id);
CREATE TABLE dedupe (
    target     text NOT NULL,
    key        text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (target, key)
);
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
";

/// The advisory lock that serialises migrations between relays starting at
/// once ("relay" in ASCII). Single-key locks live apart from the two-key
/// ones below, so the two never collide.
const MIGRATION_LOCK: i64 = 0x72_656c_6179;

/// The first key of the per-target burst locks ("rly" in ASCII); the second
/// is a hash of the target's name.
const TARGET_LOCK_CLASS: i32 = 0x72_6c79;

/// Every bound the caller can hand in ends up here or below: intervals this
/// far out are "never" for a queue, and PostgreSQL's interval arithmetic
/// stays exact and in range.
const MAX_OFFSET_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// Wait for a pooled connection, or for a new one to be made, before the
/// store reports itself unavailable (ingress answers 503, the sender retries).
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Unacknowledged data on a connection for this long ends it.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection is probed after this long (then every third of it).
const KEEPALIVES_IDLE: Duration = Duration::from_secs(15);
/// tokio-postgres's (and libpq's) default idle time, which a URL that sets
/// none leaves in place.
const LIBPQ_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// How often an idle LISTEN connection is checked: a connection that died
/// silently (a dropped NAT entry) would otherwise never be replaced.
const HEARTBEAT: Duration = Duration::from_secs(30);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The longest an operation on the delivery path (claims, completions,
/// renewals, readiness, payload URLs; ingest is bounded by its caller) may take before it is
/// reported unavailable (ingress answers 503, the sender retries). A
/// database that stopped answering without closing its connections (a host
/// gone, a network partition) would otherwise hold each webhook until its
/// sender gave up. Below GitHub's and GitLab's 10-second delivery timeout.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(8);

/// The same for what a person asks through the admin API or the CLI, which
/// may touch many rows (a retry of every dead job of a target) and has no
/// sender waiting on it.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one store operation, giving up after `limit`. (A statement the
/// database is still running then may yet complete: every operation here is
/// one that can be asked again.)
async fn within<T>(
    what: &str,
    limit: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, operation).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "the database did not answer within {}s ({what})",
            limit.as_secs()
        )))
    })
}

/// The connection type both the pool and the listener use: tokio-postgres
/// skips TLS itself when `sslmode=disable`.
type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// The PostgreSQL store: a connection pool for the queue, and one dedicated
/// connection listening for work other relays queued.
pub struct PostgresStore {
    pool: Pool,
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
        migrate(&mut client).await.map_err(fail)?;
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

/// The schema version without migrating: one connection, one read, and no
/// lock a running relay (or a migration in progress) holds.
pub async fn schema_status(settings: &PostgresSettings) -> Result<SchemaStatus, StoreError> {
    let fail = |reason: String| StoreError::Connect {
        url: settings.shown.clone(),
        reason,
    };
    let tls = tls_connector(settings).map_err(fail)?;
    let (client, connection) = connection_config(&settings.connect)
        .connect(tls)
        .await
        .map_err(|e| fail(connect_error(&e)))?;
    let driver = tokio::spawn(connection);
    let version = read_version(&client).await.map_err(|e| fail(describe(&e)));
    drop(client);
    // The connection ends once the client is gone; nothing is left behind.
    let _ = driver.await;
    Ok(SchemaStatus {
        version: version?,
        latest: latest_version(),
    })
}

async fn read_version(client: &Client) -> Result<u32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('relay_schema') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM relay_schema", &[])
        .await?
        .try_get(0)?;
    Ok(version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0))
}

fn latest_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The URL's connection settings, with what a long-running daemon needs
/// where the URL leaves it open: a connect timeout, and TCP keepalives and a
/// user timeout, so that a connection to a database that vanished without a
/// word (a host gone, a dropped NAT entry) fails in seconds instead of
/// hanging until the kernel's two-hour default.
fn connection_config(connect: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut connect = connect.clone();
    if connect.get_connect_timeout().is_none() {
        connect.connect_timeout(POOL_TIMEOUT);
    }
    if connect.get_tcp_user_timeout().is_none() {
        connect.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if connect.get_keepalives_idle() == LIBPQ_KEEPALIVES_IDLE {
        connect
            .keepalives(true)
            .keepalives_idle(KEEPALIVES_IDLE)
            .keepalives_interval(KEEPALIVES_IDLE / 3)
            .keepalives_retries(3);
    }
    connect
}

/// One TLS setup for every connection: the CA file's certificates when one
/// is configured, else the platform's roots (read only when TLS can be used).
fn tls_connector(settings: &PostgresSettings) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    if settings.connect.get_ssl_mode() != SslMode::Disable {
        match &settings.ca_file {
            Some(path) => {
                let unreadable = |e: rustls::pki_types::pem::Error| {
                    format!("cannot read CA certificates from {}: {e}", path.display())
                };
                for cert in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                    roots
                        .add(cert.map_err(unreadable)?)
                        .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{} holds no PEM certificate", path.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    warn!(
                        errors = ?found.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "no system CA certificates found: a TLS connection to PostgreSQL will fail; set store.ca_file"
                    );
                }
            }
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Applies what this build knows and the database lacks, in one
/// transaction under an advisory lock: a relay starting at the same moment
/// waits, then finds the work done.
async fn migrate(client: &mut Object) -> Result<(), String> {
    let tx = client.transaction().await.map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| describe(&e))?;
    // "Already exists, skipping" is the normal case, not news.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL);
         INSERT INTO relay_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM relay_schema);",
    )
    .await
    .map_err(|e| describe(&e))?;
    let version: i32 = tx
        .query_one("SELECT max(version) FROM relay_schema", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| describe(&e))?;
    let known = MIGRATIONS.len();
    let version = usize::try_from(version).unwrap_or(0);
    if version > known {
        return Err(format!(
            "the database has schema version {version}, newer than this relay's {known}; run a newer relay"
        ));
    }
    if version == known {
        return Ok(());
    }
    for migration in &MIGRATIONS[version..] {
        tx.batch_execute(migration).await.map_err(|e| describe(&e))?;
    }
    let latest = i32::try_from(known).unwrap_or(i32::MAX);
    tx.execute("UPDATE relay_schema SET version = $1", &[&latest])
        .await
        .map_err(|e| describe(&e))?;
    tx.commit().await.map_err(|e| describe(&e))?;
    info!(from = version, to = known, "store schema brought up to date");
    Ok(())
}

/// A tokio-postgres error with its cause: the error's own text is only its
/// kind ("db error"); the server's message is the source.
fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn pool_error(e: &PoolError) -> String {
    let waited = POOL_TIMEOUT.as_secs();
    match e {
        PoolError::Backend(e) => connect_error(e),
        PoolError::Timeout(TimeoutType::Wait) => {
            format!("every pooled database connection stayed busy for {waited}s (store.pool_size)")
        }
        PoolError::Timeout(_) => format!("PostgreSQL did not accept a connection within {waited}s"),
        other => other.to_string(),
    }
}

/// Why a connection could not be made, with a hint where the usual fix is
/// not obvious from the server's words.
fn connect_error(e: &tokio_postgres::Error) -> String {
    let text = describe(e);
    if text.starts_with("error performing TLS handshake") {
        // libpq's sslmode=prefer/require do not check the certificate;
        // relay always does.
        format!(
            "{text} (relay verifies the server's certificate: set store.ca_file to the CA that signed it, \
             or add sslmode=disable to store.url on a trusted network)"
        )
    } else {
        text
    }
}

fn unavailable(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

/// A column read that reports a type surprise instead of panicking.
fn col<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| StoreError::Corrupt(describe(&e)))
}

fn count(row: &Row, index: usize) -> Result<u32, StoreError> {
    Ok(u32::try_from(col::<i64>(row, index)?).unwrap_or(0))
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

/// The advisory lock key of a target's burst count. FNV-1a, because the
/// key must be the same in every relay build on every host.
fn target_lock(target: &str) -> i32 {
    let hash = target.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}

#[async_trait]
impl Store for PostgresStore {
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        // No deadline of its own: the accept path bounds the wait for every
        // store alike (`accept::SENDERS_DEADLINE`), and lets the commit run on.
        async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
            let insert_event = tx
                .prepare_cached(
                    "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary)
                     VALUES ($1, $2, $3, $4, now(), $5, $6, $7, $8, $9)
                     ON CONFLICT (source, delivery) DO NOTHING
                     RETURNING id",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let inserted = tx
                .query_opt(
                    &insert_event,
                    &[
                        &event.id,
                        &event.source,
                        &event.delivery,
                        &event.hook,
                        &event.content_type,
                        &&event.body[..],
                        &event.payload.as_deref(),
                        &i64::from(event.hop),
                        &event.summary,
                    ],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            if inserted.is_none() {
                // Another relay may have committed this delivery a moment ago:
                // the unique key decided, and its event id is the answer.
                let original = tx
                    .query_one(
                        "SELECT id FROM events WHERE source = $1 AND delivery = $2",
                        &[&event.source, &event.delivery],
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
                return Ok(Ingested::Duplicate(col(&original, 0)?));
            }
            for drop in &event.drops {
                insert_drop(&tx, event.id, drop).await?;
            }
            // The burst count is only right if no other relay is adding jobs for
            // the target meanwhile: a per-target lock, held to the commit. All
            // are taken up front, in key order (unnest keeps the array's), so
            // two ingests for the same targets queue rather than deadlock.
            // Dedupe needs no lock of its own: its row decides.
            let mut locks: Vec<i32> = event
                .jobs
                .iter()
                .filter(|job| job.limits.burst.is_some())
                .map(|job| target_lock(&job.target))
                .collect();
            locks.sort_unstable();
            locks.dedup();
            if !locks.is_empty() {
                let lock = tx
                    .prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k")
                    .await
                    .map_err(|e| unavailable(&e))?;
                tx.execute(&lock, &[&TARGET_LOCK_CLASS, &locks])
                    .await
                    .map_err(|e| unavailable(&e))?;
            }
            let insert_job = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, last_error,
                                       claim_id, lease_until, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8,
                             $9, now() + $10::int8 * interval '1 microsecond', now(), now())",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let mut held_back = Vec::new();
            let mut leased = Vec::new();
            let mut queued = false;
            for job in &event.jobs {
                if let Some(drop) = hold_back(&tx, job).await? {
                    insert_drop(&tx, event.id, &drop).await?;
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
                queued |= state == JobState::Queued;
                tx.execute(
                    &insert_job,
                    &[
                        &job.id,
                        &event.id,
                        &job.route,
                        &job.target,
                        &state.as_str(),
                        &request,
                        &needs_payload,
                        &error,
                        &job.lease.map(|l| l.claim),
                        &job.lease.map(|l| offset(l.until, event.received_at)),
                    ],
                )
                .await
                .map_err(|e| unavailable(&e))?;
                leased.extend(job.leased(&event));
            }
            if queued {
                notify(&tx).await?;
            }
            tx.commit().await.map_err(|e| unavailable(&e))?;
            Ok(Ingested::Accepted { held_back, leased })
        }
        .await
    }

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        _now: SystemTime,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        within("claim", OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            // One statement, so one short transaction: expired leases first (a
            // worker died holding them), then due jobs, each walking its own
            // partial index in order. Rows another relay is claiming right now
            // are skipped, not waited for.
            let stmt = client
                .prepare_cached(
                    "WITH expired AS (
                         SELECT id FROM jobs
                         WHERE target = $1 AND state = 'in_flight' AND lease_until <= now()
                         ORDER BY lease_until LIMIT $2
                         FOR UPDATE SKIP LOCKED
                     ), due AS (
                         SELECT id FROM jobs
                         WHERE target = $1 AND state = 'queued' AND due_at <= now()
                         ORDER BY due_at LIMIT $2 - (SELECT count(*) FROM expired)
                         FOR UPDATE SKIP LOCKED
                     ), claimed AS (
                         UPDATE jobs SET state = 'in_flight', claim_id = $3,
                             lease_until = now() + $4::int8 * interval '1 microsecond', updated_at = now()
                         WHERE id IN (SELECT id FROM expired UNION ALL SELECT id FROM due)
                         RETURNING id, event_id, route, target, attempts, maybe_attempts, request, needs_payload
                     )
                     SELECT c.id, c.event_id, c.route, c.target, c.attempts, c.maybe_attempts, c.request,
                            CASE WHEN c.needs_payload THEN COALESCE(e.payload, e.body) END
                     FROM claimed c JOIN events e ON e.id = c.event_id",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let claim = Uuid::now_v7();
            let rows = client
                .query(
                    &stmt,
                    &[
                        &target,
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                        &claim,
                        &micros(lease),
                    ],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let mut jobs = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: Uuid = col(row, 0)?;
                let request: PreparedRequest = col::<Option<&str>>(row, 6)?
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?
                    .ok_or_else(|| StoreError::Corrupt(format!("job {id} is queued without a request")))?;
                jobs.push(ClaimedJob {
                    id,
                    event_id: col(row, 1)?,
                    route: col(row, 2)?,
                    target: col(row, 3)?,
                    attempts: u32::try_from(col::<i32>(row, 4)?).unwrap_or(0),
                    maybe_attempts: u32::try_from(col::<i32>(row, 5)?).unwrap_or(0),
                    claim,
                    request,
                    payload: col::<Option<Vec<u8>>>(row, 7)?.map(Bytes::from),
                });
            }
            Ok(jobs)
        })
        .await
    }

    async fn complete(&self, c: Completion, now: SystemTime) -> Result<bool, StoreError> {
        within("complete", OPERATION_TIMEOUT, async {
            let mut client = self.client().await?;
            // Times are translated from the moment of writing, not from `c.at`:
            // a completion recorded late (the database was away) keeps the
            // attempt's real start, and a retry's backoff counts from the
            // attempt's end.
            let written_at = now;
            let (state, due_in, maybe, error) = match &c.next {
                NextState::Done => (JobState::Done, 0, 0, None),
                NextState::Retry {
                    due_at,
                    maybe_delivered,
                } => (
                    JobState::Queued,
                    offset(*due_at, written_at),
                    i32::from(*maybe_delivered),
                    Some(c.attempt.excerpt.as_str()),
                ),
                NextState::Dead { reason } => (JobState::Dead, 0, 0, Some(reason.as_str())),
            };
            // The attempt is written only where the claim still holds: a stale
            // worker's completion matches no row and so records nothing.
            // Attempts are numbered across manual retries, which reset the job's
            // own counter.
            const COMPLETE: &str = "WITH moved AS (
                     UPDATE jobs SET state = $1, attempts = attempts + 1, maybe_attempts = maybe_attempts + $2,
                         due_at = now() + $3::int8 * interval '1 microsecond', claim_id = NULL,
                         lease_until = NULL, last_error = $4, updated_at = now()
                     WHERE id = $5 AND claim_id = $6 AND state = 'in_flight'
                     RETURNING id
                 )
                 INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
                 SELECT moved.id,
                        (SELECT COALESCE(max(number), 0) + 1 FROM attempts WHERE job_id = moved.id),
                        now() + $7::int8 * interval '1 microsecond', $8, $9, $10, $11
                 FROM moved";
            let state_name = state.as_str();
            let started = offset(c.attempt.started_at, written_at);
            let duration_ms = micros(c.attempt.duration) / 1000;
            let status = c.attempt.status.map(i32::from);
            let params: [&(dyn ToSql + Sync); 11] = [
                &state_name,
                &maybe,
                &due_in,
                &error,
                &c.job_id,
                &c.claim,
                &started,
                &duration_ms,
                &status,
                &c.attempt.outcome,
                &c.attempt.excerpt,
            ];
            if state != JobState::Queued {
                // One statement is its own transaction: no BEGIN and COMMIT
                // round trips on the busiest path.
                let stmt = client
                    .prepare_cached(COMPLETE)
                    .await
                    .map_err(|e| unavailable(&e))?;
                let recorded = client
                    .execute(&stmt, &params)
                    .await
                    .map_err(|e| unavailable(&e))?;
                return Ok(recorded > 0);
            }
            // A retry is news for every relay's dispatcher once it commits.
            let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
            let stmt = tx.prepare_cached(COMPLETE).await.map_err(|e| unavailable(&e))?;
            if tx.execute(&stmt, &params).await.map_err(|e| unavailable(&e))? == 0 {
                return Ok(false);
            }
            notify(&tx).await?;
            tx.commit().await.map_err(|e| unavailable(&e))?;
            Ok(true)
        })
        .await
    }

    async fn renew(
        &self,
        job: Uuid,
        claim: Uuid,
        lease: Duration,
        _now: SystemTime,
    ) -> Result<bool, StoreError> {
        within("renew", OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE jobs SET lease_until = now() + $3::int8 * interval '1 microsecond'
                     WHERE id = $1 AND claim_id = $2 AND state = 'in_flight'",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let renewed = client
                .execute(&stmt, &[&job, &claim, &micros(lease)])
                .await
                .map_err(|e| unavailable(&e))?;
            Ok(renewed > 0)
        })
        .await
    }

    async fn next_wakeup(&self, now: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        within("next_wakeup", OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT LEAST((SELECT min(due_at) FROM jobs WHERE state = 'queued'),
                                  (SELECT min(lease_until) FROM jobs WHERE state = 'in_flight')),
                            now()",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let row = client.query_one(&stmt, &[]).await.map_err(|e| unavailable(&e))?;
            let next: Option<SystemTime> = col(&row, 0)?;
            let db_now: SystemTime = col(&row, 1)?;
            // Past-due reads as "now": the caller sleeps on the difference.
            Ok(next.map(|t| now + t.duration_since(db_now).unwrap_or(Duration::ZERO)))
        })
        .await
    }

    async fn work_arrived(&self) {
        self.wake.notified().await;
    }

    async fn ping(&self, _now: SystemTime) -> Result<(), StoreError> {
        within("ping", OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            // A write, not a SELECT 1: a read-only standby or a full disk must
            // count as not ready.
            let stmt = client
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('ping', now()::text)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            client
                .execute(&stmt, &[])
                .await
                .map(|_| ())
                .map_err(|e| unavailable(&e))
        })
        .await
    }

    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobView>, StoreError> {
        within("jobs", ADMIN_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, event_id, route, target, state, attempts, last_error, created_at, updated_at, due_at,
                            request IS NOT NULL
                     FROM jobs
                     WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR target = $2)
                       AND ($3::uuid IS NULL OR event_id = $3)
                     ORDER BY updated_at DESC, id DESC
                     LIMIT $4",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            client
                .query(
                    &stmt,
                    &[
                        &filter.state.map(JobState::as_str),
                        &filter.target,
                        &filter.event,
                        &i64::try_from(filter.limit).unwrap_or(i64::MAX),
                    ],
                )
                .await
                .map_err(|e| unavailable(&e))?
                .iter()
                .map(job_view)
                .collect()
        })
        .await
    }

    async fn job(&self, id: Uuid) -> Result<Option<JobDetail>, StoreError> {
        within("job", ADMIN_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, event_id, route, target, state, attempts, last_error, created_at, updated_at, due_at,
                            request IS NOT NULL, request
                     FROM jobs WHERE id = $1",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let Some(row) = client
                .query_opt(&stmt, &[&id])
                .await
                .map_err(|e| unavailable(&e))?
            else {
                return Ok(None);
            };
            let view = job_view(&row)?;
            let request: Option<String> = col(&row, 11)?;
            let stmt = client
                .prepare_cached(
                    "SELECT number, started_at, duration_ms, status, outcome, excerpt
                     FROM attempts WHERE job_id = $1 ORDER BY number",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let history = client
                .query(&stmt, &[&id])
                .await
                .map_err(|e| unavailable(&e))?
                .iter()
                .map(|row| {
                    Ok(AttemptView {
                        number: u32::try_from(col::<i32>(row, 0)?).unwrap_or(0),
                        started_at: col(row, 1)?,
                        duration_ms: u64::try_from(col::<i64>(row, 2)?).unwrap_or(0),
                        status: col::<Option<i32>>(row, 3)?.and_then(|s| u16::try_from(s).ok()),
                        outcome: col(row, 4)?,
                        excerpt: col(row, 5)?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Some(JobDetail {
                job: view,
                request: request.and_then(|r| serde_json::from_str(&r).ok()),
                history,
            }))
        })
        .await
    }

    async fn events(&self, limit: usize) -> Result<Vec<EventView>, StoreError> {
        within("events", ADMIN_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT e.id, e.source, e.delivery, e.hook, e.received_at, e.summary,
                            c.jobs, c.pending, c.done, c.dead
                     FROM (SELECT * FROM events ORDER BY received_at DESC, id DESC LIMIT $1) e
                     CROSS JOIN LATERAL (
                         SELECT count(*) AS jobs,
                                count(*) FILTER (WHERE state IN ('queued', 'in_flight')) AS pending,
                                count(*) FILTER (WHERE state = 'done') AS done,
                                count(*) FILTER (WHERE state = 'dead') AS dead
                         FROM jobs WHERE event_id = e.id) c
                     ORDER BY e.received_at DESC, e.id DESC",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let rows = client
                .query(&stmt, &[&i64::try_from(limit).unwrap_or(i64::MAX)])
                .await
                .map_err(|e| unavailable(&e))?;
            let mut ids = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: Uuid = col(row, 0)?;
                ids.push(id);
                events.push(EventView {
                    id: id.to_string(),
                    source: col(row, 1)?,
                    delivery: col(row, 2)?,
                    hook: col(row, 3)?,
                    received_at: col(row, 4)?,
                    summary: serde_json::from_str(col(row, 5)?).unwrap_or_default(),
                    jobs: count(row, 6)?,
                    pending: count(row, 7)?,
                    done: count(row, 8)?,
                    dead: count(row, 9)?,
                    dropped: Vec::new(),
                });
            }
            if ids.is_empty() {
                return Ok(events);
            }
            let stmt = client
                .prepare_cached(
                    "SELECT event_id, route, target, rule, reason FROM drops WHERE event_id = ANY($1) ORDER BY id",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            for row in client.query(&stmt, &[&ids]).await.map_err(|e| unavailable(&e))? {
                let event_id: Uuid = col(&row, 0)?;
                if let Some(index) = ids.iter().position(|id| *id == event_id) {
                    events[index].dropped.push(Dropped {
                        route: col(&row, 1)?,
                        target: col(&row, 2)?,
                        rule: col(&row, 3)?,
                        reason: col(&row, 4)?,
                    });
                }
            }
            Ok(events)
        })
        .await
    }

    async fn requeue(&self, id: Uuid, _now: SystemTime) -> Result<Requeued, StoreError> {
        within("requeue", ADMIN_TIMEOUT, async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
            // Try first, explain after: the update's own condition decides, so
            // a requeue racing another relay's cannot queue a job twice.
            let requeued = requeue_where(&tx, "id = $1", &[&id]).await?;
            if requeued > 0 {
                notify(&tx).await?;
                tx.commit().await.map_err(|e| unavailable(&e))?;
                return Ok(Requeued::Requeued);
            }
            let found = tx
                .query_opt(
                    "SELECT state, request IS NOT NULL FROM jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let Some(row) = found else {
                return Ok(Requeued::NotFound);
            };
            let state: String = col(&row, 0)?;
            if state != JobState::Dead.as_str() {
                return Ok(Requeued::NotDead(
                    JobState::parse(&state).unwrap_or(JobState::Done),
                ));
            }
            // Dead, yet not requeued: only a job without a request stays dead.
            Ok(Requeued::NoRequest)
        })
        .await
    }

    async fn requeue_dead(
        &self,
        target: &str,
        since: SystemTime,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        within("requeue_dead", ADMIN_TIMEOUT, async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| unavailable(&e))?;
            let requeued = requeue_where(
                &tx,
                "target = $1 AND updated_at >= now() + $2::int8 * interval '1 microsecond'
                     AND updated_at <= now() + $3::int8 * interval '1 microsecond'",
                &[&target, &offset(since, now), &offset(until, now)],
            )
            .await?;
            if requeued > 0 {
                notify(&tx).await?;
                tx.commit().await.map_err(|e| unavailable(&e))?;
            }
            Ok(requeued)
        })
        .await
    }

    async fn purge(&self, before: SystemTime, now: SystemTime, limit: usize) -> Result<u64, StoreError> {
        within("purge", ADMIN_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("DELETE FROM dedupe WHERE expires_at <= now()")
                .await
                .map_err(|e| unavailable(&e))?;
            client.execute(&stmt, &[]).await.map_err(|e| unavailable(&e))?;
            let stmt = client
                .prepare_cached(
                    "DELETE FROM events WHERE id IN (
                         SELECT id FROM events e
                         WHERE e.received_at < now() + $1::int8 * interval '1 microsecond'
                           AND NOT EXISTS (SELECT 1 FROM jobs j
                                           WHERE j.event_id = e.id AND j.state IN ('queued', 'in_flight'))
                         LIMIT $2)",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            client
                .execute(
                    &stmt,
                    &[&offset(before, now), &i64::try_from(limit).unwrap_or(i64::MAX)],
                )
                .await
                .map_err(|e| unavailable(&e))
        })
        .await
    }

    async fn queue_stats(&self, now: SystemTime) -> Result<QueueStats, StoreError> {
        within("queue_stats", ADMIN_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")
                .await
                .map_err(|e| unavailable(&e))?;
            let mut jobs: Vec<(JobState, u64)> = [
                JobState::Queued,
                JobState::InFlight,
                JobState::Done,
                JobState::Dead,
            ]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
            for row in client.query(&stmt, &[]).await.map_err(|e| unavailable(&e))? {
                let state: &str = col(&row, 0)?;
                if let Some(slot) = jobs.iter_mut().find(|(s, _)| s.as_str() == state) {
                    slot.1 = u64::try_from(col::<i64>(&row, 1)?).unwrap_or(0);
                }
            }
            let stmt = client
                .prepare_cached(
                    "SELECT min(due_at), now() FROM jobs WHERE state = 'queued' AND due_at <= now()",
                )
                .await
                .map_err(|e| unavailable(&e))?;
            let row = client.query_one(&stmt, &[]).await.map_err(|e| unavailable(&e))?;
            let oldest: Option<SystemTime> = col(&row, 0)?;
            let db_now: SystemTime = col(&row, 1)?;
            Ok(QueueStats {
                jobs,
                oldest_due: oldest.map(|t| on_caller_clock(t, db_now, now)),
            })
        })
        .await
    }

    async fn event_body(&self, id: Uuid) -> Result<Option<(String, Bytes)>, StoreError> {
        within("event_body", OPERATION_TIMEOUT, async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached("SELECT content_type, body FROM events WHERE id = $1")
                .await
                .map_err(|e| unavailable(&e))?;
            let Some(row) = client
                .query_opt(&stmt, &[&id])
                .await
                .map_err(|e| unavailable(&e))?
            else {
                return Ok(None);
            };
            Ok(Some((col(&row, 0)?, Bytes::from(col::<Vec<u8>>(&row, 1)?))))
        })
        .await
    }
}

/// The loop guard's store-side checks, in the guard's order and relative
/// to the database's `now()`; `Some` when one holds the job back.
/// The caller holds the target's advisory lock when a burst limit is set,
/// so the count cannot race another relay's ingest for the same target.
async fn hold_back(
    tx: &deadpool_postgres::Transaction<'_>,
    job: &NewJob,
) -> Result<Option<Dropped>, StoreError> {
    let trigger = job.trigger();
    for check in job.limits.checks() {
        let held = match check {
            Check::Burst { limit, per } => {
                let stmt = tx
                    .prepare_cached(
                        "SELECT count(*) FROM (
                             SELECT 1 FROM jobs
                             WHERE target = $1 AND created_at > now() - $2::int8 * interval '1 microsecond'
                             LIMIT $3) recent",
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
                let row = tx
                    .query_one(&stmt, &[&job.target, &micros(per), &i64::from(limit)])
                    .await
                    .map_err(|e| unavailable(&e))?;
                trigger.burst(col(&row, 0)?, limit, per)
            }
            Check::Dedupe { key, window } => {
                // The row lock of ON CONFLICT makes a second relay wait for
                // the first's verdict.
                let stmt = tx
                    .prepare_cached(
                        "INSERT INTO dedupe (target, key, expires_at)
                         VALUES ($1, $2, now() + $3::int8 * interval '1 microsecond')
                         ON CONFLICT (target, key) DO UPDATE SET expires_at = EXCLUDED.expires_at
                         WHERE dedupe.expires_at <= now()",
                    )
                    .await
                    .map_err(|e| unavailable(&e))?;
                let taken = tx
                    .execute(&stmt, &[&job.target, &key, &micros(window)])
                    .await
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

async fn insert_drop(
    tx: &deadpool_postgres::Transaction<'_>,
    event: Uuid,
    drop: &Dropped,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO drops (event_id, route, target, rule, reason) VALUES ($1, $2, $3, $4, $5)",
        )
        .await
        .map_err(|e| unavailable(&e))?;
    tx.execute(
        &stmt,
        &[&event, &drop.route, &drop.target, &drop.rule, &drop.reason],
    )
    .await
    .map(|_| ())
    .map_err(|e| unavailable(&e))
}

/// Wakes every relay's dispatcher when this transaction commits (and not if
/// it rolls back).
async fn notify(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.batch_execute("NOTIFY relay_jobs")
        .await
        .map_err(|e| unavailable(&e))
}

/// Puts dead jobs matching `condition` (whose parameters start at $1) back in
/// the queue with a fresh attempt budget; their history stays.
async fn requeue_where(
    tx: &deadpool_postgres::Transaction<'_>,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let sql = format!(
        "UPDATE jobs SET state = 'queued', attempts = 0, maybe_attempts = 0, due_at = now(), updated_at = now(),
             last_error = NULL
         WHERE state = 'dead' AND request IS NOT NULL AND {condition}"
    );
    let stmt = tx.prepare_cached(&sql).await.map_err(|e| unavailable(&e))?;
    tx.execute(&stmt, params).await.map_err(|e| unavailable(&e))
}

fn job_view(row: &Row) -> Result<JobView, StoreError> {
    let state: &str = col(row, 4)?;
    Ok(JobView {
        id: col::<Uuid>(row, 0)?.to_string(),
        event_id: col::<Uuid>(row, 1)?.to_string(),
        route: col(row, 2)?,
        target: col(row, 3)?,
        state: JobState::parse(state).unwrap_or(JobState::Dead),
        attempts: u32::try_from(col::<i32>(row, 5)?).unwrap_or(0),
        last_error: col(row, 6)?,
        created_at: col(row, 7)?,
        updated_at: col(row, 8)?,
        due_at: col(row, 9)?,
        retryable: col(row, 10)?,
    })
}

/// Opens the dedicated LISTEN connection (never a pooled one: a pooled
/// connection would be handed to other work and its notifications lost).
async fn listen_on(
    connect: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    wake: &Notify,
) -> Result<(Client, PgConnection), String> {
    let (client, mut connection) = connect
        .connect(tls.clone())
        .await
        .map_err(|e| connect_error(&e))?;
    drive(&mut connection, wake, client.batch_execute("LISTEN relay_jobs"))
        .await?
        .map_err(|e| describe(&e))?;
    Ok((client, connection))
}

/// Runs `work` while reading the connection, which is what makes a query's
/// answer (and any notification) arrive. Ends early, with the reason, if
/// the connection does.
async fn drive<F: Future>(
    connection: &mut PgConnection,
    wake: &Notify,
    work: F,
) -> Result<F::Output, String> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(describe(&e)),
                None => return Err("the server closed the connection".to_owned()),
            },
        }
    }
}

/// Listens for as long as the store lives, reconnecting when the connection
/// drops. A missed signal costs latency only (the dispatcher also polls), so
/// after every reconnect the dispatcher is woken to look for itself.
async fn keep_listening(
    first: (Client, PgConnection),
    connect: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    wake: Arc<Notify>,
    shown: String,
) {
    let mut session = first;
    loop {
        let (client, mut connection) = session;
        let heartbeat = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.batch_execute("SELECT 1")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return describe(&e),
                    Err(_) => return "the connection stopped answering".to_owned(),
                }
            }
        };
        let lost = match drive(&mut connection, &wake, heartbeat).await {
            Ok(reason) | Err(reason) => reason,
        };
        drop(client);
        warn!(
            store = %shown,
            error = %lost,
            "lost the PostgreSQL LISTEN connection; reconnecting (work from other relays is found by polling meanwhile)"
        );
        let mut delay = BACKOFF_FIRST;
        let mut failures = 0u32;
        session = loop {
            tokio::time::sleep(delay).await;
            match listen_on(&connect, &tls, &wake).await {
                Ok(session) => break session,
                Err(e) => {
                    failures += 1;
                    debug!(store = %shown, error = %e, "cannot reconnect the LISTEN connection yet");
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        };
        info!(store = %shown, failures, "PostgreSQL LISTEN connection restored");
        wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL that says nothing of timeouts gets a daemon's: a dead peer is
    /// noticed in seconds, not after the kernel's two hours.
    #[test]
    fn connections_get_keepalives_and_a_user_timeout_unless_the_url_sets_them() {
        let plain: tokio_postgres::Config = "postgres://relay@db/relay".parse().unwrap();
        let hardened = connection_config(&plain);
        assert_eq!(hardened.get_connect_timeout(), Some(&POOL_TIMEOUT));
        assert_eq!(hardened.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
        assert!(hardened.get_keepalives());
        assert_eq!(hardened.get_keepalives_idle(), Duration::from_secs(15));
        assert_eq!(hardened.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(hardened.get_keepalives_retries(), Some(3));

        let own: tokio_postgres::Config =
            "postgres://relay@db/relay?connect_timeout=2&tcp_user_timeout=30&keepalives_idle=60"
                .parse()
                .unwrap();
        let kept = connection_config(&own);
        assert_eq!(kept.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(kept.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(kept.get_keepalives_idle(), Duration::from_secs(60));
    }
}
