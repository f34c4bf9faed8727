//! Outbound proxies, against a tiny HTTP proxy written here on loopback that
//! records every request head it receives: absolute-form requests for http
//! targets (forwarded to the mock CI), `CONNECT` for https ones (tunnelled to
//! a TLS server with a self-signed certificate relay does not trust). The
//! environment's `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` are set on a relay
//! subprocess, never in this process.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Daemon, MockServer, Reply, api_get, b64, post_to, relay_binary, sign, test_client};

const SECRET: &str = "proxy-test-secret";
const TOKEN: &str = "cci-token-8f41d2b9c07e";
const PROXY_PASSWORD: &str = "pr0xy-pa55word-7c1e";
const PIPELINE: &str = "/api/v2/project/gh/acme/api/pipeline";
const PATIENCE: Duration = Duration::from_secs(20);

/// Every variable relay could take a proxy from; cleared on each subprocess.
const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// A forward proxy on 127.0.0.1 that records the head of every request.
struct TestProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl TestProxy {
    async fn start() -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_proxied(stream, seen.clone()));
            }
        });
        TestProxy { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Waits until a request head starting with `start` arrived; returns it.
    async fn wait_for(&self, start: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(head) = self.heads().into_iter().find(|h| h.starts_with(start)) {
                return head;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy never saw {start:?}; it saw {:#?}",
                self.heads()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One client connection: record the head, then tunnel (CONNECT) or forward
/// (absolute form, rewritten to origin form with `Connection: close`).
async fn serve_proxied(mut client: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        if buffer.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let rest = buffer[head_end..].to_vec();
    heads.lock().unwrap().push(head.clone());
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if method == "CONNECT" {
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            return;
        };
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        let _ = upstream.write_all(&rest).await;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    let Some(after_scheme) = target.strip_prefix("http://") else {
        let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        return;
    };
    let (authority, path) = match after_scheme.find('/') {
        Some(slash) => (&after_scheme[..slash], &after_scheme[slash..]),
        None => (after_scheme, "/"),
    };
    let Ok(mut upstream) = TcpStream::connect(authority).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().to_ascii_lowercase();
        if !matches!(
            name.as_str(),
            "proxy-authorization" | "proxy-connection" | "connection"
        ) {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    if upstream.write_all(forwarded.as_bytes()).await.is_err() || upstream.write_all(&rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A TLS server with a self-signed certificate: relay's handshake fails.
pub(crate) async fn untrusted_tls_server() -> SocketAddr {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    tls_server(config).await
}

/// A server on 127.0.0.1 that completes TLS handshakes with `config` and
/// then says nothing: enough for a client's certificate check to speak.
pub(crate) async fn tls_server(config: rustls::ServerConfig) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(stream).await;
            });
        }
    });
    addr
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

fn target(name: &str, base_url: &str, proxy: &str) -> String {
    format!(
        "\n[targets.{name}]\nkind = \"circleci\"\nbase_url = \"{base_url}\"\nproject = \"gh/acme/api\"\ntoken = \"{TOKEN}\"\n{proxy}\n"
    )
}

/// A config file in `dir` routing every push to `targets`.
fn write_config(dir: &std::path::Path, names: &[&str], targets: &str) -> std::path::PathBuf {
    let to: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[store]\nurl = \"sqlite://{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [sources.gh]\nprovider = \"github\"\npath = \"/hooks/github\"\nsecret = \"{SECRET}\"\n\n\
         [[routes]]\nname = \"all\"\nto = [{}]\n{targets}",
        dir.join("relay.db").display(),
        to.join(", ")
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A relay subprocess with the proxy variables cleared, then `env` set.
fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
    let mut command = Command::new(relay_binary());
    command.args(["serve", "--log-format", "json", "-c"]).arg(config);
    for name in PROXY_VARS {
        command.env_remove(name);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    Daemon::spawn(command)
}

/// Posts one signed push; relay must accept it.
async fn push(daemon: &Daemon) {
    let body = json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222", "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string();
    let headers = sign::github(SECRET, "push", &uuid::Uuid::new_v4().to_string(), body.as_bytes());
    let (status, text) = post_to(&daemon.url("/hooks/github"), &headers, body).await;
    assert_eq!(status, 202, "{text}");
}

/// The job for `target` once it has an attempt, with its history.
async fn attempted(daemon: &Daemon, target: &str) -> serde_json::Value {
    let admin = daemon.admin.expect("an admin listener");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let jobs = api_get(admin, &format!("/api/jobs?target={target}")).await;
        if let Some(id) = jobs["jobs"][0]["id"].as_str() {
            let job = api_get(admin, &format!("/api/jobs/{id}")).await;
            if job["history"].as_array().is_some_and(|h| !h.is_empty()) {
                return job;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no attempt for {target}; log:\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A header's value in a recorded request head (names are case-insensitive).
fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

fn absolute_form(mock: &MockServer) -> String {
    format!("POST {}{PIPELINE} HTTP/1.1", mock.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environments_proxy_gets_absolute_form_for_http_and_connect_for_https() {
    let mock = MockServer::start(Reply::new(201, r#"{"id":"p1","number":1}"#)).await;
    let proxy = TestProxy::start().await;
    let tls = untrusted_tls_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &["plain", "secure"],
        &(target("plain", &mock.url(), "") + &target("secure", &format!("https://{tls}"), "")),
    );
    let daemon = start(
        &config,
        &[("HTTP_PROXY", &proxy.url()), ("https_proxy", &proxy.url())],
    );
    push(&daemon).await;

    proxy.wait_for(&absolute_form(&mock)).await;
    let forwarded = mock.wait_for(1).await;
    assert_eq!(forwarded[0].path(), PIPELINE, "the proxy forwarded it to the CI");
    let plain = attempted(&daemon, "plain").await;
    assert_eq!(plain["history"][0]["outcome"], "delivered", "{plain:#}");

    proxy.wait_for(&format!("CONNECT {tls} HTTP/1.1\r\n")).await;
    let secure = attempted(&daemon, "secure").await;
    let attempt = &secure["history"][0];
    assert_eq!(attempt["outcome"], "retry_connect", "{secure:#}");
    let text = attempt.to_string();
    assert!(
        text.contains(&format!("via proxy {}", proxy.url())),
        "the message names the proxy: {text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_the_environments_proxy() {
    let mock = MockServer::start(Reply::new(201, r#"{"id":"p1","number":1}"#)).await;
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &["plain"], &target("plain", &mock.url(), ""));
    let daemon = start(
        &config,
        &[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "127.0.0.1")],
    );
    push(&daemon).await;
    mock.wait_for(1).await;
    assert_eq!(
        attempted(&daemon, "plain").await["history"][0]["outcome"],
        "delivered"
    );
    assert!(proxy.heads().is_empty(), "{:#?}", proxy.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_false_goes_direct_whatever_the_environment_says() {
    let mock = MockServer::start(Reply::new(201, r#"{"id":"p1","number":1}"#)).await;
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &["plain"],
        &target("plain", &mock.url(), "proxy = false"),
    );
    let daemon = start(
        &config,
        &[("HTTP_PROXY", &proxy.url()), ("ALL_PROXY", &proxy.url())],
    );
    push(&daemon).await;
    mock.wait_for(1).await;
    assert_eq!(
        attempted(&daemon, "plain").await["history"][0]["outcome"],
        "delivered"
    );
    assert!(proxy.heads().is_empty(), "{:#?}", proxy.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_proxy_is_used_without_any_environment() {
    let mock = MockServer::start(Reply::new(201, r#"{"id":"p1","number":1}"#)).await;
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &["plain"],
        &target("plain", &mock.url(), &format!("proxy = \"{}\"", proxy.url())),
    );
    let daemon = start(&config, &[]);
    push(&daemon).await;
    let head = proxy.wait_for(&absolute_form(&mock)).await;
    assert_eq!(header(&head, "proxy-authorization"), None, "{head}");
    mock.wait_for(1).await;
    assert_eq!(
        attempted(&daemon, "plain").await["history"][0]["outcome"],
        "delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_are_sent_to_the_proxy_and_shown_nowhere() {
    let mock = MockServer::start(Reply::new(201, r#"{"id":"p1","number":1}"#)).await;
    let proxy = TestProxy::start().await;
    let tls = untrusted_tls_server().await;
    let dir = tempfile::tempdir().unwrap();
    let setting = format!(
        "proxy = {{ url = \"{}\", username = \"relay-bot\", password = {{ env = \"PROXY_PASSWORD\" }} }}",
        proxy.url()
    );
    let config = write_config(
        dir.path(),
        &["plain", "secure"],
        &(target("plain", &mock.url(), &setting) + &target("secure", &format!("https://{tls}"), &setting)),
    );
    let env = [("PROXY_PASSWORD", PROXY_PASSWORD)];
    let basic = format!("Basic {}", b64(format!("relay-bot:{PROXY_PASSWORD}").as_bytes()));

    // `relay check` describes the proxy, masked.
    let mut check = Command::new(relay_binary());
    check
        .args(["check", "-c"])
        .arg(&config)
        .env_remove("RELAY_CONFIG");
    for name in PROXY_VARS {
        check.env_remove(name);
    }
    let out = check.envs(env).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "via proxy {} as relay-bot, password from env PROXY_PASSWORD",
            proxy.url()
        )),
        "{stdout}"
    );

    let daemon = start(&config, &env);
    push(&daemon).await;
    let head = proxy.wait_for(&absolute_form(&mock)).await;
    assert_eq!(
        header(&head, "proxy-authorization").as_deref(),
        Some(basic.as_str()),
        "{head}"
    );
    let tunnel = proxy.wait_for(&format!("CONNECT {tls} HTTP/1.1\r\n")).await;
    assert_eq!(
        header(&tunnel, "proxy-authorization").as_deref(),
        Some(basic.as_str()),
        "{tunnel}"
    );
    mock.wait_for(1).await;
    let plain = attempted(&daemon, "plain").await;
    let secure = attempted(&daemon, "secure").await;
    assert_eq!(plain["history"][0]["outcome"], "delivered");
    assert_eq!(secure["history"][0]["outcome"], "retry_connect");
    assert!(
        mock.requests()[0].header("proxy-authorization").is_none(),
        "the credentials stop at the proxy"
    );

    let metrics = test_client()
        .get(format!("http://{}/metrics", daemon.admin.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logs = daemon.logs();
    let encoded = b64(format!("relay-bot:{PROXY_PASSWORD}").as_bytes());
    for (what, text) in [
        ("relay check", format!("{stdout}{stderr}")),
        ("the log", logs),
        ("the http job", plain.to_string()),
        ("the https job", secure.to_string()),
        ("the metrics", metrics),
    ] {
        assert!(
            !text.contains(PROXY_PASSWORD),
            "{what} shows the password:\n{text}"
        );
        assert!(!text.contains(&encoded), "{what} shows the credentials:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_is_a_connect_retry_naming_the_proxy() {
    let port = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let setting = format!(
        "proxy = {{ url = \"http://127.0.0.1:{port}\", username = \"relay-bot\", password = {{ env = \"PROXY_PASSWORD\" }} }}"
    );
    let config = write_config(
        dir.path(),
        &["plain"],
        &target("plain", "http://127.0.0.1:9", &setting),
    );
    let daemon = start(&config, &[("PROXY_PASSWORD", PROXY_PASSWORD)]);
    push(&daemon).await;
    let job = attempted(&daemon, "plain").await;
    let attempt = &job["history"][0];
    assert_eq!(attempt["outcome"], "retry_connect", "{job:#}");
    let text = attempt.to_string();
    assert!(
        text.contains(&format!("connection failed via proxy http://127.0.0.1:{port}: ")),
        "{text}"
    );
    assert!(!job.to_string().contains(PROXY_PASSWORD), "{job:#}");
    assert!(!daemon.logs().contains(PROXY_PASSWORD));
}
