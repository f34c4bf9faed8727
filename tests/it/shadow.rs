//! Shadow runs: a target with `shadow = true` is triggered and followed for
//! real, never reported on its route's commit, and compared with the
//! route's other targets per commit. Four pushes play the four pass/fail
//! combinations; the CIs' completions come back as their own webhooks.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply, fixture, sign};

crate::on_both_backends! {
    cases: [a_shadow_is_compared_in_all_four_combinations_and_never_reported],
}

const GITHUB_SECRET: &str = "gh-webhook-secret-0123456789";
const CCI_SECRET: &str = "cci-hook-secret-0123456789";
const GL_TOKEN: &str = "gl-hook-token-0123456789";
const API_TOKEN: &str = "gh-status-token-6d5c4b3a2f1e";

fn config(api: &str, circle: &str, gitlab: &str) -> String {
    format!(
        r#"
[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{GITHUB_SECRET}"
api = {{ token = "{API_TOKEN}", url = "{api}" }}

[sources.circleci]
provider = "circleci"
path = "/hooks/circleci"
secret = "{CCI_SECRET}"

[sources.gitlab]
provider = "gitlab"
path = "/hooks/gitlab"
token = "{GL_TOKEN}"

[[routes]]
name = "builds"
from = ["github"]
to = ["primary", "candidate"]
report = true

[targets.primary]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"

[targets.candidate]
kind = "gitlab"
base_url = "{gitlab}"
project = "acme/api"
ref = "main"
token = "glptt-trigger-3b9e77a1d5"
shadow = true

[loop_guard]
dedupe_window = "0s"
"#
    )
}

fn circle_pipeline(n: u32) -> String {
    format!("0b1f2a3c-0000-4000-8000-00000000000{n}")
}

async fn a_shadow_is_compared_in_all_four_combinations_and_never_reported(backend: Backend) {
    let (Some(cci_fixture), Some(gl_fixture)) = (
        fixture("circleci/workflow-completed-github.json"),
        fixture("gitlab/pipeline-hook-docs.json"),
    ) else {
        return;
    };
    let api = MockServer::start(Reply::new(201, "{}")).await;
    let circle = MockServer::start(Reply::new(500, "{}")).await;
    let gitlab = MockServer::start(Reply::new(500, "{}")).await;
    for n in 1..=4 {
        circle.script([Reply::new(
            201,
            &json!({"id": circle_pipeline(n), "state": "created", "number": n}).to_string(),
        )]);
        gitlab.script([Reply::new(
            201,
            &json!({"id": 900 + n, "iid": n, "status": "created",
                    "web_url": format!("https://gitlab.example.com/acme/api/-/pipelines/{}", 900 + n)})
            .to_string(),
        )]);
    }
    let relay = Relay::start_on(&backend, &config(&api.url(), &circle.url(), &gitlab.url())).await;
    // (primary, shadow) outcomes, one commit each.
    let cases = [
        ("success", "success"),
        ("success", "failed"),
        ("failed", "success"),
        ("failed", "failed"),
    ];
    let sha = |n: u32| format!("{n:0>40}");
    for n in 1..=4u32 {
        crate::support::post_github_push(
            &relay,
            GITHUB_SECRET,
            "refs/heads/main",
            &sha(n),
            &format!("push-{n}"),
        )
        .await;
        relay.wait_jobs("state=done&target=candidate", n as usize).await;
        relay.wait_jobs("state=done&target=primary", n as usize).await;
    }
    let pending = relay.api("/api/shadow").await;
    assert_eq!(
        pending["summary"],
        json!({"agree": 0, "shadow_failed": 0, "shadow_passed": 0, "pending": 4}),
        "{pending:#}"
    );
    for (i, (primary, shadow)) in cases.iter().enumerate() {
        let n = i as u32 + 1;
        let mut cci: Value = serde_json::from_slice(&cci_fixture).unwrap();
        cci["id"] = json!(format!("cci-done-{n}"));
        cci["pipeline"]["id"] = json!(circle_pipeline(n));
        cci["pipeline"]["number"] = json!(n);
        cci["workflow"]["status"] = json!(primary);
        let body = serde_json::to_vec(&cci).unwrap();
        let (status, answer) = relay
            .post(
                "/hooks/circleci",
                &sign::circleci(CCI_SECRET, "workflow-completed", &body),
                body,
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let mut gl: Value = serde_json::from_slice(&gl_fixture).unwrap();
        gl["object_attributes"]["id"] = json!(900 + n);
        gl["object_attributes"]["status"] = json!(shadow);
        let body = serde_json::to_vec(&gl).unwrap();
        let (status, answer) = relay
            .post(
                "/hooks/gitlab",
                &sign::gitlab(GL_TOKEN, "Pipeline Hook", &format!("gl-done-{n}")),
                body,
            )
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let shadow = relay.api("/api/shadow?route=builds").await;
    assert_eq!(
        shadow["summary"],
        json!({"agree": 2, "shadow_failed": 1, "shadow_passed": 1, "pending": 0}),
        "{shadow:#}"
    );
    let runs = shadow["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    // Newest first: the fourth push's run leads.
    let expected = ["agree", "shadow_passed", "shadow_failed", "agree"];
    for (run, (i, verdict)) in runs.iter().zip(expected.iter().enumerate()) {
        let n = 4 - i as u32;
        let (primary, candidate) = cases[(n - 1) as usize];
        assert_eq!(run["verdict"], *verdict, "{run:#}");
        assert_eq!(run["route"], "builds");
        assert_eq!(run["repo"], "acme/api");
        assert_eq!(run["sha"], sha(n));
        assert_eq!(
            run["primary"],
            json!([{"target": "primary", "state": primary,
                    "url": format!("https://app.circleci.com/pipelines/github/acme/api/{n}")}])
        );
        assert_eq!(
            run["shadow"],
            json!([{"target": "candidate", "state": candidate,
                    "url": format!("https://gitlab.example.com/acme/api/-/pipelines/{}", 900 + n)}])
        );
    }
    let metrics = relay.metrics().await;
    for (verdict, count) in [("agree", 2), ("shadow_failed", 1), ("shadow_passed", 1)] {
        let line = format!(r#"relay_shadow_verdicts_total{{route="builds",verdict="{verdict}"}} {count}"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // The shadow is never reported: every status is the primary's.
    relay.wait_jobs("target=status:github&state=done", 8).await;
    let statuses = api.requests();
    assert_eq!(statuses.len(), 8, "a pending and a final status per push");
    assert!(
        statuses.iter().all(|s| s.json()["context"] == "relay/primary"),
        "{statuses:#?}"
    );
    // The overview page shows the week's summary.
    let overview = crate::support::test_client()
        .get(format!("http://{}/", relay.admin.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        overview.contains("<tr><td>2</td><td>1</td><td>1</td><td>0</td></tr>"),
        "{overview}"
    );
    let text = relay::cli::format_shadow(&shadow);
    assert!(text.starts_with("ROUTE "), "{text}");
    assert!(
        text.contains("\nbuilds                         2              1              1        0\n"),
        "{text}"
    );
    assert!(text.contains("latest disagreements:"), "{text}");
    eprintln!("{text}");
    relay.stop().await;
}
