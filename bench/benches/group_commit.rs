//! The SQLite store under load, in four measurements:
//!
//!     cargo bench -p relay-bench --bench group_commit            # ingest, then webhook (three rounds)
//!     cargo bench -p relay-bench --bench group_commit -- ingest  # group commit against one fsync per commit
//!     cargo bench -p relay-bench --bench group_commit -- webhook [N]
//!     cargo bench -p relay-bench --bench group_commit -- quiet [K] [N]
//!     cargo bench -p relay-bench --bench group_commit -- drain [N]
//!
//! `ingest`: each round commits the same number of ~7 KB events (each with
//! one job) from 32 concurrent tasks, as concurrent webhooks would, with
//! group commit and with one fsync per commit, interleaved, on the same
//! disk. The figure that matters is the ratio.
//!
//! `webhook`: what one webhook costs the store as relay uses it, its ingest
//! with the job leased to the sender and a dedupe key taken for it at a
//! random place in the loop guard's index, then the job's completion, from 32
//! tasks on one thread: webhooks per second and the process's CPU time per
//! webhook (fsync waits do not count). Run it under `valgrind
//! --tool=callgrind` for instruction counts, which do not depend on what
//! else the machine is doing.
//!
//! `quiet`: the same webhook, N of them (2,000 unless said) sent one at a
//! time, so each is a commit of its own, after K others (60,000 unless
//! said: ten minutes at 100 pushes a second) took their dedupe keys
//! uncounted: what a webhook costs at a quiet moment inside a busy dedupe
//! window, where each commit's fixed cost is its own.
//!
//! `drain`: what a backlog costs the store as the dispatcher drains it: N
//! queued jobs (committed first, not counted), then claims of up to 32 at a
//! time, each job's completion recorded concurrently, as its send ends,
//! until none is left: jobs per second and CPU time per job. Under
//! callgrind too.
//!
//! Bounded: a fixed number of events per round, three rounds per mode.
//!
//! `SqliteStore::open_with_batch` and `MAX_BATCH` exist for this bench alone:
//! relay's `bench` feature, which this crate's dev-dependency on relay turns
//! on, is what may expose them.

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use relay::guard::JobLimits;
use relay::pipeline::{Pipeline, PipelineState};
use relay::request::{Auth, PreparedRequest, RequestBody};
use relay::store::{
    AttemptRecord, Completion, Ingested, Lease, MAX_BATCH, NewEvent, NewJob, NextState, SqliteStore, Store,
};
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

/// Event `n` with one job and a dedupe key (each distinct, as with the
/// default loop guard): queued, or leased to the caller as ingress's fast
/// lane stores it. The burst breaker is off, as in the harness, so every event
/// queues its job.
fn event(body: &Bytes, n: usize, lease: Option<Lease>) -> NewEvent {
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
        summary: r#"{"events":[{"kind":"push","repo":"acme/api","ref":"refs/heads/main","sha":"2222222222222222222222222222222222222222"}]}"#.to_owned(),
        jobs: vec![NewJob {
            id: Uuid::now_v7(),
            route: "builds".to_owned(),
            target: "circleci".to_owned(),
            request: Ok(Arc::new(PreparedRequest {
                url: "https://circleci.com/api/v2/project/gh/acme/api/pipeline".to_owned(),
                headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
                auth: Auth::Header {
                    name: "Circle-Token".to_owned(),
                },
            })),
            limits: JobLimits {
                // A commit's sha is random, so its key lands anywhere in the
                // index, as each push's does.
                dedupe: Some((
                    format!("acme/api\nrefs/heads/main\n{:032x}{n:08x}", Uuid::new_v4().as_u128()),
                    Duration::from_secs(600),
                )),
                burst: None,
            },
            lease,
            repo: "acme/api".to_owned(),
            sha: "2222222222222222222222222222222222222222".to_owned(),
            shadow: false,
            report: None,
        }],
        drops: Vec::new(),
    }
}

/// Events per second for one round of ingests on a fresh database.
async fn ingest_round(max_batch: usize, body: &Bytes) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with_batch(
            &dir.path().join("bench.db"),
            max_batch,
            std::time::SystemTime::now(),
        )
        .expect("store opens"),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, body) = (store.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for n in (t..EVENTS).step_by(TASKS) {
                let outcome = store.ingest(event(&body, n, None)).await.expect("ingest commits");
                assert_eq!(
                    outcome,
                    Ingested::Accepted {
                        held_back: Vec::new(),
                        leased: Vec::new()
                    }
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("task finishes");
    }
    EVENTS as f64 / started.elapsed().as_secs_f64()
}

/// Webhooks per second and CPU µs per webhook for `events` ingests, each
/// followed by its job's completion.
async fn webhook_round(events: usize, body: &Bytes) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("bench.db"), std::time::SystemTime::now()).expect("store opens"),
    );
    let (started, cpu) = (Instant::now(), cpu_seconds());
    send_webhooks(&store, body, 0..events, TASKS).await;
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    (events as f64 / wall, cpu * 1e6 / events as f64)
}

/// Webhooks per second and CPU µs per webhook for `events` webhooks sent
/// one at a time, each its own commit, after `window` others (not
/// counted) took their dedupe keys: a quiet minute inside a busy window.
async fn quiet_round(window: usize, events: usize, body: &Bytes) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("bench.db"), std::time::SystemTime::now()).expect("store opens"),
    );
    send_webhooks(&store, body, 0..window, TASKS).await;
    let (started, cpu) = (Instant::now(), cpu_seconds());
    send_webhooks(&store, body, window..window + events, 1).await;
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    (events as f64 / wall, cpu * 1e6 / events as f64)
}

/// Sends the webhooks numbered `numbers` from `tasks` concurrent tasks:
/// each ingested with its job leased to the sender, then completed.
async fn send_webhooks(store: &Arc<dyn Store>, body: &Bytes, numbers: std::ops::Range<usize>, tasks: usize) {
    let mut running = Vec::new();
    for t in 0..tasks {
        let (store, body) = (store.clone(), body.clone());
        let numbers = numbers.clone();
        running.push(tokio::spawn(async move {
            for n in (numbers.start + t..numbers.end).step_by(tasks) {
                let claim = Uuid::now_v7();
                let lease = Lease {
                    claim,
                    until: SystemTime::now() + Duration::from_secs(60),
                };
                let event = event(&body, n, Some(lease));
                let job_id = event.jobs[0].id;
                let outcome = store.ingest(event).await.expect("ingest commits");
                // The job comes back leased to this caller, to send.
                match outcome {
                    Ingested::Accepted { held_back, leased } => {
                        assert!(held_back.is_empty(), "{held_back:?}");
                        assert_eq!(leased.iter().map(|j| j.id).collect::<Vec<_>>(), [job_id]);
                    }
                    other => panic!("{other:?}"),
                }
                let now = SystemTime::now();
                let completion = delivered(job_id, claim);
                let recorded = store.complete(completion, now).await.expect("completion commits");
                assert!(recorded);
            }
        }));
    }
    for task in running {
        task.await.expect("task finishes");
    }
}

/// A completion of `job` that ends it: delivered, as the harness's mock
/// answers, with a pipeline of its own (a random id, as CircleCI's are,
/// which the store indexes).
fn delivered(job_id: Uuid, claim: Uuid) -> Completion {
    let now = SystemTime::now();
    let pipeline = Uuid::new_v4();
    Completion {
        job_id,
        claim,
        attempt: AttemptRecord {
            started_at: now,
            duration: Duration::from_millis(1),
            status: Some(201),
            outcome: "delivered",
            excerpt: format!(r#"201: {{"id":"{pipeline}","state":"created","number":1}}"#),
        },
        pipeline: Some(Pipeline {
            id: pipeline.to_string(),
            number: Some(1),
            url: Some("https://app.circleci.com/pipelines/gh/acme/api/1".to_owned()),
            state: PipelineState::Created,
        }),
        next: NextState::Done,
        at: now,
        follow: None,
        // The bench's route reports nothing.
        reported: false,
    }
}

/// Jobs per second and CPU µs per job for draining `jobs` queued jobs:
/// claims of up to [`TASKS`], each claimed job's completion in a task of
/// its own, the next claim once they are recorded.
async fn drain_round(jobs: usize, body: &Bytes) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("bench.db"), std::time::SystemTime::now()).expect("store opens"),
    );
    let mut fill = Vec::new();
    for t in 0..TASKS {
        let (store, body) = (store.clone(), body.clone());
        fill.push(tokio::spawn(async move {
            for n in (t..jobs).step_by(TASKS) {
                store.ingest(event(&body, n, None)).await.expect("ingest commits");
            }
        }));
    }
    for task in fill {
        task.await.expect("task finishes");
    }
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let mut drained = 0;
    loop {
        let claimed = store
            .claim("circleci", TASKS, Duration::from_secs(60), SystemTime::now())
            .await
            .expect("claim");
        if claimed.is_empty() {
            break;
        }
        drained += claimed.len();
        let sends: Vec<_> = claimed
            .into_iter()
            .map(|job| {
                let store = store.clone();
                tokio::spawn(async move {
                    let now = SystemTime::now();
                    assert!(
                        store
                            .complete(delivered(job.id, job.claim), now)
                            .await
                            .expect("completion commits")
                    );
                })
            })
            .collect();
        for send in sends {
            send.await.expect("send finishes");
        }
    }
    assert_eq!(drained, jobs, "every queued job is claimed once");
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    (jobs as f64 / wall, cpu * 1e6 / jobs as f64)
}

/// User and system CPU time of this process so far, from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

async fn ingest(body: &Bytes) {
    println!(
        "ingest of {EVENTS} events of {} bytes from {TASKS} tasks, {ROUNDS} rounds per mode (rounds interleaved)",
        body.len()
    );
    let (mut grouped, mut single) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        grouped.push(ingest_round(MAX_BATCH, body).await);
        single.push(ingest_round(1, body).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (g, g_lo, g_hi) = median(grouped);
    let (s, s_lo, s_hi) = median(single);
    println!("group commit (≤{MAX_BATCH} per transaction): {g:>8.0} events/s (min {g_lo:.0}, max {g_hi:.0})");
    println!("one fsync per commit:                {s:>8.0} events/s (min {s_lo:.0}, max {s_hi:.0})");
    println!("ratio: group commit is {:.1}× one fsync per commit", g / s);
}

async fn webhooks(body: &Bytes, events: usize, rounds: usize) {
    let (mut rates, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (rate, cpu) = webhook_round(events, body).await;
        rates.push(rate);
        cpus.push(cpu);
    }
    let (rate, rate_lo, rate_hi) = median(rates);
    let (cpu, cpu_lo, cpu_hi) = median(cpus);
    println!(
        "{events} webhooks (ingest, then the completion) of {} bytes from {TASKS} tasks, median of {rounds}: \
         {rate:.0}/s (min {rate_lo:.0}, max {rate_hi:.0}), {cpu:.1} µs CPU per webhook (min {cpu_lo:.1}, max {cpu_hi:.1})",
        body.len()
    );
}

async fn quiet(body: &Bytes, window: usize, events: usize) {
    let (rate, cpu) = quiet_round(window, events, body).await;
    println!(
        "{events} webhooks one at a time after {window} others took their dedupe keys: {rate:.0}/s, \
         {cpu:.1} µs CPU per webhook"
    );
}

async fn drain(body: &Bytes, jobs: usize) {
    let (rate, cpu) = drain_round(jobs, body).await;
    println!(
        "{jobs} queued jobs drained (claims of up to {TASKS}, then each completion): {rate:.0} jobs/s, \
         {cpu:.1} µs CPU per job"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let body = payload();
    let which = args.first().map(String::as_str);
    // `webhook` counts the CPU of one thread's work: a current-thread
    // runtime (SQLite's writer still runs on tokio's blocking pool).
    let runtime = match which {
        Some("webhook" | "quiet" | "drain") => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    }
    .expect("a tokio runtime");
    runtime.block_on(async {
        match which {
            Some("ingest") => ingest(&body).await,
            Some("webhook") => {
                let events = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20_000);
                webhooks(&body, events, 1).await;
            }
            Some("quiet") => {
                let window = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(60_000);
                let events = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(2_000);
                quiet(&body, window, events).await;
            }
            Some("drain") => {
                let jobs = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20_000);
                drain(&body, jobs).await;
            }
            _ => {
                ingest(&body).await;
                webhooks(&body, 20_000, ROUNDS).await;
            }
        }
    });
}
