//! Running relay as a daemon: TLS (versions, ALPN, a renewed certificate
//! after SIGHUP, stalled handshakes), slow clients, config reload, socket
//! activation, sd_notify, Prometheus metrics, and the systemd units.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    Daemon, MockServer, Relay, Reply, base_config, post_to, relay_binary, sign, test_client,
};

const SECRET: &str = "prod-secret";

fn push(n: u32) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": format!("{n:040x}"), "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string()
    .into_bytes()
}

fn signed(n: u32) -> (Vec<(String, String)>, Vec<u8>) {
    let body = push(n);
    (
        sign::github(
            SECRET,
            "push",
            &format!("prod-{n}-{}", uuid::Uuid::new_v4()),
            &body,
        ),
        body,
    )
}

const SOURCE_AND_DRY_ROUTE: &str = r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "prod-secret"

[[routes]]
name = "all"
to = ["t"]

[targets.t]
kind = "http"
url = "http://127.0.0.1:9/t"
dry_run = true
"#;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, certified.cert.der().to_vec(), certified.cert.pem())
}

/// A client that trusts only `pem`, and reports the server's certificate.
fn tls_client(pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .tls_info(true)
        .build()
        .unwrap()
}

/// Posts a signed webhook over HTTPS; the status and the server's certificate.
async fn post_tls(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    n: u32,
) -> Result<(u16, Vec<u8>), reqwest::Error> {
    let (headers, body) = signed(n);
    let mut request = client
        .post(format!("https://localhost:{}/hooks/github", addr.port()))
        .body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request.send().await?;
    let cert = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok((response.status().as_u16(), cert))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first_der, first_pem) = certificate(dir.path(), "first");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[store]\nurl = \"sqlite://{}\"\n{SOURCE_AND_DRY_ROUTE}",
            cert.display(),
            key.display(),
            dir.path().join("relay.db").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&config, &[]);
    let (status, served) = post_tls(&tls_client(&first_pem), daemon.addr, 1).await.unwrap();
    assert_eq!((status, served == first_der), (202, true));

    // Renew: new key and certificate in the same files, then SIGHUP.
    let (new_cert, new_key, second_der, second_pem) = certificate(dir.path(), "second");
    std::fs::rename(new_cert, &cert).unwrap();
    std::fs::rename(new_key, &key).unwrap();
    daemon.signal("HUP");
    daemon.wait_log("config reloaded", 1);
    let (status, served) = post_tls(&tls_client(&second_pem), daemon.addr, 2).await.unwrap();
    assert_eq!(status, 202);
    assert!(
        served == second_der,
        "the next connection gets the renewed certificate"
    );
    assert!(
        post_tls(&tls_client(&first_pem), daemon.addr, 3).await.is_err(),
        "the old one is gone"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

async fn tls_relay(request_timeout: &str) -> (Relay, String) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _, pem) = certificate(dir.path(), "cert");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nrequest_timeout = \"{request_timeout}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[store]\nurl = \"sqlite://{}\"\n{SOURCE_AND_DRY_ROUTE}",
        cert.display(),
        key.display(),
        dir.path().join("relay.db").display()
    );
    (Relay::start_with(dir, &text).await, pem)
}

/// A raw TLS handshake with only `version` allowed and `alpn` offered.
async fn handshake(
    addr: std::net::SocketAddr,
    pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[u8],
) -> (Option<rustls::ProtocolVersion>, Option<Vec<u8>>) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    (
        session.protocol_version(),
        session.alpn_protocol().map(<[u8]>::to_vec),
    )
}

#[tokio::test]
async fn tls_1_2_and_1_3_with_alpn_h2_and_http_1_1() {
    let (relay, pem) = tls_relay("10s").await;
    assert_eq!(
        handshake(relay.addr, &pem, &rustls::version::TLS12, b"h2").await,
        (Some(rustls::ProtocolVersion::TLSv1_2), Some(b"h2".to_vec()))
    );
    assert_eq!(
        handshake(relay.addr, &pem, &rustls::version::TLS13, b"http/1.1").await,
        (Some(rustls::ProtocolVersion::TLSv1_3), Some(b"http/1.1".to_vec()))
    );
    // And HTTP/2 over it works end to end.
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .resolve("localhost", relay.addr)
        .build()
        .unwrap();
    let (headers, body) = signed(1);
    let mut request = client
        .post(format!("https://localhost:{}/hooks/github", relay.addr.port()))
        .body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status().as_u16(), 202);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_hold_nothing_up_and_are_closed_at_the_timeout() {
    let (relay, pem) = tls_relay("3s").await;
    // Thirty clients connect and never send a ClientHello.
    let mut stalled = Vec::new();
    for _ in 0..30 {
        stalled.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .resolve("localhost", relay.addr)
        .build()
        .unwrap();
    let (headers, body) = signed(1);
    let mut request = client
        .post(format!("https://localhost:{}/hooks/github", relay.addr.port()))
        .body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let sent = Instant::now();
    assert_eq!(request.send().await.unwrap().status().as_u16(), 202);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "accepted while the stalled ones still wait"
    );
    for mut stream in stalled {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled handshake is closed: {read:?}"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sending_headers_a_byte_at_a_time_do_not_block_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nrequest_timeout = \"3s\"\n[store]\nurl = \"sqlite://{}\"\n{SOURCE_AND_DRY_ROUTE}",
        dir.path().join("relay.db").display()
    );
    let relay = Relay::start_with(dir, &text).await;
    let addr = relay.addr;
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            for byte in b"POST /hooks/github HTTP/1.1\r\nHost: relay\r\nX-Slow: "
                .iter()
                .cycle()
            {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 256];
                // The server answering or closing ends the dribble.
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                    Ok(Ok(_)) | Ok(Err(_)) => break,
                    Err(_) => {}
                }
                assert!(started.elapsed() < Duration::from_secs(10), "never closed");
            }
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (headers, body) = signed(1);
    let sent = Instant::now();
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "accepted while slow clients dribble"
    );
    for task in slow {
        let lasted = task.await.unwrap();
        assert!(
            lasted >= Duration::from_millis(2900),
            "closed too early: {lasted:?}"
        );
    }
    relay.stop().await;
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_routing_refuses_a_broken_config_and_loses_no_job() {
    let a = MockServer::start(Reply::new(200, "{}")).await;
    let b = MockServer::start(Reply::new(200, "{}")).await;
    let circle = MockServer::start(Reply::new(201, r#"{"id":"x","number":1,"state":"created"}"#)).await;
    // The first attempt at CircleCI fails, so the job waits in the queue.
    circle.script([Reply::new(503, r#"{"message":"busy"}"#)]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let text = |route_to: &str, token: &str, extra: &str| {
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]

[store]
url = "sqlite://{db}"

[delivery]
backoff = {{ first = "1500ms", max = "2s", factor = 2.0 }}

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "mirror"
branches = ["main"]
to = ["{route_to}"]

[[routes]]
name = "ci"
branches = ["release"]
to = ["circle"]

[targets.a]
kind = "http"
url = "{a}/a"

[targets.b]
kind = "http"
url = "{b}/b"
{extra}

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "{token}"
"#,
            db = dir.path().join("relay.db").display(),
            a = a.url(),
            b = b.url(),
            circle = circle.url(),
        )
    };
    write(&config, &text("a", "old-token", ""));
    let daemon = Daemon::start(&config, &[]);
    let url = daemon.url("/hooks/github");
    let (headers, body) = signed(1);
    assert_eq!(post_to(&url, &headers, body).await.0, 202);
    a.wait_for(1).await;

    // A job left waiting for its retry, across the reloads that follow.
    let release = json!({
        "ref": "refs/heads/release", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222", "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string();
    let headers = sign::github(SECRET, "push", "release-1", release.as_bytes());
    assert_eq!(post_to(&url, &headers, release).await.0, 202);
    circle.wait_for(1).await;

    // A valid reload: the mirror route now goes to b, and the CircleCI token changes.
    write(&config, &text("b", "new-token", ""));
    daemon.signal("HUP");
    daemon.wait_log("config reloaded", 1);
    let (headers, body) = signed(2);
    assert_eq!(post_to(&url, &headers, body).await.0, 202);
    b.wait_for(1).await;

    // A broken one is refused, with the key at fault, and the old config stays.
    write(&config, &text("b", "newer-token", "bogus_key = 1"));
    daemon.signal("HUP");
    daemon.wait_log("config reload refused", 1);
    assert!(
        daemon.logs().contains("targets.b.bogus_key"),
        "the refusal names the key"
    );
    let (headers, body) = signed(3);
    assert_eq!(post_to(&url, &headers, body).await.0, 202);
    b.wait_for(2).await;
    assert_eq!(a.requests().len(), 1, "routing did not fall back");

    // The queued job was sent again, with the credential of the running config.
    let sent = circle.wait_for(2).await;
    assert_eq!(sent[0].header("circle-token"), Some("old-token"));
    assert_eq!(sent[1].header("circle-token"), Some("new-token"));
    assert_eq!(sent[0].body, sent[1].body, "its rendered request was kept");
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let store =
        crate::support::open_store(&format!("sqlite://{}", dir.path().join("relay.db").display())).await;
    let states = crate::support::job_states(store.as_ref()).await;
    assert_eq!(
        (states["done"], states.values().sum::<u64>()),
        (4, 4),
        "every job delivered, none lost to a reload: {states:?}"
    );
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_sockets() {
    if !have("systemd-socket-activate") {
        eprintln!("SKIPPED: systemd-socket-activate is not installed (Debian package systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    // server.listen names an address this host cannot bind: serving at all
    // proves relay used the sockets it was given.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"192.0.2.1:8080\"]\n[admin]\nlisten = \"192.0.2.1:9180\"\n[store]\nurl = \"sqlite://{}\"\n{SOURCE_AND_DRY_ROUTE}",
            dir.path().join("relay.db").display()
        ),
    )
    .unwrap();
    let (webhooks, admin) = (free_port(), free_port());
    let mut command = std::process::Command::new("systemd-socket-activate");
    command
        .args([
            "-l",
            &webhooks.to_string(),
            "-l",
            &admin.to_string(),
            "--fdname=webhooks:admin",
            "-E",
            "RELAY_LOG",
        ])
        .arg(relay_binary())
        .args(["serve", "--log-format", "json", "-c"])
        .arg(&config);
    // The activator starts relay when the first connection arrives: knock.
    std::thread::spawn(move || {
        for _ in 0..200 {
            if std::net::TcpStream::connect(webhooks).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    let daemon = Daemon::spawn(command);
    assert_eq!(daemon.addr, webhooks);
    let (headers, body) = signed(1);
    assert_eq!(
        post_to(&format!("http://{webhooks}/hooks/github"), &headers, body)
            .await
            .0,
        202
    );
    let health = test_client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let (status, logs) = daemon.terminate();
    assert!(status.success(), "{logs}");
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn sd_notify_ready_reloading_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nurl = \"sqlite://{}\"\n{SOURCE_AND_DRY_ROUTE}",
            dir.path().join("relay.db").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut messages: Vec<String> = Vec::new();
    let receive_until = |wanted: &str, messages: &mut Vec<String>| {
        let deadline = Instant::now() + crate::support::PATIENCE;
        while Instant::now() < deadline {
            let mut buf = [0u8; 512];
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = text.lines().any(|l| l == wanted);
                messages.push(text);
                if done {
                    return;
                }
            }
        }
        panic!("no {wanted} among {messages:?}");
    };
    receive_until("READY=1", &mut messages);
    receive_until("WATCHDOG=1", &mut messages);
    daemon.signal("HUP");
    receive_until("RELOADING=1", &mut messages);
    receive_until("READY=1", &mut messages);
    daemon.signal("TERM");
    receive_until("STOPPING=1", &mut messages);
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let order: Vec<&str> = messages
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| *l != "WATCHDOG=1")
        .collect();
    assert_eq!(order, vec!["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
}

/// A strict reading of the exposition text: every sample line parses, every
/// family is typed, and it ends with `# EOF`. Returns the samples.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics text ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "{line}");
            assert!(name.starts_with("relay_"), "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap();
                assert!(matches!(t, "counter" | "gauge" | "histogram"), "{line}");
                typed.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            typed.iter().any(|t| name.starts_with(t.as_str())),
            "sample {name} has no # TYPE before it"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
            }
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_move_as_requests_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{SOURCE_AND_DRY_ROUTE}",
        base_config(&dir.path().join("relay.db"))
    );
    let relay = Relay::start_with(dir, &text).await;
    let scrape = || async {
        let response = test_client()
            .get(format!("http://{}/metrics", relay.admin.unwrap()))
            .send()
            .await
            .unwrap();
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        parse_metrics(&response.text().await.unwrap())
    };
    let before = scrape().await;
    assert_eq!(before.get("relay_dropped_total{rule=\"burst\"}"), Some(&0.0));
    for n in 1..=2 {
        let (headers, body) = signed(n);
        assert_eq!(relay.post("/hooks/github", &headers, body).await.0, 202);
    }
    let wrong = sign::github("guess", "push", "x", b"{}");
    assert_eq!(relay.post("/hooks/github", &wrong, b"{}".to_vec()).await.0, 401);
    relay.wait_done(2).await;
    let after = scrape().await;
    let get = |k: &str| *after.get(k).unwrap_or_else(|| panic!("no {k} in {after:#?}"));
    assert_eq!(
        get("relay_ingress_requests_total{source=\"gh\",status=\"202\"}"),
        2.0
    );
    assert_eq!(
        get("relay_ingress_requests_total{source=\"gh\",status=\"401\"}"),
        1.0
    );
    assert_eq!(get("relay_events_total{source=\"gh\",kind=\"push\"}"), 2.0);
    assert_eq!(get("relay_attempts_total{target=\"t\",outcome=\"dry_run\"}"), 2.0);
    assert_eq!(get("relay_jobs{state=\"done\"}"), 2.0);
    assert_eq!(get("relay_queue_depth"), 0.0);
    assert_eq!(get("relay_oldest_due_job_age_seconds"), 0.0);
    assert_eq!(get("relay_store_commit_duration_seconds_count"), 2.0);
    relay.stop().await;
}

#[test]
fn the_units_verify_and_the_service_is_hardened() {
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    let units = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd");
    // A root with the binary where the unit says, and systemd's own units.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["usr/bin", "etc/systemd/system", "bin", "usr/lib/systemd"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let copy = std::process::Command::new("cp")
        .args(["-r", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copy.success());
    std::fs::copy(relay_binary(), r.join("usr/bin/relay")).unwrap();
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    for unit in ["relay.service", "relay.socket"] {
        std::fs::copy(units.join(unit), r.join("etc/systemd/system").join(unit)).unwrap();
    }
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg(r.join("etc/systemd/system/relay.service"))
        .arg(r.join("etc/systemd/system/relay.socket"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(units.join("relay.service"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("relay.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(
        exposure <= 1.5,
        "exposure {exposure} is above 1.5 (OK):\n{report}"
    );
    let unit = std::fs::read_to_string(units.join("relay.service")).unwrap();
    assert!(
        !unit
            .lines()
            .any(|l| l.trim_start().starts_with("PrivateNetwork=")),
        "relay must reach the CI APIs"
    );
}
