//! Every provider, end to end: a signed webhook is accepted with 202, and the
//! mock CI server receives the trigger the route asks for.

use serde_json::json;

use crate::support::{MockServer, Relay, Reply, sign};

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

[sources.bb]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = "bb-secret"

[sources.gt]
provider = "gitea"
path = "/hooks/gitea"
secret = "gt-secret"

[sources.custom]
provider = "generic"
path = "/hooks/custom"
secret = "custom-secret"
signature = {{ header = "X-Custom-Signature", algorithm = "sha256", prefix = "sha256=" }}
event_header = "X-Custom-Event"
delivery_header = "X-Custom-Delivery"
fields = {{ repo = "/project/name", ref = "/git/ref", sha = "/git/sha" }}

[[routes]]
name = "all-pushes"
events = ["push", "tag"]
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{}"
project = "gh/acme/{{{{ repo | replace('/', '-') }}}}"
token = "circle-token"
parameters = {{ source = "{{{{ source }}}}", sha = "{{{{ sha }}}}" }}
"#,
        circle.url()
    )
}

const CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":42,"created_at":"2026-11-22T10:00:00Z"}"#;

fn github_push(repo: &str, git_ref: &str, sha: &str) -> Vec<u8> {
    json!({
        "ref": git_ref, "before": "1111111111111111111111111111111111111111", "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": { "full_name": repo, "html_url": format!("https://example.test/{repo}") },
        "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": "work", "added": [], "modified": ["a.txt"], "removed": [] },
        "commits": [{ "id": sha, "message": "work", "added": [], "modified": ["a.txt"], "removed": [] }]
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn every_provider_triggers_the_route_target() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle)).await;
    let sha = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";

    // GitHub push to a branch.
    let body = github_push("acme/api", "refs/heads/main", sha);
    let (status, answer) = relay
        .post(
            "/hooks/github",
            &sign::github("gh-secret", "push", "d-gh-1", &body),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 1);
    assert_eq!(answer["routes"], json!(["all-pushes"]));

    // GitLab tag push.
    let body = json!({
        "object_kind": "tag_push", "ref": "refs/tags/v2.0.0",
        "before": "0000000000000000000000000000000000000000", "after": sha,
        "checkout_sha": sha, "user_username": "grace",
        "project": { "path_with_namespace": "acme/web", "web_url": "https://gitlab.test/acme/web" },
        "commits": [], "total_commits_count": 0
    })
    .to_string();
    let (status, answer) = relay
        .post(
            "/hooks/gitlab",
            &sign::gitlab("gl-token", "Tag Push Hook", "d-gl-1"),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");

    // Bitbucket push carrying two changes: two events, two triggers.
    let change = |name: &str, hash: &str| {
        json!({ "new": { "type": "branch", "name": name, "target": { "hash": hash, "message": "m" } },
                "old": { "type": "branch", "name": name, "target": { "hash": "2222222222222222222222222222222222222222" } },
                "created": false, "closed": false, "forced": false })
    };
    let body = json!({
        "actor": { "nickname": "lin" },
        "repository": { "full_name": "acme/mobile", "links": { "html": { "href": "https://bitbucket.test/acme/mobile" } } },
        "push": { "changes": [change("main", sha), change("dev", "3333333333333333333333333333333333333333")] }
    })
    .to_string()
    .into_bytes();
    let (status, answer) = relay
        .post(
            "/hooks/bitbucket",
            &sign::bitbucket("bb-secret", "repo:push", "d-bb-1", &body),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 2);

    // Gitea push (Forgejo headers alongside).
    let body = github_push("acme/ops", "refs/heads/main", sha);
    let (status, answer) = relay
        .post(
            "/hooks/gitea",
            &sign::gitea("gt-secret", "push", "d-gt-1", &body),
            body,
        )
        .await;
    assert_eq!(status, 202, "{answer}");

    // Generic sender with its own header and field map.
    let body =
        json!({ "project": { "name": "acme/tools" }, "git": { "ref": "refs/heads/main", "sha": sha } })
            .to_string()
            .into_bytes();
    let headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("X-Custom-Event".to_owned(), "push".to_owned()),
        ("X-Custom-Delivery".to_owned(), "d-custom-1".to_owned()),
        (
            "X-Custom-Signature".to_owned(),
            format!(
                "sha256={}",
                crate::support::hex(&crate::support::hmac_sha256(b"custom-secret", &[&body]))
            ),
        ),
    ];
    let (status, answer) = relay.post("/hooks/custom", &headers, body).await;
    assert_eq!(status, 202, "{answer}");

    let requests = circle.wait_for(6).await;
    let mut seen: Vec<(String, serde_json::Value)> =
        requests.iter().map(|r| (r.path().to_owned(), r.json())).collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    let expect =
        |slug: &str, body: serde_json::Value| (format!("/api/v2/project/gh/acme/{slug}/pipeline"), body);
    let mut wanted = vec![
        expect(
            "acme-api",
            json!({ "branch": "main", "parameters": { "source": "gh", "sha": sha } }),
        ),
        expect(
            "acme-web",
            json!({ "tag": "v2.0.0", "parameters": { "source": "gl", "sha": sha } }),
        ),
        expect(
            "acme-mobile",
            json!({ "branch": "main", "parameters": { "source": "bb", "sha": sha } }),
        ),
        expect(
            "acme-mobile",
            json!({ "branch": "dev", "parameters": { "source": "bb", "sha": "3333333333333333333333333333333333333333" } }),
        ),
        expect(
            "acme-ops",
            json!({ "branch": "main", "parameters": { "source": "gt", "sha": sha } }),
        ),
        expect(
            "acme-tools",
            json!({ "branch": "main", "parameters": { "source": "custom", "sha": sha } }),
        ),
    ];
    wanted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    assert_eq!(seen, wanted);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("circle-token"), Some("circle-token"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        // Nothing the Git host sent is passed on.
        for incoming in [
            "x-github-event",
            "x-hub-signature-256",
            "x-gitlab-token",
            "x-gitlab-event",
            "x-event-key",
        ] {
            assert!(r.header(incoming).is_none(), "{incoming} leaked to the target");
        }
    }
    relay.wait_done(6).await;
    assert_eq!(
        relay.attempts().await,
        vec![(1, Some(201), "delivered".to_owned()); 6],
        "one attempt per job, each delivered with the target's 201"
    );
    relay.stop().await;
}

#[tokio::test]
async fn github_ping_is_answered_and_not_stored() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle)).await;
    let body = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec();
    let (status, answer) = relay
        .post(
            "/hooks/github",
            &sign::github("gh-secret", "ping", "d-ping", &body),
            body,
        )
        .await;
    assert_eq!((status, answer), (200, json!({ "pong": true })));
    assert_eq!(relay.events().await.len(), 0);
    relay.stop().await;
}

#[tokio::test]
async fn a_redelivery_answers_the_original_event_and_queues_nothing() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle)).await;
    let body = github_push(
        "acme/api",
        "refs/heads/main",
        "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83",
    );
    let headers = sign::github("gh-secret", "push", "72d3162e-cc78-11e3-81ab-4c9367dc0958", &body);
    let (first, answer) = relay.post("/hooks/github", &headers, body.clone()).await;
    assert_eq!(first, 202);
    let (again, duplicate) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(again, 200);
    assert_eq!(duplicate, json!({ "duplicate": answer["event"] }));
    assert_eq!(relay.events().await.len(), 1);
    assert_eq!(relay.jobs("").await.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn github_form_encoded_body_is_verified_as_sent() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle)).await;
    let json_doc = github_push(
        "acme/api",
        "refs/heads/main",
        "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83",
    );
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&json_doc).unwrap())
        .finish();
    let mut headers = sign::github("gh-secret", "push", "d-form", form.as_bytes());
    headers[0].1 = "application/x-www-form-urlencoded".into();
    let (status, answer) = relay.post("/hooks/github", &headers, form.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let stored = crate::support::stored_bodies(&relay.db_path(), answer["event"].as_str());
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].body,
        form.as_bytes(),
        "the body is stored exactly as received"
    );
    assert_eq!(
        stored[0].payload.as_deref(),
        Some(&json_doc[..]),
        "the JSON document is stored beside it"
    );
    circle.wait_for(1).await;
    relay.stop().await;
}
