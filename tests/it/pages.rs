//! The status pages and the events API: filters and pages of stored
//! deliveries, one delivery with its jobs, its explanation under the config
//! in force, its replay (loop guard applied, hop kept), the pages' escaping
//! and security headers, and who may read and who may change.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply, config_on, sign, test_client};

crate::on_both_backends! {
    cases: [
        events_are_filtered_and_paged,
        an_event_is_shown_explained_and_replayed,
        pages_escape_what_a_payload_holds,
    ],
}

const SECRET: &str = "page-secret";
const TOKEN: &str = "page-admin-token-7c1d";
/// What CircleCI answers a trigger with: the pipeline it created.
const CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":7,"created_at":"2026-11-22T10:00:00Z"}"#;

fn config(circle: &MockServer, admin: &str) -> String {
    format!(
        r#"
[loop_guard]
dedupe_window = "1h"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
events = ["push"]
branches = ["main"]
to = ["circle"]

[[routes]]
name = "releases"
events = ["tag"]
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{}"
project = "gh/acme/api"
token = "circle-token"
{admin}
"#,
        circle.url()
    )
}

async fn start(backend: &Backend, circle: &MockServer, admin: &str) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let text = config_on(backend, dir.path(), "", &config(circle, admin));
    Relay::start_with(dir, &text).await
}

/// A signed GitHub push of `sha` to `git_ref` in `repo`, with this head
/// commit message and these extra headers; returns relay's 202 answer.
pub async fn push(
    relay: &Relay,
    repo: &str,
    git_ref: &str,
    sha: &str,
    message: &str,
    extra: &[(&str, &str)],
) -> Value {
    let body = json!({
        "ref": git_ref,
        "before": "1111111111111111111111111111111111111111",
        "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": { "full_name": repo, "html_url": format!("https://github.com/{repo}") },
        "pusher": { "name": "ada" },
        "head_commit": { "id": sha, "message": message, "added": [], "modified": [], "removed": [] },
        "commits": []
    })
    .to_string()
    .into_bytes();
    let mut headers = sign::github(SECRET, "push", &uuid::Uuid::new_v4().to_string(), &body);
    headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

fn sha(n: u8) -> String {
    format!("{n:x}").repeat(40)[..40].to_owned()
}

/// A request to the admin listener: status, headers and body text.
async fn admin(
    relay: &Relay,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = test_client().request(method, format!("http://{}{path}", relay.admin.unwrap()));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn ids(answer: &Value) -> Vec<String> {
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn events_are_filtered_and_paged(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    // The tag's trigger is refused for good: its job dies.
    let relay = start(&backend, &circle, "").await;
    let a = push(&relay, "acme/api", "refs/heads/main", &sha(1), "one", &[]).await;
    let b = push(&relay, "acme/web", "refs/heads/main", &sha(2), "two", &[]).await;
    circle.wait_for(2).await;
    relay.wait_done(2).await;
    circle.script([Reply::new(422, r#"{"message":"no such tag"}"#)]);
    let c = push(&relay, "acme/api", "refs/tags/v1", &sha(3), "three", &[]).await;
    relay.wait_jobs("state=dead", 1).await;
    let d = push(&relay, "acme/api", "refs/heads/wip", &sha(4), "four", &[]).await;
    let id = |answer: &Value| answer["event"].as_str().unwrap().to_owned();

    let all = relay.api("/api/events").await;
    assert_eq!(ids(&all), [id(&d), id(&c), id(&b), id(&a)], "newest first");
    assert_eq!(all["next"], Value::Null, "one page holds them all");
    assert_eq!(ids(&relay.api("/api/events?repo=acme/web").await), [id(&b)]);
    assert_eq!(ids(&relay.api("/api/events?kind=tag").await), [id(&c)]);
    assert_eq!(ids(&relay.api("/api/events?state=dead").await), [id(&c)]);
    assert_eq!(
        ids(&relay.api("/api/events?state=done&repo=acme/api").await),
        [id(&a)]
    );
    assert_eq!(ids(&relay.api("/api/events?source=gh&since=1h").await).len(), 4);
    assert_eq!(ids(&relay.api("/api/events?source=nope").await).len(), 0);
    assert_eq!(ids(&relay.api("/api/events?until=1h").await).len(), 0);

    // Pages of two, each page's last event the cursor of the next.
    let first = relay.api("/api/events?limit=2").await;
    assert_eq!(ids(&first), [id(&d), id(&c)]);
    assert_eq!(first["next"], id(&c));
    let second = relay.api(&format!("/api/events?limit=2&before={}", id(&c))).await;
    assert_eq!(ids(&second), [id(&b), id(&a)]);
    let third = relay.api(&format!("/api/events?limit=2&before={}", id(&a))).await;
    assert_eq!(ids(&third).len(), 0);
    assert_eq!(third["next"], Value::Null);

    // The page lists the same, with the filter kept in the next link.
    let (status, _, html) = admin(
        &relay,
        reqwest::Method::GET,
        "/events?repo=acme%2Fapi&limit=1",
        &[],
    )
    .await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains(&format!("/events/{}", id(&d))), "{html}");
    assert!(!html.contains(&format!("/events/{}", id(&c))), "{html}");
    assert!(
        html.contains(&format!(
            "/events?repo=acme%2Fapi&amp;limit=1&amp;before={}",
            id(&d)
        )),
        "{html}"
    );

    let (status, _, body) = admin(&relay, reqwest::Method::GET, "/api/events?state=lost", &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("queued, in_flight, done, dead"), "{body}");
    let (status, _, _) = admin(&relay, reqwest::Method::GET, "/api/events?since=yesterday", &[]).await;
    assert_eq!(status, 400);
    let (status, _, html) = admin(&relay, reqwest::Method::GET, "/events?before=nope", &[]).await;
    assert_eq!(status, 400, "{html}");
    relay.stop().await;
}

async fn an_event_is_shown_explained_and_replayed(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = start(&backend, &circle, "").await;
    let answer = push(
        &relay,
        "acme/api",
        "refs/heads/main",
        &sha(5),
        "ship it",
        &[("X-Relay-Hop", "2")],
    )
    .await;
    let id = answer["event"].as_str().unwrap().to_owned();
    circle.wait_for(1).await;
    relay.wait_done(1).await;

    let event = relay.api(&format!("/api/events/{id}")).await;
    assert_eq!(event["id"], id);
    assert_eq!(event["hook"], "push");
    assert_eq!(event["hop"], 2);
    assert_eq!(event["content_type"], "application/json");
    let body: Value = serde_json::from_str(event["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["head_commit"]["message"], "ship it");
    let jobs = event["jobs_detail"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[0]["history"][0]["status"], 201);
    assert_eq!(jobs[0]["pipeline"]["number"], 7);

    let explained = relay.api(&format!("/api/events/{id}/explain")).await;
    assert_eq!(explained["event"], id);
    let routes = &explained["events"][0]["routes"];
    assert_eq!(routes[0]["route"], "builds");
    assert_eq!(routes[0]["matched"], true);
    assert_eq!(routes[0]["jobs"][0]["target"], "circle");
    assert_eq!(routes[1]["route"], "releases");
    assert_eq!(routes[1]["matched"], false);
    assert_eq!(routes[1]["predicate"], "events");
    assert!(
        explained["text"]
            .as_str()
            .unwrap()
            .contains("route builds: matched"),
        "{explained}"
    );

    // The replay takes the accept path: the loop guard's dedupe holds back
    // the same commit to the same target within its window.
    let url = format!("http://{}/api/events/{id}/replay", relay.admin.unwrap());
    let response = test_client().post(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let replayed: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_ne!(replayed["event"], id);
    assert_eq!(replayed["jobs"], 0, "{replayed}");
    assert_eq!(replayed["dropped"][0]["rule"], "dedupe", "{replayed}");
    let copy = relay
        .api(&format!("/api/events/{}", replayed["event"].as_str().unwrap()))
        .await;
    assert_eq!(copy["hop"], 2, "the hops that led to the original are kept");
    assert_eq!(
        copy["delivery"],
        Value::Null,
        "a replay is not the sender's redelivery"
    );
    assert_eq!(copy["body"], event["body"]);
    assert_eq!(circle.requests().len(), 1, "nothing more was sent");

    let (status, _, body) = admin(
        &relay,
        reqwest::Method::POST,
        &format!("/api/events/{}/replay", uuid::Uuid::now_v7()),
        &[],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    relay.stop().await;
}

async fn pages_escape_what_a_payload_holds(backend: Backend) {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = start(&backend, &circle, "").await;
    let message = "<img src=x onerror=alert(1)> </script><script>alert(2)</script>";
    let branch = "refs/heads/main\"><svg onload=alert(3)>";
    let answer = push(&relay, "acme/api", branch, &sha(6), message, &[]).await;
    let id = answer["event"].as_str().unwrap().to_owned();
    for path in ["/", "/events", &format!("/events/{id}"), "/dead"] {
        let (status, headers, html) = admin(&relay, reqwest::Method::GET, path, &[]).await;
        assert_eq!(status, 200, "{path}: {html}");
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(!html.contains("<svg"), "{path}: {html}");
        assert!(!html.contains("<img"), "{path}: {html}");
        assert!(!html.contains("<script>alert"), "{path}: {html}");
        assert!(html.len() < 100 * 1024, "{path} weighs {} bytes", html.len());
    }
    let (_, _, html) = admin(&relay, reqwest::Method::GET, &format!("/events/{id}"), &[]).await;
    assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"), "{html}");
    assert!(html.contains("&quot;&gt;&lt;svg onload=alert(3)&gt;"), "{html}");
    assert!(html.contains("<td>builds</td>"), "the verdicts are shown: {html}");
    let (status, _, _) = admin(&relay, reqwest::Method::GET, "/events/not-an-id", &[]).await;
    assert_eq!(status, 404);
    let (status, headers, css) = admin(&relay, reqwest::Method::GET, "/assets/relay.css", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/css; charset=utf-8");
    assert!(css.contains("body"));
    relay.stop().await;
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        crate::support::b64(format!("{user}:{password}").as_bytes())
    )
}

/// With `[admin] token`, the pages take the token as Basic or Bearer; a
/// change takes Bearer alone, so a browser's saved Basic credentials,
/// which another site's form would carry, change nothing.
#[tokio::test]
async fn reads_take_basic_or_bearer_and_changes_take_bearer_alone() {
    let circle = MockServer::start(Reply::new(422, r#"{"message":"no"}"#)).await;
    let admin_table = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n");
    let relay = start(&Backend::Sqlite, &circle, &admin_table).await;
    let mut relay = relay;
    relay.api_token = Some(TOKEN.to_owned());
    push(&relay, "acme/api", "refs/heads/main", &sha(7), "m", &[]).await;
    let dead = relay.wait_jobs("state=dead", 1).await;
    let job = dead[0]["id"].as_str().unwrap().to_owned();
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    let (status, headers, html) = admin(&relay, get.clone(), "/", &[]).await;
    assert_eq!(status, 401, "{html}");
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );
    assert!(!html.contains(TOKEN));
    let good_basic = basic("anyone", TOKEN);
    for auth in [good_basic.as_str(), &format!("Bearer {TOKEN}")] {
        let (status, _, _) = admin(&relay, get.clone(), "/dead", &[("authorization", auth)]).await;
        assert_eq!(status, 200, "{auth}");
        let (status, _, _) = admin(&relay, get.clone(), "/api/events", &[("authorization", auth)]).await;
        assert_eq!(status, 200, "{auth}");
    }
    let (status, _, _) = admin(&relay, get.clone(), "/", &[("authorization", &basic(TOKEN, "x"))]).await;
    assert_eq!(status, 401);

    // What another site's form can send: the browser's saved Basic
    // credentials, or none. Both refused, though the page can be read.
    let retry = format!("/api/jobs/{job}/retry");
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (status, _, body) = admin(&relay, post.clone(), &retry, &form).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = admin(
        &relay,
        post.clone(),
        &retry,
        &[("authorization", &good_basic), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = admin(&relay, post.clone(), &retry, &[("authorization", &good_basic)]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let replay = format!("/api/events/{}/replay", dead[0]["event_id"].as_str().unwrap());
    let (status, _, _) = admin(&relay, post.clone(), &replay, &[("authorization", &good_basic)]).await;
    assert_eq!(status, 401);
    assert_eq!(relay.jobs("state=dead").await.len(), 1, "nothing was retried");
    assert_eq!(relay.events().await.len(), 1, "nothing was replayed");

    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = admin(&relay, post, &retry, &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "queued");
    relay.stop().await;
}
