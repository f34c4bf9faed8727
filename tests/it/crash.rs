//! The promise behind every 2xx, tested by killing the real binary: webhooks
//! posted concurrently while relay is SIGKILLed at random moments and
//! restarted all reach the target, duplicates only from sends in flight at a
//! kill; and SIGTERM during load drains within the deadline, exits 0, and a
//! restart sends what was left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::json;
use tokio::sync::Mutex;

use crate::support::{Daemon, MockServer, Reply, sign};

pub const SECRET: &str = "crash-secret";
/// In flight per target at once; bounds the duplicates one kill can cause.
pub const CONCURRENCY: usize = 8;

pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn write_config(
    dir: &Path,
    addr: SocketAddr,
    target: &MockServer,
    shutdown_timeout: &str,
) -> std::path::PathBuf {
    let store = format!("sqlite://{}", dir.join("relay.db").display());
    write_config_with(dir, addr, target, shutdown_timeout, &store, "")
}

/// A config with one GitHub source, one route and one CircleCI target whose
/// trigger carries the delivery id, on `store`; `delivery` adds lines to the
/// `[delivery]` table.
pub fn write_config_with(
    dir: &Path,
    addr: SocketAddr,
    target: &MockServer,
    shutdown_timeout: &str,
    store: &str,
    delivery: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
listen = ["{addr}"]
shutdown_timeout = "{shutdown_timeout}"

[store]
url = "{store}"

[loop_guard]
burst = false

[delivery]
attempts = 100
backoff = {{ first = "100ms", max = "1s", factor = 2.0 }}
concurrency = {CONCURRENCY}
{delivery}

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "all"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{target}"
project = "gh/acme/api"
token = "t"
parameters = {{ delivery = "{{{{ delivery }}}}" }}
"#,
        target = target.url(),
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn push(i: usize) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": format!("{:040x}", i + 1), "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string()
    .into_bytes()
}

/// Posts webhook `i` until a relay acknowledges it (202, or 200 for a
/// redelivery of one it already holds), as a Git host's redelivery would,
/// trying the `urls` in turn from `i`'s own (relays behind no balancer).
/// Returns whether it was acknowledged before `deadline`.
pub async fn deliver_until_acknowledged(
    client: &reqwest::Client,
    urls: &[String],
    i: usize,
    deadline: Instant,
) -> bool {
    let body = push(i);
    let headers = sign::github(SECRET, "push", &format!("crash-{i}"), &body);
    let mut turn = i;
    while Instant::now() < deadline {
        let url = &urls[turn % urls.len()];
        turn += 1;
        let mut request = client
            .post(url)
            .body(body.clone())
            .timeout(Duration::from_secs(5));
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Ok(response) = request.send().await {
            match response.status().as_u16() {
                200 | 202 => return true,
                503 => {}
                other => panic!(
                    "webhook {i}: unexpected {other}: {}",
                    response.text().await.unwrap_or_default()
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Which deliveries the target saw, and how often.
pub fn seen(target: &MockServer) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in target.requests() {
        let delivery = r.json()["parameters"]["delivery"].as_str().unwrap().to_owned();
        *counts.entry(delivery).or_insert(0) += 1;
    }
    counts
}

/// Posts webhooks `0..count` from `senders` concurrent senders, each webhook
/// first to its own relay (alternating) and to the other when that fails;
/// returns how many were acknowledged.
pub async fn post_all(urls: Vec<String>, count: usize, senders: usize, deadline: Instant) -> usize {
    let client = crate::support::test_client();
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (next, acknowledged, urls, client) =
            (next.clone(), acknowledged.clone(), urls.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    return;
                }
                if deliver_until_acknowledged(&client, &urls, i, deadline).await {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    acknowledged.load(Ordering::SeqCst)
}

/// Waits until the target has seen every delivery `crash-0..count`, then a
/// moment more for stragglers; returns (delivered, duplicated).
pub async fn drained(target: &MockServer, count: usize, deadline: Instant) -> (usize, usize) {
    let all: BTreeSet<String> = (0..count).map(|i| format!("crash-{i}")).collect();
    loop {
        let counts = seen(target);
        if all.iter().all(|d| counts.contains_key(d)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {} of {count} delivered",
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = seen(target);
    let delivered = all.iter().filter(|d| counts.contains_key(*d)).count();
    let requests: usize = counts.values().sum();
    (delivered, requests - counts.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_webhook() {
    const WEBHOOKS: usize = 2000;
    const SENDERS: usize = 32;
    const KILLS: usize = 3;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let target = MockServer::start(Reply::new(201, r#"{"id":"p","number":1,"state":"created"}"#)).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let config = write_config(dir.path(), addr, &target, "5s");
    let daemon = Arc::new(Mutex::new(Daemon::start(&config, &[])));
    let url = format!("http://{addr}/hooks/github");

    let load = tokio::spawn(post_all(vec![url], WEBHOOKS, SENDERS, deadline));

    // Kill while the load runs: random moments, each followed by a restart.
    let mut in_flight_at_kills = Vec::new();
    for _ in 0..KILLS {
        let pause = rand::rng().random_range(150..700);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut guard = daemon.lock().await;
        let before = target.requests().len();
        guard.signal("KILL");
        let _ = guard.child.wait();
        in_flight_at_kills.push(before);
        *guard = Daemon::start(&config, &[]);
    }
    let acked = load.await.unwrap();
    assert_eq!(
        acked, WEBHOOKS,
        "every webhook should be acknowledged once relay is back"
    );

    // Let the last relay drain.
    let (delivered, duplicated) = drained(&target, WEBHOOKS, deadline).await;
    let lost = WEBHOOKS - delivered;
    eprintln!(
        "crash test: {WEBHOOKS} webhooks, {acked} acknowledged, {delivered} delivered, {duplicated} duplicated, \
         {lost} lost; {KILLS} SIGKILLs (target had seen {in_flight_at_kills:?} requests at each), {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert!(
        duplicated <= KILLS * CONCURRENCY,
        "{duplicated} duplicates: more than the {CONCURRENCY} sends that can be in flight at each of {KILLS} kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_sends_exits_0_and_a_restart_sends_the_rest() {
    const WEBHOOKS: usize = 60;
    // Slow answers keep sends in flight when SIGTERM arrives.
    let slow = MockServer::start(
        Reply::new(201, r#"{"id":"p","number":1,"state":"created"}"#).after(Duration::from_millis(800)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let config = write_config(dir.path(), addr, &slow, "5s");
    let daemon = Daemon::start(&config, &[]);
    let url = format!("http://{addr}/hooks/github");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = crate::support::test_client();
    for i in 0..WEBHOOKS {
        assert!(deliver_until_acknowledged(&client, std::slice::from_ref(&url), i, deadline).await);
    }
    slow.wait_for(CONCURRENCY).await;

    let signalled = Instant::now();
    daemon.signal("TERM");
    // It stops accepting at once, while its sends are still in flight.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_millis(600) {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections should be refused right after SIGTERM");
    let (status, logs) = daemon.terminate();
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}; log:\n{logs}");
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?}, over the 5s deadline"
    );
    let sent_before = slow.requests().len();
    assert!(sent_before < WEBHOOKS, "the test needs jobs left over");
    // Every line reached stderr, the last ones written by the log's own
    // thread as relay exited: one per webhook taken, one per send
    // recorded, and the goodbye last.
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with('{')).collect();
    let count = |message: &str| {
        let needle = format!("\"message\":\"{message}\"");
        lines.iter().filter(|l| l.contains(&needle)).count()
    };
    assert_eq!(count("webhook accepted"), WEBHOOKS, "log:\n{logs}");
    assert_eq!(count("delivered"), sent_before, "log:\n{logs}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("\"message\":\"relay stopped\"")),
        "the last line: {:?}",
        lines.last()
    );
    let store =
        crate::support::open_store(&format!("sqlite://{}", dir.path().join("relay.db").display())).await;
    let states = crate::support::job_states(store.as_ref()).await;
    assert_eq!(
        states["done"] as usize, sent_before,
        "every send in flight at SIGTERM finished and was recorded: {states:?}"
    );
    drop(store);

    // A restart against a fast target sends the rest, and nothing twice.
    slow.stop();
    let fast = slow.restart().await;
    let daemon = Daemon::start(&config, &[]);
    let start = Instant::now();
    loop {
        let counts = seen(&fast);
        if counts.len() == WEBHOOKS {
            assert!(
                counts.values().all(|n| *n == 1),
                "a clean shutdown leaves no duplicates: {counts:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} of {WEBHOOKS} delivered",
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = daemon.terminate();
    assert!(status.success());
}
