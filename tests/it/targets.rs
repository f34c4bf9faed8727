//! Field-by-field conformance of every request relay sends to each target
//! kind, checked against PROTOCOLS.md part B (B1 CircleCI v2, B3 CircleCI
//! v1.1, B4 GitLab trigger) and DESIGN.md (`[targets.*]`, delivery
//! semantics):
//!
//! - method, exact path (percent-encoding included), query, the headers that
//!   matter, and the whole JSON body (or the exact bytes, where relay
//!   forwards the webhook) as the mock CI server received them;
//! - CircleCI's parameter limits (at render time: dead job, nothing sent; at
//!   load time: a config error naming the key);
//! - dry runs, and how a target's answer is classified in the store (read
//!   through the admin API);
//! - that no target credential ever reaches the store.
//!
//! Every test posts a GitHub webhook signed with the source secret to relay
//! on loopback; the targets point at `MockServer`s. Each runs on SQLite and
//! on PostgreSQL.

use std::time::Duration;

use relay::config::Config;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{Backend, MockServer, Recorded, Relay, Reply, base_config, hex, hmac_sha256, sign};

crate::on_both_backends! {
    cases: [
        circleci_v2_branch_push_sends_branch_and_typed_parameters,
        circleci_v2_tag_push_sends_tag_and_renders_tag_templates,
        circleci_v2_branch_or_tag_set_on_the_target_wins_over_the_event,
        circleci_v2_parameter_over_512_characters_is_dead_at_once_and_never_sent,
        circleci_v1_branch_push_posts_to_the_encoded_branch_with_revision,
        circleci_v1_tag_push_posts_to_the_project_with_tag_and_no_revision,
        gitlab_trigger_by_project_path_uses_the_event_ref,
        gitlab_trigger_by_numeric_id_with_a_fixed_ref_never_carries_gitlab_hook_headers,
        gitlab_forward_payload_sends_the_webhook_body_byte_for_byte,
        gitlab_triggers_carry_the_hop_variable,
        circleci_hop_parameter_is_sent_as_an_integer_parameter,
        http_target_forwards_the_body_resigned_with_its_own_secret,
        dry_run_targets_of_every_kind_send_nothing_and_record_a_redacted_request,
        a_404_from_the_target_makes_the_job_dead_after_one_request,
        a_url_that_does_not_parse_makes_the_job_dead_at_its_first_attempt,
        a_503_is_retried_with_backoff_and_the_201_that_follows_completes_the_job,
    ],
}

/// The GitHub source's webhook secret.
const GH_SECRET: &str = "gh-source-secret-5e0c1a";
/// Target credentials: distinctive, so finding one anywhere is no accident.
const CIRCLE_TOKEN: &str = "cci-token-8f41d2b9c07e";
const GITLAB_TOKEN: &str = "glptt-trigger-3b9e77a1d5";
const MIRROR_SECRET: &str = "mirror-sign-secret-a4c9e2";

const SHA_A: &str = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";
const SHA_B: &str = "9c2f5b7a1e8d3c6b0a4f2e1d9c8b7a6f5e4d3c2b";
const ZERO: &str = "0000000000000000000000000000000000000000";

const CIRCLE_CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":42,"created_at":"2026-11-22T10:00:00Z"}"#;
const GITLAB_CREATED: &str =
    r#"{"id":4242,"iid":7,"project_id":1234,"ref":"main","status":"created","source":"trigger"}"#;

/// The headers a Git host sends that must never reach a target.
const INCOMING_HEADERS: [&str; 6] = [
    "x-github-event",
    "x-github-delivery",
    "x-hub-signature",
    "x-gitlab-event",
    "x-gitlab-token",
    "idempotency-key",
];

/// The shared skeleton: one GitHub source, one route for pushes and tags to
/// `to`, then the `[targets.*]` text. `@BASE@` in `targets` becomes `base`.
fn config(to: &[&str], targets: &str, base: &str) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{GH_SECRET}"

[[routes]]
name = "ci"
from = ["gh"]
events = ["push", "tag"]
to = [{}]
{}
"#,
        to.join(", "),
        targets.replace("@BASE@", base)
    )
}

/// Fast retries for the outcome tests: a separate table after the rest.
const FAST_DELIVERY: &str = r#"
[delivery]
backoff = { first = "50ms", max = "200ms", factor = 2.0 }
throttle_floor = "50ms"
"#;

/// A GitHub `push` body (PROTOCOLS.md A1) for `acme/api`.
fn github_push(git_ref: &str, sha: &str, message: &str) -> Vec<u8> {
    let tag = git_ref.starts_with("refs/tags/");
    json!({
        "ref": git_ref,
        "before": if tag { ZERO } else { "1111111111111111111111111111111111111111" },
        "after": sha,
        "created": tag, "deleted": false, "forced": false,
        "base_ref": null,
        "repository": { "full_name": "acme/api", "html_url": "https://github.com/acme/api" },
        "pusher": { "name": "ada", "email": "ada@example.test" },
        "sender": { "login": "ada" },
        "head_commit": { "id": sha, "message": message, "added": [], "modified": ["src/lib.rs"], "removed": [] },
        "commits": if tag { json!([]) } else {
            json!([{ "id": sha, "message": message, "added": [], "modified": ["src/lib.rs"], "removed": [] }])
        }
    })
    .to_string()
    .into_bytes()
}

/// Posts a signed GitHub `push` webhook; returns relay's 202 answer.
async fn post_push(relay: &Relay, body: &[u8], delivery: &str) -> Value {
    let headers = sign::github(GH_SECRET, "push", delivery, body);
    let (status, answer) = relay.post("/hooks/github", &headers, body.to_vec()).await;
    assert_eq!(status, 202, "relay refused the webhook: {answer}");
    answer
}

/// Method, content type and the absence of anything the Git host sent.
fn assert_clean_post(r: &Recorded) {
    assert_eq!(r.method, "POST", "{r:#?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:#?}");
    for incoming in INCOMING_HEADERS {
        assert!(
            r.header(incoming).is_none(),
            "{incoming} reached the target: {r:#?}"
        );
    }
}

/// [`assert_clean_post`] for a CI trigger API: nothing signs the request.
fn assert_trigger_post(r: &Recorded) {
    assert_clean_post(r);
    assert!(
        r.header("x-hub-signature-256").is_none(),
        "a trigger is not HMAC-signed: {r:#?}"
    );
}

/// The single value of a header that must appear exactly once.
fn only_header<'a>(r: &'a Recorded, name: &str) -> &'a str {
    let values: Vec<_> = r.headers.get_all(name).iter().collect();
    assert_eq!(values.len(), 1, "{name} must be sent exactly once: {r:#?}");
    values[0].to_str().unwrap()
}

/// A query string decoded into sorted (key, value) pairs.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    pairs.sort();
    pairs
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Fails if one of `secrets` is anywhere in the store, byte for byte (the
/// SQLite file and its WAL, or every PostgreSQL table copied out raw), or in
/// what the admin API shows of events and jobs. A check over nothing proves
/// nothing, so the same scans must find `acme/api`, the repository every
/// test's webhook names.
async fn assert_store_holds_no_secret(relay: &Relay, secrets: &[&str]) {
    let contains = |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let stored = relay.store_bytes().await;
    let events = relay.events().await;
    let jobs = relay.job_details().await;
    assert!(!events.is_empty(), "no events stored");
    assert!(!jobs.is_empty(), "no jobs stored");
    let shown = serde_json::to_vec(&json!({ "events": events, "jobs": jobs })).unwrap();
    for (place, bytes) in [("the store", &stored), ("the admin API", &shown)] {
        assert!(
            contains(bytes, "acme/api"),
            "the scan of {place} did not even find the webhook's repository"
        );
        for secret in secrets {
            assert!(!contains(bytes, secret), "{place} holds the secret {secret:?}");
        }
    }
}

/// `(state, last_error)` of the one job for `target`.
async fn job(relay: &Relay, target: &str) -> (String, Option<String>) {
    let job = relay.job_for(target).await;
    (
        job["state"].as_str().unwrap().to_owned(),
        job["last_error"].as_str().map(str::to_owned),
    )
}

/// Nothing left to send: no job queued (waiting for a retry) or in flight.
async fn assert_nothing_pending(relay: &Relay) {
    let queue = relay.queue().await;
    assert_eq!(
        (queue["queued"], queue["in_flight"]),
        (0, 0),
        "jobs per state: {queue:?}"
    );
}

// ----------------------------------------------------------------------------
// CircleCI API v2 (PROTOCOLS.md B1)

const CIRCLE_V2: &str = r#"
[targets.circle]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
parameters = { release = true, count = 3, deploy = false, version = "{{ tag }}", sha = "{{ sha }}", on_branch = "{{ branch }}" }
"#;

/// The v2 request: path, `Circle-Token`, and the whole JSON body.
fn assert_circleci_v2(r: &Recorded, slug: &str, body: &Value) {
    assert_trigger_post(r);
    assert_eq!(r.path(), format!("/api/v2/project/{slug}/pipeline"));
    assert_eq!(r.query(), None, "no credential or anything else in the query");
    assert_eq!(only_header(r, "circle-token"), CIRCLE_TOKEN);
    assert!(
        r.header("authorization").is_none(),
        "the token goes in Circle-Token only"
    );
    assert_eq!(&r.json(), body);
}

async fn circleci_v2_branch_push_sends_branch_and_typed_parameters(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["circle"], CIRCLE_V2, &mock.url())).await;
    post_push(
        &relay,
        &github_push("refs/heads/feature/login", SHA_A, "work"),
        "d-v2-branch",
    )
    .await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    assert_circleci_v2(
        &requests[0],
        "gh/acme/api",
        &json!({
            "branch": "feature/login",
            "parameters": {
                "release": true,
                "count": 3,
                "deploy": false,
                "version": "",
                "sha": SHA_A,
                "on_branch": "feature/login"
            }
        }),
    );
    relay.wait_done(1).await;
    assert_eq!(
        relay.attempts().await,
        vec![(1, Some(201), "delivered".to_owned())]
    );
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

async fn circleci_v2_tag_push_sends_tag_and_renders_tag_templates(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["circle"], CIRCLE_V2, &mock.url())).await;
    post_push(
        &relay,
        &github_push("refs/tags/v1.4.0", SHA_B, "release"),
        "d-v2-tag",
    )
    .await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    assert_circleci_v2(
        &requests[0],
        "gh/acme/api",
        &json!({
            "tag": "v1.4.0",
            "parameters": {
                "release": true,
                "count": 3,
                "deploy": false,
                "version": "v1.4.0",
                "sha": SHA_B,
                "on_branch": ""
            }
        }),
    );
    relay.wait_done(1).await;
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

async fn circleci_v2_branch_or_tag_set_on_the_target_wins_over_the_event(backend: Backend) {
    let targets = r#"
[targets.pinned-branch]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/web"
token = "cci-token-8f41d2b9c07e"
branch = "main"
parameters = { from_ref = "{{ ref }}" }

[targets.pinned-tag]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/ops"
token = "cci-token-8f41d2b9c07e"
tag = "deploy-{{ branch }}{{ tag }}"
parameters = { from_ref = "{{ ref }}" }
"#;
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let relay = Relay::start_on(
        &backend,
        &config(&["pinned-branch", "pinned-tag"], targets, &mock.url()),
    )
    .await;

    // A tag push: `branch = "main"` sends a branch, not the event's tag.
    post_push(
        &relay,
        &github_push("refs/tags/v2.0.0", SHA_A, "release"),
        "d-pin-1",
    )
    .await;
    let mut requests = mock.wait_for(2).await;
    // A branch push: `tag = …` sends a tag, not the event's branch.
    post_push(
        &relay,
        &github_push("refs/heads/feature/x", SHA_B, "work"),
        "d-pin-2",
    )
    .await;
    requests.extend(mock.wait_for(4).await.split_off(2));
    assert_eq!(requests.len(), 4);

    // Each push yields one request per target, in either order.
    let one = |slug: &str, i: std::ops::Range<usize>, body: Value| {
        let path = format!("/api/v2/project/{slug}/pipeline");
        let matching: Vec<&Recorded> = requests[i].iter().filter(|r| r.path() == path).collect();
        assert_eq!(matching.len(), 1, "one request to {path}: {requests:#?}");
        assert_circleci_v2(matching[0], slug, &body);
    };
    one(
        "gh/acme/web",
        0..2,
        json!({ "branch": "main", "parameters": { "from_ref": "refs/tags/v2.0.0" } }),
    );
    one(
        "gh/acme/ops",
        0..2,
        json!({ "tag": "deploy-v2.0.0", "parameters": { "from_ref": "refs/tags/v2.0.0" } }),
    );
    one(
        "gh/acme/web",
        2..4,
        json!({ "branch": "main", "parameters": { "from_ref": "refs/heads/feature/x" } }),
    );
    one(
        "gh/acme/ops",
        2..4,
        json!({ "tag": "deploy-feature/x", "parameters": { "from_ref": "refs/heads/feature/x" } }),
    );
    relay.wait_done(4).await;
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

async fn circleci_v2_parameter_over_512_characters_is_dead_at_once_and_never_sent(backend: Backend) {
    // Same template, one character apart: 512 is the limit, 513 is over it.
    // Characters, not bytes: "é" is two bytes in UTF-8.
    let targets = r#"
[targets.edge]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/edge"
token = "cci-token-8f41d2b9c07e"
parameters = { note = "{{ message }}" }

[targets.over]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/over"
token = "cci-token-8f41d2b9c07e"
parameters = { note = "{{ message }}!" }
"#;
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["edge", "over"], targets, &mock.url())).await;
    let message = "é".repeat(512);
    let answer = post_push(
        &relay,
        &github_push("refs/heads/main", SHA_A, &message),
        "d-limit",
    )
    .await;

    assert_eq!(answer["jobs"], 2, "{answer}");
    let rejected = answer["rejected"].as_array().expect("a rejected array");
    assert_eq!(rejected.len(), 1, "{answer}");
    assert_eq!(rejected[0]["route"], "ci");
    assert_eq!(rejected[0]["target"], "over");
    let reason = rejected[0]["reason"].as_str().expect("a reason");
    assert!(reason.contains("512") && reason.contains("note"), "{reason}");

    // The dead job is dead at ingest, before anything is sent.
    let (state, last_error) = job(&relay, "over").await;
    assert_eq!(state, "dead");
    assert_eq!(last_error.as_deref(), Some(reason));

    let requests = mock.wait_for(1).await;
    relay.wait_jobs("target=edge&state=done", 1).await;
    assert_eq!(requests.len(), 1, "only the job within the limit is sent");
    assert_circleci_v2(
        &requests[0],
        "gh/acme/edge",
        &json!({ "branch": "main", "parameters": { "note": message } }),
    );
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.path() != "/api/v2/project/gh/acme/over/pipeline")
    );
    let over = relay.job_for("over").await;
    assert_eq!(
        (&over["state"], &over["attempts"], &over["history"]),
        (&json!("dead"), &json!(0), &json!([])),
        "a job dead on arrival has no attempts: {over:#}"
    );
    assert_eq!(over["retryable"], false, "{over:#}");
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

/// A whole config with one circleci target `name` whose table ends with `extra`.
fn circle_config_text(name: &str, extra: &str) -> String {
    let dir = std::env::temp_dir().join("relay-targets-config-check.db");
    format!(
        "{}{}",
        base_config(&dir),
        config(
            &[name],
            &format!(
                "\n[targets.{name}]\nkind = \"circleci\"\nbase_url = \"https://circleci.test\"\nproject = \"gh/acme/api\"\ntoken = \"{CIRCLE_TOKEN}\"\n{extra}"
            ),
            ""
        )
    )
}

fn parameters_table(name: &str, keys: impl IntoIterator<Item = String>) -> String {
    let lines: String = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| format!("{key} = {i}\n"))
        .collect();
    format!("\n[targets.{name}.parameters]\n{lines}")
}

#[test]
fn circleci_v2_parameter_count_and_key_length_are_config_errors() {
    let numbered = |n: usize| (0..n).map(|i| format!("p{i:03}"));

    // 100 entries is the limit.
    let ok = circle_config_text("hundred", &parameters_table("hundred", numbered(100)));
    Config::from_toml(&ok).unwrap_or_else(|e| panic!("100 parameters must be accepted: {e}"));
    let err = Config::from_toml(&circle_config_text(
        "big",
        &parameters_table("big", numbered(101)),
    ))
    .expect_err("101 parameters must be refused");
    let text = err.to_string();
    assert!(text.contains("targets.big.parameters"), "{text}");
    assert!(text.contains("100"), "{text}");

    // Keys up to 128 characters.
    let k128 = "k".repeat(128);
    let ok = circle_config_text("keys", &parameters_table("keys", [k128]));
    Config::from_toml(&ok).unwrap_or_else(|e| panic!("a 128-character key must be accepted: {e}"));
    let k129 = "k".repeat(129);
    let err = Config::from_toml(&circle_config_text(
        "long",
        &parameters_table("long", [k129.clone()]),
    ))
    .expect_err("a 129-character key must be refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!("targets.long.parameters.{k129}")),
        "{text}"
    );
    assert!(text.contains("128"), "{text}");

    // branch and tag are mutually exclusive (B1).
    let err = Config::from_toml(&circle_config_text("both", "branch = \"main\"\ntag = \"v1\"\n"))
        .expect_err("branch with tag must be refused");
    let text = err.to_string();
    assert!(text.contains("targets.both.tag"), "{text}");
}

// ----------------------------------------------------------------------------
// CircleCI API v1.1 (PROTOCOLS.md B3)

const CIRCLE_V1: &str = r#"
[targets.legacy]
kind = "circleci_v1"
base_url = "@BASE@"
project = "github/acme/api"
token = "cci-token-8f41d2b9c07e"
job = "deploy_docker"
build_parameters = { UPSTREAM_SHA = "{{ sha }}", UPSTREAM_REF = "{{ ref }}" }
"#;

fn assert_circleci_v1(r: &Recorded, path: &str, body: &Value) {
    assert_trigger_post(r);
    assert_eq!(r.path(), path);
    assert_eq!(r.query(), None, "no ?circle-token= (deprecated) or anything else");
    assert_eq!(only_header(r, "circle-token"), CIRCLE_TOKEN);
    assert_eq!(&r.json(), body);
}

async fn circleci_v1_branch_push_posts_to_the_encoded_branch_with_revision(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, r#"{"build_num":7,"lifecycle":"not_running"}"#)).await;
    let relay = Relay::start_on(&backend, &config(&["legacy"], CIRCLE_V1, &mock.url())).await;
    post_push(
        &relay,
        &github_push("refs/heads/feature/x", SHA_A, "work"),
        "d-v1-branch",
    )
    .await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    assert_circleci_v1(
        &requests[0],
        "/api/v1.1/project/github/acme/api/tree/feature%2Fx",
        &json!({
            "revision": SHA_A,
            "build_parameters": {
                "CIRCLE_JOB": "deploy_docker",
                "UPSTREAM_SHA": SHA_A,
                "UPSTREAM_REF": "refs/heads/feature/x"
            }
        }),
    );
    relay.wait_done(1).await;
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

async fn circleci_v1_tag_push_posts_to_the_project_with_tag_and_no_revision(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, r#"{"build_num":8,"lifecycle":"not_running"}"#)).await;
    let relay = Relay::start_on(&backend, &config(&["legacy"], CIRCLE_V1, &mock.url())).await;
    post_push(
        &relay,
        &github_push("refs/tags/v3.1.0", SHA_B, "release"),
        "d-v1-tag",
    )
    .await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    assert_circleci_v1(
        &requests[0],
        "/api/v1.1/project/github/acme/api",
        &json!({
            "tag": "v3.1.0",
            "build_parameters": {
                "CIRCLE_JOB": "deploy_docker",
                "UPSTREAM_SHA": SHA_B,
                "UPSTREAM_REF": "refs/tags/v3.1.0"
            }
        }),
    );
    relay.wait_done(1).await;
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

// ----------------------------------------------------------------------------
// GitLab pipeline trigger (PROTOCOLS.md B4)

fn assert_gitlab_trigger(r: &Recorded, path: &str, body: &Value) {
    assert_trigger_post(r);
    assert_eq!(r.path(), path);
    assert_eq!(r.query(), None, "the trigger token travels in the JSON body");
    assert_eq!(&r.json(), body);
}

async fn gitlab_trigger_by_project_path_uses_the_event_ref(backend: Backend) {
    let targets = r#"
[targets.gitlab-deploy]
kind = "gitlab"
base_url = "@BASE@"
project = "acme/deploy"
token = "glptt-trigger-3b9e77a1d5"
variables = { UPSTREAM_SHA = "{{ sha }}", UPSTREAM_REPO = "{{ repo }}", UPSTREAM_REF = "{{ ref }}" }
inputs = { environment = "production", scan_security = false, level = 3, version = "{{ tag }}" }
"#;
    let mock = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["gitlab-deploy"], targets, &mock.url())).await;
    let path = "/api/v4/projects/acme%2Fdeploy/trigger/pipeline";

    post_push(
        &relay,
        &github_push("refs/tags/v1.0.0", SHA_A, "release"),
        "d-gl-tag",
    )
    .await;
    let requests = mock.wait_for(1).await;
    assert_gitlab_trigger(
        &requests[0],
        path,
        &json!({
            "token": GITLAB_TOKEN,
            "ref": "v1.0.0",
            "variables": { "UPSTREAM_SHA": SHA_A, "UPSTREAM_REPO": "acme/api", "UPSTREAM_REF": "refs/tags/v1.0.0", "RELAY_HOP": "1" },
            "inputs": { "environment": "production", "scan_security": false, "level": 3, "version": "v1.0.0" }
        }),
    );

    post_push(
        &relay,
        &github_push("refs/heads/feature/x", SHA_B, "work"),
        "d-gl-branch",
    )
    .await;
    let requests = mock.wait_for(2).await;
    assert_eq!(requests.len(), 2);
    assert_gitlab_trigger(
        &requests[1],
        path,
        &json!({
            "token": GITLAB_TOKEN,
            "ref": "feature/x",
            "variables": { "UPSTREAM_SHA": SHA_B, "UPSTREAM_REPO": "acme/api", "UPSTREAM_REF": "refs/heads/feature/x", "RELAY_HOP": "1" },
            "inputs": { "environment": "production", "scan_security": false, "level": 3, "version": "" }
        }),
    );
    relay.wait_done(2).await;
    assert_store_holds_no_secret(&relay, &[GITLAB_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

async fn gitlab_trigger_by_numeric_id_with_a_fixed_ref_never_carries_gitlab_hook_headers(backend: Backend) {
    // A GitLab source too: its `X-Gitlab-Event: Push Hook` and token must not
    // be passed on (GitLab answers 403 to `X-Gitlab-Event: Pipeline Hook`).
    let targets = r#"
[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "gl-source-token-66d1"

[[routes]]
name = "from-gitlab"
from = ["gl"]
events = ["push"]
to = ["gitlab-numeric"]

[targets.gitlab-numeric]
kind = "gitlab"
base_url = "@BASE@"
project = "1234"
token = "glptt-trigger-3b9e77a1d5"
ref = "main"
variables = { UPSTREAM_SHA = "{{ sha }}", UPSTREAM_SOURCE = "{{ source }}" }
inputs = { dry = true }
"#;
    let mock = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["gitlab-numeric"], targets, &mock.url())).await;
    let path = "/api/v4/projects/1234/trigger/pipeline";

    post_push(
        &relay,
        &github_push("refs/heads/feature/x", SHA_A, "work"),
        "d-gl-num",
    )
    .await;
    let requests = mock.wait_for(1).await;
    assert_gitlab_trigger(
        &requests[0],
        path,
        &json!({
            "token": GITLAB_TOKEN,
            "ref": "main",
            "variables": { "UPSTREAM_SHA": SHA_A, "UPSTREAM_SOURCE": "gh", "RELAY_HOP": "1" },
            "inputs": { "dry": true }
        }),
    );

    let gl_body = json!({
        "object_kind": "push", "ref": "refs/heads/develop",
        "before": "1111111111111111111111111111111111111111", "after": SHA_B,
        "checkout_sha": SHA_B, "user_username": "grace",
        "project": { "path_with_namespace": "acme/web", "web_url": "https://gitlab.test/acme/web" },
        "commits": [{ "id": SHA_B, "message": "work", "added": [], "modified": ["a"], "removed": [] }],
        "total_commits_count": 1
    })
    .to_string();
    let (status, answer) = relay
        .post(
            "/hooks/gitlab",
            &sign::gitlab("gl-source-token-66d1", "Push Hook", "d-gl-src"),
            gl_body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let requests = mock.wait_for(2).await;
    assert_eq!(requests.len(), 2);
    assert_gitlab_trigger(
        &requests[1],
        path,
        &json!({
            "token": GITLAB_TOKEN,
            "ref": "main",
            "variables": { "UPSTREAM_SHA": SHA_B, "UPSTREAM_SOURCE": "gl", "RELAY_HOP": "1" },
            "inputs": { "dry": true }
        }),
    );
    relay.wait_done(2).await;
    assert_store_holds_no_secret(&relay, &[GITLAB_TOKEN, GH_SECRET, "gl-source-token-66d1"]).await;
    relay.stop().await;
}

async fn gitlab_forward_payload_sends_the_webhook_body_byte_for_byte(backend: Backend) {
    // Characters that break a query string unless encoded: space, +, &, =, /, #, %, é.
    let targets = r#"
[targets.gitlab-payload]
kind = "gitlab"
base_url = "@BASE@"
project = "acme/deploy"
token = "glptt-trigger-3b9e77a1d5"
forward_payload = true
variables = { UPSTREAM_SHA = "{{ sha }}", NOTE = "a b+c&d=e/f#g%h é" }
"#;
    let mock = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&["gitlab-payload"], targets, &mock.url())).await;

    // Odd spacing and an escaped character: any re-serialization would show.
    let body = format!(
        "{{\n  \"ref\" : \"refs/heads/release/2.0\",\"before\":\"1111111111111111111111111111111111111111\",\n  \"after\":\"{SHA_A}\", \"created\":false,\"deleted\":false,\"forced\":false,\n  \"repository\":{{\"full_name\":\"acme/api\",\"html_url\":\"https://github.com/acme/api\"}},\n  \"pusher\":{{\"name\":\"ada\"}},\n  \"head_commit\":{{\"id\":\"{SHA_A}\",\"message\":\"caf\\u00e9 \\/ fix\",\"added\":[],\"modified\":[\"x\"],\"removed\":[]}},\n  \"commits\":[]\n}}\n"
    )
    .into_bytes();
    post_push(&relay, &body, "d-gl-payload").await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_trigger_post(r);
    assert_eq!(
        r.path(),
        "/api/v4/projects/acme%2Fdeploy/ref/release%2F2.0/trigger/pipeline"
    );
    let query = r.query().expect("token and variables in the query");
    assert_eq!(
        query_pairs(query),
        vec![
            ("token".to_owned(), GITLAB_TOKEN.to_owned()),
            ("variables[NOTE]".to_owned(), "a b+c&d=e/f#g%h é".to_owned()),
            ("variables[RELAY_HOP]".to_owned(), "1".to_owned()),
            ("variables[UPSTREAM_SHA]".to_owned(), SHA_A.to_owned()),
        ],
        "raw query: {query}"
    );
    assert!(
        !query.contains(' ') && !query.contains('#'),
        "unencoded characters in {query}"
    );
    assert_eq!(
        &r.body[..],
        &body[..],
        "the body must be the webhook's, byte for byte"
    );
    assert_eq!(sha256_hex(&r.body), sha256_hex(&body));
    relay.wait_done(1).await;
    assert_store_holds_no_secret(&relay, &[GITLAB_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

/// DESIGN.md, loop guard rule 2: "Every trigger carries the hop count
/// (`RELAY_HOP`, as a GitLab variable …)", so a pipeline event coming back
/// can be dropped at `max_hops`. GitLab variables are strings (B4). A webhook
/// from a Git host is hop 0, so its triggers carry 1.
async fn gitlab_triggers_carry_the_hop_variable(backend: Backend) {
    let targets = r#"
[targets.gl-json]
kind = "gitlab"
base_url = "@BASE@"
project = "acme/deploy"
token = "glptt-trigger-3b9e77a1d5"

[targets.gl-payload]
kind = "gitlab"
base_url = "@BASE@"
project = "acme/other"
token = "glptt-trigger-3b9e77a1d5"
forward_payload = true
"#;
    let mock = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = Relay::start_on(
        &backend,
        &config(&["gl-json", "gl-payload"], targets, &mock.url()),
    )
    .await;
    post_push(&relay, &github_push("refs/heads/main", SHA_A, "work"), "d-hop").await;
    let requests = mock.wait_for(2).await;
    let json_trigger = requests
        .iter()
        .find(|r| r.path() == "/api/v4/projects/acme%2Fdeploy/trigger/pipeline")
        .expect("the JSON trigger");
    assert_eq!(json_trigger.json()["variables"]["RELAY_HOP"], json!("1"));
    let payload_trigger = requests
        .iter()
        .find(|r| r.path() == "/api/v4/projects/acme%2Fother/ref/main/trigger/pipeline")
        .expect("the webhook-style trigger");
    let pairs = query_pairs(payload_trigger.query().unwrap_or_default());
    let hop = pairs.iter().find(|(k, _)| k == "variables[RELAY_HOP]");
    assert_eq!(hop.map(|(_, v)| v.as_str()), Some("1"), "query: {pairs:?}");
    relay.stop().await;
}

/// DESIGN.md documents `hop_parameter = "relay_hop"` on a circleci target
/// ("as a CircleCI parameter when the target declares hop_parameter").
async fn circleci_hop_parameter_is_sent_as_an_integer_parameter(backend: Backend) {
    let targets = r#"
[targets.circle]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
hop_parameter = "relay_hop"
"#;
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let text = format!(
        "{}{}",
        base_config(&std::env::temp_dir().join("relay-targets-hop.db")),
        config(&["circle"], targets, &mock.url())
    );
    if let Err(e) = Config::from_toml(&text) {
        panic!("hop_parameter is a documented circleci key: {e}");
    }
    let relay = Relay::start_on(&backend, &config(&["circle"], targets, &mock.url())).await;
    post_push(
        &relay,
        &github_push("refs/heads/main", SHA_A, "work"),
        "d-hop-cci",
    )
    .await;
    let requests = mock.wait_for(1).await;
    assert_eq!(requests[0].json()["parameters"]["relay_hop"], json!(1));
    relay.stop().await;
}

// ----------------------------------------------------------------------------
// Plain HTTP forwarding (DESIGN.md `[targets.mirror]`)

async fn http_target_forwards_the_body_resigned_with_its_own_secret(backend: Backend) {
    let targets = r#"
[targets.mirror]
kind = "http"
url = "@BASE@/ci/incoming/hook?team=ci%2Fops"
sign = { secret = "mirror-sign-secret-a4c9e2" }
"#;
    let mock = MockServer::start(Reply::new(200, r#"{"ok":true}"#)).await;
    let relay = Relay::start_on(&backend, &config(&["mirror"], targets, &mock.url())).await;

    let cases = [
        ("refs/heads/main", SHA_A, "d-http-push", "push"),
        ("refs/tags/v9.9.9", SHA_B, "d-http-tag", "tag"),
    ];
    for (n, (git_ref, sha, delivery, kind)) in cases.into_iter().enumerate() {
        // Pretty-printed, so a re-serialized body would differ.
        let doc: Value = serde_json::from_slice(&github_push(git_ref, sha, "work")).unwrap();
        let body = serde_json::to_vec_pretty(&doc).unwrap();
        let answer = post_push(&relay, &body, delivery).await;
        let event_id = answer["event"].as_str().expect("an event id").to_owned();

        let requests = mock.wait_for(n + 1).await;
        assert_eq!(requests.len(), n + 1);
        let r = &requests[n];
        assert_clean_post(r);
        assert_eq!(r.target, "/ci/incoming/hook?team=ci%2Fops");
        assert_eq!(
            &r.body[..],
            &body[..],
            "the body must be the webhook's, byte for byte"
        );
        assert_eq!(sha256_hex(&r.body), sha256_hex(&body));

        let ours = format!("sha256={}", hex(&hmac_sha256(MIRROR_SECRET.as_bytes(), &[&body])));
        let senders = format!("sha256={}", hex(&hmac_sha256(GH_SECRET.as_bytes(), &[&body])));
        let signature = only_header(r, "x-hub-signature-256");
        assert_eq!(signature, ours, "signed with the target's secret");
        assert_ne!(signature, senders, "the sender's signature is not passed on");

        assert_eq!(only_header(r, "x-relay-event"), kind);
        assert_eq!(only_header(r, "x-relay-source"), "gh");
        assert_eq!(only_header(r, "x-relay-event-id"), event_id);
    }
    relay.wait_done(2).await;
    assert_store_holds_no_secret(&relay, &[MIRROR_SECRET, GH_SECRET]).await;
    relay.stop().await;
}

// ----------------------------------------------------------------------------
// Dry runs

async fn dry_run_targets_of_every_kind_send_nothing_and_record_a_redacted_request(backend: Backend) {
    let targets = r#"
[targets.dry-circle]
kind = "circleci"
dry_run = true
base_url = "@BASE@"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
parameters = { release = true }

[targets.dry-legacy]
kind = "circleci_v1"
dry_run = true
base_url = "@BASE@"
project = "github/acme/api"
token = "cci-token-8f41d2b9c07e"
job = "build"

[targets.dry-gitlab]
kind = "gitlab"
dry_run = true
base_url = "@BASE@"
project = "acme/deploy"
token = "glptt-trigger-3b9e77a1d5"

[targets.dry-payload]
kind = "gitlab"
dry_run = true
base_url = "@BASE@"
project = "acme/deploy"
token = "glptt-trigger-3b9e77a1d5"
forward_payload = true

[targets.dry-mirror]
kind = "http"
dry_run = true
url = "@BASE@/hook"
sign = { secret = "mirror-sign-secret-a4c9e2" }
"#;
    let names = [
        "dry-circle",
        "dry-legacy",
        "dry-gitlab",
        "dry-payload",
        "dry-mirror",
    ];
    let mock = MockServer::start(Reply::new(201, CIRCLE_CREATED)).await;
    let relay = Relay::start_on(&backend, &config(&names, targets, &mock.url())).await;
    let answer = post_push(&relay, &github_push("refs/heads/main", SHA_A, "work"), "d-dry").await;
    assert_eq!(answer["jobs"], 5, "{answer}");

    relay.wait_done(5).await;
    // Each attempt completes after its send would have happened.
    assert!(
        mock.requests().is_empty(),
        "a dry run sent: {:#?}",
        mock.requests()
    );
    assert_eq!(
        relay.attempts().await,
        vec![(1, None, "dry_run".to_owned()); 5],
        "one attempt per job, no status: nothing was sent"
    );
    for name in names {
        let job = relay.job_for(name).await;
        let history = job["history"].as_array().unwrap();
        assert_eq!(history.len(), 1, "{job:#}");
        let excerpt = history[0]["excerpt"].as_str().unwrap();
        assert!(
            excerpt.starts_with(&format!("POST {}/", mock.url())),
            "{name}: {excerpt}"
        );
        assert!(
            excerpt.contains("[redacted]"),
            "{name}: the credential's place is marked: {excerpt}"
        );
    }
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GITLAB_TOKEN, MIRROR_SECRET, GH_SECRET]).await;
    relay.stop().await;
}

// ----------------------------------------------------------------------------
// Outcome classification, as the store records it

const CIRCLE_PLAIN: &str = r#"
[targets.circle]
kind = "circleci"
base_url = "@BASE@"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
"#;

async fn a_404_from_the_target_makes_the_job_dead_after_one_request(backend: Backend) {
    let mock = MockServer::start(Reply::new(404, r#"{"message":"Project does not exist."}"#)).await;
    let text = format!(
        "{}{FAST_DELIVERY}",
        config(&["circle"], CIRCLE_PLAIN, &mock.url())
    );
    let relay = Relay::start_on(&backend, &text).await;
    post_push(&relay, &github_push("refs/heads/main", SHA_A, "work"), "d-404").await;

    relay.wait_jobs("state=dead", 1).await;
    // Dead is final: no retry is scheduled (backoff would be 50ms).
    assert_nothing_pending(&relay).await;
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "a 404 is permanent: {requests:#?}");
    assert_circleci_v2(&requests[0], "gh/acme/api", &json!({ "branch": "main" }));
    assert_eq!(
        relay.attempts().await,
        vec![(1, Some(404), "dead_status".to_owned())]
    );
    let (state, last_error) = job(&relay, "circle").await;
    assert_eq!(state, "dead");
    let last_error = last_error.expect("the target's message is kept");
    assert!(last_error.contains("Project does not exist."), "{last_error}");
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}

/// A URL that renders but does not parse (a port past 65535) cannot reach
/// anything: the job is dead at its first attempt with the parser's reason,
/// not retried as if a request might have gone out.
async fn a_url_that_does_not_parse_makes_the_job_dead_at_its_first_attempt(backend: Backend) {
    let targets = r#"
[targets.mirror]
kind = "http"
url = "http://127.0.0.1:99999/hook"
sign = { secret = "mirror-sign-secret-a4c9e2" }
"#;
    let text = format!("{}{FAST_DELIVERY}", config(&["mirror"], targets, ""));
    let relay = Relay::start_on(&backend, &text).await;
    post_push(
        &relay,
        &github_push("refs/heads/main", SHA_A, "work"),
        "d-bad-url",
    )
    .await;

    relay.wait_jobs("state=dead", 1).await;
    assert_nothing_pending(&relay).await;
    assert_eq!(relay.attempts().await, vec![(1, None, "dead_request".to_owned())]);
    let (_, last_error) = job(&relay, "mirror").await;
    assert_eq!(
        last_error.as_deref(),
        Some("the request's URL is not a valid URL: invalid port number")
    );
    relay.stop().await;
}

async fn a_503_is_retried_with_backoff_and_the_201_that_follows_completes_the_job(backend: Backend) {
    let mock = MockServer::start(Reply::new(500, r#"{"message":"no third request expected"}"#)).await;
    mock.script([
        Reply::new(503, r#"{"message":"Service Unavailable"}"#),
        Reply::new(201, CIRCLE_CREATED),
    ]);
    let text = format!(
        "{}{FAST_DELIVERY}",
        config(&["circle"], CIRCLE_PLAIN, &mock.url())
    );
    let relay = Relay::start_on(&backend, &text).await;
    post_push(&relay, &github_push("refs/heads/main", SHA_A, "work"), "d-503").await;

    let requests = mock.wait_for(2).await;
    relay.wait_done(1).await;
    // Done is final: nothing more is scheduled, so no third request.
    assert_nothing_pending(&relay).await;
    let requests_after = mock.requests();
    assert_eq!(requests_after.len(), 2, "{requests_after:#?}");
    for r in &requests {
        assert_circleci_v2(r, "gh/acme/api", &json!({ "branch": "main" }));
    }
    assert_eq!(
        requests[0].body, requests[1].body,
        "a retry sends the same request"
    );
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_millis(50),
        "retried after {gap:?}, before backoff.first"
    );
    assert_eq!(
        relay.attempts().await,
        vec![
            (1, Some(503), "retry_status".to_owned()),
            (2, Some(201), "delivered".to_owned()),
        ]
    );
    assert_eq!(job(&relay, "circle").await.0, "done");
    assert_store_holds_no_secret(&relay, &[CIRCLE_TOKEN, GH_SECRET]).await;
    relay.stop().await;
}
