//! The SQLite schema: its migrations, the connection settings every
//! database is opened with, the read-only look at a schema's version for
//! `relay check`, and the lock file that keeps a second relay off a
//! database.
//!
//! What this module must never do: edit a released migration (add one), or
//! touch relay's rows beyond what a migration carries over as it is. A
//! migration runs in its own transaction, with foreign keys off, so
//! rebuilding a table cascades nothing away.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::Connection;
use tracing::info;

use crate::store::{SchemaStatus, StoreError};

/// The schema, one migration per version, applied in order; `user_version`
/// records how far a database has come. Never edit a released entry: add one.
const MIGRATIONS: &[&str] = &[
    V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13, V14, V15, V16,
];

/// The schema version this build migrates a database to (`relay --version`).
pub(crate) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

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

/// Event bodies may be stored compressed; `codec` says how (see
/// [`super::codec::Codec`]).
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

/// The pipeline a job's trigger started, as its CI's answer named it
/// (`crate::pipeline::Pipeline`); all null until an answer names one. The
/// index finds the job a pipeline event reports on.
const V6: &str = "
ALTER TABLE jobs ADD COLUMN pipeline_id TEXT;
ALTER TABLE jobs ADD COLUMN pipeline_number INTEGER;
ALTER TABLE jobs ADD COLUMN pipeline_url TEXT;
ALTER TABLE jobs ADD COLUMN pipeline_state TEXT;
ALTER TABLE jobs ADD COLUMN pipeline_updated_at INTEGER;
CREATE INDEX jobs_pipeline ON jobs (pipeline_id) WHERE pipeline_id IS NOT NULL;
";

/// Following a pipeline by polling its CI: `follow_until` is set once a
/// trigger of a following target names a pipeline that has not ended (null:
/// never followed), `follow_due` is when the next poll is due (null: not
/// polling, because it ended, gave up or was refused; `follow_note` says
/// which), `follow_polls` how many polls so far. The index finds the due
/// polls of each target.
const V7: &str = "
ALTER TABLE jobs ADD COLUMN follow_due INTEGER;
ALTER TABLE jobs ADD COLUMN follow_until INTEGER;
ALTER TABLE jobs ADD COLUMN follow_polls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN follow_note TEXT;
CREATE INDEX jobs_follow ON jobs (target, follow_due) WHERE follow_due IS NOT NULL;
";

/// Reporting back and shadow runs. A trigger job keeps the repository and
/// commit it is about, whether its target is a shadow, and, for a route
/// with `report`, where its states are reported (`report`: a
/// `report::ReportSpec` as JSON). A report job is one whose `report_of`
/// names the trigger job it reports on; its `report` holds what it says
/// (the spec, and the pipeline as it stood). The index finds shadow runs.
const V8: &str = "
ALTER TABLE jobs ADD COLUMN repo TEXT;
ALTER TABLE jobs ADD COLUMN sha TEXT;
ALTER TABLE jobs ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN report TEXT;
ALTER TABLE jobs ADD COLUMN report_of TEXT;
CREATE INDEX jobs_shadow ON jobs (route, created_at) WHERE shadow = 1;
";

/// The dispatcher's next wake-up is the earliest due job or lease of any
/// target. The per-target indexes put `target` first, so that minimum read
/// every queued job: 0.1 s at a million, on every finished send. These two
/// answer it from their first entry (PostgreSQL's V6).
const V9: &str = "
CREATE INDEX jobs_due ON jobs (due_at) WHERE state = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'in_flight';
";

/// Two costs that grew with the store.
///
/// A finished trigger marks its still-waiting reports superseded. Without
/// an index on `report_of`, SQLite looked for them through every queued
/// job: 0.14 s of CPU for each finished send with a million queued, which
/// is what made ingest fall to 72 webhooks/s at 100,000 queued and 7 at a
/// million (PostgreSQL's V7).
///
/// `/metrics` counts jobs per state on every scrape: a read of the whole
/// table, seconds with 14 days of history. `job_counts` keeps the counts,
/// moved by triggers in the same transaction as the rows (a rolled-back
/// savepoint takes its counts with it; a purge's cascade fires them too).
/// A migration that rebuilds `jobs` must create the triggers again.
const V10: &str = "
CREATE INDEX jobs_report_of ON jobs (report_of) WHERE report_of IS NOT NULL;
CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts (state, n) VALUES ('queued', 0), ('in_flight', 0), ('done', 0), ('dead', 0);
UPDATE job_counts SET n = (SELECT COUNT(*) FROM jobs WHERE jobs.state = job_counts.state);
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER jobs_counted_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
";

/// Inserted jobs are counted by the statements that insert them
/// (`Tx::count_inserted`), no longer by a trigger. The trigger made each
/// insert a statement that may write several rows, and the foreign key to
/// `events` one that may abort, and SQLite keeps a statement journal for
/// such a statement: a copy of every page it touches that the transaction
/// had already changed, about 5% of relay's CPU a webhook at 32
/// connections. Updates and deletes are still counted by V10's triggers.
/// Something that inserts jobs in SQL of its own (a test's or the bench's
/// fixture) must count them too.
const V11: &str = "
DROP TRIGGER jobs_counted_insert;
";

/// A job's lease is found through `jobs_lease` (V9) alone. The per-target
/// `jobs_leased` (V3) cost every job an entry written when it was leased
/// and removed when it finished, and one more page on most commits. Its
/// two readers, the claim of lapsed leases and the status page's count of
/// a target's jobs in flight, now read `jobs_lease` and keep their
/// target's rows: it holds only jobs in flight, at most the targets' send
/// slots (relay requeues them all when it starts), and the claim reads
/// only the lapsed ones.
const V12: &str = "
DROP INDEX jobs_leased;
";

/// Dedupe keys are one B-tree, ordered by `(target, key)` (`WITHOUT
/// ROWID`), which the purge sweeps a bounded batch at a time in that order:
/// the keys a batch forgets then sit on a few neighbouring pages. Before,
/// the purge scanned the whole table and deleted every expired key in one
/// statement, holding the writer (and every webhook waiting on it) for over
/// a second after a busy hour. In expiry order instead, each key a batch
/// forgot was on a page of its own (a commit's sha is random): 1.6 GB
/// written to forget 360,000 keys, against 79 MB in key order. A key's
/// insert also writes one B-tree where it wrote two: 32 WAL frames a commit
/// of 21 keys instead of 34.5.
const V13: &str = "
CREATE TABLE dedupe_v13 (
    target     TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (target, key)
) WITHOUT ROWID;
INSERT INTO dedupe_v13 (target, key, expires_at) SELECT target, key, expires_at FROM dedupe;
DROP TABLE dedupe;
ALTER TABLE dedupe_v13 RENAME TO dedupe;
";

/// Dedupe keys become a log: one row a key taken, appended in rowid order
/// with no index, so a commit's keys share the table's last leaf. The
/// lookup moved to an index off the database file (the `dedupe` module), which opening
/// the store rebuilds from this. Ordered by `(target, key)` on disk (V13), a
/// commit's random shas each wrote a leaf of their own: about 10 KB a
/// webhook with the checkpoint's copy.
const V14: &str = "
CREATE TABLE dedupe_v14 (
    target     TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
INSERT INTO dedupe_v14 (target, key, expires_at) SELECT target, key, expires_at FROM dedupe;
DROP TABLE dedupe;
ALTER TABLE dedupe_v14 RENAME TO dedupe;
";

/// The pipeline lookup in two halves, so that neither takes a random key.
/// CircleCI's pipeline ids are random UUIDs: indexed by themselves, each
/// trigger's answer wrote a leaf of its own, anywhere in an index as long as
/// the retention (14 frames of a commit's 63 at 32 connections, and one leaf
/// a trigger once the index outgrows a commit). An id that is not a plain
/// number is indexed behind the pipeline's number, which grows by one a
/// pipeline in each project; a plain-number id (GitLab's, API v1.1's) grows
/// by itself and keeps its own index. `queue::correlate` reads both with
/// these same conditions, which is what lets SQLite use the partial indexes.
const V15: &str = "
DROP INDEX jobs_pipeline;
CREATE INDEX jobs_pipeline ON jobs (pipeline_id)
    WHERE pipeline_id IS NOT NULL AND NOT (pipeline_id GLOB '*[^0-9]*' AND pipeline_number IS NOT NULL);
CREATE INDEX jobs_pipeline_numbered ON jobs (pipeline_number, pipeline_id)
    WHERE pipeline_id GLOB '*[^0-9]*' AND pipeline_number IS NOT NULL;
";

/// State changes are counted by the statements that make them
/// (`Tx::count_moved`), no longer by V10's trigger, as V11 did for inserts. The
/// trigger ran a program of two `job_counts` updates for every row whose
/// state changed, twice a trigger sent (claimed, then finished); the
/// statements' two one-row updates cost the store 8% fewer instructions a
/// webhook and a drained job (callgrind, the `group_commit` bench). Deletes
/// (retention's purge) are still counted by V10's trigger.
const V16: &str = "
DROP TRIGGER jobs_counted_update;
";

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Creates and locks the database's lock file, held open for the store's
/// life: the OS lock on it is what keeps a second relay from dispatching the
/// same jobs. `Err` says why, for the store's open error.
pub(super) fn lock(db: &Path) -> Result<File, String> {
    let lock_path = lock_path(db);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot create lock file {}: {e}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        "another relay is using this database; each relay needs its own sqlite file (or share a postgres:// store)"
            .to_owned()
    })?;
    Ok(lock)
}

/// Sets the connection up for relay's load, brings the schema up to date
/// (one transaction per migration) and builds the dedupe keys' index from
/// the keys still open at `now`.
pub(super) fn prepare(conn: &mut Connection, now: SystemTime) -> Result<(), String> {
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
    let keys = super::dedupe::open_index(conn, now)
        .map_err(|e| format!("cannot build the index of dedupe keys: {e}"))?;
    if keys > 0 {
        // A restart inside a busy window reads back every key still open:
        // say why it took a moment.
        info!(
            keys,
            "the loop guard's open dedupe keys are read back from the store"
        );
    }
    Ok(())
}

/// The schema version of the database at `path`, read-only: a running
/// relay's lock is not needed and not disturbed.
pub(crate) fn schema_status(path: &Path) -> Result<SchemaStatus, StoreError> {
    let latest = MIGRATIONS.len() as u32;
    if !path.exists() {
        return Ok(SchemaStatus { version: 0, latest });
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
    Ok(SchemaStatus {
        version: u32::try_from(version).unwrap_or(0),
        latest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// The first column of every row `sql` selects, as text.
    fn texts(conn: &Connection, sql: &str) -> Vec<String> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A database at `path` as a relay at schema `version` left it.
    fn database_at(path: &Path, version: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        for (index, migration) in MIGRATIONS[..version].iter().enumerate() {
            conn.execute_batch(migration).unwrap();
            conn.pragma_update(None, "user_version", index as i64 + 1)
                .unwrap();
        }
        conn
    }

    /// A database written by a relay at schema 4 comes through the jobs
    /// table's rebuild whole: rows, attempts, and the foreign keys that tie
    /// them to their event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_jobs_rebuild_keeps_every_row_and_its_ties() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = database_at(&path, 4);
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
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
        let store = SqliteStore::open(&path, std::time::UNIX_EPOCH).unwrap();
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let rows: Vec<String> = texts(&conn, "SELECT id || '|' || event_id || '|' || state || '|' || COALESCE(request, '-') || '|' || needs_payload
                        || '|' || attempts || '|' || maybe_attempts || '|' || due_at || '|' || COALESCE(last_error, '-')
                        || '|' || created_at || '|' || updated_at
                 FROM jobs ORDER BY id");
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
        let indexes: Vec<String> = texts(
            &conn,
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL
                 ORDER BY name",
        );
        assert_eq!(
            indexes,
            [
                "jobs_created",
                "jobs_due",
                "jobs_event",
                "jobs_follow",
                "jobs_lease",
                "jobs_pipeline",
                "jobs_pipeline_numbered",
                "jobs_queued",
                "jobs_report_of",
                "jobs_shadow",
            ],
            "the rebuild's four, and every later migration's"
        );
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

    /// A relay at schema 13 keeps every dedupe key it held, as rows of a
    /// log with no index of its own (the lookup is the writer's index,
    /// rebuilt from these), and the keys hold their commits back after the
    /// upgrade as before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dedupe_keys_become_a_log_the_index_is_built_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let main = "acme/api\nrefs/heads/main\nabc";
        {
            let conn = database_at(&path, 13);
            conn.execute(
                "INSERT INTO dedupe (target, key, expires_at)
                     VALUES ('ci', ?1, 5), ('ci', 'acme/api\nrefs/heads/dev\nabc', 9), ('gl', ?1, 4000000000000)",
                [main],
            )
            .unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let log = texts(
            &conn,
            "SELECT target || '|' || key || '|' || expires_at FROM main.dedupe ORDER BY expires_at",
        );
        assert_eq!(
            log,
            [
                "ci|acme/api\nrefs/heads/main\nabc|5",
                "ci|acme/api\nrefs/heads/dev\nabc|9",
                "gl|acme/api\nrefs/heads/main\nabc|4000000000000"
            ],
            "every key kept"
        );
        let indexes = texts(
            &conn,
            "SELECT name FROM sqlite_schema WHERE tbl_name = 'dedupe' AND type = 'index'",
        );
        assert!(indexes.is_empty(), "the log has no index: {indexes:?}");
        let now = super::super::from_millis(1_000);
        let window = Duration::from_secs(60);
        let tx = super::super::tally::Tx::immediate(&conn);
        let take = |target: &str| super::super::dedupe::take(&tx, target, main, now, window).unwrap();
        assert!(
            !take("gl"),
            "a key whose window is open still holds its commit back"
        );
        assert!(take("ci"), "a key whose window closed is taken again");
    }

    /// Pipelines recorded by a relay at schema 14 are found after the
    /// upgrade as events name them: CircleCI's by id and number, GitLab's by
    /// its id, one recorded without a number by its id.
    #[test]
    fn the_pipelines_recorded_before_the_split_index_are_found_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let circleci = "5034460f-c7c4-4c43-9457-de07e2029e7b";
        let unnumbered = "6a1b2c3d-0000-4000-8000-00000000000a";
        {
            let conn = database_at(&path, 14);
            conn.execute_batch(&format!(
                "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary)
                     VALUES ('e1', 'github', 'd1', 'push', 5, 'application/json', X'7B7D', 0, '{{}}');
                 INSERT INTO jobs (id, event_id, route, target, state, needs_payload, due_at, created_at,
                                   updated_at, pipeline_id, pipeline_number)
                     VALUES ('j1', 'e1', 'r', 'ci', 'done', 0, 5, 5, 5, '{circleci}', 42),
                            ('j2', 'e1', 'r', 'gl', 'done', 0, 5, 6, 6, '918273', 17),
                            ('j3', 'e1', 'r', 'ci', 'done', 0, 5, 7, 7, '{unnumbered}', NULL);"
            ))
            .unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let started = |id: &str, number: u64| {
            super::super::queue::correlate(
                &super::super::tally::Tx::immediate(&conn),
                id,
                number,
                crate::pipeline::PipelineState::Running,
                super::super::from_millis(1_000),
            )
            .unwrap()
            .map(|upstream| upstream.target)
        };
        assert_eq!(started(circleci, 42).as_deref(), Some("ci"));
        assert_eq!(started(circleci, 0), None, "a random id is found with its number");
        assert_eq!(started("918273", 0).as_deref(), Some("gl"));
        assert_eq!(started(unnumbered, 0).as_deref(), Some("ci"));
    }

    /// A relay at schema 15 counted state changes with a trigger; after the
    /// upgrade the statements count them, once: the kept counts still match
    /// the rows after a restart's recovery, a claim and a completion.
    #[test]
    fn the_counts_kept_before_v16_stay_right_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = database_at(&path, 15);
            conn.execute_batch(
                "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary)
                     VALUES ('01a24b56-65c6-74d2-a328-0000000000e1', 'github', 'd1', 'push', 5, 'application/json', X'7B7D', 0, '{}');
                 INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at,
                                   claim_id, lease_until, created_at, updated_at)
                     VALUES ('01a24b56-65c6-74d2-a328-000000000001', '01a24b56-65c6-74d2-a328-0000000000e1', 'r', 'ci', 'in_flight',
                             '{\"url\":\"http://127.0.0.1:9/\",\"headers\":[],\"body\":{\"text\":\"\"},\"auth\":{\"type\":\"header\",\"name\":\"Circle-Token\"}}',
                             0, 5, '01a24b56-65c6-74d2-a328-0000000000c1', 99, 5, 5),
                            ('01a24b56-65c6-74d2-a328-000000000002', '01a24b56-65c6-74d2-a328-0000000000e1', 'r', 'ci', 'done', NULL, 0, 5,
                             NULL, NULL, 5, 5);
                 UPDATE job_counts SET n = CASE state WHEN 'in_flight' THEN 1 WHEN 'done' THEN 1 ELSE 0 END;",
            )
            .unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let kept = |conn: &Connection| texts(conn, "SELECT state || '=' || n FROM job_counts ORDER BY state");
        let tx = conn.unchecked_transaction().unwrap();
        assert_eq!(super::super::queue::recover(&tx).unwrap(), 1);
        tx.commit().unwrap();
        assert_eq!(kept(&conn), ["dead=0", "done=1", "in_flight=0", "queued=1"]);
        let now = super::super::from_millis(1_000);
        let claimed = super::super::queue::claim(
            &super::super::tally::Tx::immediate(&conn),
            "ci",
            8,
            Duration::from_secs(60),
            now,
        )
        .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(kept(&conn), ["dead=0", "done=1", "in_flight=1", "queued=0"]);
        let done = super::super::queue_cost::completion(&claimed[0], crate::store::NextState::Done, None);
        assert!(super::super::queue::complete(&super::super::tally::Tx::immediate(&conn), &done).unwrap());
        assert_eq!(kept(&conn), ["dead=0", "done=2", "in_flight=0", "queued=0"]);
    }
}
