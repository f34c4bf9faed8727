//! Reporting back (PROTOCOLS.md D): a route with `report` posts each
//! target's pipeline state on the pushed commit through the source's `api`:
//! pending once the trigger is accepted, then each state the pipeline goes
//! through, and `error` with the target's message when the trigger dies.
//! Mock GitHub, GitLab, Bitbucket and Gitea status APIs check every field of
//! every report; a mock CircleCI plays the pipeline, followed by polling.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Recorded, Relay, Reply, fixture, sign};

crate::on_both_backends! {
    cases: [
        github_sees_a_pipeline_s_whole_life,
        gitlab_sees_a_pipeline_s_whole_life,
        bitbucket_sees_a_pipeline_s_whole_life,
        gitea_sees_a_pipeline_s_whole_life,
        a_dead_trigger_is_an_error_status_on_github,
        a_dead_trigger_is_an_error_status_on_gitlab,
        a_dead_trigger_is_an_error_status_on_bitbucket,
        a_dead_trigger_is_an_error_status_on_gitea,
        a_status_the_host_refuses_is_a_dead_report_naming_the_scope,
        a_waiting_report_is_superseded_by_a_newer_one,
    ],
}

const API_TOKEN: &str = "host-status-token-6d5c4b3a2f1e";
const SECRET: &str = "hook-secret-0123456789abcdef";
const CCI_TOKEN: &str = "cci-personal-token-5f0e1d2c3b4a";
const PIPELINE: &str = "5034460f-c7c4-4c43-9457-de07e2029e7b";
const PIPELINE_PAGE: &str = "https://app.circleci.com/pipelines/github/acme/api/7";

#[derive(Clone, Copy, PartialEq)]
enum Host {
    Github,
    Gitlab,
    Bitbucket,
    Gitea,
}

impl Host {
    fn source(self, api: &str) -> String {
        let (provider, auth) = match self {
            Host::Github => ("github", format!("secret = \"{SECRET}\"")),
            Host::Gitlab => ("gitlab", format!("token = \"{SECRET}\"")),
            Host::Bitbucket => ("bitbucket", format!("secret = \"{SECRET}\"")),
            Host::Gitea => ("gitea", format!("secret = \"{SECRET}\"")),
        };
        // post_github_push posts to /hooks/github.
        let hook = if self == Host::Github {
            "/hooks/github"
        } else {
            "/hooks/host"
        };
        format!(
            r#"
[sources.host]
provider = "{provider}"
path = "{hook}"
{auth}
api = {{ token = "{API_TOKEN}", url = "{api}" }}
"#
        )
    }

    /// Posts a real push of this host (a fixture), signed.
    async fn push(self, relay: &Relay) -> bool {
        let delivery = uuid::Uuid::new_v4().to_string();
        let (body, headers) = match self {
            Host::Github => {
                crate::support::post_github_push(
                    relay,
                    SECRET,
                    "refs/heads/main",
                    "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c",
                    &delivery,
                )
                .await;
                return true;
            }
            Host::Gitlab => {
                let Some(body) = fixture("gitlab/push-hook-docs.json") else {
                    return false;
                };
                let headers = sign::gitlab(SECRET, "Push Hook", &delivery);
                (body, headers)
            }
            Host::Bitbucket => {
                let Some(body) = fixture("bitbucket/repo-push-branch-commits.json") else {
                    return false;
                };
                let headers = sign::bitbucket(SECRET, "repo:push", &delivery, &body);
                (body, headers)
            }
            Host::Gitea => {
                let Some(body) = fixture("gitea/push-docs.json") else {
                    return false;
                };
                let headers = sign::gitea(SECRET, "push", &delivery, &body);
                (body, headers)
            }
        };
        let (status, answer) = relay.post("/hooks/host", &headers, body).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["jobs"], 1, "{answer}");
        true
    }

    /// The status request's path for `repo` at `sha`.
    fn path(self, repo: &str, sha: &str) -> String {
        match self {
            Host::Github => format!("/repos/{repo}/statuses/{sha}"),
            Host::Gitlab => format!("/api/v4/projects/{}/statuses/{sha}", repo.replace('/', "%2F")),
            Host::Bitbucket => format!("/2.0/repositories/{repo}/commit/{sha}/statuses/build"),
            Host::Gitea => format!("/api/v1/repos/{repo}/statuses/{sha}"),
        }
    }

    /// Asserts the headers every status request of this host carries.
    fn assert_headers(self, request: &Recorded) {
        assert_eq!(request.method, "POST");
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert!(request.header("user-agent").unwrap().starts_with("relay/"));
        let bearer = format!("Bearer {API_TOKEN}");
        match self {
            Host::Github => {
                assert_eq!(request.header("authorization"), Some(bearer.as_str()));
                assert_eq!(request.header("accept"), Some("application/vnd.github+json"));
                assert_eq!(request.header("x-github-api-version"), Some("2022-11-28"));
            }
            Host::Gitlab => {
                assert_eq!(request.header("private-token"), Some(API_TOKEN));
                assert_eq!(request.header("authorization"), None);
            }
            Host::Bitbucket => assert_eq!(request.header("authorization"), Some(bearer.as_str())),
            Host::Gitea => {
                let token = format!("token {API_TOKEN}");
                assert_eq!(request.header("authorization"), Some(token.as_str()));
            }
        }
    }

    /// The body of a status in `state` (this host's word) saying `description`.
    fn body(self, state: &str, description: &str, link: Option<&str>) -> Value {
        let mut body = match self {
            Host::Github | Host::Gitea => {
                json!({"state": state, "context": "relay/app", "description": description})
            }
            Host::Gitlab => json!({"state": state, "name": "relay/app", "description": description}),
            Host::Bitbucket => {
                json!({"key": "relay/app", "state": state, "name": "relay/app", "description": description})
            }
        };
        if let Some(link) = link {
            let field = if self == Host::Bitbucket {
                "url"
            } else {
                "target_url"
            };
            body[field] = json!(link);
        }
        body
    }

    /// This host's words for pending, running and passed.
    fn states(self) -> [&'static str; 3] {
        match self {
            Host::Github | Host::Gitea => ["pending", "pending", "success"],
            Host::Gitlab => ["pending", "running", "success"],
            Host::Bitbucket => ["INPROGRESS", "INPROGRESS", "SUCCESSFUL"],
        }
    }
}

fn config(host: Host, api: &str, circle: &str) -> String {
    format!(
        r#"{source}
[[routes]]
name = "builds"
from = ["host"]
to = ["app"]
report = true

[targets.app]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "{CCI_TOKEN}"
follow = {{ first = "100ms", max = "100ms" }}

[loop_guard]
dedupe_window = "0s"
"#,
        source = host.source(api)
    )
}

fn created() -> Reply {
    Reply::new(
        201,
        &json!({"id": PIPELINE, "state": "created", "number": 7, "created_at": "2026-12-04T09:00:00Z"})
            .to_string(),
    )
}

fn workflows(status: &str) -> Reply {
    Reply::new(
        200,
        &json!({"items": [{
            "id": "c1c1c1c1-0000-4000-8000-000000000001", "name": "build", "status": status,
            "created_at": "2026-12-04T09:00:01Z", "stopped_at": null, "pipeline_id": PIPELINE,
            "pipeline_number": 7, "project_slug": "gh/acme/api",
            "started_by": "9f7d6a1b-0000-4000-8000-000000000001"
        }], "next_page_token": null})
        .to_string(),
    )
}

/// The trigger job (not a report), once relay has it.
async fn trigger(relay: &Relay) -> Value {
    relay.wait_jobs("target=app", 1).await.remove(0)
}

async fn whole_life(host: Host, backend: Backend) {
    let api = MockServer::start(Reply::new(201, "{}")).await;
    let circle = MockServer::start(workflows("success").after(Duration::from_millis(300))).await;
    circle.script([created(), workflows("running").after(Duration::from_millis(300))]);
    let relay = Relay::start_on(&backend, &config(host, &api.url(), &circle.url())).await;
    if !host.push(&relay).await {
        return;
    }
    let [pending, running, passed] = host.states();
    // Until the final status arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let statuses = loop {
        let seen = api.requests();
        if seen.last().is_some_and(|r| r.json()["state"] == passed) {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "no final status: {seen:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let job = trigger(&relay).await;
    let (repo, sha) = (job["repo"].as_str().unwrap(), job["sha"].as_str().unwrap());
    assert_eq!(sha.len(), 40, "{job}");
    let link = Some(PIPELINE_PAGE);
    // Pending, running, passed, in that order. A report still waiting when
    // the next is queued is superseded, never sent after it: on a loaded
    // machine one of the first two may be skipped that way.
    let mut kinds = Vec::new();
    for request in &statuses {
        host.assert_headers(request);
        assert_eq!(request.path(), host.path(repo, sha));
        let body = request.json();
        let description = body["description"].as_str().unwrap().to_owned();
        let (kind, want) = match description.as_str() {
            "CircleCI pipeline #7 is queued" => (0, host.body(pending, &description, link)),
            "CircleCI pipeline #7 is running" => (1, host.body(running, &description, link)),
            d if d.starts_with("CircleCI pipeline #7 passed in ") && d.ends_with(" s") => {
                (2, host.body(passed, &description, link))
            }
            other => panic!("unexpected status {other:?}"),
        };
        assert_eq!(body, want);
        kinds.push(kind);
    }
    assert!(
        kinds.windows(2).all(|w| w[0] < w[1]),
        "in order, each once: {kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&2));
    // Three reports were queued; those not sent say why.
    let reports = relay.wait_jobs("target=status:host&state=done", 3).await;
    for report in &reports {
        assert_eq!(report["report_of"], job["id"], "{report}");
        assert_eq!(report["repo"], repo);
    }
    let superseded = reports
        .iter()
        .filter(|r| r["last_error"] == relay::report::SUPERSEDED)
        .count();
    assert_eq!(superseded + statuses.len(), 3, "{reports:#?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.requests().len(),
        statuses.len(),
        "nothing once the pipeline ended"
    );
    let stored = relay.store_bytes().await;
    let token = API_TOKEN.as_bytes();
    assert!(
        !stored.windows(token.len()).any(|w| w == token),
        "the api token is in the store"
    );
    assert!(!relay.metrics().await.contains(API_TOKEN));
    relay.stop().await;
}

async fn github_sees_a_pipeline_s_whole_life(backend: Backend) {
    whole_life(Host::Github, backend).await;
}

async fn gitlab_sees_a_pipeline_s_whole_life(backend: Backend) {
    whole_life(Host::Gitlab, backend).await;
}

async fn bitbucket_sees_a_pipeline_s_whole_life(backend: Backend) {
    whole_life(Host::Bitbucket, backend).await;
}

async fn gitea_sees_a_pipeline_s_whole_life(backend: Backend) {
    whole_life(Host::Gitea, backend).await;
}

async fn a_dead_trigger_is_an_error_status_on_github(backend: Backend) {
    dead_trigger(Host::Github, &backend).await;
}

async fn a_dead_trigger_is_an_error_status_on_gitlab(backend: Backend) {
    dead_trigger(Host::Gitlab, &backend).await;
}

async fn a_dead_trigger_is_an_error_status_on_bitbucket(backend: Backend) {
    dead_trigger(Host::Bitbucket, &backend).await;
}

async fn a_dead_trigger_is_an_error_status_on_gitea(backend: Backend) {
    dead_trigger(Host::Gitea, &backend).await;
}

/// A trigger the target refuses: an error status with the target's message.
async fn dead_trigger(host: Host, backend: &Backend) {
    let api = MockServer::start(Reply::new(201, "{}")).await;
    let circle = MockServer::start(Reply::new(404, r#"{"message":"Project not found"}"#)).await;
    let relay = Relay::start_on(backend, &config(host, &api.url(), &circle.url())).await;
    if !host.push(&relay).await {
        return;
    }
    let statuses = api.wait_for(1).await;
    let job = trigger(&relay).await;
    assert_eq!(job["state"], "dead", "{job}");
    let (repo, sha) = (job["repo"].as_str().unwrap(), job["sha"].as_str().unwrap());
    let status = &statuses[0];
    host.assert_headers(status);
    assert_eq!(status.path(), host.path(repo, sha));
    let body = status.json();
    let description = body["description"].as_str().unwrap().to_owned();
    assert!(
        description.starts_with(
            "relay could not trigger app: 404: Project not found; API v2 needs a personal API token"
        ),
        "{description}"
    );
    assert_eq!(description.chars().count(), 140, "{description}");
    let error = match host {
        Host::Github | Host::Gitea => "error",
        Host::Gitlab => "failed",
        Host::Bitbucket => "FAILED",
    };
    // No pipeline, so no pipeline page: Bitbucket, which requires a link,
    // gets the repository's page from the push.
    let link = (host == Host::Bitbucket).then(|| job_link(&body));
    assert_eq!(body, host.body(error, &description, link.as_deref()));
    if let Some(link) = link {
        assert!(link.starts_with("https://bitbucket.org/"), "{link}");
    }
    relay.stop().await;
}

fn job_link(body: &Value) -> String {
    body["url"].as_str().unwrap_or("").to_owned()
}

async fn a_status_the_host_refuses_is_a_dead_report_naming_the_scope(backend: Backend) {
    let api = MockServer::start(Reply::new(
        403,
        r#"{"message":"Resource not accessible by personal access token"}"#,
    ))
    .await;
    // The pipeline stays queued (no workflow yet): one report only.
    let circle = MockServer::start(Reply::new(200, r#"{"items":[],"next_page_token":null}"#)).await;
    circle.script([created()]);
    let relay = Relay::start_on(&backend, &config(Host::Github, &api.url(), &circle.url())).await;
    Host::Github.push(&relay).await;
    let dead = relay.wait_jobs("target=status:host&state=dead", 1).await;
    assert_eq!(
        dead[0]["last_error"],
        "403: Resource not accessible by personal access token; the api token needs \"Commit statuses: write\" on this repository (classic tokens: repo:status), or the repository is wrong"
    );
    // The trigger itself is unharmed: a report never delays or fails it.
    assert_eq!(trigger(&relay).await["state"], "done");
    relay.stop().await;
}

/// The status relay posts comes back from GitHub as a `status` webhook: a
/// CI outcome, dropped by the loop guard (no route takes pipeline events
/// here), so reporting can never start a loop.
#[tokio::test]
async fn a_status_coming_back_from_github_is_a_ci_outcome_drop() {
    let api = MockServer::start(Reply::new(201, "{}")).await;
    let circle = MockServer::start(Reply::new(201, "{}")).await;
    let relay = Relay::start(&config(Host::Github, &api.url(), &circle.url())).await;
    let body = json!({
        "id": 6805126730_u64, "sha": "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c", "name": "acme/api",
        "context": "relay/app", "state": "success", "description": "CircleCI pipeline #7 passed in 4 min 12 s",
        "target_url": PIPELINE_PAGE, "branches": [],
        "repository": {"full_name": "acme/api", "html_url": "https://github.com/acme/api"},
        "sender": {"login": "relay-bot"}
    })
    .to_string()
    .into_bytes();
    let headers = sign::github(SECRET, "status", "status-delivery-1", &body);
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 0, "{answer}");
    assert_eq!(answer["dropped"][0]["rule"], "ci_outcome", "{answer}");
    assert!(circle.requests().is_empty());
    assert!(api.requests().is_empty());
    relay.stop().await;
}

/// Reporting's config is checked at its keys.
#[test]
fn reporting_config_is_checked_at_its_keys() {
    let problems = |text: &str| match relay::config::Config::from_toml(text) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let base = |sources: &str, route: &str| {
        format!(
            r#"{sources}
[[routes]]
name = "r"
to = ["t"]
{route}

[targets.t]
kind = "circleci"
project = "gh/acme/api"
token = "t"
"#
        )
    };
    let github = "[sources.gh]\nprovider = \"github\"\npath = \"/hooks/github\"\nsecret = \"s\"\n";
    let no_from = problems(&base(github, "report = true"));
    assert!(
        no_from.contains("routes[0].report: needs from = [...]"),
        "{no_from}"
    );
    let no_api = problems(&base(github, "from = [\"gh\"]\nreport = true"));
    assert!(
        no_api
            .contains("routes[0].report: sources.gh has no api = { token = … } to post commit statuses with"),
        "{no_api}"
    );
    let bad_context = problems(&base(
        &format!("{github}api = {{ token = \"x\" }}\n"),
        "from = [\"gh\"]\nreport = \"ci/{{ branch }}\"",
    ));
    assert!(
        bad_context.contains("routes[0].report: may name only target and route, not branch"),
        "{bad_context}"
    );
    let gitea = "[sources.gt]\nprovider = \"gitea\"\npath = \"/hooks/gitea\"\nsecret = \"s\"\napi = { token = \"x\" }\n";
    let gitea_url = problems(&base(gitea, ""));
    assert!(
        gitea_url.contains("sources.gt.api.url: is required for gitea"),
        "{gitea_url}"
    );
    let cci = "[sources.c]\nprovider = \"circleci\"\npath = \"/hooks/c\"\nsecret = \"s\"\napi = { token = \"x\" }\n";
    let cci_api = problems(&base(cci, ""));
    assert!(
        cci_api.contains("sources.c.api: provider \"circleci\" has no commit status API"),
        "{cci_api}"
    );
    let ok = relay::config::Config::from_toml(&base(
        &format!("{github}api = {{ token = \"x\", url = \"https://ghe.example.com/api/v3/\" }}\n"),
        "from = [\"gh\"]\nreport = \"ci/{{ route }}/{{ target }}\"",
    ))
    .unwrap();
    assert_eq!(
        ok.reporters["status:gh"].describe(),
        "status POST https://ghe.example.com/api/v3/repos/{repo}/statuses/{sha}"
    );
}

/// A report still waiting when a newer one of the same pipeline is queued
/// is superseded: it is never sent, so an older state cannot land after a
/// newer one. One send slot, and a host slow to take the first status, keep
/// "running" waiting until "passed" overtakes it.
async fn a_waiting_report_is_superseded_by_a_newer_one(backend: Backend) {
    let api = MockServer::start(Reply::new(201, "{}")).await;
    api.script([Reply::new(201, "{}").after(Duration::from_millis(1500))]);
    let circle = MockServer::start(workflows("success")).await;
    circle.script([created(), workflows("running")]);
    let text = config(Host::Github, &api.url(), &circle.url())
        .replace("[loop_guard]", "[delivery]\nconcurrency = 1\n\n[loop_guard]");
    let relay = Relay::start_on(&backend, &text).await;
    Host::Github.push(&relay).await;
    let reports = relay.wait_jobs("target=status:host&state=done", 3).await;
    let superseded: Vec<&Value> = reports
        .iter()
        .filter(|r| r["last_error"] == relay::report::SUPERSEDED)
        .collect();
    assert_eq!(superseded.len(), 1, "{reports:#?}");
    assert_eq!(superseded[0]["attempts"], 0, "never sent");
    let states: Vec<String> = api
        .requests()
        .iter()
        .map(|r| r.json()["description"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[0], "CircleCI pipeline #7 is queued");
    assert!(
        states[1].starts_with("CircleCI pipeline #7 passed in "),
        "{states:?}"
    );
    relay.stop().await;
}
