//! The status pages with 100,000 events in the store: time to first byte
//! and weight of each page, served by relay in this process on loopback.
//!
//!     cargo bench -p relay-bench --bench pages [-- EVENTS]
//!
//! Fills a fresh SQLite store with EVENTS (default 100,000) pushes spread
//! over the last day, across 20 repositories, each with one job (one in 50
//! dead), then asks each page 20 times over a fresh connection and prints
//! the median and worst time to first byte and the body's size. A figure,
//! not a test: nothing here passes or fails. Bounded: a fixed number of
//! events and requests. Talks only to 127.0.0.1.

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use relay::guard::JobLimits;
use relay::request::{Auth, PreparedRequest, RequestBody};
use relay::store::{NewEvent, NewJob, Queue, SqliteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const REQUESTS: usize = 20;
const REPOS: usize = 20;

fn event(n: usize, count: usize, now: SystemTime) -> NewEvent {
    let repo = format!("acme/r{}", n % REPOS);
    let sha = format!("{:040x}", n + 1);
    let body = serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": sha,
        "repository": { "full_name": repo }, "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": "x".repeat(1500) },
    })
    .to_string();
    let summary = serde_json::json!({ "events": [
        { "kind": "push", "repo": repo, "ref": "refs/heads/main", "sha": sha }
    ] });
    // Spread over the last day, oldest first.
    let age = Duration::from_millis(86_400_000 * (count - n) as u64 / count as u64);
    NewEvent {
        id: Uuid::now_v7(),
        source: "github".to_owned(),
        delivery: Some(format!("seed-{n}")),
        hook: "push".to_owned(),
        content_type: "application/json".to_owned(),
        body: Bytes::from(body),
        payload: None,
        hop: 0,
        received_at: now - age,
        summary: summary.to_string(),
        jobs: vec![NewJob {
            id: Uuid::now_v7(),
            route: "builds".to_owned(),
            // Not a target of the config the relay runs: the jobs stay put.
            target: "legacy".to_owned(),
            request: if n.is_multiple_of(50) {
                Err("the target was removed".to_owned())
            } else {
                Ok(Arc::new(PreparedRequest {
                    url: "http://127.0.0.1:9/pipeline".to_owned(),
                    headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                    body: RequestBody::Text("{}".to_owned()),
                    auth: Auth::Header {
                        name: "Circle-Token".to_owned(),
                    },
                }))
            },
            limits: JobLimits::default(),
            lease: None,
            repo: repo.clone(),
            sha: sha.clone(),
            shadow: false,
            report: None,
        }],
        drops: Vec::new(),
    }
}

async fn fill(db: &std::path::Path, count: usize) -> String {
    let store = Arc::new(
        SqliteStore::open(db, std::time::SystemTime::now())
            .expect("the bench runs on loopback, in a temp dir"),
    );
    let now = SystemTime::now();
    let mut last = String::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let mut tasks = Vec::new();
        for &n in chunk {
            let store = store.clone();
            let event = event(n, count, now);
            last = event.id.to_string();
            tasks.push(tokio::spawn(async move { store.ingest(event).await }));
        }
        for task in tasks {
            task.await
                .expect("the bench runs on loopback, in a temp dir")
                .expect("the bench runs on loopback, in a temp dir");
        }
    }
    last
}

/// Time to first byte and the whole answer's size, over a new connection.
async fn ask(addr: std::net::SocketAddr, path: &str) -> (Duration, usize) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the bench runs on loopback, in a temp dir");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the bench runs on loopback, in a temp dir");
    let started = Instant::now();
    let mut first = [0u8; 1];
    stream
        .read_exact(&mut first)
        .await
        .expect("the bench runs on loopback, in a temp dir");
    let ttfb = started.elapsed();
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .expect("the bench runs on loopback, in a temp dir");
    let text = String::from_utf8_lossy(&rest);
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    assert!(
        text.starts_with("TTP/1.1 200"),
        "{path}: {}",
        &text[..text.len().min(200)]
    );
    (ttfb, body)
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("the bench runs on loopback, in a temp dir");
    let db = dir.path().join("relay.db");
    let started = Instant::now();
    let last = fill(&db, count).await;
    println!(
        "filled {count} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let config = relay::config::Config::from_toml(&format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"

[store]
url = "sqlite://{}"

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "builds"
to = ["circleci"]

[targets.circleci]
kind = "circleci"
project = "gh/acme/api"
token = "t"
dry_run = true
"#,
        db.display()
    ))
    .expect("the bench runs on loopback, in a temp dir");
    let listeners = relay::server::Listeners::bind(&config)
        .await
        .expect("the bench runs on loopback, in a temp dir");
    let admin = listeners
        .admin_addr()
        .expect("the bench runs on loopback, in a temp dir");
    let control = relay::daemon::Control::default();
    let shutdown = control.shutdown.clone();
    let daemon = tokio::spawn(relay::daemon::run(config, listeners, control));
    let paths = [
        "/".to_owned(),
        "/events".to_owned(),
        "/events?repo=acme/r7".to_owned(),
        "/events?state=dead".to_owned(),
        "/events?repo=acme/none".to_owned(),
        format!("/events/{last}"),
        "/dead".to_owned(),
        "/api/events?limit=50".to_owned(),
    ];
    println!(
        "{:<28} {:>12} {:>12} {:>10}",
        "page", "TTFB median", "TTFB worst", "bytes"
    );
    for path in &paths {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..REQUESTS {
            let (ttfb, bytes) = ask(admin, path).await;
            times.push(ttfb);
            size = bytes;
        }
        times.sort();
        println!(
            "{:<28} {:>9.1} ms {:>9.1} ms {:>10}",
            path,
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0,
            size
        );
    }
    shutdown.cancel();
    let _ = daemon.await;
}
