//! Ingest throughput of the SQLite store with group commit against one
//! fsync per commit, measured in the same run on the same disk:
//!
//!     cargo bench --bench group_commit
//!
//! Each round commits the same number of ~7 KB events (each with one job)
//! from 32 concurrent tasks, as concurrent webhooks would. The figure that
//! matters is the ratio; absolute numbers depend on the disk. Bounded: a
//! fixed number of events per round, three rounds per mode.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use relay::store::{Ingested, JobLimits, MAX_BATCH, NewEvent, NewJob, SqliteStore, Store};
use relay::targets::{Auth, PreparedRequest, RequestBody};
use uuid::Uuid;

const EVENTS: usize = 4000;
const TASKS: usize = 32;
const ROUNDS: usize = 3;

fn payload() -> Bytes {
    // A push of 20 commits (GitHub lists up to 20): about 7 KB.
    let commits: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "id": format!("{:040x}", i), "message": "Refactor the importer so empty payloads are handled",
                "timestamp": "2026-11-20T10:12:03+01:00",
                "author": { "name": "Ada Lovelace", "email": "ada@example.com", "username": "ada" },
                "added": [], "removed": [], "modified": ["services/api/src/import.rs", "services/api/src/lib.rs"]
            })
        })
        .collect();
    let doc = serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": "2".repeat(40),
        "repository": { "full_name": "acme/api", "html_url": "https://github.com/acme/api" },
        "pusher": { "name": "ada" }, "commits": commits
    });
    Bytes::from(doc.to_string())
}

fn event(body: &Bytes, n: usize) -> NewEvent {
    NewEvent {
        id: Uuid::now_v7(),
        source: "github".to_owned(),
        delivery: Some(format!("delivery-{n}")),
        hook: "push".to_owned(),
        content_type: "application/json".to_owned(),
        body: body.clone(),
        payload: None,
        hop: 0,
        received_at: SystemTime::now(),
        summary: r#"{"events":[{"kind":"push"}],"dropped":[]}"#.to_owned(),
        jobs: vec![NewJob {
            id: Uuid::now_v7(),
            route: "builds".to_owned(),
            target: "circleci".to_owned(),
            request: Ok(PreparedRequest {
                url: "https://circleci.com/api/v2/project/gh/acme/api/pipeline".to_owned(),
                headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
                auth: Auth::Header {
                    name: "Circle-Token".to_owned(),
                },
            }),
            // A dedupe key (each distinct), as with the default loop guard; the
            // burst breaker off, as in relay-bench, so every event queues a job.
            limits: JobLimits {
                dedupe: Some((
                    format!("acme/api\nrefs/heads/main\n{n:040x}"),
                    Duration::from_secs(600),
                )),
                burst: None,
            },
            lease: None,
        }],
        drops: Vec::new(),
    }
}

/// Events per second for one round on a fresh database.
async fn round(max_batch: usize, body: &Bytes) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open_with_batch(&dir.path().join("bench.db"), max_batch).expect("store opens"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, body) = (store.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for n in (t..EVENTS).step_by(TASKS) {
                let outcome = store.ingest(event(&body, n)).await.expect("ingest commits");
                assert_eq!(outcome, Ingested::Accepted(Vec::new()));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finishes");
    }
    EVENTS as f64 / started.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let body = payload();
    println!(
        "ingest of {EVENTS} events of {} bytes from {TASKS} tasks, {ROUNDS} rounds per mode (rounds interleaved)",
        body.len()
    );
    let (mut grouped, mut single) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        grouped.push(round(MAX_BATCH, &body).await);
        single.push(round(1, &body).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (g, g_lo, g_hi) = median(grouped);
    let (s, s_lo, s_hi) = median(single);
    println!("group commit (≤{MAX_BATCH} per transaction): {g:>8.0} events/s (min {g_lo:.0}, max {g_hi:.0})");
    println!("one fsync per commit:                {s:>8.0} events/s (min {s_lo:.0}, max {s_hi:.0})");
    println!("ratio: group commit is {:.1}× one fsync per commit", g / s);
}
