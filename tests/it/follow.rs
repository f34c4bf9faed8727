//! Following pipelines by polling (PROTOCOLS.md F): `follow` on `circleci`
//! targets polls `GET /api/v2/pipeline/{id}/workflow` with the trigger's
//! token, on `gitlab` targets `GET /projects/:id/pipelines/:id` with a token
//! of its own, with a growing wait, until the pipeline ends, the CI's own
//! webhook says it ended, the CI refuses, or the deadline passes; and the
//! polls are in the store, so a restart takes them up. The mocks play
//! CircleCI and GitLab on loopback; relay's state is read through its API.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Recorded, Relay, Reply, fixture, sign};

crate::on_both_backends! {
    cases: [
        circleci_pipelines_are_followed_to_their_end,
        gitlab_pipelines_are_followed_with_a_token_of_their_own,
        the_ci_webhook_ends_polling_early,
        polls_survive_a_restart,
        a_refused_poll_stops_following_and_says_why,
        following_gives_up_at_the_deadline,
    ],
}

const CCI_TOKEN: &str = "cci-personal-token-5f0e1d2c3b4a";
const CCI_SECRET: &str = "cci-hook-secret-0123456789";
const GL_TRIGGER: &str = "glptt-trigger-3b9e77a1d5c0";
const GL_READER: &str = "glpat-read-api-7c1d9e2f4a6b";
const PIPELINE: &str = "5034460f-c7c4-4c43-9457-de07e2029e7b";
const GITHUB_SECRET: &str = "gh-webhook-secret-0123456789";

fn config(circle: &str, follow: &str) -> String {
    format!(
        r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{GITHUB_SECRET}"

[sources.circleci]
provider = "circleci"
path = "/hooks/circleci"
secret = "{CCI_SECRET}"

[[routes]]
name = "builds"
from = ["github"]
events = ["push"]
to = ["app"]

[targets.app]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "{CCI_TOKEN}"
follow = {follow}

[loop_guard]
dedupe_window = "0s"
"#
    )
}

fn gitlab_config(gitlab: &str) -> String {
    format!(
        r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{GITHUB_SECRET}"

[[routes]]
name = "deploys"
from = ["github"]
events = ["push"]
to = ["deploy"]

[targets.deploy]
kind = "gitlab"
base_url = "{gitlab}"
project = "acme/deploy"
ref = "main"
token = "{GL_TRIGGER}"
follow = {{ token = "{GL_READER}", first = "200ms", max = "300ms" }}
"#
    )
}

/// CircleCI's answer to a trigger: the pipeline it created.
fn created() -> Reply {
    Reply::new(
        201,
        &json!({"id": PIPELINE, "state": "created", "number": 7, "created_at": "2026-12-04T09:00:00Z"})
            .to_string(),
    )
}

/// One workflow as `GET /pipeline/{id}/workflow` lists it (every field the
/// OpenAPI document requires).
fn workflow(name: &str, status: &str, created_at: &str) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "name": name,
        "status": status,
        "created_at": created_at,
        "stopped_at": null,
        "pipeline_id": PIPELINE,
        "pipeline_number": 7,
        "project_slug": "gh/acme/api",
        "started_by": "9f7d6a1b-0000-4000-8000-000000000001",
    })
}

fn workflows(items: &[Value], next: Option<&str>) -> Reply {
    Reply::new(200, &json!({"items": items, "next_page_token": next}).to_string())
}

fn running() -> Reply {
    workflows(&[workflow("build", "running", "2026-12-04T09:00:01Z")], None)
}

async fn push(relay: &Relay) {
    crate::support::post_github_push(
        relay,
        GITHUB_SECRET,
        "refs/heads/main",
        "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c",
        &uuid::Uuid::new_v4().to_string(),
    )
    .await;
}

/// Waits until the only job's pipeline satisfies `done`; returns the job.
async fn wait_pipeline(relay: &Relay, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = relay.jobs("").await;
        if let Some(job) = jobs.first().filter(|j| done(&j["pipeline"])) {
            return relay.job(job["id"].as_str().unwrap()).await;
        }
        assert!(std::time::Instant::now() < deadline, "waited in vain: {jobs:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn polls_of(requests: &[Recorded]) -> Vec<&Recorded> {
    requests.iter().filter(|r| r.method == "GET").collect()
}

fn assert_circleci_poll(poll: &Recorded, path: &str, query: Option<&str>) {
    assert_eq!(poll.method, "GET");
    assert_eq!(poll.path(), path);
    assert_eq!(poll.query(), query);
    assert_eq!(poll.header("circle-token"), Some(CCI_TOKEN));
    assert_eq!(poll.header("accept"), Some("application/json"));
    assert!(poll.header("user-agent").unwrap().starts_with("relay/"));
    assert!(poll.body.is_empty());
}

async fn circleci_pipelines_are_followed_to_their_end(backend: Backend) {
    let circle = MockServer::start(Reply::new(500, "{}")).await;
    circle.script([
        created(),
        // No workflow yet: relay asks the pipeline itself, which is not started.
        workflows(&[], None),
        Reply::new(
            200,
            &json!({"id": PIPELINE, "number": 7, "state": "pending"}).to_string(),
        ),
        running(),
        // Two pages; `build` failed and was rerun: the rerun counts.
        workflows(
            &[workflow("build", "failed", "2026-12-04T09:00:01Z")],
            Some("tok/2"),
        ),
        workflows(
            &[
                workflow("build", "success", "2026-12-04T09:06:00Z"),
                workflow("deploy", "success", "2026-12-04T09:06:00Z"),
            ],
            None,
        ),
    ]);
    let relay = Relay::start_on(
        &backend,
        &config(&circle.url(), r#"{ first = "200ms", max = "300ms" }"#),
    )
    .await;
    push(&relay).await;
    let job = wait_pipeline(&relay, |p| p["state"] == "success").await;
    let pipeline = &job["pipeline"];
    assert_eq!(pipeline["id"], PIPELINE);
    assert_eq!(pipeline["number"], 7);
    assert_eq!(
        pipeline["url"],
        "https://app.circleci.com/pipelines/github/acme/api/7"
    );
    assert_eq!(
        pipeline["follow"],
        json!({"polls": 3, "next_poll_at": null, "stopped": null}),
        "{job:#}"
    );
    let requests = circle.requests();
    let polls = polls_of(&requests);
    assert_eq!(polls.len(), 5, "{requests:#?}");
    let workflow_path = format!("/api/v2/pipeline/{PIPELINE}/workflow");
    assert_circleci_poll(polls[0], &workflow_path, None);
    assert_circleci_poll(polls[1], &format!("/api/v2/pipeline/{PIPELINE}"), None);
    assert_circleci_poll(polls[2], &workflow_path, None);
    assert_circleci_poll(polls[3], &workflow_path, None);
    assert_circleci_poll(polls[4], &workflow_path, Some("page-token=tok%2F2"));
    // Nothing more once the pipeline ended.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(circle.requests().len(), requests.len());
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains(r#"relay_pipelines_finished_total{target="app",state="success"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"relay_pipeline_polls_total{target="app",outcome="state"} 3"#),
        "{metrics}"
    );
    relay.stop().await;
}

async fn gitlab_pipelines_are_followed_with_a_token_of_their_own(backend: Backend) {
    let gitlab = MockServer::start(Reply::new(500, "{}")).await;
    gitlab.script([
        Reply::new(
            201,
            r#"{"id":4242,"iid":12,"status":"created","web_url":"https://gitlab.example.com/acme/deploy/-/pipelines/4242"}"#,
        ),
        Reply::new(200, r#"{"id":4242,"iid":12,"status":"running","ref":"main"}"#),
        Reply::new(502, "Bad Gateway"),
        Reply::new(200, r#"{"id":4242,"iid":12,"status":"failed","ref":"main"}"#),
    ]);
    let relay = Relay::start_on(&backend, &gitlab_config(&gitlab.url())).await;
    push(&relay).await;
    let job = wait_pipeline(&relay, |p| p["state"] == "failed").await;
    assert_eq!(job["pipeline"]["id"], "4242");
    assert_eq!(job["pipeline"]["follow"]["polls"], 3);
    assert_eq!(job["pipeline"]["follow"]["next_poll_at"], Value::Null);
    let requests = gitlab.requests();
    let polls = polls_of(&requests);
    assert_eq!(polls.len(), 3, "{requests:#?}");
    for poll in &polls {
        assert_eq!(poll.target, "/api/v4/projects/acme%2Fdeploy/pipelines/4242");
        assert_eq!(poll.header("private-token"), Some(GL_READER));
        assert_eq!(poll.header("accept"), Some("application/json"));
        assert!(poll.body.is_empty());
    }
    // The trigger carried the trigger token, and the polls only the reader.
    assert_eq!(requests[0].json()["token"], GL_TRIGGER);
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains(r#"relay_pipeline_polls_total{target="deploy",outcome="retry"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"relay_pipelines_finished_total{target="deploy",state="failed"} 1"#),
        "{metrics}"
    );
    let reader = GL_READER.as_bytes();
    assert!(!metrics.contains(GL_READER));
    assert!(!job.to_string().contains(GL_READER));
    let stored = relay.store_bytes().await;
    assert!(
        !stored.windows(reader.len()).any(|w| w == reader),
        "the follow token is in the store"
    );
    relay.stop().await;
}

async fn the_ci_webhook_ends_polling_early(backend: Backend) {
    let Some(fixture) = fixture("circleci/workflow-completed-github.json") else {
        return;
    };
    let circle = MockServer::start(running()).await;
    circle.script([created()]);
    let relay = Relay::start_on(
        &backend,
        &config(&circle.url(), r#"{ first = "200ms", max = "200ms" }"#),
    )
    .await;
    push(&relay).await;
    wait_pipeline(&relay, |p| p["state"] == "running").await;
    let mut completed: Value = serde_json::from_slice(&fixture).unwrap();
    completed["id"] = json!("d-0001");
    completed["pipeline"]["id"] = json!(PIPELINE);
    completed["pipeline"]["number"] = json!(7);
    completed["workflow"]["status"] = json!("success");
    let body = serde_json::to_vec(&completed).unwrap();
    let (status, answer) = relay
        .post(
            "/hooks/circleci",
            &sign::circleci(CCI_SECRET, "workflow-completed", &body),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let job = wait_pipeline(&relay, |p| p["state"] == "success").await;
    assert_eq!(job["pipeline"]["follow"]["next_poll_at"], Value::Null, "{job:#}");
    assert_eq!(job["pipeline"]["follow"]["stopped"], Value::Null);
    // At most the poll already on its way when the webhook came; its
    // older answer ("running") must not undo the webhook's "success".
    let seen = circle.requests().len();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(circle.requests().len() <= seen + 1, "polling went on");
    let job = relay.job(job["id"].as_str().unwrap()).await;
    assert_eq!(job["pipeline"]["state"], "success");
    relay.stop().await;
}

async fn polls_survive_a_restart(backend: Backend) {
    let circle = MockServer::start(workflows(
        &[workflow("build", "success", "2026-12-04T09:00:01Z")],
        None,
    ))
    .await;
    circle.script([created(), running()]);
    let dir = tempfile::tempdir().unwrap();
    let text = crate::support::config_on(
        &backend,
        dir.path(),
        "",
        &config(&circle.url(), r#"{ first = "300ms", max = "2s" }"#),
    );
    let relay = Relay::start_with(dir, &text).await;
    push(&relay).await;
    wait_pipeline(&relay, |p| p["follow"]["polls"] == 1).await;
    let dir = relay.stop_keeping_dir().await;
    let relay = Relay::start_with(dir, &text).await;
    let job = wait_pipeline(&relay, |p| p["state"] == "success").await;
    assert_eq!(job["pipeline"]["follow"]["polls"], 2, "{job:#}");
    let requests = circle.requests();
    let posts = requests.iter().filter(|r| r.method == "POST").count();
    assert_eq!(
        posts, 1,
        "the restarted relay triggered nothing: it took up the stored poll"
    );
    assert_eq!(polls_of(&requests).len(), 2);
    relay.stop().await;
}

async fn a_refused_poll_stops_following_and_says_why(backend: Backend) {
    let gitlab = MockServer::start(Reply::new(403, r#"{"message":"403 Forbidden"}"#)).await;
    gitlab.script([Reply::new(
        201,
        r#"{"id":4243,"iid":13,"status":"created","web_url":"https://gitlab.example.com/acme/deploy/-/pipelines/4243"}"#,
    )]);
    let relay = Relay::start_on(&backend, &gitlab_config(&gitlab.url())).await;
    push(&relay).await;
    let job = wait_pipeline(&relay, |p| !p["follow"]["stopped"].is_null()).await;
    let follow = &job["pipeline"]["follow"];
    assert_eq!(
        follow["stopped"],
        "the CI refused the poll: 403: 403 Forbidden; the follow token cannot read pipelines: it needs the read_api scope (a trigger token cannot read)"
    );
    assert_eq!(follow["next_poll_at"], Value::Null);
    assert_eq!(follow["polls"], 1);
    assert_eq!(job["pipeline"]["state"], "created");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        polls_of(&gitlab.requests()).len(),
        1,
        "a refusal is not polled again"
    );
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains(r#"relay_pipeline_polls_total{target="deploy",outcome="refused"} 1"#),
        "{metrics}"
    );
    relay.stop().await;
}

async fn following_gives_up_at_the_deadline(backend: Backend) {
    let circle = MockServer::start(running()).await;
    circle.script([created()]);
    let relay = Relay::start_on(
        &backend,
        &config(
            &circle.url(),
            r#"{ first = "100ms", max = "200ms", deadline = "1s" }"#,
        ),
    )
    .await;
    push(&relay).await;
    let job = wait_pipeline(&relay, |p| !p["follow"]["stopped"].is_null()).await;
    let follow = &job["pipeline"]["follow"];
    assert_eq!(
        follow["stopped"],
        "the pipeline had not ended 1s after its trigger; relay stopped polling it"
    );
    assert_eq!(job["pipeline"]["state"], "running");
    // 100 ms, then 200 ms waits: the deadline allows at most five polls
    // (fewer on a loaded machine, never more).
    let polls = follow["polls"].as_u64().unwrap();
    assert!((1..=5).contains(&polls), "{polls} polls");
    assert_eq!(polls_of(&circle.requests()).len() as u64, polls);
    relay.stop().await;
}

/// `follow` where it cannot work is refused at the key, with what to do.
#[test]
fn follow_is_checked_where_it_is_set() {
    let with = |target: &str| {
        format!(
            r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "r"
to = ["t"]

[targets.t]
{target}
"#
        )
    };
    let problems = |target: &str| match relay::config::Config::from_toml(&with(target)) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let gitlab = problems(
        r#"kind = "gitlab"
project = "acme/deploy"
token = "glptt-x"
follow = true"#,
    );
    assert!(
        gitlab.contains(
            "targets.t.follow.token: is required to follow: a token with the read_api scope, like { env = \"GITLAB_API_TOKEN\" } (a trigger token cannot read pipelines)"
        ),
        "{gitlab}"
    );
    let http = problems(
        r#"kind = "http"
url = "http://127.0.0.1:9/"
follow = true"#,
    );
    assert!(http.contains("targets.t.follow"), "{http}");
    let pace = problems(
        r#"kind = "circleci"
project = "gh/acme/api"
token = "t"
follow = { first = "1m", max = "10s", deadline = "0s", concurrency = 0 }"#,
    );
    for key in [
        "follow.max: must be at least first",
        "follow.deadline: must be at least first",
        "follow.concurrency: must be at least 1",
    ] {
        assert!(pace.contains(key), "{key} in {pace}");
    }
    let config = relay::config::Config::from_toml(&with(
        r#"kind = "circleci"
project = "gh/acme/api"
token = "t"
follow = true"#,
    ))
    .unwrap();
    assert!(
        config.targets["t"]
            .describe()
            .ends_with(", follows each pipeline by polling (first after 10s, at most every 5m, for 1day)"),
        "{}",
        config.targets["t"].describe()
    );
    assert!(
        problems(
            r#"kind = "circleci"
project = "gh/acme/api"
token = "t"
follow = false"#
        )
        .is_empty()
    );
}
