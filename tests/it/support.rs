//! The test harness: relay started in-process on 127.0.0.1:0 against a fresh
//! SQLite file, mock CI servers that record every request and answer from a
//! script, and signing helpers written from PROTOCOLS.md (not from relay's
//! own code), so the tests check the protocol, not self-consistency.

// A shared toolbox: not every test module uses every helper.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use relay::config::Config;
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

/// relay running in this process on loopback, with its own SQLite file.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    client: reqwest::Client,
}

/// An HTTP client for talking to relay; loopback only, so no proxy.
pub fn test_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The part every test config shares: loopback on port 0 and a fresh store.
pub fn base_config(db: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"sqlite://{}\"\n\n",
        db.display()
    )
}

impl Relay {
    /// Starts relay with `base_config` followed by `rest` (sources, routes, targets…).
    pub async fn start(rest: &str) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}{rest}", base_config(&dir.path().join("relay.db")));
        Relay::start_with(dir, &text).await
    }

    /// Starts relay with exactly this config text (which must listen on port 0).
    pub async fn start_with(dir: tempfile::TempDir, text: &str) -> Relay {
        let config =
            Config::from_toml(text).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
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

    /// A read-only view of the store, as another process would see it.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(self.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
    }

    /// An event's `body` and `payload` columns as received: the store keeps
    /// them LZ4-compressed where that pays (`codec` 1).
    pub fn stored_body(&self, event_id: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        let (body, payload, codec): (Vec<u8>, Option<Vec<u8>>, i64) = self
            .db()
            .query_row(
                "SELECT body, payload, codec FROM events WHERE ?1 IS NULL OR id = ?1",
                [event_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let unpack = |stored: Vec<u8>| match codec {
            0 => stored,
            1 => lz4_flex::block::decompress_size_prepended(&stored).unwrap(),
            other => panic!("codec {other}"),
        };
        (unpack(body), payload.map(unpack))
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).unwrap()
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

    /// Polls `sql` (a count) until it reaches `n`; fails after `PATIENCE`.
    pub async fn wait_count(&self, sql: &str, n: i64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = self.count(sql);
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited for `{sql}` to be {n}, it is {got}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
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

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

/// The environment variable naming a PostgreSQL server the tests may create
/// databases on (`.ci/postgres start` prints such a URL).
pub const POSTGRES_ENV: &str = "RELAY_TEST_POSTGRES";

/// A fresh, empty database on the test server, as a `postgres://` URL, or
/// `None` (and one note on the terminal) when `RELAY_TEST_POSTGRES` is unset.
/// `test` names the caller in the skip note.
pub async fn postgres_database(test: &str) -> Option<String> {
    let Ok(server) = std::env::var(POSTGRES_ENV) else {
        use std::io::Write as _;
        // Straight to the terminal: libtest hides what passing tests print.
        let _ = writeln!(
            std::io::stderr(),
            "skipped (PostgreSQL): {test} — set {POSTGRES_ENV} to run it (.ci/postgres start DIR PORT prints one)"
        );
        return None;
    };
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{POSTGRES_ENV} is set but the server does not answer: {e}"));
    tokio::spawn(connection);
    let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
    let (base, _) = server.rsplit_once('/').expect("the URL names a database");
    Some(format!("{base}/{name}"))
}
