//! Delivery that loses nothing, in-process: the retry schedule (503s, a 429
//! with Retry-After, a 404), a target outage, the jobs API and manual
//! retries, and retention. Every case runs on SQLite and on PostgreSQL and
//! reads relay's state through the admin API. On SQLite the schedule cases
//! run under tokio's paused clock, at full length; PostgreSQL decides due
//! times with its own clock, so there they run in real time, scaled down.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply, config_on, sign, test_client};

crate::on_both_backends! {
    cases: [
        a_send_that_outlasts_its_lease_is_renewed_not_repeated,
        jobs_that_find_every_slot_taken_wait_their_turn_and_go_once_each,
        a_target_outage_delays_but_loses_nothing,
        dead_jobs_are_listed_inspected_and_retried_by_hand,
        finished_events_are_purged_after_retention_and_pending_ones_kept,
    ],
    paused_on_sqlite: [
        three_503s_then_201_are_four_requests_on_the_backoff_schedule,
        a_429_with_retry_after_is_not_retried_sooner,
        a_429_waits_at_least_the_throttle_floor,
        a_404_is_dead_after_one_attempt_with_the_targets_message,
    ],
}

/// The schedule cases' time unit and the slack allowed after a due time:
/// on SQLite's paused clock, seconds and the work between an answer and the
/// next claim; on PostgreSQL, in real time, a second each. The slack is wide
/// because CI runs the whole suite at once on two cores (300 ms was once
/// overrun there); doubling stays visible because a gap's upper bound,
/// `1.2 × base + 1 s`, is still below the next step's lower bound.
fn pace(backend: &Backend) -> (Duration, Duration) {
    if backend.is_sqlite() {
        (Duration::from_secs(1), Duration::from_millis(50))
    } else {
        (Duration::from_secs(1), Duration::from_secs(1))
    }
}

/// A duration as the config spells it.
fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

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

/// `(status, outcome)` of every attempt through `/api/jobs/{id}`, in order.
async fn outcomes(relay: &Relay) -> Vec<(Option<u64>, String)> {
    relay
        .attempts()
        .await
        .into_iter()
        .map(|(_, status, outcome)| (status, outcome))
        .collect()
}

/// The `delivery` parameter each request carried, in arrival order.
pub fn deliveries(circle: &MockServer) -> Vec<String> {
    circle
        .requests()
        .iter()
        .map(|r| r.json()["parameters"]["delivery"].as_str().unwrap().to_owned())
        .collect()
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

/// Within `[base, base × 1.2]` (jitter only delays) plus `slack` for the
/// work between the answer and the next claim.
fn assert_gap(gap: Duration, base: Duration, slack: Duration) {
    assert!(
        gap >= base && gap <= base.mul_f64(1.2) + slack,
        "gap {gap:?} is outside [{base:?}, {:?}]",
        base.mul_f64(1.2) + slack
    );
}

async fn three_503s_then_201_are_four_requests_on_the_backoff_schedule(backend: Backend) {
    let (unit, slack) = pace(&backend);
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script((0..3).map(|_| Reply::new(503, r#"{"message":"try later"}"#)));
    let relay = Relay::start_on(
        &backend,
        &config(
            &circle,
            &format!(
                r#"backoff = {{ first = "{}", max = "30m", factor = 2.0 }}"#,
                ms(unit * 2)
            ),
            "",
        ),
    )
    .await;
    post_push(&relay, 1).await;

    let requests = circle.wait_for_within(4, Duration::from_secs(60)).await;
    assert_gap(requests[1].at - requests[0].at, unit * 2, slack);
    assert_gap(requests[2].at - requests[1].at, unit * 4, slack);
    assert_gap(requests[3].at - requests[2].at, unit * 8, slack);
    let bodies: Vec<Value> = requests.iter().map(|r| r.json()).collect();
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every retry sends the same request"
    );

    let done = relay.wait_done(1).await;
    assert_eq!(done[0]["attempts"], 4, "{done:#?}");
    assert_eq!(
        outcomes(&relay).await,
        vec![
            (Some(503), "retry_status".to_owned()),
            (Some(503), "retry_status".to_owned()),
            (Some(503), "retry_status".to_owned()),
            (Some(201), "delivered".to_owned()),
        ]
    );
    // Nothing more: no retry is pending, and the next webhook is the next
    // request the target sees.
    assert_nothing_pending(&relay).await;
    post_push(&relay, 2).await;
    circle.wait_for(5).await;
    relay.wait_done(2).await;
    assert_eq!(
        deliveries(&circle),
        [
            "delivery-1",
            "delivery-1",
            "delivery-1",
            "delivery-1",
            "delivery-2"
        ]
    );
    relay.stop().await;
}

async fn a_429_with_retry_after_is_not_retried_sooner(backend: Backend) {
    let (unit, slack) = pace(&backend);
    // Retry-After counts whole seconds: 7 on the paused clock, 2 in real time.
    let retry_after = if backend.is_sqlite() { 7 } else { 2 };
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script([
        Reply::new(429, r#"{"message":"rate limited"}"#).header("Retry-After", &retry_after.to_string())
    ]);
    let relay = Relay::start_on(
        &backend,
        &config(
            &circle,
            &format!(
                "backoff = {{ first = \"{}\", max = \"30m\", factor = 2.0 }}\nthrottle_floor = \"{}\"",
                ms(unit),
                ms(unit)
            ),
            "",
        ),
    )
    .await;
    post_push(&relay, 1).await;
    let requests = circle.wait_for_within(2, Duration::from_secs(60)).await;
    let gap = requests[1].at - requests[0].at;
    let wanted = Duration::from_secs(retry_after);
    assert!(
        gap >= wanted && gap <= wanted + slack,
        "Retry-After: {retry_after} was not honoured: {gap:?}"
    );
    relay.wait_done(1).await;
    assert_eq!(
        outcomes(&relay).await,
        vec![
            (Some(429), "retry_throttled".to_owned()),
            (Some(201), "delivered".to_owned()),
        ]
    );
    relay.stop().await;
}

async fn a_429_waits_at_least_the_throttle_floor(backend: Backend) {
    let (unit, slack) = pace(&backend);
    // Far above the backoff: 45s on the paused clock, 3s in real time.
    let floor = if backend.is_sqlite() {
        Duration::from_secs(45)
    } else {
        Duration::from_secs(3)
    };
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script([Reply::new(429, "{}")]);
    let relay = Relay::start_on(
        &backend,
        &config(
            &circle,
            &format!(
                "backoff = {{ first = \"{}\", max = \"30m\", factor = 2.0 }}\nthrottle_floor = \"{}\"",
                ms(unit),
                ms(floor)
            ),
            "",
        ),
    )
    .await;
    post_push(&relay, 1).await;
    let requests = circle.wait_for_within(2, Duration::from_secs(120)).await;
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= floor && gap <= floor + slack, "{gap:?}");
    relay.wait_done(1).await;
    assert_eq!(
        outcomes(&relay).await,
        vec![
            (Some(429), "retry_throttled".to_owned()),
            (Some(201), "delivered".to_owned()),
        ]
    );
    relay.stop().await;
}

async fn a_404_is_dead_after_one_attempt_with_the_targets_message(backend: Backend) {
    let circle = MockServer::start(Reply::new(404, r#"{"message":"Project does not exist."}"#)).await;
    let relay = Relay::start_on(&backend, &config(&circle, "", "")).await;
    post_push(&relay, 1).await;
    circle.wait_for(1).await;
    let dead = relay.wait_jobs("state=dead", 1).await;
    assert_eq!(dead[0]["attempts"], 1);
    assert_eq!(
        dead[0]["last_error"],
        "404: Project does not exist.; API v2 needs a personal API token (a project API token does not work here), or the project slug is wrong"
    );
    assert_eq!(dead[0]["retryable"], true);
    assert_eq!(
        outcomes(&relay).await,
        vec![(Some(404), "dead_status".to_owned())]
    );
    // Dead is final: nothing is left to retry, and the next webhook's
    // request is the next one the target sees.
    assert_nothing_pending(&relay).await;
    post_push(&relay, 2).await;
    circle.wait_for(2).await;
    relay.wait_jobs("state=dead", 2).await;
    assert_eq!(deliveries(&circle), ["delivery-1", "delivery-2"]);
    assert_eq!(relay.queue().await["dead"], 2);
    relay.stop().await;
}

/// A target that takes longer to answer than the lease: relay renews the
/// lease while the send runs, so the job is not taken over and sent again.
async fn a_send_that_outlasts_its_lease_is_renewed_not_repeated(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED).after(Duration::from_secs(4))).await;
    let relay = Relay::start_on(
        &backend,
        &config(&circle, "timeout = \"10s\"\nlease = \"1500ms\"", ""),
    )
    .await;
    post_push(&relay, 1).await;
    let done = relay.wait_done(1).await;
    // A takeover would have claimed the job when its 1.5s lease ran out,
    // during the 4s send, and its request would have arrived by now.
    assert_eq!(circle.requests().len(), 1, "one send, however long it took");
    assert_eq!(done[0]["attempts"], 1);
    let job = relay.job(done[0]["id"].as_str().unwrap()).await;
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{job:#}");
    assert_eq!(
        (history[0]["status"].as_u64(), history[0]["outcome"].as_str()),
        (Some(201), Some("delivered"))
    );
    let duration_ms = history[0]["duration_ms"].as_u64().unwrap();
    assert!(duration_ms >= 4000, "the attempt took {duration_ms} ms");
    assert_nothing_pending(&relay).await;
    relay.stop().await;
}

/// With the target's one send slot taken, the jobs of the next webhooks wait
/// for it in memory, leased at their commit, on either store (a job queued
/// instead would cost a claim and a row version more). The target sees one
/// send at a time, in the order the webhooks came, each job once, though
/// each waits longer than its lease.
async fn jobs_that_find_every_slot_taken_wait_their_turn_and_go_once_each(backend: Backend) {
    let send = Duration::from_secs(2);
    let circle = MockServer::start(Reply::new(201, CREATED).after(send)).await;
    let relay = Relay::start_on(
        &backend,
        &config(&circle, "concurrency = 1\ntimeout = \"10s\"\nlease = \"1s\"", ""),
    )
    .await;
    for n in 0..3 {
        post_push(&relay, n).await;
    }
    circle.wait_for(1).await;
    let mut states: Vec<String> = relay
        .jobs("")
        .await
        .iter()
        .map(|j| j["state"].as_str().unwrap().to_owned())
        .collect();
    states.sort();
    assert_eq!(
        states,
        ["in_flight", "in_flight", "in_flight"],
        "the first job sending, the other two leased, waiting in memory for its slot"
    );
    let done = relay.wait_done(3).await;
    assert!(done.iter().all(|j| j["attempts"] == 1), "{done:#?}");
    assert_eq!(
        deliveries(&circle),
        ["delivery-0", "delivery-1", "delivery-2"],
        "one request a job, in the order the webhooks came"
    );
    let arrivals: Vec<_> = circle.requests().iter().map(|r| r.at).collect();
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= send - Duration::from_millis(50),
            "a send began {gap:?} after the one before it, which takes {send:?}: two in flight at once"
        );
    }
    assert_nothing_pending(&relay).await;
    relay.stop().await;
}

async fn a_target_outage_delays_but_loses_nothing(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start_on(
        &backend,
        &config(
            &circle,
            r#"attempts = 40
backoff = { first = "50ms", max = "300ms", factor = 2.0 }"#,
            "",
        ),
    )
    .await;
    circle.stop();
    for n in 0..20 {
        post_push(&relay, n).await;
    }
    // Connections are refused for a while: every job retries, again and
    // again, and none dies.
    let deadline = std::time::Instant::now() + crate::support::PATIENCE;
    loop {
        let jobs = relay.jobs("").await;
        assert_eq!(jobs.len(), 20);
        assert!(jobs.iter().all(|j| j["state"] != "dead"), "{jobs:#?}");
        if jobs.iter().all(|j| j["attempts"].as_u64().unwrap() >= 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every job was retried: {jobs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for job in relay.job_details().await {
        let history = job["history"].as_array().unwrap();
        assert!(
            history
                .iter()
                .all(|a| a["outcome"] == "retry_connect" && a["status"].is_null()),
            "{job:#}"
        );
    }

    let back = circle.restart().await;
    back.wait_for(20).await;
    relay.wait_done(20).await;
    let mut delivered = deliveries(&back);
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 20, "every webhook reached the target once");
    assert_eq!(back.requests().len(), 20, "and only once");
    assert_eq!(relay.queue().await["dead"], 0);
    relay.stop().await;
    back.stop();
}

/// relay with an admin listener with a token, on port 0.
async fn relay_with_admin(backend: &Backend, circle: &MockServer, token: &str) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let rest = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n{}",
        config(circle, "attempts = 1", "")
    );
    let text = config_on(backend, dir.path(), "", &rest);
    let mut relay = Relay::start_with(dir, &text).await;
    relay.api_token = Some(token.to_owned());
    relay
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

async fn dead_jobs_are_listed_inspected_and_retried_by_hand(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    circle.script((0..3).map(|_| Reply::new(422, r#"{"message":"Unknown parameter delivery"}"#)));
    let token = Some("admin-token-3e1f");
    let relay = relay_with_admin(&backend, &circle, "admin-token-3e1f").await;
    for n in 0..3 {
        post_push(&relay, n).await;
    }
    relay.wait_jobs("state=dead", 3).await;

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
    let done = relay.wait_done(1).await;
    assert_eq!(done[0]["id"], id.as_str());
    let job = relay.job(&id).await;
    assert_eq!(job["last_error"], Value::Null, "{job:#}");
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
    relay.wait_done(3).await;

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

async fn finished_events_are_purged_after_retention_and_pending_ones_kept(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_on(
        &backend,
        dir.path(),
        "retention = \"1s\"",
        &config(
            &circle,
            r#"backoff = { first = "1h", max = "1h", factor = 2.0 }"#,
            "",
        ),
    );
    let relay = Relay::start_with(dir, &text).await;
    let first = post_push(&relay, 1).await;
    circle.wait_for(1).await;
    relay.wait_done(1).await;
    // The next one fails and waits an hour for its retry: it must survive.
    circle.script([Reply::new(503, "{}")]);
    let second = post_push(&relay, 2).await;
    circle.wait_for(2).await;
    let deadline = std::time::Instant::now() + crate::support::PATIENCE;
    let events = loop {
        let events = relay.events().await;
        if events.len() == 1 {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the finished event was not purged: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(events[0]["id"], second["event"], "{first} was the one purged");
    assert_eq!(
        (events[0]["jobs"].as_u64(), events[0]["pending"].as_u64()),
        (Some(1), Some(1))
    );
    let kept = relay.wait_jobs("state=queued", 1).await;
    assert_eq!(kept[0]["attempts"], 1);
    assert_eq!(kept[0]["event_id"], second["event"]);
    assert_eq!(relay.jobs("").await.len(), 1, "the done job went with its event");
    assert_eq!(
        outcomes(&relay).await,
        vec![(Some(503), "retry_status".to_owned())]
    );
    relay.stop().await;
}
