//! Routing end to end: what each route predicate lets through, the skip
//! markers and ignored pushers (dropped, and said so), fan-out, one trigger
//! per target per event, and events that are parsed but never routed.
//! Targets are dry runs; the 202 answer and the jobs table tell the story.

use serde_json::{Value, json};

use crate::support::{Relay, hex, hmac_sha256, sign};

const CONFIG: &str = r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"
ignore_pushers = ["release-bot"]

[sources.gt]
provider = "gitea"
path = "/hooks/gitea"
secret = "g"

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"

[[routes]]
name = "api-paths"
from = ["gh"]
repos = ["acme/api"]
events = ["push"]
paths = ["services/api/**"]
to = ["a"]

[[routes]]
name = "main-only"
repos = ["acme/*", "!acme/legacy"]
branches = ["main"]
to = ["b", "c"]

[[routes]]
name = "releases"
tags = ["v*", "!v*-rc*"]
when = "payload.repository.private == false"
to = ["c"]

[[routes]]
name = "also-c"
repos = ["acme/web"]
to = ["c"]

[[routes]]
name = "pipelines"
from = ["gl"]
events = ["pipeline"]
when = "status == 'success'"
to = ["a"]

[targets.a]
kind = "http"
url = "http://127.0.0.1:9/a"
dry_run = true

[targets.b]
kind = "http"
url = "http://127.0.0.1:9/b"
dry_run = true

[targets.c]
kind = "http"
url = "http://127.0.0.1:9/c"
dry_run = true
"#;

fn push(repo: &str, git_ref: &str, message: &str, pusher: &str, files: &[&str]) -> Vec<u8> {
    json!({
        "ref": git_ref, "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222",
        "repository": { "full_name": repo, "private": false },
        "pusher": { "name": pusher }, "head_commit": { "message": message },
        "commits": [{ "id": "2222222222222222222222222222222222222222", "message": message,
                      "added": [], "removed": [], "modified": files }]
    })
    .to_string()
    .into_bytes()
}

async fn github(relay: &Relay, event: &str, body: Vec<u8>) -> Value {
    let delivery = uuid::Uuid::new_v4().to_string();
    let (status, answer) = relay
        .post("/hooks/github", &sign::github("s", event, &delivery, &body), body)
        .await;
    assert_eq!(status, 202, "{answer}");
    answer
}

/// The routes and targets of the jobs a webhook produced, as
/// `/api/jobs?event=` lists them, sorted.
async fn jobs_of(relay: &Relay, answer: &Value) -> Vec<(String, String)> {
    let event = answer["event"].as_str().unwrap();
    let mut jobs: Vec<(String, String)> = relay
        .jobs(&format!("event={event}"))
        .await
        .iter()
        .map(|j| {
            (
                j["route"].as_str().unwrap().to_owned(),
                j["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    jobs.sort();
    jobs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn predicates_fan_out_and_one_trigger_per_target() {
    let relay = Relay::start(CONFIG).await;

    // A push to main of acme/api touching the API: the path route and the
    // main-only route (which fans out to b and c).
    let a = github(
        &relay,
        "push",
        push(
            "acme/api",
            "refs/heads/main",
            "fix",
            "ada",
            &["services/api/x.rs"],
        ),
    )
    .await;
    assert_eq!(a["routes"], json!(["api-paths", "main-only"]));
    assert_eq!(a["jobs"], 3);
    assert_eq!(
        jobs_of(&relay, &a).await,
        pairs(&[("api-paths", "a"), ("main-only", "b"), ("main-only", "c")])
    );

    // Only docs changed: the path route declines.
    let b = github(
        &relay,
        "push",
        push("acme/api", "refs/heads/main", "docs", "ada", &["docs/x.md"]),
    )
    .await;
    assert_eq!(b["routes"], json!(["main-only"]));

    // acme/web on main: main-only and also-c both name c; c is triggered once.
    let c = github(
        &relay,
        "push",
        push("acme/web", "refs/heads/main", "x", "ada", &["a"]),
    )
    .await;
    assert_eq!(
        jobs_of(&relay, &c).await,
        pairs(&[("main-only", "b"), ("main-only", "c")])
    );

    // An excluded repo, and a branch other than main.
    let d = github(
        &relay,
        "push",
        push("acme/legacy", "refs/heads/main", "x", "ada", &["a"]),
    )
    .await;
    assert_eq!((d["jobs"].clone(), d["routes"].clone()), (json!(0), json!([])));
    let e = github(
        &relay,
        "push",
        push("acme/api", "refs/heads/dev", "x", "ada", &["docs/x"]),
    )
    .await;
    assert_eq!(e["jobs"], 0);

    // Tags: a release tag goes to releases only (main-only filters branches,
    // so it takes no tags); a release candidate is excluded.
    let f = github(
        &relay,
        "push",
        push("acme/api", "refs/tags/v1.2.0", "x", "ada", &[]),
    )
    .await;
    assert_eq!(jobs_of(&relay, &f).await, pairs(&[("releases", "c")]));
    let g = github(
        &relay,
        "push",
        push("acme/api", "refs/tags/v1.3.0-rc1", "x", "ada", &[]),
    )
    .await;
    assert_eq!(g["jobs"], 0);

    // `when` reads the payload: a private repository's tag is not released.
    let mut private: Value =
        serde_json::from_slice(&push("acme/api", "refs/tags/v2.0.0", "x", "ada", &[])).unwrap();
    private["repository"]["private"] = json!(true);
    let h = github(&relay, "push", private.to_string().into_bytes()).await;
    assert_eq!(h["jobs"], 0);

    // GitHub's `create` for a tag is parsed but never routed: the `push`
    // for the same tag already triggered.
    let create = json!({ "ref": "v1.2.0", "ref_type": "tag", "repository": { "full_name": "acme/api" } });
    let i = github(&relay, "create", create.to_string().into_bytes()).await;
    assert_eq!((i["jobs"].clone(), i["routes"].clone()), (json!(0), json!([])));
    relay.stop().await;
}

#[tokio::test]
async fn paths_let_an_event_through_when_the_file_list_is_incomplete() {
    let relay = Relay::start(CONFIG).await;
    // GitHub lists at most 20 commits; with 20 listed, the files seen are not all.
    let commits: Vec<Value> = (0..20)
        .map(|i| json!({ "id": format!("{i:040x}"), "message": "m", "added": [], "removed": [], "modified": ["docs/x.md"] }))
        .collect();
    let body = json!({
        "ref": "refs/heads/dev", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222", "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": commits
    });
    let answer = github(&relay, "push", body.to_string().into_bytes()).await;
    assert_eq!(answer["routes"], json!(["api-paths"]));
    relay.stop().await;
}

#[tokio::test]
async fn skip_markers_and_ignored_pushers_are_dropped_and_said_so() {
    let relay = Relay::start(CONFIG).await;
    for marker in ["[skip ci]", "[ci skip]", "[no ci]", "[skip relay]", "[SKIP CI]"] {
        let body = push(
            "acme/api",
            "refs/heads/main",
            &format!("bump {marker}"),
            "ada",
            &["services/api/x"],
        );
        let answer = github(&relay, "push", body).await;
        assert_eq!(answer["jobs"], 0, "{marker}");
        assert_eq!(answer["dropped"][0]["rule"], "skip_marker", "{answer}");
        assert!(
            answer["dropped"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("head commit message")
        );
    }
    let bot = github(
        &relay,
        "push",
        push("acme/api", "refs/heads/main", "release", "release-bot", &["a"]),
    )
    .await;
    assert_eq!(bot["jobs"], 0);
    assert_eq!(bot["dropped"][0]["rule"], "ignored_pusher");
    // The drop is stored with the event too.
    let stored = relay.event(bot["event"].as_str().unwrap()).await;
    assert_eq!(
        stored["dropped"],
        json!([{
            "route": null,
            "target": null,
            "rule": "ignored_pusher",
            "reason": "pusher \"release-bot\" is in sources.gh.ignore_pushers",
        }])
    );
    relay.stop().await;
}

#[tokio::test]
async fn gitlab_pipeline_events_route_only_where_asked_for() {
    let relay = Relay::start(CONFIG).await;
    let hook = |status: &str| {
        json!({
            "object_kind": "pipeline",
            "object_attributes": { "id": 31, "ref": "main", "tag": false, "sha": "2222222222222222222222222222222222222222",
                                   "source": "push", "status": status, "variables": [] },
            "project": { "path_with_namespace": "acme/api" }
        })
        .to_string()
    };
    let (status, ok) = relay
        .post(
            "/hooks/gitlab",
            &sign::gitlab("t", "Pipeline Hook", "p1"),
            hook("success"),
        )
        .await;
    assert_eq!(status, 202);
    // Only the route that names `pipeline` takes it: main-only (default
    // events push and tag) does not, though the ref is main.
    assert_eq!(ok["routes"], json!(["pipelines"]));
    let (_, failed) = relay
        .post(
            "/hooks/gitlab",
            &sign::gitlab("t", "Pipeline Hook", "p2"),
            hook("failed"),
        )
        .await;
    assert_eq!(failed["jobs"], 0);
    relay.stop().await;
}

#[tokio::test]
async fn gitea_form_posts_are_verified_over_the_json_payload() {
    let relay = Relay::start(CONFIG).await;
    let json_doc = push("acme/api", "refs/heads/main", "x", "ada", &["services/api/x"]);
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&json_doc).unwrap())
        .finish();
    // Gitea signs the JSON document, not the form body on the wire.
    let signature = hex(&hmac_sha256(b"g", &[&json_doc]));
    let headers = vec![
        (
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        ),
        ("X-Gitea-Event".to_owned(), "push".to_owned()),
        ("X-Gitea-Delivery".to_owned(), "gt-form-1".to_owned()),
        ("X-Gitea-Signature".to_owned(), signature),
    ];
    let (status, answer) = relay.post("/hooks/gitea", &headers, form.clone()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["routes"], json!(["main-only"]));
    // Signed over the form body instead, it is refused.
    let mut wrong = headers.clone();
    wrong[3].1 = hex(&hmac_sha256(b"g", &[form.as_bytes()]));
    wrong[2].1 = "gt-form-2".to_owned();
    let (status, _) = relay.post("/hooks/gitea", &wrong, form).await;
    assert_eq!(status, 401);
    relay.stop().await;
}
