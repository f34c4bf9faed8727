//! Targets that misbehave on the wire: an answer of a gigabyte, an answer
//! that never ends, a connection accepted and never answered, a name that
//! does not resolve, and TLS certificates relay cannot trust (self-signed,
//! or from a trusted CA but expired). relay reads a bounded start of any
//! answer, gives up on silence at `delivery.timeout` (a `maybe_delivered`
//! attempt: the request went out), and says which certificate problem kept
//! it from connecting. Each server here is written byte by byte on 127.0.0.1
//! and bounded in what it sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Daemon, Relay, api_get, post_github_push, post_to, sign};

const GH_SECRET: &str = "gh-source-secret-5e0c1a";
const SHA: &str = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";
/// The most any server here writes: far beyond what relay may read.
const WRITE_CAP: u64 = 256 * 1024 * 1024;

fn config(base_url: &str, delivery: &str) -> String {
    format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{GH_SECRET}"

[[routes]]
name = "ci"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{base_url}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"

[delivery]
backoff = {{ first = "100ms", max = "200ms", factor = 2.0 }}
throttle_floor = "100ms"
{delivery}
"#
    )
}

/// A server that reads one request, answers with `head`, then writes
/// `chunk` again and again (up to [`WRITE_CAP`]) until the client goes away.
/// The flag is set when a write failed before the cap: the client hung up
/// while the answer was still coming.
async fn flooding_server(head: &'static str, chunk: Vec<u8>) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let flag = flag.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = stream.read(&mut request).await;
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut written = 0u64;
                while written < WRITE_CAP {
                    if stream.write_all(&chunk).await.is_err() {
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    written += chunk.len() as u64;
                }
            });
        }
    });
    (url, cut)
}

/// Waits (5 s at most) for the server to see relay hang up mid-answer.
async fn assert_cut_off(cut: &AtomicBool) {
    for _ in 0..250 {
        if cut.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("relay kept reading: the server wrote its whole answer");
}

/// The one job, once it has left `queued`/`in_flight` for good.
async fn settled_job(relay: &Relay, state: &str) -> Value {
    relay.wait_jobs(&format!("state={state}"), 1).await;
    relay.job_for("circle").await
}

#[tokio::test]
async fn a_gigabyte_answer_is_read_only_as_far_as_the_record_needs() {
    let (url, cut) = flooding_server(
        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n",
        vec![b'x'; 1024 * 1024],
    )
    .await;
    let relay = Relay::start(&config(&url, "")).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-faulty").await;
    let job = settled_job(&relay, "done").await;
    let excerpt = job["history"][0]["excerpt"].as_str().unwrap();
    assert!(excerpt.starts_with("201: xxxx"), "{excerpt}");
    // 500 characters of the answer are kept, marked as cut.
    assert_eq!(
        excerpt.chars().count(),
        "201: ".len() + 500 + 1 + " (the answer is not CircleCI's pipeline JSON)".len(),
        "{excerpt}"
    );
    // relay stopped reading long before the gigabyte: the server's writes
    // failed once relay closed the connection.
    assert_cut_off(&cut).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_endless_chunked_answer_is_cut_off() {
    let mut chunk = format!("{:x}\r\n", 16 * 1024).into_bytes();
    chunk.extend(std::iter::repeat_n(b'y', 16 * 1024));
    chunk.extend(b"\r\n");
    let (url, cut) = flooding_server(
        "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunk,
    )
    .await;
    let relay = Relay::start(&config(&url, "attempts = 1")).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-faulty").await;
    let job = settled_job(&relay, "dead").await;
    let excerpt = job["history"][0]["excerpt"].as_str().unwrap();
    assert!(excerpt.starts_with("503: yyyy"), "{excerpt}");
    assert_eq!(excerpt.chars().count(), "503: ".len() + 500 + 1, "{excerpt}");
    assert_eq!(job["history"][0]["outcome"], "retry_status");
    assert_cut_off(&cut).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_target_that_accepts_and_never_answers_times_out_as_maybe_delivered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicU64::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = vec![0u8; 64 * 1024];
            if let Ok(n) = stream.read(&mut buffer).await
                && buffer[..n].starts_with(b"POST ")
            {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            // Kept open and silent.
            held.push(stream);
        }
    });
    let relay = Relay::start(&config(&url, "timeout = \"1s\"\nmaybe_delivered_retries = 0")).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-faulty").await;
    let job = settled_job(&relay, "dead").await;
    let attempt = &job["history"][0];
    assert_eq!(attempt["outcome"], "maybe_delivered", "{job}");
    assert_eq!(attempt["status"], Value::Null);
    assert_eq!(attempt["excerpt"], "no answer within 1s after sending", "{job}");
    assert_eq!(requests.load(Ordering::Relaxed), 1, "the request went out once");
    relay.stop().await;
}

#[tokio::test]
async fn a_self_signed_certificate_is_a_retry_that_names_the_certificate() {
    let addr = crate::proxy::untrusted_tls_server().await;
    let relay = Relay::start(&config(&format!("https://{addr}"), "attempts = 2")).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-faulty").await;
    for excerpt in connect_retries(&settled_job(&relay, "dead").await) {
        assert!(
            excerpt.contains("invalid peer certificate: UnknownIssuer"),
            "the message says which certificate problem: {excerpt}"
        );
    }
    relay.stop().await;
}

/// A TLS server on 127.0.0.1 whose certificate was signed by a CA of our
/// own (written to `ca_pem`) and expired in 2020.
async fn expired_tls_server(ca_pem: &std::path::Path) -> std::net::SocketAddr {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(ca_pem, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.not_before = rcgen::date_time_ymd(2019, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone(), ca_cert.der().clone()], key)
        .unwrap();
    crate::proxy::tls_server(config).await
}

/// The dead job of the only target, read through a daemon's admin API.
async fn dead_job_of(daemon: &Daemon) -> Value {
    let admin = daemon.admin.expect("an admin listener");
    for _ in 0..300 {
        let dead = api_get(admin, "/api/jobs?state=dead").await;
        if let Some(id) = dead["jobs"][0]["id"].as_str() {
            return api_get(admin, &format!("/api/jobs/{id}")).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no dead job; relay's log:\n{}", daemon.logs());
}

/// The excerpts of a dead job's two attempts, each a `retry_connect` whose
/// message starts as a connect failure's does.
fn connect_retries(job: &Value) -> Vec<String> {
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{job}");
    history
        .iter()
        .map(|attempt| {
            assert_eq!(attempt["outcome"], "retry_connect", "{job}");
            let excerpt = attempt["excerpt"].as_str().unwrap();
            assert!(excerpt.starts_with("connection failed: "), "{excerpt}");
            excerpt.to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_a_retry_that_says_it_expired() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let addr = expired_tls_server(&ca).await;
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n{}",
        dir.path().join("relay.db").display(),
        config(&format!("https://{addr}"), "attempts = 2")
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    // The CA is trusted the way an operator trusts an internal one: the
    // system store's SSL_CERT_FILE. Only the expiry is then wrong.
    let daemon = Daemon::start(&path, &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    let body = serde_json::json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": SHA, "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string();
    let headers = sign::github(GH_SECRET, "push", "d-expired", body.as_bytes());
    let (status, answer) = post_to(&daemon.url("/hooks/github"), &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    for excerpt in connect_retries(&dead_job_of(&daemon).await) {
        assert!(
            excerpt.contains("invalid peer certificate") && excerpt.to_lowercase().contains("expired"),
            "the message says the certificate expired: {excerpt}"
        );
    }
    let _ = daemon.terminate();
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_a_retry_that_says_so() {
    // A 64-character label is not a valid DNS name: the resolver refuses it
    // on this machine, before any query leaves it (tests talk to loopback
    // only), and relay sees what an unknown name gives it.
    let host = format!("{}.invalid", "a".repeat(64));
    let relay = Relay::start(&config(&format!("http://{host}"), "attempts = 2")).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-faulty").await;
    for excerpt in connect_retries(&settled_job(&relay, "dead").await) {
        assert!(
            excerpt.contains("dns error"),
            "the message says the name did not resolve: {excerpt}"
        );
    }
    relay.stop().await;
}
