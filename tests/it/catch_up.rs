//! Catching up (PROTOCOLS.md E): relay was down while 20 pushes failed to
//! reach it; GitHub does not retry. When relay starts with `catch_up`, it
//! lists the hook's deliveries (two pages) and asks for exactly those 20
//! again: not the ones that succeeded, not the ones it holds, not one asked
//! for three times already. A mock GitHub API plays the hook; the test
//! plays GitHub redelivering, and each redelivery is routed once.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply};

crate::on_both_backends! {
    cases: [twenty_failed_deliveries_are_asked_for_once_each_and_routed_once],
}

const SECRET: &str = "gh-webhook-secret-0123456789";
const HOOKS_TOKEN: &str = "gh-hooks-token-8a7b6c5d4e3f";
const HOOK: &str = "repos/acme/api/hooks/292430182";

fn config(api: &str, circle: &str, catch_up: bool) -> String {
    let catch_up = if catch_up {
        format!("catch_up = {{ hook = \"{HOOK}\", every = \"1h\" }}")
    } else {
        String::new()
    };
    format!(
        r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"
api = {{ token = "{HOOKS_TOKEN}", url = "{api}" }}
{catch_up}

[[routes]]
name = "builds"
from = ["github"]
to = ["app"]

[targets.app]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"

[loop_guard]
dedupe_window = "0s"
"#
    )
}

/// A delivery an hour old: relay looks back as far as GitHub keeps them,
/// three days (`catchup::KEPT`), so a fixed date would age out of the look.
fn delivery(id: u64, guid: &str, redelivery: bool, status_code: u16) -> Value {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let delivered_at = humantime::format_rfc3339_seconds(hour_ago).to_string();
    json!({
        "id": id, "guid": guid, "delivered_at": delivered_at, "redelivery": redelivery,
        "duration": 0.27, "status": if status_code == 200 { "OK" } else { "failed to connect to host" },
        "status_code": status_code, "event": "push", "action": null,
        "installation_id": null, "repository_id": 1296269
    })
}

fn sha(n: u64) -> String {
    format!("{n:0>40x}")
}

async fn twenty_failed_deliveries_are_asked_for_once_each_and_routed_once(backend: Backend) {
    let circle = MockServer::start(Reply::new(
        201,
        r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","number":1}"#,
    ))
    .await;
    let api = MockServer::start(Reply::new(202, "{}")).await;
    let dir = tempfile::tempdir().unwrap();
    // Two deliveries relay did receive, before it went down.
    let first = crate::support::config_on(
        &backend,
        dir.path(),
        "",
        &config(&api.url(), &circle.url(), false),
    );
    let relay = Relay::start_with(dir, &first).await;
    for held in ["held-1", "held-2"] {
        crate::support::post_github_push(&relay, SECRET, "refs/heads/main", &sha(99), held).await;
    }
    let dir = relay.stop_keeping_dir().await;

    let mut page_one = vec![
        delivery(1, "ok-1", false, 200),
        delivery(2, "held-1", false, 502),
        delivery(3, "held-2", false, 0),
        delivery(4, "ok-2", false, 200),
    ];
    let mut page_two = vec![
        // Asked for three times already, and failing still: given up.
        delivery(5, "thrice", false, 502),
        delivery(6, "thrice", true, 502),
        delivery(7, "thrice", true, 502),
        delivery(8, "thrice", true, 502),
        // Failed, then redelivered by a person: nothing to ask.
        delivery(9, "fixed", false, 502),
        delivery(10, "fixed", true, 200),
    ];
    for n in 1..=20u64 {
        let failed = delivery(
            100 + n,
            &format!("lost-{n}"),
            false,
            if n % 2 == 0 { 502 } else { 0 },
        );
        if n <= 10 {
            page_one.push(failed);
        } else {
            page_two.push(failed);
        }
    }
    let next = format!("{}/{HOOK}/deliveries?per_page=100&cursor=v1_2", api.url());
    api.script([
        Reply::new(200, &Value::from(page_one).to_string())
            .header("Link", &format!("<{next}>; rel=\"next\"")),
        Reply::new(200, &Value::from(page_two.clone()).to_string()),
    ]);
    let second = first.replace(
        "[[routes]]",
        &format!("catch_up = {{ hook = \"{HOOK}\", every = \"1h\" }}\n\n[[routes]]"),
    );
    let relay = Relay::start_with(dir, &second).await;
    let seen = api.wait_for(22).await;
    let lists = &seen[..2];
    assert_eq!(lists[0].method, "GET");
    assert_eq!(lists[0].target, format!("/{HOOK}/deliveries?per_page=100"));
    assert_eq!(
        lists[1].target,
        format!("/{HOOK}/deliveries?per_page=100&cursor=v1_2")
    );
    for request in &seen {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {HOOKS_TOKEN}").as_str())
        );
        assert_eq!(request.header("accept"), Some("application/vnd.github+json"));
        assert_eq!(request.header("x-github-api-version"), Some("2022-11-28"));
    }
    let mut asked: Vec<String> = seen[2..].iter().map(|r| r.target.clone()).collect();
    asked.sort();
    let mut expected: Vec<String> = (1..=20u64)
        .map(|n| format!("/{HOOK}/deliveries/{}/attempts", 100 + n))
        .collect();
    expected.sort();
    assert_eq!(asked, expected, "exactly the 20 lost deliveries");
    assert!(seen[2..].iter().all(|r| r.method == "POST" && r.body.is_empty()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(api.requests().len(), 22, "nothing else asked");

    // GitHub redelivers each, with its delivery id; one arrives twice.
    for n in 1..=20u64 {
        crate::support::post_github_push(&relay, SECRET, "refs/heads/main", &sha(n), &format!("lost-{n}"))
            .await;
    }
    let body = json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": sha(3),
        "created": false, "deleted": false, "forced": false,
        "repository": {"full_name": "acme/api", "html_url": "https://github.com/acme/api"},
        "pusher": {"name": "ada"}, "commits": [],
        "head_commit": {"id": sha(3), "message": "work", "added": [], "modified": [], "removed": []}
    });
    let body = body.to_string().into_bytes();
    let headers = crate::support::sign::github(SECRET, "push", "lost-3", &body);
    let (status, answer) = relay.post("/hooks/github", &headers, body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["duplicate"].is_string(), "{answer}");
    relay.wait_done(22).await;
    assert_eq!(
        circle.requests().len(),
        22,
        "two held + twenty caught up, each once"
    );

    // Asked again by hand: relay holds them all now, so nothing to ask.
    api.script([Reply::new(200, &Value::from(page_two).to_string())]);
    let (status, again) = relay.api_post("/api/catch-up?source=github&since=1d").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"source": "github", "asked": []}));
    assert_eq!(
        relay::cli::format_catch_up(&again),
        "github: nothing to ask for: every failed delivery is in relay, or none failed\n"
    );
    relay.stop().await;
}

/// `catch_up` is checked at its keys.
#[test]
fn catch_up_is_checked_at_its_keys() {
    let problems = |source: &str| {
        let text = format!(
            "{source}\n[[routes]]\nname = \"r\"\nto = [\"t\"]\n\n[targets.t]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\n"
        );
        match relay::config::Config::from_toml(&text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let github = "[sources.gh]\nprovider = \"github\"\npath = \"/hooks/github\"\nsecret = \"s\"\n";
    let no_api = problems(&format!("{github}catch_up = {{ hook = \"{HOOK}\" }}"));
    assert!(
        no_api.contains("sources.gh.catch_up: needs api = { token = … } on the source"),
        "{no_api}"
    );
    let bad_hook = problems(&format!(
        "{github}api = {{ token = \"x\" }}\ncatch_up = {{ hook = \"repos/acme/../hooks/1\" }}"
    ));
    assert!(
        bad_hook.contains("sources.gh.catch_up.hook: must be repos/OWNER/REPO/hooks/ID or orgs/ORG/hooks/ID"),
        "{bad_hook}"
    );
    let gitlab = problems(
        "[sources.gl]\nprovider = \"gitlab\"\npath = \"/hooks/gitlab\"\ntoken = \"s\"\ncatch_up = { hook = \"repos/a/b/hooks/1\" }",
    );
    assert!(
        gitlab.contains("sources.gl.catch_up: only GitHub lists and redelivers"),
        "{gitlab}"
    );
    let ok = problems(&format!(
        "{github}api = {{ token = \"x\" }}\ncatch_up = {{ hook = \"orgs/acme/hooks/42\", every = \"10m\" }}"
    ));
    assert_eq!(ok, "");
}
