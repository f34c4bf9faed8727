//! The store-size point: relay's ingest at 32 connections on an empty
//! SQLite store and on one holding `--history` finished events inside
//! retention (ten million by default: 14 days at 8 webhooks/s), and how
//! long the retention purge holds ingest while it deletes events past
//! retention.
//!
//! The measured relay makes the store's schema (one webhook, sent and
//! triggered), so any build's relay can be measured: the history is then
//! copied from that event, its job and its attempt in plain SQL, each row
//! with ids and times of its own and a short body, as a finished event is
//! stored. [`EXPIRED`] of them are older than retention, and
//! [`EXPIRED_KEYS`] dedupe keys have had their window close: relay's purge
//! deletes both as it starts, while a probe sends webhooks at
//! [`PROBE_RATE`] a second and times each answer; the same probe on the
//! empty store is the baseline.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use serde::Serialize;

use crate::Options;
use crate::curves::CONNECTIONS;
use crate::load::{self, rss_mib};
use crate::process::{Running, free_port};
use crate::relay::{Setup, Workspace, start_relay};
use crate::servers::MockCircle;
use crate::subjects::{Summary, load_run, summarize};

/// Finished events inside retention, by default.
pub const HISTORY: usize = 10_000_000;

/// Finished events past retention, for the purge to delete at start.
const EXPIRED: usize = 200_000;

/// Dedupe keys whose window closed in the last hour, for the purge to
/// forget at start: an hour of pushes at [`PROBE_RATE`] (each push's sha is
/// a key of its own), what the hourly pass finds after a busy hour.
const EXPIRED_KEYS: usize = 360_000;

/// The longest the fill may take; past it the fill stops at a whole chunk
/// and the point is measured at the size reached.
const FILL_BUDGET: Duration = Duration::from_secs(1_200);

/// Rows of each table written per transaction.
const CHUNK: usize = 250_000;

/// The probe's webhooks per second, one request at a time in flight each.
pub const PROBE_RATE: u32 = 100;

/// How long the probe runs on the empty store.
const BASELINE_PROBE: Duration = Duration::from_secs(5);

/// The longest the probe waits for the purge to finish.
const PURGE_BUDGET: Duration = Duration::from_secs(300);

/// Retention in the measured relay's config; the history lies inside it.
const RETENTION_DAYS: u64 = 14;

#[derive(Debug, Clone, Serialize)]
pub struct StoreSize {
    /// The empty store: ingest, and the probe with nothing to purge.
    pub empty: SizePoint,
    /// The store with its history: ingest once the purge is done, and the
    /// probe while it ran.
    pub full: SizePoint,
    /// Events the purge deleted, and the seconds from relay's first answer
    /// until it said so (0 and the budget when it did not).
    pub purged: u64,
    pub purge_secs: f64,
    /// Seconds from relay's start until it answered, with the history in
    /// its store: the probe and the purge's clock start after it.
    pub open_secs: f64,
    /// Expired dedupe keys in the store as relay started, and how many its
    /// purge said it forgot (0 from a relay that does not say).
    pub expired_dedupe_keys: usize,
    pub dedupe_keys_purged: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizePoint {
    /// Finished events inside retention.
    pub events: usize,
    pub fill_secs: f64,
    pub fill_cut_short: bool,
    pub store_mib: f64,
    pub ingest: Summary,
    pub rss_after_mib: f64,
    pub probe: Probe,
}

/// Webhooks sent at [`PROBE_RATE`], each timed from send to answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Probe {
    pub sent: usize,
    /// Answered 202.
    pub accepted: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The answers slower than [`SLOW_MS`], the first [`SLOW_KEPT`]: when
    /// each was sent (seconds into the probe) and how long it took (ms).
    pub slow: Vec<(f64, f64)>,
}

/// An answer slower than this is listed in the probe's figures.
const SLOW_MS: f64 = 50.0;
const SLOW_KEPT: usize = 20;

pub async fn store_size(ws: &Workspace, options: &Options, history: usize) -> Result<StoreSize, String> {
    let circle = MockCircle::default()
        .start(false)
        .await
        .map_err(|e| e.to_string())?;
    let setup = Setup {
        retention: Some(format!("{RETENTION_DAYS}d")),
        ..Setup::default()
    };
    eprintln!("  an empty store …");
    let db = ws.path("history-empty.db");
    let store = format!("sqlite://{}", db.display());
    let port = free_port()?;
    let relay = start_relay(ws, "history-empty", port, &store, circle, &setup).await?;
    let idle = probe(ws, port, "empty", |_| false, BASELINE_PROBE).await;
    let empty = measured(ws, options, &relay, &db, 0, (0.0, false), idle).await?;
    drop(relay);

    let db = ws.path("history.db");
    let store = format!("sqlite://{}", db.display());
    eprintln!("  the measured relay makes the schema …");
    let port = free_port()?;
    let relay = start_relay(ws, "history-schema", port, &store, circle, &setup).await?;
    let first = probe(ws, port, "schema", |sent| sent >= 1, Duration::from_secs(10)).await;
    if first.accepted != 1 {
        return Err("store size: the first webhook was not accepted".to_owned());
    }
    settle_template(&db).await?;
    drop(relay);
    eprintln!(
        "  copying {history} finished events, {EXPIRED} of them past retention, and {EXPIRED_KEYS} expired dedupe keys …"
    );
    let started = Instant::now();
    let filled = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || fill(&db, history, EXPIRED, FILL_BUDGET))
            .await
            .map_err(|e| e.to_string())??
    };
    let fill_secs = started.elapsed().as_secs_f64();
    eprintln!("  {filled} events in {fill_secs:.0} s; relay starts and purges …");
    let port = free_port()?;
    let started = Instant::now();
    let relay = start_relay(ws, "history", port, &store, circle, &setup).await?;
    let open_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let log = relay.log.clone();
    // The log is read four times a second, not at every send.
    let purge_done =
        move |sent: usize| sent.is_multiple_of(PROBE_RATE as usize / 4) && purged(&log).is_some();
    let during = probe(ws, port, "purge", purge_done, PURGE_BUDGET).await;
    let (purged, dedupe_keys_purged) = purged(&relay.log).unwrap_or_default();
    let purge_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  relay answered {open_secs:.1} s after it started; it purged {purged} events and {dedupe_keys_purged} dedupe keys in {purge_secs:.1} s more; the probe's longest answer {:.1} ms; loading …",
        during.max_ms
    );
    let inside = filled.saturating_sub(EXPIRED);
    let full = measured(
        ws,
        options,
        &relay,
        &db,
        inside,
        (fill_secs, filled < history + EXPIRED),
        during,
    )
    .await?;
    drop(relay);
    // Ten million events are gigabytes: not kept past the measurement.
    let _ = std::fs::remove_file(&db);
    let _ = std::fs::remove_file(ws.path("history.db-wal"));
    Ok(StoreSize {
        empty,
        full,
        purged,
        purge_secs,
        open_secs,
        expired_dedupe_keys: EXPIRED_KEYS,
        dedupe_keys_purged,
    })
}

/// Loads `relay` at 32 connections, `--runs` times, and says what was measured.
async fn measured(
    ws: &Workspace,
    options: &Options,
    relay: &Running,
    db: &Path,
    events: usize,
    (fill_secs, fill_cut_short): (f64, bool),
    probe: Probe,
) -> Result<SizePoint, String> {
    let url = format!("http://127.0.0.1:{}/hooks/github", relay.port);
    let script = ws.path("history.lua");
    let mut runs = Vec::new();
    for run in 0..options.runs {
        let tag = format!("history-{events}-{run}-{}", uuid::Uuid::new_v4());
        load::write_script(&script, &ws.body, &tag).map_err(|e| e.to_string())?;
        runs.push(load_run(relay, &url, &script, CONNECTIONS, options.duration, None, None).await?);
    }
    Ok(SizePoint {
        events,
        fill_secs,
        fill_cut_short,
        store_mib: std::fs::metadata(db)
            .map(|m| m.len() as f64 / 1_048_576.0)
            .unwrap_or(0.0),
        ingest: summarize(CONNECTIONS, runs),
        rss_after_mib: rss_mib(relay.pid()).unwrap_or(0.0),
        probe,
    })
}

/// Sends the load's push at [`PROBE_RATE`] until `done(sent)` or `budget`,
/// timing each answer.
async fn probe(
    ws: &Workspace,
    port: u16,
    tag: &str,
    done: impl Fn(usize) -> bool,
    budget: Duration,
) -> Probe {
    let Ok(client) = relay::sends::http_client(Duration::from_secs(30)) else {
        return Probe::default();
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1) / PROBE_RATE);
    let started = Instant::now();
    let mut sent = Vec::new();
    while !done(sent.len()) && started.elapsed() < budget {
        tick.tick().await;
        let request = ws.push(&client, port, &format!("probe-{tag}-{}", sent.len()));
        sent.push(tokio::spawn(async move {
            let at = Instant::now();
            let accepted = matches!(request.send().await, Ok(r) if r.status().as_u16() == 202);
            (
                accepted,
                at.duration_since(started).as_secs_f64(),
                at.elapsed().as_secs_f64() * 1e3,
            )
        }));
    }
    let mut took = Vec::with_capacity(sent.len());
    let mut slow = Vec::new();
    let mut accepted = 0;
    let count = sent.len();
    for task in sent {
        if let Ok((ok, at, ms)) = task.await {
            accepted += usize::from(ok);
            took.push(ms);
            if ms > SLOW_MS && slow.len() < SLOW_KEPT {
                slow.push((at, ms));
            }
        }
    }
    took.sort_by(f64::total_cmp);
    let at = |q: f64| {
        took.get(((took.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Probe {
        sent: count,
        accepted,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: took.last().copied().unwrap_or(0.0),
        slow,
    }
}

/// The events and dedupe keys relay's log says the purge deleted, once it
/// has said so (a relay that does not count keys: 0 of them).
fn purged(log: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|line| line.contains("finished events purged"))
        .find_map(|line| {
            let fields = serde_json::from_str::<serde_json::Value>(line).ok()?;
            Some((
                fields["events"].as_u64()?,
                fields["dedupe_keys"].as_u64().unwrap_or(0),
            ))
        })
}

/// Waits (a bounded while) until the template event's job is finished.
async fn settle_template(db: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let done = Connection::open(db)
            .and_then(|conn| {
                conn.query_row("SELECT COUNT(*) FROM jobs WHERE state = 'done'", [], |row| {
                    row.get::<_, i64>(0)
                })
            })
            .unwrap_or(0);
        if done > 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("store size: the first webhook's trigger did not finish in 10 s".to_owned())
}

/// Copies the one finished event relay stored `inside + expired` times, in
/// chunks, until `budget` runs out; how many events the store then holds.
fn fill(db: &Path, inside: usize, expired: usize, budget: Duration) -> Result<usize, String> {
    let fail = |e: rusqlite::Error| format!("store size: filling {}: {e}", db.display());
    let conn = Connection::open(db).map_err(fail)?;
    // A copy for measuring: nothing here needs to survive a crash.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .map_err(fail)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64;
    let day = 86_400_000_i64;
    let retention = RETENTION_DAYS as i64 * day;
    // The expired events first, a day past retention; the rest spread over
    // the retention window up to an hour ago, oldest first.
    let plan = [
        (expired, now_ms - retention - day, day / 2),
        (inside, now_ms - retention + day, retention - day - 3_600_000),
    ];
    let template: (String, String) = conn
        .query_row(
            "SELECT event_id, id FROM jobs WHERE state = 'done' LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(fail)?;
    let started = Instant::now();
    let mut next = 0usize;
    for (count, from, span) in plan {
        let step = span / count.max(1) as i64;
        let mut done = 0;
        while done < count {
            if started.elapsed() > budget {
                return Ok(next);
            }
            let this = CHUNK.min(count - done);
            copy_chunk(&conn, &template, next, this, from + done as i64 * step, step).map_err(fail)?;
            done += this;
            next += this;
        }
    }
    expired_keys(&conn, &template.1, now_ms).map_err(fail)?;
    crate::backlog::on_disk(conn, db).map_err(|e| format!("store size: syncing {}: {e}", db.display()))?;
    Ok(next)
}

/// [`EXPIRED_KEYS`] dedupe keys of the template job's target, each a push's
/// (a random sha), their windows closed over the hour before `now_ms`.
fn expired_keys(conn: &Connection, job: &str, now_ms: i64) -> rusqlite::Result<()> {
    let hour = 3_600_000_i64;
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1)
         INSERT INTO dedupe (target, key, expires_at)
         SELECT t.target, t.repo || char(10) || 'refs/heads/main' || char(10) || lower(hex(randomblob(20))),
                ?2 + i * ?3
         FROM n, (SELECT target, repo FROM jobs WHERE id = ?4) t",
        params![
            EXPIRED_KEYS as i64,
            now_ms - hour,
            hour / EXPIRED_KEYS as i64,
            job
        ],
    )?;
    Ok(())
}

/// Copies the template event and job (ids), with the job's attempt, `count`
/// times, numbered from `first`, received from `from_ms` every `step_ms`.
fn copy_chunk(
    conn: &Connection,
    (event, job): &(String, String),
    first: usize,
    count: usize,
    from_ms: i64,
    step_ms: i64,
) -> rusqlite::Result<()> {
    const NUMBERS: &str = "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)";
    let body = r#"{"ref":"refs/heads/main","after":"2222222222222222222222222222222222222222","repository":{"full_name":"acme/api"},"pusher":{"name":"history"}}"#;
    conn.execute_batch("BEGIN")?;
    conn.execute(
        &format!(
            "{NUMBERS}
             INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, payload, hop, summary, codec)
             SELECT printf('00000000-0000-7000-8000-%012x', ?1 + i), t.source, printf('history-%012d', ?1 + i), t.hook,
                    ?3 + i * ?4, t.content_type, CAST(?5 AS BLOB), NULL, 0, t.summary, 0
             FROM n, (SELECT * FROM events WHERE id = ?6) t"
        ),
        params![first as i64, count as i64, from_ms, step_ms, body, event],
    )?;
    conn.execute(
        &format!(
            "{NUMBERS}
             INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, attempts, maybe_attempts,
                               due_at, created_at, updated_at, repo, sha)
             SELECT printf('00000000-0000-7000-9000-%012x', ?1 + i), printf('00000000-0000-7000-8000-%012x', ?1 + i),
                    t.route, t.target, 'done', t.request, t.needs_payload, 1, 0,
                    ?3 + i * ?4, ?3 + i * ?4, ?3 + i * ?4 + 40, t.repo, t.sha
             FROM n, (SELECT * FROM jobs WHERE id = ?5) t"
        ),
        params![first as i64, count as i64, from_ms, step_ms, job],
    )?;
    conn.execute(
        &format!(
            "{NUMBERS}
             INSERT INTO attempts (job_id, number, started_at, duration_ms, status, outcome, excerpt)
             SELECT printf('00000000-0000-7000-9000-%012x', ?1 + i), 1, ?3 + i * ?4, t.duration_ms, t.status,
                    t.outcome, t.excerpt
             FROM n, (SELECT * FROM attempts WHERE job_id = ?5 LIMIT 1) t"
        ),
        params![first as i64, count as i64, from_ms, step_ms, job],
    )?;
    crate::backlog::count_inserted(conn, "done", count)?;
    conn.execute_batch("COMMIT")
}
