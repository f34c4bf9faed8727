//! The loop guard and payload forwarding: each rule drops exactly what it
//! should, and says so in the answer, in `relay_dropped_total{rule}` and in
//! the store; a two-project trigger loop stops at `max_hops`; and payload
//! URLs hand the original body to a CI job, and nothing to anyone else.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Backend, Daemon, MockServer, Relay, Reply, config_on, hex, hmac_sha256, sign, test_client,
};

crate::on_both_backends! {
    cases: [
        ci_outcomes_are_dropped_unless_a_route_asks_for_pipelines,
        events_at_max_hops_are_dropped_below_it_they_carry_one_more,
        the_dedupe_window_triggers_a_target_once_per_repo_ref_and_sha_across_restarts,
        retention_forgets_closed_dedupe_windows_and_logs_how_many,
        the_burst_breaker_holds_back_the_excess_per_target,
        skip_markers_and_ignored_pushers_count_in_the_metrics,
        a_two_project_trigger_loop_stops_at_max_hops,
        with_the_dedupe_window_the_same_loop_stops_at_its_first_repeat,
        payload_urls_return_the_original_body_and_refuse_tampering,
        payload_urls_expire,
        each_change_of_a_bitbucket_push_forwards_the_whole_original_body,
        a_pipeline_event_exposes_its_status_id_source_and_variables,
    ],
}

const GITLAB_CREATED: &str = r#"{"id":1,"status":"created","ref":"main"}"#;

/// relay on `backend` with the admin listener (for /metrics and the API)
/// and `rest` after the base.
async fn relay(backend: &Backend, rest: &str) -> Relay {
    relay_in(backend, tempfile::tempdir().unwrap(), rest).await
}

async fn relay_in(backend: &Backend, dir: tempfile::TempDir, rest: &str) -> Relay {
    let text = config_on(backend, dir.path(), "", rest);
    Relay::start_with(dir, &text).await
}

async fn dropped(relay: &Relay, rule: &str) -> f64 {
    relay
        .metric(&format!("relay_dropped_total{{rule=\"{rule}\"}}"))
        .await
}

/// The drops stored with an event, as `/api/events` shows them:
/// (route, target, rule).
async fn stored_drops(relay: &Relay, event: &Value) -> Vec<(Option<String>, Option<String>, String)> {
    let stored = relay.event(event["event"].as_str().unwrap()).await;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    stored["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (text(&d["route"]), text(&d["target"]), text(&d["rule"]).unwrap()))
        .collect()
}

fn push(sha: &str) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111", "after": sha,
        "repository": { "full_name": "acme/api" }, "pusher": { "name": "ada" },
        "head_commit": { "message": "change" }, "commits": []
    })
    .to_string()
    .into_bytes()
}

async fn post_github(relay: &Relay, body: Vec<u8>, extra: &[(&str, &str)]) -> Value {
    let mut headers = sign::github("s", "push", &uuid::Uuid::new_v4().to_string(), &body);
    headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

fn pipeline_hook(project: &str, sha: &str, status: &str, hop: Option<u32>) -> String {
    let variables: Vec<Value> = hop
        .map(|h| json!({ "key": "RELAY_HOP", "value": h.to_string() }))
        .into_iter()
        .collect();
    json!({
        "object_kind": "pipeline",
        "object_attributes": { "id": 7, "ref": "main", "tag": false, "sha": sha, "source": "trigger",
                               "status": status, "variables": variables },
        "project": { "path_with_namespace": project }
    })
    .to_string()
}

async fn post_gitlab(relay: &Relay, body: String) -> Value {
    let delivery = uuid::Uuid::new_v4().to_string();
    let (status, answer) = relay
        .post(
            "/hooks/gitlab",
            &sign::gitlab("t", "Pipeline Hook", &delivery),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    answer
}

const SOURCES: &str = r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"
"#;

async fn ci_outcomes_are_dropped_unless_a_route_asks_for_pipelines(backend: Backend) {
    let relay = relay(
        &backend,
        &format!(
            r#"{SOURCES}
[[routes]]
name = "pushes"
to = ["t"]

[targets.t]
kind = "http"
url = "http://127.0.0.1:9/t"
dry_run = true
"#
        ),
    )
    .await;
    let answer = post_gitlab(
        &relay,
        pipeline_hook("acme/api", &"2".repeat(40), "success", None),
    )
    .await;
    assert_eq!(answer["jobs"], 0);
    assert_eq!(answer["dropped"][0]["rule"], "ci_outcome");
    let body = json!({ "workflow_run": { "id": 9, "head_branch": "main", "head_sha": "2".repeat(40),
                                         "event": "push", "conclusion": "success" },
                       "repository": { "full_name": "acme/api" } })
    .to_string()
    .into_bytes();
    let headers = sign::github("s", "workflow_run", "wr-1", &body);
    let (_, answer2) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(answer2["dropped"][0]["rule"], "ci_outcome");
    assert_eq!(dropped(&relay, "ci_outcome").await, 2.0);
    assert_eq!(
        stored_drops(&relay, &answer).await,
        vec![(None, None, "ci_outcome".to_owned())]
    );
    // A push is not a CI outcome.
    let push_answer = post_github(&relay, push(&"3".repeat(40)), &[]).await;
    assert_eq!(push_answer["jobs"], 1);
    relay.stop().await;
}

async fn events_at_max_hops_are_dropped_below_it_they_carry_one_more(backend: Backend) {
    let target = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = relay(
        &backend,
        &format!(
            r#"
[loop_guard]
max_hops = 3
dedupe_window = "0s"
{SOURCES}
[[routes]]
name = "chain"
events = ["push", "pipeline"]
to = ["deploy", "mirror"]

[targets.deploy]
kind = "gitlab"
base_url = "{url}"
project = "acme/deploy"
token = "trigger"

[targets.mirror]
kind = "http"
url = "{url}/mirror"
"#,
            url = target.url()
        ),
    )
    .await;
    // From a pipeline variable: 2 is routed (its triggers carry 3), 3 is dropped.
    let below = post_gitlab(
        &relay,
        pipeline_hook("acme/a", &"a".repeat(40), "success", Some(2)),
    )
    .await;
    assert_eq!(below["jobs"], 2);
    let at = post_gitlab(
        &relay,
        pipeline_hook("acme/a", &"b".repeat(40), "success", Some(3)),
    )
    .await;
    assert_eq!(
        (at["jobs"].clone(), at["dropped"][0]["rule"].clone()),
        (json!(0), json!("hop_limit"))
    );
    // From the X-Relay-Hop header another relay sends.
    let header_below = post_github(&relay, push(&"c".repeat(40)), &[("X-Relay-Hop", "2")]).await;
    assert_eq!(header_below["jobs"], 2);
    let header_at = post_github(&relay, push(&"d".repeat(40)), &[("X-Relay-Hop", "3")]).await;
    assert_eq!(header_at["dropped"][0]["rule"], "hop_limit");

    let requests = target.wait_for(4).await;
    let mut hops: Vec<String> = requests
        .iter()
        .map(|r| match r.path() {
            "/mirror" => r.header("x-relay-hop").unwrap().to_owned(),
            _ => r.json()["variables"]["RELAY_HOP"].as_str().unwrap().to_owned(),
        })
        .collect();
    hops.sort();
    assert_eq!(hops, vec!["3", "3", "3", "3"]);
    assert_eq!(dropped(&relay, "hop_limit").await, 2.0);
    assert_eq!(
        stored_drops(&relay, &at).await,
        vec![(None, None, "hop_limit".to_owned())]
    );
    relay.stop().await;
}

/// A GitHub source and one route to two dry-run targets, with the loop
/// guard's dedupe window `window`.
fn dedupe_config(window: &str) -> String {
    format!(
        r#"
[loop_guard]
dedupe_window = "{window}"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "builds"
to = ["one", "two"]

[targets.one]
kind = "http"
url = "http://127.0.0.1:9/one"
dry_run = true

[targets.two]
kind = "http"
url = "http://127.0.0.1:9/two"
dry_run = true
"#
    )
}

async fn the_dedupe_window_triggers_a_target_once_per_repo_ref_and_sha_across_restarts(backend: Backend) {
    let rest = &dedupe_config("5s");
    let first = relay(&backend, rest).await;
    let sha = "e".repeat(40);
    let a = post_github(&first, push(&sha), &[]).await;
    assert_eq!(a["jobs"], 2);
    // The same commit again (a mirror, a second hook…): both targets held back.
    let b = post_github(&first, push(&sha), &[]).await;
    assert_eq!(b["jobs"], 0);
    let rules: Vec<(&str, &str)> = b["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["target"].as_str().unwrap(), d["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(rules, vec![("one", "dedupe"), ("two", "dedupe")]);
    assert_eq!(dropped(&first, "dedupe").await, 2.0);
    assert_eq!(
        stored_drops(&first, &b).await,
        vec![
            (
                Some("builds".to_owned()),
                Some("one".to_owned()),
                "dedupe".to_owned()
            ),
            (
                Some("builds".to_owned()),
                Some("two".to_owned()),
                "dedupe".to_owned()
            ),
        ]
    );
    // Another commit is not a duplicate.
    assert_eq!(post_github(&first, push(&"f".repeat(40)), &[]).await["jobs"], 2);
    let dir = first.stop_keeping_dir().await;

    // The window lives in the store: a restart remembers it...
    let second = relay_in(&backend, dir, rest).await;
    assert_eq!(post_github(&second, push(&sha), &[]).await["jobs"], 0);
    // ...until it passes.
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(post_github(&second, push(&sha), &[]).await["jobs"], 2);
    second.stop().await;
}

/// Posts a signed push of `sha` to a relay binary; how many jobs it queued.
async fn post_to_daemon(daemon: &Daemon, sha: String) -> u64 {
    let body = push(&sha);
    let headers = sign::github("s", "push", &uuid::Uuid::new_v4().to_string(), &body);
    let mut request = test_client().post(daemon.url("/hooks/github"));
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let answer = request.body(body).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let answer: Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    answer["jobs"].as_u64().unwrap()
}

/// On SQLite the dedupe keys are looked up in an index kept off the
/// database file: a restart reads back from the store's log the keys whose
/// window is still open, says how many (a restart in a busy window takes a
/// moment for them), and holds their commits back as before; a key whose
/// window closed before the restart stays in the log for the purge, and
/// its commit triggers again.
#[tokio::test]
async fn a_restart_on_sqlite_reads_the_open_dedupe_keys_back_and_says_how_many() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the keys taken after the sleep are still open when the
    // second relay reads them back, on a CI machine running every test at once.
    let text = config_on(&Backend::Sqlite, dir.path(), "", &dedupe_config("8s"));
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let first = Daemon::start(&config, &[]);
    assert_eq!(post_to_daemon(&first, "a".repeat(40)).await, 2);
    tokio::time::sleep(Duration::from_millis(8100)).await;
    assert_eq!(post_to_daemon(&first, "b".repeat(40)).await, 2);
    assert_eq!(post_to_daemon(&first, "c".repeat(40)).await, 2);
    let (status, _) = first.terminate();
    assert!(status.success());

    let second = Daemon::start(&config, &[]);
    // Logged before relay answers; the log's own thread may write it later.
    second.wait_log("dedupe keys are read back", 1);
    assert_eq!(
        second.logged_numbers("dedupe keys are read back", "keys"),
        [4],
        "a key for each open commit and target, none for the closed one:\n{}",
        second.logs()
    );
    assert_eq!(
        post_to_daemon(&second, "b".repeat(40)).await,
        0,
        "held back after the restart"
    );
    assert_eq!(
        post_to_daemon(&second, "a".repeat(40)).await,
        2,
        "its window closed before the restart"
    );
    assert_eq!(post_to_daemon(&second, "d".repeat(40)).await, 2);
    let (status, _) = second.terminate();
    assert!(status.success());
}

/// The keys whose window has closed are forgotten by the retention purge,
/// which says how many in its log line; until then a key holds its commit
/// back, and once forgotten the commit triggers again.
async fn retention_forgets_closed_dedupe_windows_and_logs_how_many(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    // A pass of the purge every second (retention ÷ 4, a second at least).
    let text = config_on(&backend, dir.path(), "retention = \"1s\"", &dedupe_config("2s"));
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config, &[]);
    let post = |sha: String| post_to_daemon(&daemon, sha);
    let shas: Vec<String> = ["a", "b", "c"].iter().map(|c| c.repeat(40)).collect();
    for sha in &shas {
        assert_eq!(post(sha.clone()).await, 2);
    }
    assert_eq!(post(shas[0].clone()).await, 0, "held back within its window");

    let forgotten = || -> u64 {
        daemon
            .logged_numbers("finished events purged", "dedupe_keys")
            .iter()
            .sum()
    };
    let deadline = std::time::Instant::now() + crate::support::PATIENCE;
    // A key for each commit and target.
    while forgotten() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge did not say it forgot 6 keys:\n{}",
            daemon.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(forgotten(), 6, "{}", daemon.logs());
    assert_eq!(
        post(shas[0].clone()).await,
        2,
        "forgotten, the commit triggers again"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

async fn the_burst_breaker_holds_back_the_excess_per_target(backend: Backend) {
    let relay = relay(
        &backend,
        r#"
[loop_guard]
dedupe_window = "0s"
burst = { limit = 3, per = "1m" }

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "builds"
to = ["limited", "roomy"]

[targets.limited]
kind = "http"
url = "http://127.0.0.1:9/limited"
dry_run = true

[targets.roomy]
kind = "http"
url = "http://127.0.0.1:9/roomy"
dry_run = true
burst = false
"#,
    )
    .await;
    let mut answers = Vec::new();
    for n in 0..5 {
        answers.push(post_github(&relay, push(&format!("{:040x}", n + 1)), &[]).await);
    }
    let jobs: Vec<u64> = answers.iter().map(|a| a["jobs"].as_u64().unwrap()).collect();
    assert_eq!(jobs, vec![2, 2, 2, 1, 1]);
    for held in &answers[3..] {
        assert_eq!(held["dropped"][0]["target"], "limited");
        assert_eq!(held["dropped"][0]["rule"], "burst");
        assert!(
            held["dropped"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("burst limit is 3")
        );
    }
    assert_eq!(relay.jobs("target=limited").await.len(), 3);
    assert_eq!(relay.jobs("target=roomy").await.len(), 5);
    let mut burst_drops = Vec::new();
    for answer in &answers {
        burst_drops.extend(stored_drops(&relay, answer).await);
    }
    assert_eq!(
        burst_drops,
        vec![
            (
                Some("builds".to_owned()),
                Some("limited".to_owned()),
                "burst".to_owned()
            );
            2
        ]
    );
    assert_eq!(dropped(&relay, "burst").await, 2.0);
    relay.stop().await;
}

async fn skip_markers_and_ignored_pushers_count_in_the_metrics(backend: Backend) {
    let relay = relay(
        &backend,
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"
ignore_pushers = ["bot"]

[[routes]]
name = "builds"
to = ["t"]

[targets.t]
kind = "http"
url = "http://127.0.0.1:9/t"
dry_run = true
"#,
    )
    .await;
    let mut skip: Value = serde_json::from_slice(&push(&"1".repeat(40))).unwrap();
    skip["head_commit"]["message"] = json!("docs [ci skip]");
    let a = post_github(&relay, skip.to_string().into_bytes(), &[]).await;
    let mut bot: Value = serde_json::from_slice(&push(&"2".repeat(40))).unwrap();
    bot["pusher"]["name"] = json!("bot");
    let b = post_github(&relay, bot.to_string().into_bytes(), &[]).await;
    assert_eq!((a["jobs"].clone(), b["jobs"].clone()), (json!(0), json!(0)));
    assert_eq!(dropped(&relay, "skip_marker").await, 1.0);
    assert_eq!(dropped(&relay, "ignored_pusher").await, 1.0);
    assert_eq!(
        dropped(&relay, "burst").await,
        0.0,
        "every rule is exported from the start"
    );
    assert_eq!(
        stored_drops(&relay, &a).await,
        vec![(None, None, "skip_marker".to_owned())]
    );
    relay.stop().await;
}

/// Two GitLab projects, each pipeline triggering the other's. The test plays
/// GitLab: every trigger it receives becomes a successful pipeline whose
/// Pipeline Hook (carrying the trigger's variables) it posts back to relay.
async fn run_loop(backend: &Backend, dedupe_window: &str) -> (usize, Value) {
    let gitlab = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = relay(
        backend,
        &format!(
            r#"
[loop_guard]
max_hops = 3
dedupe_window = "{dedupe_window}"

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"

[[routes]]
name = "a-to-b"
repos = ["acme/a"]
events = ["pipeline"]
when = "status == 'success'"
to = ["project-b"]

[[routes]]
name = "b-to-a"
repos = ["acme/b"]
events = ["pipeline"]
when = "status == 'success'"
to = ["project-a"]

[targets.project-a]
kind = "gitlab"
base_url = "{url}"
project = "acme/a"
token = "trigger-a"
ref = "main"

[targets.project-b]
kind = "gitlab"
base_url = "{url}"
project = "acme/b"
token = "trigger-b"
ref = "main"
"#,
            url = gitlab.url()
        ),
    )
    .await;
    // Each project's pipelines run on its own head commit.
    let sha = |project: &str| {
        if project == "acme/a" {
            "a".repeat(40)
        } else {
            "b".repeat(40)
        }
    };
    let mut last = post_gitlab(&relay, pipeline_hook("acme/a", &sha("acme/a"), "success", None)).await;
    // Every trigger comes from a job an answer announced: the chain is over
    // when every announced trigger has arrived and been answered.
    let mut announced = last["jobs"].as_u64().unwrap() as usize;
    let mut answered = 0;
    while answered < announced {
        let seen = gitlab.wait_for(announced).await;
        assert_eq!(seen.len(), announced, "more triggers than jobs: {seen:#?}");
        for trigger in &seen[answered..] {
            assert!(
                trigger.header("x-gitlab-event").is_none(),
                "GitLab refuses triggers carrying it"
            );
            let project = match trigger.path() {
                "/api/v4/projects/acme%2Fa/trigger/pipeline" => "acme/a",
                "/api/v4/projects/acme%2Fb/trigger/pipeline" => "acme/b",
                other => panic!("unexpected trigger {other}"),
            };
            let hop: u32 = trigger.json()["variables"]["RELAY_HOP"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            last = post_gitlab(
                &relay,
                pipeline_hook(project, &sha(project), "success", Some(hop)),
            )
            .await;
            announced += last["jobs"].as_u64().unwrap() as usize;
        }
        answered = seen.len();
        assert!(answered < 20, "the loop did not stop");
    }
    // Every job the chain made was sent and is done: nothing is left to
    // trigger anything more.
    relay.wait_done(answered).await;
    assert_eq!(gitlab.requests().len(), answered);
    relay.stop().await;
    (answered, last)
}

async fn a_two_project_trigger_loop_stops_at_max_hops(backend: Backend) {
    let (triggers, last) = run_loop(&backend, "0s").await;
    // Hops 1, 2 and 3 are triggered; the pipeline at hop 3 is dropped.
    assert_eq!(triggers, 3);
    assert_eq!(last["jobs"], 0);
    assert_eq!(last["dropped"][0]["rule"], "hop_limit");
}

async fn with_the_dedupe_window_the_same_loop_stops_at_its_first_repeat(backend: Backend) {
    let (triggers, last) = run_loop(&backend, "10m").await;
    // A→B, B→A, then A→B again for the same commit: held back by dedupe.
    assert_eq!(triggers, 2);
    assert_eq!(last["dropped"][0]["rule"], "dedupe");
}

#[test]
fn relay_check_warns_about_the_loop_naming_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        r#"
[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"

[[routes]]
name = "a-to-b"
repos = ["acme/a"]
events = ["pipeline"]
to = ["project-b"]

[[routes]]
name = "b-to-a"
repos = ["acme/b"]
events = ["pipeline"]
to = ["project-a"]

[targets.project-a]
kind = "gitlab"
project = "acme/a"
dry_run = true

[targets.project-b]
kind = "circleci"
project = "gh/acme/b"
dry_run = true
"#,
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::relay_binary())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("a-to-b → project-b builds acme/b"), "{text}");
    assert!(text.contains("b-to-a → project-a builds acme/a"), "{text}");
    assert!(
        text.contains(
            "routes a-to-b, b-to-a form a cycle; loop_guard stops it at 3 hops (and dedupe_window 10m)"
        ),
        "{text}"
    );
}

const PAYLOAD_KEY: &str = "payload-key-5d2e";

async fn payload_relay(backend: &Backend, circle: &MockServer, ttl: &str) -> Relay {
    // The relay's own address is the public URL CI jobs use.
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let text = format!(
        r#"
[server]
listen = ["{addr}"]
public_url = "http://{addr}/"
payload_key = "{PAYLOAD_KEY}"
payload_ttl = "{ttl}"

[store]
url = "{db}"
retention = "1h"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "builds"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "t"
payload_parameter = "payload_url"
"#,
        db = backend.store_url(dir.path()),
        circle = circle.url()
    );
    Relay::start_with(dir, &text).await
}

async fn get(url: &str) -> (u16, Option<String>, Vec<u8>) {
    let response = test_client().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, content_type, response.bytes().await.unwrap().to_vec())
}

async fn payload_urls_return_the_original_body_and_refuse_tampering(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, r#"{"id":"p","number":1,"state":"created"}"#)).await;
    let relay = payload_relay(&backend, &circle, "1h").await;
    // A form-encoded GitHub delivery: the URL returns it exactly as received.
    let doc = push(&"9".repeat(40));
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&doc).unwrap())
        .finish();
    let mut headers = sign::github("s", "push", "payload-1", form.as_bytes());
    headers[0].1 = "application/x-www-form-urlencoded".into();
    let (status, answer) = relay.post("/hooks/github", &headers, form.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let event = answer["event"].as_str().unwrap().to_owned();
    let sent = circle.wait_for(1).await;
    let url = sent[0].json()["parameters"]["payload_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        url.starts_with(&format!("http://{}/payloads/{event}?exp=", relay.addr)),
        "{url}"
    );
    assert!(url.len() <= 512, "CircleCI parameter values hold 512 characters");

    let (status, content_type, body) = get(&url).await;
    assert_eq!(status, 200);
    assert_eq!(content_type.as_deref(), Some("application/x-www-form-urlencoded"));
    assert_eq!(body, form.as_bytes());

    let query: Vec<(String, String)> = form_urlencoded::parse(url.split_once('?').unwrap().1.as_bytes())
        .into_owned()
        .collect();
    let (exp, sig) = (&query[0].1, &query[1].1);
    let base = format!("http://{}/payloads", relay.addr);
    let other = uuid::Uuid::now_v7();
    let later: u64 = exp.parse::<u64>().unwrap() + 3600;
    for tampered in [
        format!("{base}/{other}?exp={exp}&sig={sig}"),
        format!("{base}/{event}?exp={later}&sig={sig}"),
        format!("{base}/{event}?exp={exp}&sig={}", "0".repeat(64)),
        format!("{base}/{event}?exp={exp}"),
    ] {
        let (status, _, body) = get(&tampered).await;
        assert_eq!(status, 403, "{tampered}: {}", String::from_utf8_lossy(&body));
    }
    // Correctly signed (the test knows the key) but for an unknown event: 404.
    let far = later + 3600;
    let good_sig = hex(&hmac_sha256(
        PAYLOAD_KEY.as_bytes(),
        &[format!("{other}.{far}").as_bytes()],
    ));
    let (status, _, _) = get(&format!("{base}/{other}?exp={far}&sig={good_sig}")).await;
    assert_eq!(status, 404);
    // A purged event (as retention would delete it): 404 even with its valid URL.
    assert_eq!(relay.delete_event(&event).await, 1);
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    relay.stop().await;
}

async fn payload_urls_expire(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, r#"{"id":"p","number":1,"state":"created"}"#)).await;
    let relay = payload_relay(&backend, &circle, "2s").await;
    let body = push(&"8".repeat(40));
    let headers = sign::github("s", "push", "payload-2", &body);
    let (status, _) = relay.post("/hooks/github", &headers, body.clone()).await;
    assert_eq!(status, 202);
    let url = circle.wait_for(1).await[0].json()["parameters"]["payload_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, got) = get(&url).await;
    assert_eq!((status, got), (200, body));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, _, text) = get(&url).await;
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&text).contains("expired"));
    relay.stop().await;
}

async fn each_change_of_a_bitbucket_push_forwards_the_whole_original_body(backend: Backend) {
    use sha2::{Digest, Sha256};
    let gitlab = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = relay(
        &backend,
        &format!(
            r#"
[sources.bb]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = "b"

[[routes]]
name = "all"
to = ["pipeline"]

[targets.pipeline]
kind = "gitlab"
base_url = "{}"
project = "acme/ci"
token = "trigger"
forward_payload = true
"#,
            gitlab.url()
        ),
    )
    .await;
    let change = |name: &str, hash: char| {
        json!({ "new": { "type": "branch", "name": name, "target": { "hash": hash.to_string().repeat(40) } },
                "old": { "type": "branch", "name": name, "target": { "hash": "1".repeat(40) } } })
    };
    // Spaced oddly, so a re-serialized body would differ from the original.
    let body = format!(
        "{{ \"actor\": {{\"nickname\": \"lin\"}},  \"repository\": {{\"full_name\": \"acme/app\"}},\n \"push\": {{\"changes\": [{}, {}]}} }}",
        change("main", 'a'),
        change("dev", 'b')
    );
    let headers = sign::bitbucket("b", "repo:push", "bb-multi", body.as_bytes());
    let (status, answer) = relay.post("/hooks/bitbucket", &headers, body.clone()).await;
    assert_eq!((status, answer["jobs"].clone()), (202, json!(2)), "{answer}");
    let requests = gitlab.wait_for(2).await;
    let mut paths: Vec<&str> = requests.iter().map(|r| r.path()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "/api/v4/projects/acme%2Fci/ref/dev/trigger/pipeline",
            "/api/v4/projects/acme%2Fci/ref/main/trigger/pipeline"
        ]
    );
    let original = Sha256::digest(body.as_bytes());
    for r in &requests {
        assert_eq!(
            Sha256::digest(&r.body),
            original,
            "each trigger carries the whole original body"
        );
    }
    relay.stop().await;
}

async fn a_pipeline_event_exposes_its_status_id_source_and_variables(backend: Backend) {
    let gitlab = MockServer::start(Reply::new(201, GITLAB_CREATED)).await;
    let relay = relay(&backend, &format!(
        r#"
[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"

[[routes]]
name = "after-tests"
events = ["pipeline"]
when = "status == 'success' and pipeline_source == 'push'"
to = ["deploy"]

[targets.deploy]
kind = "gitlab"
base_url = "{}"
project = "acme/deploy"
token = "trigger"
variables = {{ UPSTREAM = "{{{{ repo }}}}#{{{{ pipeline_id }}}} {{{{ status }}}} env={{{{ variables.TARGET_ENV }}}}" }}
"#,
        gitlab.url()
    ))
    .await;
    let hook = |status: &str, source: &str| {
        json!({
            "object_kind": "pipeline",
            "object_attributes": { "id": 4242, "ref": "main", "tag": false, "sha": "c".repeat(40),
                                   "source": source, "status": status,
                                   "variables": [{ "key": "TARGET_ENV", "value": "staging" }] },
            "project": { "path_with_namespace": "acme/api" }
        })
        .to_string()
    };
    assert_eq!(post_gitlab(&relay, hook("failed", "push")).await["jobs"], 0);
    assert_eq!(post_gitlab(&relay, hook("success", "schedule")).await["jobs"], 0);
    assert_eq!(post_gitlab(&relay, hook("success", "push")).await["jobs"], 1);
    let trigger = &gitlab.wait_for(1).await[0];
    assert_eq!(
        trigger.json()["variables"],
        json!({ "UPSTREAM": "acme/api#4242 success env=staging", "RELAY_HOP": "1" })
    );
    relay.stop().await;
}
