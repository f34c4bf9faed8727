//! The test harness: relay started in-process on 127.0.0.1:0 against a fresh
//! store (a SQLite file, or a PostgreSQL database of its own: [`Backend`]),
//! mock CI servers that record every request and answer from a script, and
//! signing helpers written from PROTOCOLS.md (not from relay's own code), so
//! the tests check the protocol, not self-consistency.
//!
//! Tests read what relay did through its admin API (`/api/jobs`,
//! `/api/jobs/{id}`, `/api/events`, `/metrics`) or, for a store no relay
//! serves, through the store's own inspect operations ([`open_store`]):
//! not through SQL. The few helpers below that do touch the schema are for
//! tests of what lies in the store itself (bytes on disk, a row deleted on
//! purpose).

// A shared toolbox: not every test module uses every helper.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use relay::config::{Config, StoreLocation};
use relay::server::Listeners;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long any wait in a test may take before it fails with a message.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Headers as a Git host would send them (PROTOCOLS.md, part A).
pub mod sign {
    use super::*;

    pub fn github(secret: &str, event: &str, delivery: &str, body: &[u8]) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-GitHub-Event".into(), event.into()),
            ("X-GitHub-Delivery".into(), delivery.into()),
            (
                "X-Hub-Signature-256".into(),
                format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), &[body]))),
            ),
        ]
    }

    pub fn gitlab(token: &str, event: &str, delivery: &str) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Gitlab-Event".into(), event.into()),
            ("X-Gitlab-Token".into(), token.into()),
            ("Idempotency-Key".into(), delivery.into()),
        ]
    }

    /// GitLab 19's Standard Webhooks signature; `key` is the decoded whsec_ secret.
    pub fn gitlab_signed(
        key: &[u8],
        event: &str,
        id: &str,
        timestamp: u64,
        body: &[u8],
    ) -> Vec<(String, String)> {
        let ts = timestamp.to_string();
        let tag = hmac_sha256(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Gitlab-Event".into(), event.into()),
            ("Idempotency-Key".into(), id.into()),
            ("webhook-id".into(), id.into()),
            ("webhook-timestamp".into(), ts),
            ("webhook-signature".into(), format!("v1,{}", b64(&tag))),
        ]
    }

    pub fn bitbucket(secret: &str, event: &str, delivery: &str, body: &[u8]) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Event-Key".into(), event.into()),
            ("X-Request-UUID".into(), delivery.into()),
            (
                "X-Hub-Signature".into(),
                format!("sha256={}", hex(&hmac_sha256(secret.as_bytes(), &[body]))),
            ),
        ]
    }

    /// CircleCI: `Circleci-Signature: v1=<hex HMAC-SHA256>`; the delivery id
    /// is the body's own `id`, so there is no delivery header.
    pub fn circleci(secret: &str, event: &str, body: &[u8]) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("Circleci-Event-Type".into(), event.into()),
            (
                "Circleci-Signature".into(),
                format!("v1={}", hex(&hmac_sha256(secret.as_bytes(), &[body]))),
            ),
        ]
    }

    /// Gitea signs the JSON document; Forgejo sends its headers beside Gitea's.
    pub fn gitea(secret: &str, event: &str, delivery: &str, json: &[u8]) -> Vec<(String, String)> {
        let sig = hex(&hmac_sha256(secret.as_bytes(), &[json]));
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("X-Gitea-Event".into(), event.into()),
            ("X-Gitea-Delivery".into(), delivery.into()),
            ("X-Gitea-Signature".into(), sig.clone()),
            ("X-Forgejo-Event".into(), event.into()),
            ("X-Forgejo-Signature".into(), sig),
        ]
    }
}

/// A GitHub `push` of `sha` to `git_ref` in `acme/api`, signed with
/// `secret`, posted to the `/hooks/github` source; asserts the 202 and
/// returns relay's answer.
pub async fn post_github_push(
    relay: &Relay,
    secret: &str,
    git_ref: &str,
    sha: &str,
    delivery: &str,
) -> serde_json::Value {
    let body = serde_json::json!({
        "ref": git_ref,
        "before": "1111111111111111111111111111111111111111",
        "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": { "full_name": "acme/api", "html_url": "https://github.com/acme/api" },
        "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": "work", "added": [], "modified": [], "removed": [] },
        "commits": []
    })
    .to_string()
    .into_bytes();
    let headers = sign::github(secret, "push", delivery, &body);
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

/// One request a mock server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// On tokio's clock, so tests with paused time see virtual time.
    pub at: tokio::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "mock received a body that is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// What a mock answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// How long the mock takes before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn new(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[derive(Debug)]
struct MockState {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Reply>>,
    default: Reply,
    arrived: Notify,
}

/// A CI API stand-in on loopback: records requests, answers from a script
/// (then with the default reply).
#[derive(Debug, Clone)]
pub struct MockServer {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    stop: CancellationToken,
}

impl MockServer {
    pub async fn start(default: Reply) -> MockServer {
        let state = Arc::new(MockState {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            default,
            arrived: Notify::new(),
        });
        MockServer::serve("127.0.0.1:0".parse().unwrap(), state).await
    }

    async fn serve(addr: SocketAddr, state: Arc<MockState>) -> MockServer {
        // After `stop`, the old accept loop closes its listener on its next poll.
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("mock cannot bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    () = st.cancelled() => return,
                };
                let (s, st) = (s.clone(), st.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let reply = s
                                .script
                                .lock()
                                .unwrap()
                                .pop_front()
                                .unwrap_or_else(|| s.default.clone());
                            s.requests.lock().unwrap().push(Recorded {
                                method: parts.method.to_string(),
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                                at: tokio::time::Instant::now(),
                            });
                            s.arrived.notify_waiters();
                            if !reply.delay.is_zero() {
                                tokio::time::sleep(reply.delay).await;
                            }
                            let mut response = http::Response::new(Full::new(Bytes::from(reply.body)));
                            *response.status_mut() = http::StatusCode::from_u16(reply.status).unwrap();
                            for (k, v) in reply.headers {
                                response.headers_mut().insert(
                                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                    v.parse().unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // Stopping closes open connections too: an outage, not a drain.
                    tokio::select! {
                        _ = connection => {}
                        () = st.cancelled() => {}
                    }
                });
            }
        });
        MockServer { addr, state, stop }
    }

    /// Comes back on the same address after [`MockServer::stop`], keeping the
    /// requests recorded so far and the script.
    pub async fn restart(&self) -> MockServer {
        MockServer::serve(self.addr, self.state.clone()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replies for the next requests, in order; the default follows.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived; fails the test after `PATIENCE`.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        self.wait_for_within(n, PATIENCE).await
    }

    /// As `wait_for`, with its own limit (on tokio's clock: virtual time in
    /// tests that pause it).
    pub async fn wait_for_within(&self, n: usize, patience: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.state.arrived.notified();
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen = self.requests();
                assert!(
                    seen.len() >= n,
                    "mock expected {n} requests, got {}: {seen:#?}",
                    seen.len()
                );
                return seen;
            }
        }
    }

    /// Refuses connections from now on and drops the open ones.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// relay running in this process on loopback, with its own store: a fresh
/// SQLite file or a fresh PostgreSQL database (see [`Backend`]).
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    /// Where its store is, as its config says.
    pub store: StoreLocation,
    /// Sent as `Authorization: Bearer` by the API helpers, for a relay
    /// whose `[admin]` has a token.
    pub api_token: Option<String>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    client: reqwest::Client,
}

/// An HTTP client for talking to relay; loopback only, so no proxy.
pub fn test_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The part every test config shares: loopback on port 0 and a fresh SQLite
/// store (no admin listener: see [`config_on`] for one).
pub fn base_config(db: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"sqlite://{}\"\n\n",
        db.display()
    )
}

/// A whole config on `backend`: loopback on port 0, the store (with
/// `store_extra` lines in its table), `rest`, and an admin listener on port
/// 0 unless `rest` has an `[admin]` table of its own.
pub fn config_on(backend: &Backend, dir: &std::path::Path, store_extra: &str, rest: &str) -> String {
    let admin = if rest.contains("[admin]") {
        ""
    } else {
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"{}\"\n{store_extra}\n{rest}{admin}",
        backend.store_url(dir)
    )
}

impl Relay {
    /// Starts relay on a fresh SQLite file with an admin listener, then
    /// `rest` (sources, routes, targets…).
    pub async fn start(rest: &str) -> Relay {
        Relay::start_on(&Backend::Sqlite, rest).await
    }

    /// As [`Relay::start`], on `backend`.
    pub async fn start_on(backend: &Backend, rest: &str) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let text = config_on(backend, dir.path(), "", rest);
        Relay::start_with(dir, &text).await
    }

    /// Starts relay with exactly this config text (which must listen on port 0).
    pub async fn start_with(dir: tempfile::TempDir, text: &str) -> Relay {
        let config =
            Config::from_toml(text).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
        let store = config.store.location.clone();
        let listeners = Listeners::bind(&config).await.unwrap();
        let addr = listeners.ingress_addrs()[0];
        let admin = listeners.admin_addr();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let control = relay::daemon::Control {
                shutdown: token,
                ..Default::default()
            };
            relay::daemon::run(config, listeners, control).await.unwrap();
        });
        Relay {
            addr,
            admin,
            dir,
            store,
            api_token: None,
            shutdown,
            task: Some(task),
            client: test_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("relay.db")
    }

    /// `GET` on the admin listener (no token); fails the test unless 200.
    pub async fn api(&self, path: &str) -> serde_json::Value {
        let admin = self
            .admin
            .unwrap_or_else(|| panic!("this relay has no admin listener for {path}"));
        let mut request = self.client.get(format!("http://{admin}{path}"));
        if let Some(token) = &self.api_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {text}"))
    }

    /// `POST {path}` on the admin API: the status and the JSON answer.
    pub async fn api_post(&self, path: &str) -> (u16, serde_json::Value) {
        let admin = self
            .admin
            .unwrap_or_else(|| panic!("this relay has no admin listener for {path}"));
        let mut request = self.client.post(format!("http://{admin}{path}"));
        if let Some(token) = &self.api_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path} is not JSON ({e}): {text}"));
        (status, json)
    }

    /// `GET /api/jobs?{query}` (up to 1000), most recently changed first.
    pub async fn jobs(&self, query: &str) -> Vec<serde_json::Value> {
        let answer = self.api(&format!("/api/jobs?limit=1000&{query}")).await;
        answer["jobs"].as_array().expect("a jobs array").clone()
    }

    /// `GET /api/jobs/{id}`: the job, its stored request and its history.
    pub async fn job(&self, id: &str) -> serde_json::Value {
        self.api(&format!("/api/jobs/{id}")).await
    }

    /// The one job for `target`, in detail; fails unless there is exactly one.
    pub async fn job_for(&self, target: &str) -> serde_json::Value {
        let jobs = self.jobs(&format!("target={target}")).await;
        assert_eq!(jobs.len(), 1, "one job for {target}: {jobs:#?}");
        self.job(jobs[0]["id"].as_str().unwrap()).await
    }

    /// Every job in detail, oldest first (job ids are time-ordered).
    pub async fn job_details(&self) -> Vec<serde_json::Value> {
        let mut ids: Vec<String> = self
            .jobs("")
            .await
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        let mut details = Vec::new();
        for id in ids {
            details.push(self.job(&id).await);
        }
        details
    }

    /// `(number, status, outcome)` of every recorded attempt: job by job,
    /// oldest job first, each job's attempts in order.
    pub async fn attempts(&self) -> Vec<(u64, Option<u64>, String)> {
        self.job_details()
            .await
            .iter()
            .flat_map(|j| j["history"].as_array().unwrap().clone())
            .map(|a| {
                (
                    a["number"].as_u64().unwrap(),
                    a["status"].as_u64(),
                    a["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// `GET /api/events` (up to 1000), newest first.
    pub async fn events(&self) -> Vec<serde_json::Value> {
        let answer = self.api("/api/events?limit=1000").await;
        answer["events"].as_array().expect("an events array").clone()
    }

    /// One event as `/api/events` shows it; fails if it is not listed.
    pub async fn event(&self, id: &str) -> serde_json::Value {
        self.events()
            .await
            .into_iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("event {id} is not in /api/events"))
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        let admin = self.admin.expect("an admin listener for /metrics");
        let response = self
            .client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.text().await.unwrap()
    }

    /// One sample's value from `/metrics` (`series` with its labels).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    /// Jobs per state (`relay_jobs{state}` on `/metrics`, read from the
    /// store when scraped).
    pub async fn queue(&self) -> std::collections::BTreeMap<String, u64> {
        let text = self.metrics().await;
        let mut states = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("relay_jobs{state=\"")
                && let Some((state, value)) = rest.split_once("\"} ")
            {
                states.insert(state.to_owned(), value.trim().parse::<f64>().unwrap() as u64);
            }
        }
        assert!(!states.is_empty(), "no relay_jobs in:\n{text}");
        states
    }

    /// Polls `GET /api/jobs?{query}` until it lists exactly `n` jobs; fails
    /// after `PATIENCE`. Returns them.
    pub async fn wait_jobs(&self, query: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let jobs = self.jobs(query).await;
            if jobs.len() == n {
                return jobs;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {n} jobs with {query:?}, there are {}: {jobs:#?}",
                jobs.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until `done` of the webhook's jobs are done, none open.
    pub async fn wait_done(&self, n: usize) -> Vec<serde_json::Value> {
        self.wait_jobs("state=done", n).await
    }

    /// Every byte the store holds: the SQLite file and its WAL, or each
    /// PostgreSQL table copied out in binary (every column, raw). For scans
    /// that must not depend on the schema (no credential anywhere).
    pub async fn store_bytes(&self) -> Vec<u8> {
        store_bytes(&self.store).await
    }

    /// Deletes an event (and, by cascade, its jobs, attempts and drops) as
    /// retention would, without waiting for it.
    pub async fn delete_event(&self, id: &str) -> u64 {
        delete_event(&self.store, id).await
    }
    /// Posts a body with these headers; returns the status and the JSON answer.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: impl Into<Bytes>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.client.post(self.url(path)).body(body.into());
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("relay answered non-JSON ({status}): {text}"));
        (status, json)
    }

    /// Stops relay and hands back its directory (and database), so another
    /// relay can start on it.
    pub async fn stop_keeping_dir(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `../shared/fixtures`, if this checkout has it beside it.
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    dir.is_dir().then_some(dir)
}

/// Reads a fixture, or says plainly that the fixtures are absent (and the
/// caller skips).
pub fn fixture(relative: &str) -> Option<Vec<u8>> {
    match fixtures_dir() {
        Some(dir) => Some(std::fs::read(dir.join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))),
        None => {
            eprintln!(
                "SKIPPED: ../shared/fixtures is not beside this checkout; fixture {relative} not tested"
            );
            None
        }
    }
}

/// The real `relay` binary, started as a child process with JSON logs on
/// stderr, which are kept for the test to read.
#[derive(Debug)]
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<String>>,
}

pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_relay")
}

impl Daemon {
    /// Runs `relay serve -c <config>` with these extra environment variables
    /// and waits until it listens.
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        let mut command = std::process::Command::new(relay_binary());
        command.args(["serve", "--log-format", "json", "-c"]).arg(config);
        for (k, v) in env {
            command.env(k, v);
        }
        Daemon::spawn(command)
    }

    /// Starts a command that ends up running `relay serve` (through a
    /// wrapper like `systemd-socket-activate`), with JSON logs on stderr.
    pub fn spawn(mut command: std::process::Command) -> Daemon {
        use std::io::BufRead;
        command
            .env("RELAY_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("relay binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(String, SocketAddr)>();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let message = v["message"].as_str().unwrap_or_default().to_owned();
                    if let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                        let _ = tx.send((message, addr));
                    }
                } else if let Some(addr) = text_log_addr(&line) {
                    let _ = tx.send((line.clone(), addr));
                }
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let mut addr = None;
        let mut admin = None;
        let deadline = Instant::now() + PATIENCE;
        while addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((message, a)) if message.contains("webhooks") => addr = Some(a),
                Ok((message, a)) if message.contains("admin") => admin = Some(a),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "relay did not start listening; its log:\n{}",
                        logs.lock().unwrap()
                    );
                }
            }
        }
        // The admin line, if any, comes right after.
        if let Ok((message, a)) = rx.recv_timeout(Duration::from_millis(300))
            && message.contains("admin")
        {
            admin = Some(a);
        }
        Daemon {
            child,
            addr: addr.unwrap_or_else(|| unreachable!()),
            admin,
            logs,
        }
    }

    /// As [`Daemon::start`], with `relay serve --log-format text`: the
    /// human-readable log, which [`Daemon::logs`] then holds.
    pub fn start_text(config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
        let mut command = std::process::Command::new(relay_binary());
        command.args(["serve", "--log-format", "text", "-c"]).arg(config);
        for (k, v) in env {
            command.env(k, v);
        }
        Daemon::spawn(command)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The number each JSON log line containing `needle` gives `field`, in
    /// the log's order.
    pub fn logged_numbers(&self, needle: &str, field: &str) -> Vec<u64> {
        self.logs()
            .lines()
            .filter(|line| line.contains(needle))
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()?[field].as_u64())
            .collect()
    }

    /// Waits until the log holds `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let seen = self.logs().lines().filter(|l| l.contains(needle)).count();
            if seen >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {count}× {needle:?} in the log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the child (by its PID, which this test started).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then the exit status (bounded by `PATIENCE`).
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                return (status, self.logs());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("relay did not exit after SIGTERM; log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `addr=` of a text-format log line (colour codes removed).
fn text_log_addr(line: &str) -> Option<SocketAddr> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ … m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let rest = &plain[plain.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET` on an admin listener (no token); fails the test unless 200.
pub async fn api_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    let response = test_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {text}"))
}

/// Posts to a URL and returns the status and body text.
pub async fn post_to(url: &str, headers: &[(String, String)], body: impl Into<Bytes>) -> (u16, String) {
    let mut request = test_client().post(url).body(body.into());
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

// ---------------------------------------------------------------------------
// Backends: SQLite, and PostgreSQL on a throwaway cluster of the tests' own

/// The environment variable naming a PostgreSQL server the tests may create
/// databases on (`.ci/postgres start` prints such a URL). Unset, the tests
/// start a cluster of their own when PostgreSQL's server binaries are
/// installed.
pub const POSTGRES_ENV: &str = "RELAY_TEST_POSTGRES";

/// The store a test's relay runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A fresh SQLite file in the relay's directory.
    Sqlite,
    /// A fresh database of its own (a `postgres://` URL).
    Postgres(String),
}

impl Backend {
    /// A fresh PostgreSQL database, or `None` when there is no server to
    /// run on (see [`postgres_database`]); `test` names the caller.
    pub async fn postgres(test: &str) -> Option<Backend> {
        postgres_database(test).await.map(Backend::Postgres)
    }

    /// The `store.url` for a relay whose directory is `dir`.
    pub fn store_url(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}", dir.join("relay.db").display()),
            Backend::Postgres(url) => url.clone(),
        }
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, Backend::Sqlite)
    }
}

/// Makes each listed `async fn case(backend: Backend)` a test per backend:
/// `<module>::sqlite::case` and `<module>::postgres::case`. Cases listed
/// under `paused_on_sqlite` run the SQLite variant with tokio's clock paused
/// (PostgreSQL decides due times with its own clock, which no test can
/// pause: those cases scale their waits down on it instead).
///
/// Without a PostgreSQL server, a `postgres::` test says
/// `skipped (PostgreSQL): …` on the terminal and returns without running
/// its case; see [`postgres_database`].
#[macro_export]
macro_rules! on_both_backends {
    (
        cases: [$($case:ident),* $(,)?]
        $(, paused_on_sqlite: [$($paused:ident),* $(,)?])? $(,)?
    ) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case($crate::support::Backend::Sqlite).await;
                }
            )*
            $($(
                #[tokio::test(start_paused = true)]
                async fn $paused() {
                    super::$paused($crate::support::Backend::Sqlite).await;
                }
            )*)?
        }

        mod postgres {
            $(
                #[tokio::test]
                #[cfg_attr(
                    not(relay_postgres_tests),
                    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
                )]
                async fn $case() {
                    let name = concat!(module_path!(), "::", stringify!($case));
                    if let Some(backend) = $crate::support::Backend::postgres(name).await {
                        super::$case(backend).await;
                    }
                }
            )*
            $($(
                #[tokio::test]
                #[cfg_attr(
                    not(relay_postgres_tests),
                    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
                )]
                async fn $paused() {
                    let name = concat!(module_path!(), "::", stringify!($paused));
                    if let Some(backend) = $crate::support::Backend::postgres(name).await {
                        super::$paused(backend).await;
                    }
                }
            )*)?
        }
    };
}

/// The PostgreSQL server the tests use: `RELAY_TEST_POSTGRES` if set, else
/// a cluster this test process starts once (see [`own_cluster`]). `Err`
/// says why there is none.
fn postgres_server() -> Result<&'static str, &'static str> {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| match std::env::var(POSTGRES_ENV) {
            Ok(url) => Ok(url),
            Err(_) => own_cluster(),
        })
        .as_ref()
        .map(String::as_str)
        .map_err(String::as_str)
}

/// A fresh, empty database on the test server, as a `postgres://` URL.
///
/// `None` only when there is no server: `RELAY_TEST_POSTGRES` is unset and
/// PostgreSQL's server binaries are not installed. The caller then returns
/// without testing anything, and since libtest has no way to mark a test
/// skipped at run time, that is said out loud instead: a
/// `skipped (PostgreSQL): <test> — <why>` line straight to the terminal
/// (libtest hides what passing tests print), and a count of the skipped
/// tests when the test process ends (see [`SkipTally`]). A server that
/// exists but fails is a test failure, never a skip.
pub async fn postgres_database(test: &str) -> Option<String> {
    let server = match postgres_server() {
        Ok(server) => server,
        Err(why) => {
            skipped(test, why);
            return None;
        }
    };
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("the test PostgreSQL server does not answer: {e}"));
    tokio::spawn(connection);
    sweep_abandoned_databases(&client).await;
    let name = test_database_name(std::time::SystemTime::now());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
    let (base, _) = server.rsplit_once('/').expect("the URL names a database");
    Some(format!("{base}/{name}"))
}

/// How a test database's name begins; the second it was created follows.
const TEST_DATABASE_PREFIX: &str = "relay_test_";

/// How long a test database is kept after its test: long enough to look
/// into a failure, far longer than any test runs.
const TEST_DATABASE_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

fn unix_seconds(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh test database's name: the prefix, the second it is made at, an
/// id of its own.
fn test_database_name(at: std::time::SystemTime) -> String {
    format!(
        "{TEST_DATABASE_PREFIX}{}_{}",
        unix_seconds(at),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether `name` is a test database made before `cutoff` (a Unix second).
/// Names without a second (made by older builds) are never taken for one.
fn abandoned_test_database(name: &str, cutoff: u64) -> bool {
    name.strip_prefix(TEST_DATABASE_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .and_then(|(secs, _)| secs.parse::<u64>().ok())
        .is_some_and(|created| created < cutoff)
}

#[test]
fn only_test_databases_older_than_the_cutoff_are_abandoned() {
    let now = std::time::SystemTime::now();
    let two_hours_ago = test_database_name(now - 2 * TEST_DATABASE_KEPT);
    let fresh = test_database_name(now);
    let cutoff = unix_seconds(now - TEST_DATABASE_KEPT);
    assert!(abandoned_test_database(&two_hours_ago, cutoff), "{two_hours_ago}");
    assert!(!abandoned_test_database(&fresh, cutoff), "{fresh}");
    assert!(!abandoned_test_database(
        "relay_test_02152360873041b0a0b85a7774c6ad54",
        cutoff
    ));
    assert!(!abandoned_test_database("relay", cutoff));
    assert!(!abandoned_test_database("relay_bench_1000_x", cutoff));
}

/// Drops the test databases created on this server more than an hour ago,
/// once per test process. A test does not drop its own (it may fail, and
/// its database says why), so a server named by `RELAY_TEST_POSTGRES`
/// would otherwise keep every run's 200-odd databases. One still in use is
/// refused by the server (no `FORCE`) and left.
async fn sweep_abandoned_databases(client: &tokio_postgres::Client) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let cutoff = unix_seconds(std::time::SystemTime::now() - TEST_DATABASE_KEPT);
            let Ok(rows) = client
                .query(
                    "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                    &[&TEST_DATABASE_PREFIX],
                )
                .await
            else {
                return;
            };
            for row in rows {
                let name: String = row.get(0);
                if abandoned_test_database(&name, cutoff) {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                        .await;
                }
            }
        })
        .await;
}

fn skipped(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "skipped (PostgreSQL): {test} — {why}");
    SkipTally::count(test);
}

/// Counts the PostgreSQL tests skipped in this process and prints the total
/// when the process ends: a `sh` child reads one line per skipped test from
/// a pipe, and at end of file (the test process is gone, however it ended)
/// prints the summary to the terminal.
#[derive(Debug)]
struct SkipTally {
    pipe: Option<std::process::ChildStdin>,
}

impl SkipTally {
    fn count(test: &str) {
        use std::io::Write as _;
        static TALLY: OnceLock<Mutex<SkipTally>> = OnceLock::new();
        let tally = TALLY.get_or_init(|| {
            let child = std::process::Command::new("sh")
                .args([
                    "-c",
                    "n=0; while read -r _; do n=$((n + 1)); done; \
                     echo \"relay tests: $n PostgreSQL test(s) SKIPPED, not run (libtest lists them as ok): \
                     install PostgreSQL's server (initdb, pg_ctl) or set RELAY_TEST_POSTGRES\" >&2",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn();
            Mutex::new(SkipTally {
                pipe: child.ok().and_then(|mut c| c.stdin.take()),
            })
        });
        if let Some(pipe) = tally.lock().unwrap().pipe.as_mut() {
            let _ = writeln!(pipe, "{test}");
        }
    }
}

/// `/usr/lib/postgresql/<newest>/bin`, if it has `initdb` and `pg_ctl`.
fn postgres_binaries() -> Option<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// What `.ci/postgres start DIR PORT` does, once per test process: a
/// throwaway cluster in a fresh directory under the system temp dir
/// (initialised and run as the `postgres` user when the tests run as root:
/// the server refuses to run as root), listening on 127.0.0.1 on a free port
/// and on a socket in that directory, with a `relay` role (password
/// `relay-test-pw`, CREATEDB) owning a `relay` database. Returns its URL.
///
/// A watchdog child started first holds the read end of a pipe whose write
/// end only this process holds: when the process ends, however it ends, the
/// watchdog reads end of file, stops the server (`pg_ctl stop -m fast`) and
/// removes the directory. No server outlives `cargo test`. The watchdog runs
/// in a process group of its own, so that a runner ending the tests' group
/// once `cargo test` returns does not cut its removal short; clusters left
/// half-removed all the same (a killed watchdog) are swept by the next run.
fn own_cluster() -> Result<String, String> {
    use std::os::unix::process::CommandExt as _;
    let Some(bin) = postgres_binaries() else {
        return Err(format!(
            "{POSTGRES_ENV} is unset and PostgreSQL's server binaries (initdb, pg_ctl) are not installed under /usr/lib/postgresql/*/bin"
        ));
    };
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    sweep_abandoned_clusters();
    // Not in a private temp directory: the server may run as `postgres`.
    let dir = std::env::temp_dir().join(format!(
        "relay-test-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let data = dir.join("data");
    let as_server = |program: &str| {
        let mut command = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        } else {
            std::process::Command::new(bin.join(program))
        };
        command.stdin(std::process::Stdio::null());
        command
    };

    // The watchdog first, so that even a failed start is cleaned up.
    let stop = as_server("pg_ctl");
    let stop_line = format!(
        "{} -D '{}' -m fast -w stop",
        std::iter::once(stop.get_program())
            .chain(stop.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" "),
        data.display()
    );
    let watchdog = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "cat >/dev/null; {stop_line} >/dev/null 2>&1; rm -rf '{}'",
                dir.display()
            ),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the cluster's watchdog: {e}"))?;
    static WATCHDOG: OnceLock<Mutex<std::process::Child>> = OnceLock::new();
    let _ = WATCHDOG.set(Mutex::new(watchdog));

    let run = |mut command: std::process::Command, what: &str| -> Result<(), String> {
        let out = command.output().map_err(|e| format!("{what}: cannot run: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    if root {
        let mut chown = std::process::Command::new("chown");
        chown.arg("postgres:").arg(&dir);
        run(chown, "chown postgres: DIR")?;
    }
    let mut initdb = as_server("initdb");
    initdb.arg("-D").arg(&data).args([
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-U",
        "postgres",
    ]);
    run(initdb, "initdb").unwrap_or_else(|e| panic!("PostgreSQL is installed but {e}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut start = as_server("pg_ctl");
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .arg("-w")
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            dir.display()
        ))
        .arg("start");
    run(start, "pg_ctl start").unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        panic!("PostgreSQL is installed but {e}\n{log}")
    });
    let mut psql = as_server("psql");
    psql.arg("-h")
        .arg(&dir)
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", "CREATE ROLE relay LOGIN PASSWORD 'relay-test-pw' CREATEDB"])
        .args(["-c", "CREATE DATABASE relay OWNER relay"]);
    run(psql, "psql").unwrap_or_else(|e| panic!("PostgreSQL is installed but {e}"));
    Ok(format!("postgres://relay:relay-test-pw@127.0.0.1:{port}/relay"))
}

/// Removes the clusters of earlier test processes that are gone, where their
/// server is stopped (no `postmaster.pid`): what a watchdog killed in the
/// middle of its `rm -rf` left behind. A directory whose process still runs,
/// or whose server may, is left alone.
fn sweep_abandoned_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("relay-test-pg-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if gone && !path.join("data").join("postmaster.pid").exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// A store of its own on the database at `url`, for reading what a relay
/// (in another process, or stopped) left there: the inspect operations of
/// [`relay::store::Store`], not SQL.
pub async fn open_store(url: &str) -> std::sync::Arc<dyn relay::store::Store> {
    let config = Config::from_toml(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"{url}\"\n"
    ))
    .unwrap_or_else(|e| panic!("store url {url}: {e}"));
    relay::store::open(&config.store, std::time::SystemTime::now())
        .await
        .unwrap()
}

/// Jobs per state (`queued`, `in_flight`, `done`, `dead`) in a store.
pub async fn job_states(store: &dyn relay::store::Store) -> std::collections::BTreeMap<String, u64> {
    store
        .queue_stats(std::time::SystemTime::now())
        .await
        .unwrap()
        .jobs
        .into_iter()
        .map(|(state, n)| (state.as_str().to_owned(), n))
        .collect()
}

/// A stored event's body as it lies in the SQLite file: `codec` 0 is the
/// body as received, 1 LZ4 (size-prepended). For the tests of that
/// encoding itself: everything else reads events through the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBody {
    pub codec: i64,
    /// The `body` column's bytes.
    pub raw: Vec<u8>,
    /// `body` and `payload` unpacked.
    pub body: Vec<u8>,
    pub payload: Option<Vec<u8>>,
}

/// Every stored event's body (all events, or the one with this id), read
/// from the SQLite file at `db`.
pub fn stored_bodies(db: &std::path::Path, event_id: Option<&str>) -> Vec<StoredBody> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut statement = conn
        .prepare("SELECT body, payload, codec FROM events WHERE ?1 IS NULL OR id = ?1 ORDER BY id")
        .unwrap();
    let rows = statement
        .query_map([event_id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get(2)?,
            ))
        })
        .unwrap();
    rows.map(Result::unwrap)
        .map(|(raw, payload, codec)| {
            let unpack = |stored: Vec<u8>| match codec {
                0 => stored,
                1 => lz4_flex::block::decompress_size_prepended(&stored).unwrap(),
                other => panic!("codec {other}"),
            };
            StoredBody {
                codec,
                body: unpack(raw.clone()),
                raw,
                payload: payload.map(unpack),
            }
        })
        .collect()
}

/// Connects to the PostgreSQL store at `location`, as the test's own client.
pub async fn postgres_client(location: &StoreLocation) -> Option<tokio_postgres::Client> {
    let StoreLocation::Postgres(pg) = location else {
        return None;
    };
    let (client, connection) = pg.connect.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    Some(client)
}

/// See [`Relay::store_bytes`].
pub async fn store_bytes(location: &StoreLocation) -> Vec<u8> {
    let mut all = Vec::new();
    match location {
        StoreLocation::Sqlite(path) => {
            for suffix in ["", "-wal"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                if let Ok(bytes) = std::fs::read(&file) {
                    all.extend(bytes);
                }
            }
        }
        StoreLocation::Postgres(_) => {
            use futures_util::TryStreamExt as _;
            let client = postgres_client(location).await.unwrap();
            let tables: Vec<String> = client
                .query(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert!(
                tables.iter().any(|t| t == "jobs"),
                "no relay tables in {tables:?}"
            );
            for table in tables {
                let copy = format!("COPY {table} TO STDOUT (FORMAT binary)");
                let stream = client.copy_out(copy.as_str()).await.unwrap();
                let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
                for chunk in chunks {
                    all.extend_from_slice(&chunk);
                }
            }
        }
    }
    all
}

/// See [`Relay::delete_event`]: a row deleted on purpose, as retention
/// would, with the one statement both schemas take.
pub async fn delete_event(location: &StoreLocation, id: &str) -> u64 {
    const DELETE: &str = "DELETE FROM events WHERE CAST(id AS TEXT) = $1";
    match location {
        StoreLocation::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.pragma_update(None, "foreign_keys", true).unwrap();
            conn.execute(DELETE, [id]).unwrap() as u64
        }
        StoreLocation::Postgres(_) => {
            let client = postgres_client(location).await.unwrap();
            client.execute(DELETE, &[&id]).await.unwrap()
        }
    }
}
