//! Bad input at the door: each refusal has its status code, a JSON body with
//! a stable code and a message a person can act on, and leaves nothing in
//! the store. A store that cannot commit answers 503, so the sender retries.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use relay::store::{
    ClaimedJob, Completion, DuePoll, EventFilter, EventView, ForgottenKeys, Ingested, Inspect, JobDetail,
    JobFilter, JobView, Maintain, NewEvent, PollRecord, Polls, Queue, Requeued, StoreError,
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

/// Posts, then checks the status, the error code and the exact message a
/// person reads.
async fn refused(
    relay: &Relay,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    status: u16,
    code: &str,
    message: &str,
) {
    let (got, answer) = relay.post(path, headers, body).await;
    assert_eq!(
        (got, &answer),
        (status, &json!({ "error": code, "message": message }))
    );
}

/// [`refused`] for a timestamp too far from relay's clock: the message
/// names the distance (`seconds` away, give or take the second the request
/// took) and the 300s limit.
async fn refused_stale(
    relay: &Relay,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    status: u16,
    code: &str,
) -> u64 {
    let (got, answer) = relay.post(path, headers, body).await;
    assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{answer}");
    let message = answer["message"].as_str().unwrap();
    let seconds = message
        .strip_prefix("webhook-timestamp is ")
        .and_then(|m| {
            m.strip_suffix("s away from relay's clock; more than 300s is refused as a possible replay")
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    seconds
}

#[tokio::test]
async fn signatures_that_do_not_verify_are_401_and_leave_nothing() {
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let relay = Relay::start(&config(&circle)).await;
    let body = push();
    let good = sign::github("gh-secret", "push", "d1", &body);

    let wrong = sign::github("not-the-secret", "push", "d1", &body);
    refused(
        &relay,
        "/hooks/github",
        &wrong,
        body.clone(),
        401,
        "signature_mismatch", "X-Hub-Signature-256 does not match the body: the webhook's secret differs from sources.gh, or the body was changed on the way")
    .await;

    let missing = with(good.clone(), "X-Hub-Signature-256", None);
    refused(
        &relay,
        "/hooks/github",
        &missing,
        body.clone(),
        401,
        "signature_missing", "missing X-Hub-Signature-256 header: the sender signed nothing; give the webhook the secret configured in sources.gh")
    .await;

    let empty = with(good.clone(), "X-Hub-Signature-256", Some(""));
    refused(
        &relay,
        "/hooks/github",
        &empty,
        body.clone(),
        401,
        "signature_empty", "X-Hub-Signature-256 is empty: the webhook in the Git host has no secret; set it to the secret configured in sources.gh")
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
            "X-Hub-Signature-256 is malformed: expected sha256= followed by 64 hex digits",
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
        "signature_mismatch", "X-Hub-Signature-256 does not match the body: the webhook's secret differs from sources.gh, or the body was changed on the way")
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
        "signature_missing", "missing X-Hub-Signature-256 header: the sender signed nothing; give the webhook the secret configured in sources.gh")
    .await;

    let gl = sign::gitlab("wrong-token", "Push Hook", "d2");
    refused(
        &relay,
        "/hooks/gitlab",
        &gl,
        b"{}".to_vec(),
        401,
        "token_mismatch",
        "X-Gitlab-Token does not match the token configured in sources.gl",
    )
    .await;
    let gl = with(sign::gitlab("x", "Push Hook", "d2"), "X-Gitlab-Token", None);
    refused(
        &relay,
        "/hooks/gitlab",
        &gl,
        b"{}".to_vec(),
        401,
        "signature_missing", "missing X-Gitlab-Token header: the sender signed nothing; give the webhook the secret configured in sources.gl")
    .await;

    let bb = sign::bitbucket("wrong", "repo:push", "d3", b"{}");
    refused(
        &relay,
        "/hooks/bitbucket",
        &bb,
        b"{}".to_vec(),
        401,
        "signature_mismatch", "X-Hub-Signature does not match the body: the webhook's secret differs from sources.bb, or the body was changed on the way")
    .await;

    // Gitea sends an empty signature when the hook has no secret.
    let gt = with(
        sign::gitea("gt-secret", "push", "d4", b"{}"),
        "X-Gitea-Signature",
        Some(""),
    );
    let gt = with(gt, "X-Forgejo-Signature", None);
    refused(
        &relay,
        "/hooks/gitea",
        &gt,
        b"{}".to_vec(),
        401,
        "signature_empty", "X-Gitea-Signature is empty: the webhook in the Git host has no secret; set it to the secret configured in sources.gt")
    .await;

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
    let m = refused_stale(
        &relay,
        "/hooks/gitlab-signed",
        &stale,
        body.clone(),
        401,
        "signature_stale",
    )
    .await;
    // relay measures from its own clock when the request arrives: on a
    // loaded machine that is seconds after `now`, so the distance it reports
    // moves by as much (further for the stale one, nearer for the future one).
    let since = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - now;
    assert!((599..=601 + since()).contains(&m), "{m}s away, 600s expected");
    let future = sign::gitlab_signed(SIGNING_KEY, "Push Hook", "msg-3", now + 600, &body);
    let m = refused_stale(
        &relay,
        "/hooks/gitlab-signed",
        &future,
        body.clone(),
        401,
        "signature_stale",
    )
    .await;
    assert!((599 - since()..=601).contains(&m), "{m}s away, 600s expected");

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
        "signature_mismatch", "webhook-signature does not match the body: the webhook's secret differs from sources.gl19, or the body was changed on the way")
    .await;

    // The id is signed too: changing it breaks the signature.
    let swapped = with(ok.clone(), "webhook-id", Some("msg-9"));
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &swapped,
        body.clone(),
        401,
        "signature_mismatch", "webhook-signature does not match the body: the webhook's secret differs from sources.gl19, or the body was changed on the way")
    .await;

    let unsigned = with(ok, "webhook-signature", None);
    refused(
        &relay,
        "/hooks/gitlab-signed",
        &unsigned,
        body,
        401,
        "signature_missing", "missing webhook-signature header: the sender signed nothing; give the webhook the secret configured in sources.gl19")
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
    refused(
        &relay,
        "/hooks/github",
        &h,
        not_json,
        400,
        "not_json",
        "the body is not valid JSON: expected value at line 1 column 1",
    )
    .await;

    let no_ref = json!({ "before": "1", "after": "2", "repository": { "full_name": "acme/api" } })
        .to_string()
        .into_bytes();
    let h = sign::github("gh-secret", "push", "d2", &no_ref);
    refused(&relay, "/hooks/github", &h, no_ref, 400, "bad_payload", "the JSON body lacks a field relay needs or has one of the wrong type: missing field `ref` at line 1 column 64").await;

    let body = push();
    let h = with(
        sign::github("gh-secret", "push", "d3", &body),
        "X-GitHub-Event",
        None,
    );
    refused(
        &relay,
        "/hooks/github",
        &h,
        body.clone(),
        400,
        "missing_header",
        "missing x-github-event header: relay reads the event name from it",
    )
    .await;

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
        "unsupported_media_type", r#"content type "text/plain" is not accepted; use application/json or application/x-www-form-urlencoded"#)
    .await;

    let big = vec![b' '; 5 * 1024];
    let h = sign::github("gh-secret", "push", "d5", &big);
    refused(
        &relay,
        "/hooks/github",
        &h,
        big.clone(),
        413,
        "too_large",
        "the body is larger than server.max_body (4096 bytes)",
    )
    .await;

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
impl Queue for FullDisk {
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
    async fn release(&self, _: Uuid, _: Uuid, _: SystemTime) -> Result<bool, StoreError> {
        Err(full())
    }
    async fn next_wakeup(&self, _: SystemTime) -> Result<Option<SystemTime>, StoreError> {
        Ok(None)
    }
    async fn ping(&self, _: SystemTime) -> Result<(), StoreError> {
        Err(full())
    }
    async fn event_body(&self, _: Uuid) -> Result<Option<(String, bytes::Bytes)>, StoreError> {
        Err(full())
    }

    async fn correlate(
        &self,
        _: &str,
        _: u64,
        _: relay::pipeline::PipelineState,
        _: SystemTime,
    ) -> Result<Option<relay::event::Upstream>, StoreError> {
        Err(full())
    }
}

#[async_trait]
impl Inspect for FullDisk {
    async fn jobs(&self, _: JobFilter) -> Result<Vec<JobView>, StoreError> {
        Err(full())
    }
    async fn job(&self, _: Uuid) -> Result<Option<JobDetail>, StoreError> {
        Err(full())
    }
    async fn held_deliveries(&self, _: &str, _: Vec<String>) -> Result<Vec<String>, StoreError> {
        Err(full())
    }
    async fn shadow_jobs(&self, _: relay::store::ShadowFilter) -> Result<Vec<JobView>, StoreError> {
        Err(full())
    }
    async fn events(&self, _: EventFilter, _: SystemTime) -> Result<Vec<EventView>, StoreError> {
        Err(full())
    }
    async fn event(&self, _: Uuid) -> Result<Option<relay::store::StoredEvent>, StoreError> {
        Err(full())
    }
    async fn activity(
        &self,
        _: Vec<String>,
        _: Vec<String>,
        _: SystemTime,
        _: SystemTime,
    ) -> Result<relay::store::Activity, StoreError> {
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
    async fn queue_stats(&self, _: SystemTime) -> Result<relay::store::QueueStats, StoreError> {
        Err(full())
    }
}

#[async_trait]
impl Maintain for FullDisk {
    async fn purge(&self, _: SystemTime, _: SystemTime, _: usize) -> Result<u64, StoreError> {
        Err(full())
    }

    async fn forget_dedupe_keys(&self, _: SystemTime, _: usize) -> Result<ForgottenKeys, StoreError> {
        Err(full())
    }
}

#[async_trait]
impl Polls for FullDisk {
    async fn due_polls(
        &self,
        _: &str,
        _: usize,
        _: Duration,
        _: SystemTime,
    ) -> Result<Vec<DuePoll>, StoreError> {
        Err(full())
    }
    async fn record_poll(&self, _: PollRecord, _: SystemTime) -> Result<bool, StoreError> {
        Err(full())
    }
    async fn next_poll(&self, _: SystemTime) -> Result<Option<SystemTime>, StoreError> {
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
    assert_eq!(
        answer["message"],
        "the store cannot accept the webhook right now; it was not recorded, so retry later: \
         the database cannot be written: database or disk is full",
        "{answer}"
    );
    assert!(circle.requests().is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
