//! What one webhook costs the SQLite store, as relay uses it under load:
//! the ingest of an event with one job leased to the caller, then the
//! completion of that job with its attempt, from 32 concurrent tasks.
//!
//!     cargo bench --bench store_ops
//!
//! Prints events per second and CPU time per event (the process's, from
//! getrusage, so fsync waits do not count). Run it under
//! `valgrind --tool=callgrind` for instruction counts, which do not depend
//! on what else the machine is doing. Bounded: a fixed number of events.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use relay::store::{
    AttemptRecord, Completion, Ingested, JobLimits, Lease, NewEvent, NewJob, NextState, SqliteStore, Store,
};
use relay::targets::{Auth, PreparedRequest, RequestBody};
use uuid::Uuid;

const TASKS: usize = 32;

fn payload() -> Bytes {
    let commits: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "id": format!("{:040x}", i + 1), "tree_id": format!("{:040x}", i + 100),
                "message": format!("Change {i}: handle empty payloads in the importer"),
                "timestamp": "2026-11-20T10:12:03+01:00",
                "author": { "name": "Ada Lovelace", "email": "ada@example.com", "username": "ada" },
                "added": [], "removed": [], "modified": ["services/api/src/import.rs"]
            })
        })
        .collect();
    let doc = serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": format!("{:040x}", 20),
        "repository": { "full_name": "acme/api", "html_url": "https://github.com/acme/api" },
        "pusher": { "name": "ada" }, "commits": commits
    });
    Bytes::from(doc.to_string())
}

fn event(body: &Bytes, n: usize, claim: Uuid) -> NewEvent {
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
        summary: r#"{"events":[{"kind":"push","repo":"acme/api","ref":"refs/heads/main","sha":"0000000000000000000000000000000000000014"}]}"#.to_owned(),
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
            limits: JobLimits::default(),
            lease: Some(Lease {
                claim,
                until: SystemTime::now() + Duration::from_secs(60),
            }),
        }],
        drops: Vec::new(),
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let events: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let body = payload();
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("bench.db")).expect("store opens"));
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, body) = (store.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for n in (t..events).step_by(TASKS) {
                let claim = Uuid::now_v7();
                let event = event(&body, n, claim);
                let job_id = event.jobs[0].id;
                let outcome = store.ingest(event).await.expect("ingest commits");
                assert_eq!(outcome, Ingested::Accepted(Vec::new()));
                let now = SystemTime::now();
                let completion = Completion {
                    job_id,
                    claim,
                    attempt: AttemptRecord {
                        started_at: now,
                        duration: Duration::from_millis(1),
                        status: Some(201),
                        outcome: "delivered",
                        excerpt: r#"201: {"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created"}"#
                            .to_owned(),
                    },
                    next: NextState::Done,
                    at: now,
                };
                assert!(store.complete(completion, now).await.expect("completion commits"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finishes");
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    println!(
        "{events} webhooks (ingest + completion) of {} bytes from {TASKS} tasks: {:.0}/s, {:.1} µs CPU per webhook",
        body.len(),
        events as f64 / wall,
        cpu * 1e6 / events as f64
    );
}
