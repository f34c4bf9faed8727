//! A queue filled straight into a SQLite file, or a PostgreSQL database,
//! without HTTP: the delivery and queue-depth measurements start from it.
//! The measured relay makes the store's schema ([`make_schema`]); the rows
//! go in as plain SQL on columns every schema since reporting back (V8)
//! has, with the request as relay stores it (`PreparedRequest` as JSON), so
//! a build of another commit (`--relay`) can be measured on it. Never runs
//! while a relay holds the same store.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay::request::{Auth, PreparedRequest, RequestBody};
use rusqlite::{Connection, params};

use crate::process::free_port;
use crate::relay::{Setup, Workspace, postgres_error, start_relay};

/// Events committed per transaction.
const CHUNK: usize = 10_000;

/// What a fill did.
#[derive(Debug, Clone, Copy)]
pub struct Filled {
    /// Jobs queued (one per event).
    pub jobs: usize,
    pub secs: f64,
    /// Whether `budget` ran out before every job was queued.
    pub cut_short: bool,
}

/// The jobs' target: its name in relay's config and the address its
/// requests go to.
#[derive(Debug, Clone, Copy)]
pub struct JobTarget<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
}

/// Has the measured relay create (or migrate) the SQLite store at `db`:
/// started on it with `setup`, then stopped.
pub async fn make_schema(ws: &Workspace, db: &Path, circle: SocketAddr, setup: &Setup) -> Result<(), String> {
    let label = format!(
        "schema-{}",
        db.file_stem().and_then(|s| s.to_str()).unwrap_or("db")
    );
    make_schema_at(ws, &format!("sqlite://{}", db.display()), &label, circle, setup).await
}

/// [`make_schema`] for the store at URL `store`, `label` naming its files.
pub async fn make_schema_at(
    ws: &Workspace,
    store: &str,
    label: &str,
    circle: SocketAddr,
    setup: &Setup,
) -> Result<(), String> {
    let port = free_port()?;
    let relay = start_relay(ws, label, port, store, circle, setup).await?;
    drop(relay);
    Ok(())
}

/// The request every backlog job stores: a CircleCI v2 trigger at `addr`.
fn backlog_request(addr: SocketAddr) -> Result<String, String> {
    serde_json::to_string(&PreparedRequest {
        url: format!("http://{addr}/api/v2/project/gh/acme/api/pipeline"),
        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
        auth: Auth::Header {
            name: "Circle-Token".to_owned(),
        },
    })
    .map_err(|e| e.to_string())
}

/// Queues `count` jobs for `target` in the PostgreSQL database at `url`
/// (its schema made by [`make_schema_at`]), one event each, in one
/// statement. `tag` keeps delivery ids apart between fills.
pub async fn fill_postgres(url: &str, count: usize, target: JobTarget<'_>, tag: &str) -> Result<(), String> {
    let request = backlog_request(target.addr)?;
    let fail = |e: &dyn std::fmt::Display| format!("filling {}: {e}", target.name);
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| fail(&postgres_error(&e)))?;
    tokio::spawn(connection);
    let count = i64::try_from(count).map_err(|e| fail(&e))?;
    client
        .execute(
            "WITH e AS (
                 INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary)
                 SELECT gen_random_uuid(), 'github', 'backlog-' || $1 || '-' || n, 'push', now(),
                        'application/json', convert_to('{\"ref\":\"refs/heads/main\"}', 'UTF8'), 0, '{}'
                 FROM generate_series(1, $2::int8) AS n
                 RETURNING id
             )
             INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, created_at,
                               updated_at, repo, sha)
             SELECT gen_random_uuid(), e.id, 'builds', $3, 'queued', $4, false, now(), now(), now(), 'acme/api',
                    '2222222222222222222222222222222222222222'
             FROM e",
            &[&tag, &count, &target.name, &request],
        )
        .await
        .map_err(|e| fail(&postgres_error(&e)))?;
    // Fresh statistics, as autovacuum would have them on a store that
    // filled over time.
    client
        .batch_execute("ANALYZE events; ANALYZE jobs")
        .await
        .map_err(|e| fail(&postgres_error(&e)))?;
    Ok(())
}

/// Queues `count` jobs for `target` in the SQLite store at `db` (its schema
/// made by [`make_schema`]), one event each; stops at a whole chunk once
/// `budget` has passed. `tag` keeps delivery ids apart between fills of one
/// file.
pub async fn fill(
    db: &Path,
    count: usize,
    target: JobTarget<'_>,
    tag: &str,
    budget: Duration,
) -> Result<Filled, String> {
    let request = backlog_request(target.addr)?;
    let (db, name, tag) = (db.to_owned(), target.name.to_owned(), tag.to_owned());
    tokio::task::spawn_blocking(move || {
        let fail = |e: &dyn std::fmt::Display| format!("filling {}: {e}", db.display());
        let conn = Connection::open(&db).map_err(|e| fail(&e))?;
        let filled = fill_rows(&conn, count, &name, &request, &tag, budget).map_err(|e| fail(&e))?;
        on_disk(conn, &db).map_err(|e| fail(&e))?;
        Ok(filled)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn fill_rows(
    conn: &Connection,
    count: usize,
    target: &str,
    request: &str,
    tag: &str,
    budget: Duration,
) -> rusqlite::Result<Filled> {
    // A queue for measuring: nothing here needs to survive a crash.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")?;
    let started = Instant::now();
    let mut queued = 0;
    while queued < count && started.elapsed() <= budget {
        let this = CHUNK.min(count - queued);
        let tx = conn.unchecked_transaction()?;
        {
            let mut event = tx.prepare_cached(
                "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop,
                                     summary, codec)
                 VALUES (?1, 'github', ?2, 'push', ?3, 'application/json', CAST(?4 AS BLOB), NULL, 0, '{}', 0)",
            )?;
            let mut job = tx.prepare_cached(
                "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, created_at,
                                   updated_at, repo, sha)
                 VALUES (?1, ?2, 'builds', ?3, 'queued', ?4, 0, ?5, ?5, ?5, 'acme/api',
                         '2222222222222222222222222222222222222222')",
            )?;
            for n in queued..queued + this {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let event_id = uuid::Uuid::now_v7().to_string();
                event.execute(params![
                    event_id,
                    format!("backlog-{tag}-{n}"),
                    now,
                    r#"{"ref":"refs/heads/main"}"#
                ])?;
                job.execute(params![
                    uuid::Uuid::now_v7().to_string(),
                    event_id,
                    target,
                    request,
                    now
                ])?;
            }
        }
        count_inserted(&tx, "queued", this)?;
        tx.commit()?;
        queued += this;
    }
    Ok(Filled {
        jobs: queued,
        secs: started.elapsed().as_secs_f64(),
        cut_short: queued < count,
    })
}

/// Adds `jobs` a fill inserted in `state` with its own SQL to the counts
/// relay keeps on SQLite (`job_counts`, schema V10), when the schema has
/// them and no trigger counts inserts (from V11, relay counts the jobs it
/// inserts itself): the measured build may be an older one.
pub fn count_inserted(conn: &Connection, state: &str, jobs: usize) -> rusqlite::Result<()> {
    let has = |kind: &str, name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = ?1 AND name = ?2)",
            params![kind, name],
            |row| row.get(0),
        )
    };
    if has("table", "job_counts")? && !has("trigger", "jobs_counted_insert")? {
        conn.execute(
            "UPDATE job_counts SET n = n + ?2 WHERE state = ?1",
            params![state, i64::try_from(jobs).unwrap_or(i64::MAX)],
        )?;
    }
    Ok(())
}

/// Closes a fill's connection with every row in the database file and the
/// file on disk. Before relay starts: otherwise its first fsyncs wait for
/// the kernel to write the fill back (measured: 0.44 s of every webhook's
/// time as relay started on a ten-million-event history).
pub fn on_disk(conn: Connection, db: &Path) -> std::io::Result<()> {
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(std::io::Error::other)?;
    drop(conn);
    std::fs::File::open(db)?.sync_all()
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, params};

    use super::count_inserted;

    fn kept_and_counted(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT (SELECT n FROM job_counts WHERE state = 'queued'),
                    (SELECT COUNT(*) FROM jobs WHERE state = 'queued')",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap()
    }

    fn insert_queued(conn: &Connection, jobs: usize) {
        for _ in 0..jobs {
            let event = uuid::Uuid::now_v7().to_string();
            conn.execute(
                "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary, codec)
                 VALUES (?1, 'github', ?1, 'push', 0, 'application/json', x'7b7d', 0, '{}', 0)",
                params![event],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, created_at,
                                   updated_at, repo, sha)
                 VALUES (?1, ?2, 'builds', 'ci', 'queued', '{}', 0, 0, 0, 0, 'acme/api', 'x')",
                params![uuid::Uuid::now_v7().to_string(), event],
            )
            .unwrap();
        }
    }

    /// The fills' own inserts reach relay's kept counts once: added by the
    /// fill on this schema, by the trigger on a schema that still has it.
    #[tokio::test]
    async fn a_fills_jobs_are_counted_once_whichever_build_made_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        drop(relay::store::SqliteStore::open(&path, std::time::SystemTime::now()).unwrap());
        let conn = Connection::open(&path).unwrap();
        insert_queued(&conn, 3);
        count_inserted(&conn, "queued", 3).unwrap();
        assert_eq!(kept_and_counted(&conn), (3, 3));
        // As schema V10 to V11 had it: the trigger counts, the fill must not.
        conn.execute_batch(
            "CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
                 UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
             END;",
        )
        .unwrap();
        insert_queued(&conn, 2);
        count_inserted(&conn, "queued", 2).unwrap();
        assert_eq!(kept_and_counted(&conn), (5, 5));
        // Before V10 there are no kept counts to add to.
        conn.execute_batch("DROP TRIGGER jobs_counted_insert; DROP TABLE job_counts;")
            .unwrap();
        count_inserted(&conn, "queued", 1).unwrap();
    }
}
