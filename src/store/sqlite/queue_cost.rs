//! What the store's statements cost as it grows. The delivery path's must
//! cost the same however many jobs other targets have queued: an outage
//! leaves a million waiting, and a statement that walks them runs for every
//! webhook and every send. The job counts `/metrics` reads are kept by
//! triggers rather than counted, and must agree with the rows.
//!
//! Cost is counted in SQLite's virtual-machine instructions (its progress
//! handler, called after every one), which do not depend on the machine or
//! its load. A statement that finds its rows through an index costs the
//! same at any depth; one that scans the queue costs in proportion to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, params};
use uuid::Uuid;

use super::tally::Tx;
use super::{dedupe, queue, schema, views};
use crate::clock::wall_time;
use crate::guard::JobLimits;
use crate::pipeline::{Pipeline, PipelineState};
use crate::report::ReportSpec;
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::store::codec;
use crate::store::{
    AttemptRecord, ClaimedJob, Completion, Ingested, JobState, Lease, NewEvent, NewJob, NextState,
};

/// Jobs another target has queued, in flight and finished for the deep
/// measurement: enough that a scan of them dwarfs one cycle's own work.
const QUEUED_ELSEWHERE: u64 = 20_000;

/// The instructions the progress handler has counted on a connection.
pub(super) struct Counter {
    conn: Connection,
    steps: Arc<AtomicU64>,
}

impl Counter {
    pub(super) fn new() -> Counter {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
        let steps = Arc::new(AtomicU64::new(0));
        let counted = steps.clone();
        conn.progress_handler(
            1,
            Some(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                false
            }),
        )
        .unwrap();
        Counter { conn, steps }
    }

    /// The instructions `work` ran.
    pub(super) fn count(&self, work: impl FnOnce(&Connection)) -> u64 {
        let before = self.steps.load(Ordering::Relaxed);
        work(&self.conn);
        self.steps.load(Ordering::Relaxed) - before
    }
}

pub(super) fn job(target: &str, limits: JobLimits, report: Option<ReportSpec>) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        route: "builds".to_owned(),
        target: target.to_owned(),
        request: Ok(Arc::new(PreparedRequest {
            url: "https://ci.example/api/v2/project/gh/acme/api/pipeline".to_owned(),
            headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
            body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
            auth: Auth::Header {
                name: "Circle-Token".to_owned(),
            },
        })),
        limits,
        lease: None,
        repo: "acme/api".to_owned(),
        sha: "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c".to_owned(),
        shadow: false,
        report,
    }
}

pub(super) fn event(jobs: Vec<NewJob>) -> NewEvent {
    NewEvent {
        id: Uuid::now_v7(),
        source: "github".to_owned(),
        delivery: Some(Uuid::new_v4().to_string()),
        hook: "push".to_owned(),
        content_type: "application/json".to_owned(),
        body: Bytes::from_static(br#"{"ref":"refs/heads/main"}"#),
        payload: None,
        hop: 0,
        received_at: wall_time(),
        summary: r#"{"events":[{"kind":"push"}]}"#.to_owned(),
        jobs,
        drops: Vec::new(),
    }
}

pub(super) fn completion(job: &ClaimedJob, next: NextState, pipeline: Option<Pipeline>) -> Completion {
    let at = wall_time();
    Completion {
        job_id: job.id,
        claim: job.claim,
        attempt: AttemptRecord {
            started_at: at,
            duration: Duration::from_millis(3),
            status: Some(201),
            outcome: "ok",
            excerpt: "201".to_owned(),
        },
        pipeline,
        next,
        at,
        follow: None,
        reported: job.reported,
    }
}

/// One webhook's life for the `live` target, statement by statement as the
/// daemon runs them: the ingest with the loop guard's checks, the claim, a
/// failed attempt and its retry, the next wake-up, a renewal, the trigger's
/// success (queuing its report, superseding the one still waiting), the
/// CI's completion webhook, and the report's own claim.
fn one_webhook(conn: &Connection) {
    let tx = &Tx::immediate(conn);
    let planned = wall_time();
    let limits = JobLimits {
        dedupe: Some((Uuid::new_v4().to_string(), Duration::from_secs(60))),
        burst: Some((1_000_000, Duration::from_secs(60))),
    };
    let spec = ReportSpec::new(
        "github",
        "acme/api",
        "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c",
        "relay/live".to_owned(),
        "live",
        "CircleCI pipeline",
        planned,
    )
    .unwrap();
    let event = event(vec![job("live", limits, Some(spec))]);
    // Due when received: the claims below must not come before it.
    let now = event.received_at;
    let packed = codec::pack(&event);
    let Ingested::Accepted { held_back, .. } = queue::ingest(tx, &event, &packed).unwrap() else {
        panic!("a new delivery is accepted");
    };
    assert!(held_back.is_empty());
    let lease = Duration::from_secs(60);
    let claimed = queue::claim(tx, "live", 8, lease, now).unwrap();
    assert_eq!(claimed.len(), 1, "the one live job is claimed");
    let first = &claimed[0];
    let retry = NextState::Retry {
        due_at: now,
        maybe_delivered: false,
    };
    assert!(queue::complete(tx, &completion(first, retry, None)).unwrap());
    queue::next_wakeup(conn).unwrap();
    let claimed = queue::claim(tx, "live", 8, lease, now).unwrap();
    assert_eq!(claimed.len(), 1, "the retry is claimed");
    let again = &claimed[0];
    assert!(queue::renew(conn, again.id, again.claim, now + lease).unwrap());
    let pipeline = Pipeline {
        id: Uuid::new_v4().to_string(),
        number: Some(7),
        url: None,
        state: PipelineState::Running,
    };
    let done = completion(again, NextState::Done, Some(pipeline.clone()));
    assert!(queue::complete(tx, &done).unwrap());
    assert!(
        queue::correlate(tx, &pipeline.id, 7, PipelineState::Success, now)
            .unwrap()
            .is_some()
    );
    let reports = queue::claim(tx, "status:github", 8, lease, now).unwrap();
    assert_eq!(reports.len(), 1, "the newest report, the older one superseded");
    queue::next_wakeup(conn).unwrap();
}

/// Inserts an event by its id (`?1`, its delivery too) and time (`?2`),
/// for the fixtures below.
pub(super) fn event_insert(conn: &Connection) -> rusqlite::Statement<'_> {
    conn.prepare(
        "INSERT INTO events (id, source, delivery, hook, received_at, content_type, body, hop, summary, codec)
         VALUES (?1, 'github', ?1, 'push', ?2, 'application/json', x'7b7d', 0, '{}', 0)",
    )
    .unwrap()
}

/// Queues `count` jobs for `paused`, with their events, as an outage
/// leaves them: most due, some leased, some finished with a report each.
pub(super) fn queue_elsewhere(conn: &Connection, count: u64) {
    let tx = &Tx::immediate(conn);
    conn.execute_batch("BEGIN").unwrap();
    let now = super::to_millis(wall_time());
    let mut event = event_insert(conn);
    let mut job = conn
        .prepare(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at, lease_until,
                               created_at, updated_at, repo, sha, report, report_of)
             VALUES (?1, ?2, 'builds', ?3, ?4, '{}', 0, ?5, ?6, ?5, ?5, 'acme/api', 'x', NULL, ?7)",
        )
        .unwrap();
    for n in 0..count {
        let event_id = Uuid::now_v7().to_string();
        let at = now - 60_000 + i64::try_from(n).unwrap();
        event.execute(params![event_id, at]).unwrap();
        let trigger = Uuid::now_v7().to_string();
        let (state, lease) = match n % 10 {
            0 => ("in_flight", Some(now + 60_000)),
            1 => ("done", None),
            _ => ("queued", None),
        };
        job.execute(params![
            trigger,
            event_id,
            "paused",
            state,
            at,
            lease,
            None::<String>
        ])
        .unwrap();
        // As relay counts the jobs it inserts (schema V11).
        let counted = JobState::parse(state).unwrap();
        tx.count_inserted(counted, 1).unwrap();
        if state == "done" {
            // A report still waiting on a Git host that is down too.
            job.execute(params![
                Uuid::now_v7().to_string(),
                event_id,
                "status:github",
                "queued",
                now + 3_600_000,
                None::<i64>,
                trigger
            ])
            .unwrap();
            tx.count_inserted(JobState::Queued, 1).unwrap();
        }
    }
    drop((event, job));
    conn.execute_batch("COMMIT").unwrap();
}

#[test]
fn a_webhook_costs_the_same_with_a_deep_queue_elsewhere() {
    let counter = Counter::new();
    // The first cycle prepares and caches every statement.
    counter.count(one_webhook);
    let shallow = counter.count(one_webhook);
    counter.count(|conn| queue_elsewhere(conn, QUEUED_ELSEWHERE));
    let deep = counter.count(one_webhook);
    // A B-tree a level deeper costs a few instructions more; a statement
    // that walks the other target's jobs costs thousands.
    assert!(
        deep <= shallow + shallow / 4,
        "one webhook took {shallow} SQLite instructions with an empty queue and {deep} with \
         {QUEUED_ELSEWHERE} jobs queued for another target: a statement on the delivery path \
         scans the queue instead of seeking through an index"
    );
}

/// Jobs per state.
type Counts = Vec<(String, i64)>;

/// Every state's count as `job_counts` keeps it, and as the rows say.
fn counts(conn: &Connection) -> (Counts, Counts) {
    let read = |sql: &str| -> Counts {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    (
        read("SELECT state, n FROM job_counts ORDER BY state"),
        read(
            "SELECT c.state, (SELECT COUNT(*) FROM jobs j WHERE j.state = c.state)
             FROM job_counts c ORDER BY c.state",
        ),
    )
}

/// `/metrics` reads the counts the store keeps, not the rows: they must
/// agree after every kind of change a job goes through.
#[test]
fn the_kept_job_counts_match_the_rows() {
    let counter = Counter::new();
    let conn = &counter.conn;
    let tx = &Tx::immediate(conn);
    one_webhook(conn);
    queue_elsewhere(conn, 40);
    // One event for two targets: both its jobs are counted.
    let fan_out = event(vec![
        job("fan-a", JobLimits::default(), None),
        job("fan-b", JobLimits::default(), None),
    ]);
    queue::ingest(tx, &fan_out, &codec::pack(&fan_out)).unwrap();
    let now = wall_time();
    let finish = |target: &str, next: NextState| {
        let event = event(vec![job(target, JobLimits::default(), None)]);
        queue::ingest(tx, &event, &codec::pack(&event)).unwrap();
        let claimed = queue::claim(tx, target, 1, Duration::from_secs(60), event.received_at).unwrap();
        assert!(queue::complete(tx, &completion(&claimed[0], next, None)).unwrap());
        claimed[0].id
    };
    // A trigger that is done, and one that dies (then is retried by hand).
    finish("plain", NextState::Done);
    let doomed = finish(
        "doomed",
        NextState::Dead {
            reason: "gave up".to_owned(),
        },
    );
    // One claim of a lease run out (in flight already) and of a due job.
    let mut expiring = event(vec![
        job("expiring", JobLimits::default(), None),
        job("expiring", JobLimits::default(), None),
    ]);
    expiring.jobs[0].lease = Some(Lease {
        claim: Uuid::now_v7(),
        until: wall_time() + Duration::from_secs(60),
    });
    queue::ingest(tx, &expiring, &codec::pack(&expiring)).unwrap();
    let later = wall_time() + Duration::from_secs(120);
    let claimed = queue::claim(tx, "expiring", 2, Duration::from_secs(60), later).unwrap();
    assert_eq!(claimed.len(), 2, "a lease run out, and a due job");
    let (kept, rows) = counts(conn);
    assert_eq!(kept, rows, "after ingest, claims, completions and reports");
    assert!(matches!(
        super::views::requeue(tx, doomed, now).unwrap(),
        crate::store::Requeued::Requeued
    ));
    // A restart puts what was in flight back in the queue.
    let tx = conn.unchecked_transaction().unwrap();
    assert!(queue::recover(&tx).unwrap() > 0);
    tx.commit().unwrap();
    let (kept, rows) = counts(conn);
    assert_eq!(kept, rows, "after a manual retry and a restart's recovery");
    // Retention deletes finished events, and their jobs with them.
    let done = |counts: &[(String, i64)]| counts.iter().find(|(state, _)| state == "done").map(|c| c.1);
    let done_before = done(&kept);
    assert!(super::views::purge(conn, now + Duration::from_secs(3600), 1_000).unwrap() > 0);
    let (kept, rows) = counts(conn);
    assert_eq!(kept, rows, "after a purge");
    assert!(done(&kept) < done_before, "the purge deleted done jobs: {kept:?}");
}

#[test]
fn the_next_wakeup_and_the_oldest_due_job_are_the_earliest_of_any_target() {
    let counter = Counter::new();
    let conn = &counter.conn;
    let tx = &Tx::immediate(conn);
    let t0 = super::to_millis(wall_time());
    let at = |ms: i64| super::from_millis(t0 + ms);
    // Queued for a, b and c, due in 30, 10 and 20 s; in flight for d until 5 s.
    for (target, due_in) in [("a", 30_000), ("b", 10_000), ("c", 20_000)] {
        let queued = event(vec![job(target, JobLimits::default(), None)]);
        queue::ingest(tx, &queued, &codec::pack(&queued)).unwrap();
        conn.execute(
            "UPDATE jobs SET due_at = ?1 WHERE target = ?2",
            params![t0 + due_in, target],
        )
        .unwrap();
    }
    let mut leased = event(vec![job("d", JobLimits::default(), None)]);
    leased.jobs[0].lease = Some(Lease {
        claim: Uuid::now_v7(),
        until: at(5_000),
    });
    queue::ingest(tx, &leased, &codec::pack(&leased)).unwrap();
    let wakeup_and_oldest = |conn: &Connection| {
        (
            queue::next_wakeup(conn).unwrap(),
            super::views::queue_stats(conn, at(15_000)).unwrap().oldest_due,
            super::views::queue_stats(conn, at(0)).unwrap().oldest_due,
        )
    };
    assert_eq!(
        wakeup_and_oldest(conn),
        (Some(at(5_000)), Some(at(10_000)), None),
        "d's lease runs out first; of the jobs due at 15 s, b's came due first; none is due at 0 s"
    );
    // Both are read from an index's first entry (schema V9), however many
    // jobs another target has queued.
    let shallow = counter.count(|conn| {
        wakeup_and_oldest(conn);
    });
    counter.count(|conn| queue_elsewhere(conn, QUEUED_ELSEWHERE));
    let deep = counter.count(|conn| {
        wakeup_and_oldest(conn);
    });
    assert!(
        deep <= 2 * shallow,
        "the next wake-up and the oldest due job took {shallow} SQLite instructions over four targets and \
         {deep} with {QUEUED_ELSEWHERE} jobs queued for a fifth: they read every queued job instead of an index's first entry"
    );
    let wakeup = queue::next_wakeup(conn).unwrap();
    assert!(
        wakeup.is_some_and(|t| t <= at(-59_000)),
        "the jobs queued elsewhere came due a minute ago, not at {wakeup:?}"
    );
}

/// Inserts `count` finished jobs of `target`, with their events: the
/// history retention keeps.
fn finished_history(conn: &Connection, target: &str, count: u64) {
    conn.execute_batch("BEGIN").unwrap();
    let now = super::to_millis(wall_time());
    let mut event = event_insert(conn);
    let mut job = conn
        .prepare(
            "INSERT INTO jobs (id, event_id, route, target, state, request, needs_payload, due_at,
                               created_at, updated_at, repo, sha)
             VALUES (?1, ?2, 'builds', ?3, 'done', '{}', 0, ?4, ?4, ?4, 'acme/api', 'x')",
        )
        .unwrap();
    for n in 0..count {
        let event_id = Uuid::now_v7().to_string();
        let at = now - 600_000 + i64::try_from(n).unwrap();
        event.execute(params![event_id, at]).unwrap();
        job.execute(params![Uuid::now_v7().to_string(), event_id, target, at])
            .unwrap();
    }
    Tx::immediate(conn)
        .count_inserted(JobState::Done, usize::try_from(count).unwrap())
        .unwrap();
    drop((event, job));
    conn.execute_batch("COMMIT").unwrap();
}

#[test]
fn a_claim_and_the_status_page_read_none_of_a_targets_finished_jobs() {
    let counter = Counter::new();
    let lease = Duration::from_secs(60);
    let claim = |conn: &Connection| {
        let tx = &Tx::immediate(conn);
        let claimed = queue::claim(tx, "api", 8, lease, wall_time()).unwrap();
        assert!(claimed.is_empty(), "nothing is due");
    };
    // The target's row on the status page, for the last moment only: its
    // queue and its jobs in flight are all it reads.
    let page = |conn: &Connection| {
        views::activity(conn, &[], &["api".to_owned()], wall_time()).unwrap();
    };
    counter.count(claim);
    counter.count(page);
    let empty = (counter.count(claim), counter.count(page));
    counter.count(|conn| finished_history(conn, "api", QUEUED_ELSEWHERE));
    let full = (counter.count(claim), counter.count(page));
    for (what, empty, full) in [
        ("a claim with nothing due", empty.0, full.0),
        ("the status page", empty.1, full.1),
    ] {
        assert!(
            full <= empty + empty / 4,
            "{what} took {empty} SQLite instructions on an empty store and {full} with \
             {QUEUED_ELSEWHERE} finished jobs of its target: it reads the target's history \
             instead of the jobs in flight"
        );
    }
}

/// Takes `count` dedupe keys of `target` with random shas, as pushes make
/// them, expiring one millisecond apart from `first_expiry_ms`.
fn dedupe_keys(conn: &Connection, target: &str, count: u64, first_expiry_ms: i64) {
    conn.execute_batch("BEGIN").unwrap();
    let tx = &Tx::immediate(conn);
    for n in 0..count {
        let key = format!("acme/api\nrefs/heads/main\n{}", Uuid::new_v4().simple());
        let expires_at = super::from_millis(first_expiry_ms + i64::try_from(n).unwrap());
        assert!(dedupe::take(tx, target, &key, expires_at, Duration::ZERO).unwrap());
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// The keys whose expiry lies in `from..to` (ms), in the index
/// (`dedupe_index.keys`, which holds digests, not targets) or the log
/// (`main.dedupe`).
fn keys_between(conn: &Connection, table: &str, from: i64, to: i64) -> i64 {
    conn.query_row(
        &format!("SELECT COUNT(*) FROM {table} WHERE expires_at >= ?1 AND expires_at < ?2"),
        params![from, to],
        |r| r.get(0),
    )
    .unwrap()
}

/// Runs batches of `limit` until the sweep of dedupe keys ends; the keys
/// forgotten by each batch.
fn sweep_keys(conn: &Connection, now: std::time::SystemTime, limit: usize) -> Vec<u64> {
    let mut from = dedupe::SweepFrom::default();
    let mut batches = Vec::new();
    loop {
        let (batch, next) = dedupe::forget(conn, now, limit, &from).unwrap();
        batches.push(batch.forgotten);
        if !batch.more {
            return batches;
        }
        from = next;
    }
}

/// A batch of the retention purge holds the writer, and every webhook
/// waiting on it: it looks at its limit of dedupe keys, at a cost that
/// does not grow with how many expired (a busy hour leaves hundreds of
/// thousands; deleting them in one statement held the writer for over a
/// second), and the sweep forgets every expired key and no other.
#[test]
fn a_purge_batch_looks_at_its_limit_of_dedupe_keys_at_a_fixed_cost() {
    let counter = Counter::new();
    let now = wall_time();
    let now_ms = super::to_millis(now);
    let hour = 3_600_000;
    let batch = |conn: &Connection| {
        let (batch, _) = dedupe::forget(conn, now, 200, &dedupe::SweepFrom::default()).unwrap();
        assert!(batch.forgotten <= 200 && batch.more, "{batch:?}");
    };
    counter.count(|conn| {
        dedupe_keys(conn, "api", 50, now_ms + 600_000);
        dedupe_keys(conn, "api", 1_000, now_ms - 2 * hour);
    });
    counter.count(batch);
    let few = counter.count(batch);
    counter.count(|conn| dedupe_keys(conn, "api", QUEUED_ELSEWHERE, now_ms - hour));
    let many = counter.count(batch);
    assert!(
        many <= few + few / 4,
        "a batch took {few} SQLite instructions among 1,050 keys and {many} among {}: \
         it reads or deletes more than its limit",
        1_050 + QUEUED_ELSEWHERE
    );
    counter.count(|conn| {
        let left = keys_between(conn, "dedupe_index.keys", 0, i64::MAX);
        let batches = sweep_keys(conn, now, 200);
        assert!(batches.iter().all(|n| *n <= 200), "{batches:?}");
        assert_eq!(
            batches.len() as i64,
            left / 200 + 1,
            "each batch looked at 200 keys"
        );
        for table in ["dedupe_index.keys", "main.dedupe"] {
            assert_eq!(
                keys_between(conn, table, 0, now_ms),
                0,
                "every expired key is forgotten from {table}"
            );
            assert_eq!(
                keys_between(conn, table, now_ms, i64::MAX),
                50,
                "keys in their window stay in {table}"
            );
        }
    });
}

/// The log's rows a batch forgets are neighbours (the order keys were
/// taken), and the index is off the database file, so a batch writes a few
/// pages, not one a key: commits' shas are random, and forgetting them from
/// an index on disk in order of expiry wrote 4 KB a key (1.6 GB for an
/// hour's 360,000), as their insert did.
#[test]
fn forgetting_expired_keys_writes_a_few_pages_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let mut conn = Connection::open(&path).unwrap();
    schema::prepare(&mut conn, std::time::UNIX_EPOCH).unwrap();
    let now = wall_time();
    let keys = 20_000;
    dedupe_keys(&conn, "api", keys, super::to_millis(now) - 3_600_000);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let forgotten = sweep_keys(&conn, now, 200);
    assert_eq!(forgotten.iter().sum::<u64>(), keys);
    let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
    let wal = std::fs::metadata(dir.path().join("relay.db-wal")).unwrap().len();
    let frames = wal / (u64::try_from(page).unwrap() + 24);
    assert!(
        frames < keys / 10,
        "forgetting {keys} keys in {} batches wrote {frames} pages",
        forgotten.len()
    );
}
