//! Delivery that loses nothing, in-process: the retry schedule under a paused
//! clock (503s, a 429 with Retry-After, a 404), a target outage, the jobs
//! API and manual retries, and retention.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{MockServer, Relay, Reply, sign, test_client};

const SECRET: &str = "delivery-secret";
const CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":7,"created_at":"2026-11-22T10:00:00Z"}"#;

fn config(circle: &MockServer, delivery: &str, extra: &str) -> String {
    format!(
        r#"
[delivery]
{delivery}

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{}"
project = "gh/acme/api"
token = "circle-token"
parameters = {{ delivery = "{{{{ delivery }}}}" }}
{extra}
"#,
        circle.url()
    )
}

/// A push of a distinct commit (`n + 1`: an all-zero SHA would be a deletion).
fn push(n: usize) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": format!("{:040x}", n + 1), "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "change" }, "commits": []
    })
    .to_string()
    .into_bytes()
}

async fn post_push(relay: &Relay, n: usize) -> Value {
    let body = push(n);
    let (status, answer) = relay
        .post(
            "/hooks/github",
            &sign::github(SECRET, "push", &format!("delivery-{n}"), &body),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    answer
}

fn outcomes(relay: &Relay) -> Vec<(Option<u16>, String)> {
    relay
        .db()
        .prepare("SELECT status, outcome FROM attempts ORDER BY started_at, number")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Within `[base, base × 1.2]` (jitter only delays) plus a little slack for
/// the work between the answer and the next claim.
fn assert_gap(gap: Duration, base: Duration) {
    let slack = Duration::from_millis(50);
    assert!(
        gap >= base && gap <= base.mul_f64(1.2) + slack,
        "gap {gap:?} is outside [{base:?}, {:?}]",
        base.mul_f64(1.2) + slack
    );
}

#[tokio::test(start_paused = true)]
async fn three_503s_then_201_are_four_requests_on_the_backoff_schedule() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script((0..3).map(|_| Reply::new(503, r#"{"message":"try later"}"#)));
    let relay = Relay::start(&config(
        &circle,
        r#"backoff = { first = "2s", max = "30m", factor = 2.0 }"#,
        "",
    ))
    .await;
    post_push(&relay, 1).await;

    let requests = circle.wait_for_within(4, Duration::from_secs(60)).await;
    assert_gap(requests[1].at - requests[0].at, Duration::from_secs(2));
    assert_gap(requests[2].at - requests[1].at, Duration::from_secs(4));
    assert_gap(requests[3].at - requests[2].at, Duration::from_secs(8));
    // Nothing more, however long we wait.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(circle.requests().len(), 4);
    let bodies: Vec<Value> = requests.iter().map(|r| r.json()).collect();
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every retry sends the same request"
    );

    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 1)
        .await;
    assert_eq!(
        outcomes(&relay),
        vec![
            (Some(503), "retry_status".to_owned()),
            (Some(503), "retry_status".to_owned()),
            (Some(503), "retry_status".to_owned()),
            (Some(201), "delivered".to_owned()),
        ]
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_is_not_retried_sooner() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script([Reply::new(429, r#"{"message":"rate limited"}"#).header("Retry-After", "7")]);
    let relay = Relay::start(&config(
        &circle,
        r#"backoff = { first = "1s", max = "30m", factor = 2.0 }
throttle_floor = "1s""#,
        "",
    ))
    .await;
    post_push(&relay, 1).await;
    let requests = circle.wait_for_within(2, Duration::from_secs(60)).await;
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(7) && gap <= Duration::from_millis(7050),
        "Retry-After: 7 was not honoured: {gap:?}"
    );
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 1)
        .await;
    assert_eq!(outcomes(&relay)[0], (Some(429), "retry_throttled".to_owned()));
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_429_waits_at_least_the_throttle_floor() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script([Reply::new(429, "{}")]);
    let relay = Relay::start(&config(
        &circle,
        r#"backoff = { first = "1s", max = "30m", factor = 2.0 }
throttle_floor = "45s""#,
        "",
    ))
    .await;
    post_push(&relay, 1).await;
    let requests = circle.wait_for_within(2, Duration::from_secs(120)).await;
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(45) && gap <= Duration::from_millis(45_050),
        "{gap:?}"
    );
    relay.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_404_is_dead_after_one_attempt_with_the_targets_message() {
    let circle = MockServer::start(Reply::new(404, r#"{"message":"Project does not exist."}"#)).await;
    let relay = Relay::start(&config(&circle, "", "")).await;
    post_push(&relay, 1).await;
    circle.wait_for(1).await;
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'dead'", 1)
        .await;
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(circle.requests().len(), 1);
    let error: String = relay
        .db()
        .query_row("SELECT last_error FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(error, "404: Project does not exist.");
    assert_eq!(outcomes(&relay), vec![(Some(404), "dead_status".to_owned())]);
    relay.stop().await;
}

/// A target that takes longer to answer than the lease: relay renews the
/// lease while the send runs, so the job is not taken over and sent again.
#[tokio::test]
async fn a_send_that_outlasts_its_lease_is_renewed_not_repeated() {
    let circle = MockServer::start(Reply::new(201, CREATED).after(Duration::from_secs(4))).await;
    let relay = Relay::start(&config(&circle, "timeout = \"10s\"\nlease = \"1500ms\"", "")).await;
    post_push(&relay, 1).await;
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 1)
        .await;
    // Another lease's worth: a takeover would have sent by now.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(circle.requests().len(), 1, "one send, however long it took");
    let (attempts, recorded): (i64, i64) = relay
        .db()
        .query_row(
            "SELECT j.attempts, (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id) FROM jobs j",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((attempts, recorded), (1, 1));
    let duration_ms: i64 = relay
        .db()
        .query_row("SELECT duration_ms FROM attempts", [], |r| r.get(0))
        .unwrap();
    assert!(duration_ms >= 4000, "the attempt took {duration_ms} ms");
    assert_eq!(outcomes(&relay), vec![(Some(201), "delivered".to_owned())]);
    relay.stop().await;
}

#[tokio::test]
async fn a_target_outage_delays_but_loses_nothing() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(
        &circle,
        r#"attempts = 40
backoff = { first = "50ms", max = "300ms", factor = 2.0 }"#,
        "",
    ))
    .await;
    circle.stop();
    for n in 0..20 {
        post_push(&relay, n).await;
    }
    // Connections are refused for a while: every job retries, none dies.
    relay
        .wait_count(
            "SELECT COUNT(DISTINCT job_id) FROM attempts WHERE outcome = 'retry_connect'",
            20,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(relay.count("SELECT COUNT(*) FROM jobs WHERE state = 'dead'"), 0);

    let back = circle.restart().await;
    let requests = back.wait_for(20).await;
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 20)
        .await;
    let mut deliveries: Vec<String> = requests
        .iter()
        .map(|r| r.json()["parameters"]["delivery"].as_str().unwrap().to_owned())
        .collect();
    deliveries.sort();
    deliveries.dedup();
    assert_eq!(deliveries.len(), 20, "every webhook reached the target once");
    assert_eq!(relay.count("SELECT COUNT(*) FROM jobs WHERE state = 'dead'"), 0);
    relay.stop().await;
    back.stop();
}

/// relay with an admin listener (and a token) on port 0.
async fn relay_with_admin(circle: &MockServer, token: Option<&str>) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let admin = match token {
        Some(t) => format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{t}\"\n"),
        None => "[admin]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
    };
    let text = format!(
        "{}{admin}{}",
        crate::support::base_config(&dir.path().join("relay.db")),
        config(circle, "attempts = 1", "")
    );
    Relay::start_with(dir, &text).await
}

async fn admin(relay: &Relay, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("http://{}{path}", relay.admin.unwrap());
    let mut request = test_client().request(method, url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn dead_jobs_are_listed_inspected_and_retried_by_hand() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script((0..3).map(|_| Reply::new(422, r#"{"message":"Unknown parameter delivery"}"#)));
    let token = Some("admin-token-3e1f");
    let relay = relay_with_admin(&circle, token).await;
    for n in 0..3 {
        post_push(&relay, n).await;
    }
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'dead'", 3)
        .await;

    // Without the token: 401, and nothing about the jobs.
    let (status, answer) = admin(&relay, reqwest::Method::GET, "/api/jobs?state=dead", None).await;
    assert_eq!((status, answer["error"].as_str()), (401, Some("unauthorized")));

    let (status, answer) = admin(&relay, reqwest::Method::GET, "/api/jobs?state=dead", token).await;
    assert_eq!(status, 200);
    let dead = answer["jobs"].as_array().unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter()
            .all(|j| j["state"] == "dead" && j["target"] == "circle" && j["retryable"] == true)
    );
    let id = dead[0]["id"].as_str().unwrap().to_owned();

    let (status, job) = admin(&relay, reqwest::Method::GET, &format!("/api/jobs/{id}"), token).await;
    assert_eq!(status, 200);
    assert_eq!(job["last_error"], "422: Unknown parameter delivery");
    assert_eq!(
        job["request"]["url"],
        format!("{}/api/v2/project/gh/acme/api/pipeline", circle.url())
    );
    assert_eq!(
        job["request"]["auth"],
        json!({ "type": "header", "name": "Circle-Token" })
    );
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["status"], 422);
    assert_eq!(history[0]["outcome"], "dead_status");
    assert!(history[0]["duration_ms"].is_u64() && history[0]["started_at"].is_string());

    // Retry one: it is sent again and delivered this time.
    let (status, answer) = admin(
        &relay,
        reqwest::Method::POST,
        &format!("/api/jobs/{id}/retry"),
        token,
    )
    .await;
    assert_eq!((status, answer), (200, json!({ "job": id, "state": "queued" })));
    circle.wait_for(4).await;
    relay
        .wait_count(
            &format!("SELECT COUNT(*) FROM jobs WHERE id = '{id}' AND state = 'done'"),
            1,
        )
        .await;
    let (_, job) = admin(&relay, reqwest::Method::GET, &format!("/api/jobs/{id}"), token).await;
    let numbers: Vec<u64> = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2], "the history keeps both attempts");

    // A done job is not retried; an unknown one is 404.
    let (status, answer) = admin(
        &relay,
        reqwest::Method::POST,
        &format!("/api/jobs/{id}/retry"),
        token,
    )
    .await;
    assert_eq!((status, answer["error"].as_str()), (409, Some("not_dead")));
    let (status, _) = admin(
        &relay,
        reqwest::Method::POST,
        "/api/jobs/01a20000-0000-7000-8000-000000000000/retry",
        token,
    )
    .await;
    assert_eq!(status, 404);

    // The rest, by target and time range, through the CLI.
    let dir = tempfile::tempdir().unwrap();
    let cli_config = dir.path().join("relay.toml");
    std::fs::write(
        &cli_config,
        format!(
            "[admin]\nlisten = \"{}\"\ntoken = \"admin-token-3e1f\"\n",
            relay.admin.unwrap()
        ),
    )
    .unwrap();
    let output = relay_jobs(&cli_config, &["retry", "--target", "circle", "--since", "1h"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "queued 2 dead job(s) of circle\n"
    );
    circle.wait_for(6).await;
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 3)
        .await;

    let output = relay_jobs(&cli_config, &["list", "--state", "dead"]).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "no jobs\n");

    let (status, events) = admin(&relay, reqwest::Method::GET, "/api/events", token).await;
    assert_eq!(status, 200);
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e["done"] == 1 && e["dead"] == 0 && e["source"] == "gh")
    );
    relay.stop().await;
}

/// `relay jobs -c CONFIG ARGS…`, off the test's runtime, which serves relay.
async fn relay_jobs(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(crate::support::relay_binary());
    command.args(["jobs", "-c"]).arg(config).args(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn finished_events_are_purged_after_retention_and_pending_ones_kept() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[store]\nurl = \"sqlite://{}\"\nretention = \"1s\"\n{}",
        dir.path().join("relay.db").display(),
        config(
            &circle,
            r#"backoff = { first = "1h", max = "1h", factor = 2.0 }"#,
            ""
        )
    );
    let relay = Relay::start_with(dir, &text).await;
    post_push(&relay, 1).await;
    circle.wait_for(1).await;
    relay
        .wait_count("SELECT COUNT(*) FROM jobs WHERE state = 'done'", 1)
        .await;
    // The next one fails and waits an hour for its retry: it must survive.
    circle.script([Reply::new(503, "{}")]);
    post_push(&relay, 2).await;
    circle.wait_for(2).await;
    relay.wait_count("SELECT COUNT(*) FROM events", 1).await;
    relay.wait_count("SELECT COUNT(*) FROM attempts", 1).await;
    let kept: String = relay
        .db()
        .query_row("SELECT state FROM jobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, "queued");
    relay.stop().await;
}
