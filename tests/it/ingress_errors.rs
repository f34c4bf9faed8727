//! Bad input at the door: each refusal has its status code, a JSON body with
//! a stable code and a message a person can act on, and leaves nothing in
//! the store. A store that cannot commit answers 503, so the sender retries.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use relay::store::{
    ClaimedJob, Completion, EventView, Ingested, JobDetail, JobFilter, JobView, NewEvent, Requeued, Store,
    StoreError,
};
use serde_json::json;
use uuid::Uuid;

use crate::support::{MockServer, Relay, Reply, b64, sign, test_client};

const SIGNING_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn config(circle: &MockServer) -> String {
    format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "gh-secret"

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "gl-token"

[sources.gl19]
provider = "gitlab"
path = "/hooks/gitlab-signed"
signing_token = "whsec_{}"

[sources.bb]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = "bb-secret"

[sources.gt]
provider = "gitea"
path = "/hooks/gitea"
secret = "gt-secret"

[[routes]]
name = "all"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{}"
project = "gh/acme/api"
token = "circle-token"
"#,
        b64(SIGNING_KEY),
        circle.url()
    )
}

fn push() -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222",
        "repository": { "full_name": "acme/api" }, "pusher": { "name": "ada" },
        "head_commit": null, "commits": []
    })
    .to_string()
    .into_bytes()
}

fn with(headers: Vec<(String, String)>, name: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(name))
        .collect();
    if let Some(v) = value {
        headers.push((name.to_owned(), v.to_owned()));
    }
    headers
}

/// Posts, then checks the status, the error code and that the message says something.
async fn refused(
    relay: &Relay,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    status: u16,
    code: &str,
) -> String {
    let (got, answer) = relay.post(path, headers, body).await;
    assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{answer}");
    let message = answer["message"].as_str().unwrap_or_default().to_owned();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/tmp/refused.txt")
            .unwrap();
        writeln!(f, "{code}\t{message}").unwrap();
    }
    message
}

#[tokio::test]
async fn signatures_that_do_not_verify_are_401_and_leave_nothing() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let relay = Relay::start(&config(&circle)).await;
    let body = push();
    let good = sign::github("gh-secret", "push", "d1", &body);

    let wrong = sign::github("not-the-secret", "push", "d1", &body);
    let m = refused(
        &relay,
        "/hooks/github",
        &wrong,
        body.clone(),
        401,
        "signature_mismatch",
    )
    .await;
    assert!(
        m.contains("X-Hub-Signature-256") && m.contains("sources.gh"),
        "{m}"
    );

    let missing = with(good.clone(), "X-Hub-Signature-256", None);
    let m = refused(
        &relay,
        "/hooks/github",
        &missing,
        body.clone(),
        401,
        "signature_missing",
    )
    .await;
    assert!(m.contains("missing X-Hub-Signature-256"), "{m}");

    let empty = with(good.clone(), "X-Hub-Signature-256", Some(""));
    refused(
        &relay,
        "/hooks/github",
        &empty,
        body.clone(),
        401,
        "signature_empty",
    )
    .await;

    for bad in ["sha256=not-hex", "sha1=0123", "0123abcd", "sha256="] {
        let malformed = with(good.clone(), "X-Hub-Signature-256", Some(bad));
        refused(
            &relay,
            "/hooks/github",
            &malformed,
            body.clone(),
            401,
            "signature_malformed",
        )
        .await;
    }

    // The signature covers the body as sent: one changed byte fails.
    let mut tampered = body.clone();
    tampered[10] ^= 0x20;
    refused(
        &relay,
        "/hooks/github",
        &good,
        tampered,
        401,
        "signature_mismatch",
    )
    .await;

    // SHA-1 alone is not accepted unless the source asks for it.
    let sha1_only = with(good.clone(), "X-Hub-Signature-256", None);
    let sha1_only = with(
        sha1_only,
        "X-Hub-Signature",
        Some("sha1=0000000000000000000000000000000000000000"),
    );
    refused(
        &relay,
        "/hooks/github",
        &sha1_only,
        body.clone(),
        401,
        "signature_missing",
    )
    .await;

    let gl = sign::gitlab("wrong-token", "Push Hook", "d2");
    let m = refused(
        &relay,
        "/hooks/gitlab",
        &gl,
        b"{}".to_vec(),
        401,
        "token_mismatch",
    )
    .await;
    assert!(!m.contains("gl-token") && !m.contains("wrong-token"), "{m}");
    let gl = with(sign::gitlab("x", "Push Hook", "d2"), "X-Gitlab-Token", None);
    refused(
        &relay,
        "/hooks/gitlab",
        &gl,
        b"{}".to_vec(),
        401,
        "signature_missing",
    )
    .await;

    let bb = sign::bitbucket("wrong", "repo:push", "d3", b"{}");
    refused(
        &relay,
        "/hooks/bitbucket",
        &bb,
        b"{}".to_vec(),
        401,
        "signature_mismatch",
    )
    .await;

    // Gitea sends an empty signature when the hook has no secret.
    let gt = with(
        sign::gitea("gt-secret", "push", "d4", b"{}"),
        "X-Gitea-Signature",
        Some(""),
    );
    let gt = with(gt, "X-Forgejo-Signature", None);
    let m = refused(
        &relay,
        "/hooks/gitea",
        &gt,
        b"{}".to_vec(),
        401,
        "signature_empty",
    )
    .await;
    assert!(m.contains("no secret"), "{m}");

    assert_eq!(relay.events().await.len(), 0);
    assert_eq!(relay.jobs("").await.len(), 0);
    assert!(circle.requests().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn gitlab_signing_token_checks_signature_and_timestamp() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let relay = Relay::start(&config(&circle)).await;
    let body = json!({
        "object_kind": "push", "ref": "refs/heads/main",
        "before": "1111111111111111111111111111111111111111", "after": "2222222222222222222222222222222222222222",
        "project": { "path_with_namespace": "acme/api" }, "commits": [], "total_commits_count": 0
    })
    .to_string()
    .into_bytes();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let ok = sign::gitlab_signed(SIGNING_KEY, "Push Hook", "msg-1", now, &body);
    let (status, answer) = relay.post("/hooks/gitlab-signed", &ok, body.clone()).await;
    assert_eq!(status, 202, "{answer}");

    let stale = sign::gitlab_signed(SIGNING_KEY, "Push Hook", "msg-2", now - 600, &body);
    let m = refused(
        &relay,
        "/hooks/gitlab-signed",
        &stale,
        body.clone(),
        401,
        "signature_stale",
    )
    .await;
    assert!(m.contains("300s"), "{m}");
    let future = sign::gitlab_signed(SIGNING_KEY, "Push Hook", "msg-3", now + 600, &body);
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &future,
        body.clone(),
        401,
        "signature_stale",
    )
    .await;

    let wrong_key = sign::gitlab_signed(
        b"another key entirely, 32 bytes!!",
        "Push Hook",
        "msg-4",
        now,
        &body,
    );
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &wrong_key,
        body.clone(),
        401,
        "signature_mismatch",
    )
    .await;

    // The id is signed too: changing it breaks the signature.
    let swapped = with(ok.clone(), "webhook-id", Some("msg-9"));
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &swapped,
        body.clone(),
        401,
        "signature_mismatch",
    )
    .await;

    let unsigned = with(ok, "webhook-signature", None);
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &unsigned,
        body,
        401,
        "signature_missing",
    )
    .await;
    assert_eq!(relay.events().await.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn bodies_relay_cannot_use_are_400_415_413() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_body = \"4KiB\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n{}",
        dir.path().join("relay.db").display(),
        config(&circle)
    );
    let relay = Relay::start_with(dir, &text).await;

    let not_json = b"ref=refs/heads/main".to_vec();
    let h = sign::github("gh-secret", "push", "d1", &not_json);
    refused(&relay, "/hooks/github", &h, not_json, 400, "not_json").await;

    let no_ref = json!({ "before": "1", "after": "2", "repository": { "full_name": "acme/api" } })
        .to_string()
        .into_bytes();
    let h = sign::github("gh-secret", "push", "d2", &no_ref);
    let m = refused(&relay, "/hooks/github", &h, no_ref, 400, "bad_payload").await;
    assert!(m.contains("missing field `ref`"), "{m}");

    let body = push();
    let h = with(
        sign::github("gh-secret", "push", "d3", &body),
        "X-GitHub-Event",
        None,
    );
    let m = refused(&relay, "/hooks/github", &h, body.clone(), 400, "missing_header").await;
    assert!(
        m.contains("X-GitHub-Event") || m.contains("x-github-event"),
        "{m}"
    );

    let h = with(
        sign::github("gh-secret", "push", "d4", &body),
        "Content-Type",
        Some("text/plain"),
    );
    refused(
        &relay,
        "/hooks/github",
        &h,
        body.clone(),
        415,
        "unsupported_media_type",
    )
    .await;

    let big = vec![b' '; 5 * 1024];
    let h = sign::github("gh-secret", "push", "d5", &big);
    let m = refused(&relay, "/hooks/github", &h, big.clone(), 413, "too_large").await;
    assert!(m.contains("4096"), "{m}");

    // Without a Content-Length the limit holds while streaming.
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::io::Error>> = (0..10)
        .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b' '; 1024]))))
        .collect();
    let response = test_client()
        .post(relay.url("/hooks/github"))
        .header("Content-Type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", "sha256=00")
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(
            futures_util::stream::iter(chunks),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    assert_eq!(relay.events().await.len(), 0);
    relay.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_other_methods() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let relay = Relay::start(&config(&circle)).await;
    let (status, answer) = relay.post("/hooks/nope", &[], b"{}".to_vec()).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("not_found")));

    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = test_client()
            .request(method.clone(), relay.url("/hooks/github"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method}");
        assert_eq!(response.headers()["allow"], "POST");
        let answer: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(answer["error"], "method_not_allowed");
    }
    assert_eq!(relay.events().await.len(), 0);
    relay.stop().await;
}

/// A store whose disk is full: every write fails.
#[derive(Debug)]
struct FullDisk;

#[async_trait]
impl Store for FullDisk {
    async fn ingest(&self, _: NewEvent) -> Result<Ingested, StoreError> {
        Err(full())
    }
    async fn claim(
        &self,
        _: &str,
        _: usize,
        _: Duration,
        _: SystemTime,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        Ok(Vec::new())
    }
    async fn complete(&self, _: Completion, _: SystemTime) -> Result<bool, StoreError> {
        Err(full())
    }
    async fn renew(&self, _: Uuid, _: Uuid, _: Duration, _: SystemTime) -> Result<bool, StoreError> {
        Err(full())
    }
    async fn next_wakeup(&self, _: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        Ok(None)
    }
    async fn ping(&self, _: SystemTime) -> Result<(), StoreError> {
        Err(full())
    }
    async fn jobs(&self, _: JobFilter) -> Result<Vec<JobView>, StoreError> {
        Err(full())
    }
    async fn job(&self, _: Uuid) -> Result<Option<JobDetail>, StoreError> {
        Err(full())
    }
    async fn events(&self, _: usize) -> Result<Vec<EventView>, StoreError> {
        Err(full())
    }
    async fn requeue(&self, _: Uuid, _: SystemTime) -> Result<Requeued, StoreError> {
        Err(full())
    }
    async fn requeue_dead(
        &self,
        _: &str,
        _: SystemTime,
        _: SystemTime,
        _: SystemTime,
    ) -> Result<u64, StoreError> {
        Err(full())
    }
    async fn purge(&self, _: SystemTime, _: SystemTime, _: usize) -> Result<u64, StoreError> {
        Err(full())
    }
    async fn queue_stats(&self, _: SystemTime) -> Result<relay::store::QueueStats, StoreError> {
        Err(full())
    }
    async fn event_body(&self, _: Uuid) -> Result<Option<(String, bytes::Bytes)>, StoreError> {
        Err(full())
    }
}

fn full() -> StoreError {
    StoreError::Unavailable("database or disk is full".into())
}

#[tokio::test]
async fn a_store_that_cannot_commit_answers_503_with_retry_after() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}{}",
        crate::support::base_config(&dir.path().join("unused.db")),
        config(&circle)
    );
    let config = relay::config::Config::from_toml(&text).unwrap();
    let listeners = relay::server::Listeners::bind(&config).await.unwrap();
    let addr = listeners.ingress_addrs()[0];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay::daemon::run_with_store(
        config,
        Arc::new(FullDisk),
        listeners,
        relay::daemon::Control {
            shutdown: shutdown.clone(),
            ..Default::default()
        },
    ));
    let body = push();
    let mut request = test_client()
        .post(format!("http://{addr}/hooks/github"))
        .body(body.clone());
    for (k, v) in sign::github("gh-secret", "push", "d1", &body) {
        request = request.header(k, v);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let answer: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(answer["error"], "store_unavailable");
    assert!(
        answer["message"].as_str().unwrap().contains("retry later"),
        "{answer}"
    );
    assert!(circle.requests().is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
