//! No secret value reaches the logs, an error body, `relay check`/`relay
//! explain` output or the store — whichever way it was configured (file,
//! env, literal), whatever the targets answer, and even when an old Gitea
//! puts the webhook secret inside the payload. Runs the real binary.

use std::process::Command;

use serde_json::json;

use crate::support::{Daemon, MockServer, Reply, api_get, post_to, relay_binary, sign};

const GH_SECRET: &str = "gh-Sx7Q-webhook-secret-9f1c";
const GL_TOKEN: &str = "gl-Tk4R-webhook-token-22aa";
const GT_SECRET: &str = "gt-Lg9W-gitea-secret-7d0e";
const CIRCLE_TOKEN: &str = "circle-Ck3P-api-token-5b6d";
const TRIGGER_TOKEN: &str = "glptt-Tr8Z-trigger-token-1e4f";
const MIRROR_SECRET: &str = "mirror-Mr2V-sign-secret-c3a9";
const ALL: [&str; 6] = [
    GH_SECRET,
    GL_TOKEN,
    GT_SECRET,
    CIRCLE_TOKEN,
    TRIGGER_TOKEN,
    MIRROR_SECRET,
];

fn assert_clean(place: &str, text: &str) {
    for secret in ALL {
        assert!(
            !text.contains(secret),
            "{place} contains the secret {secret}:\n{text}"
        );
    }
}

#[tokio::test]
async fn secrets_stay_out_of_logs_answers_output_and_store() {
    let circle = MockServer::start(Reply::new(201, r#"{"id":"x","number":1,"state":"created"}"#)).await;
    // A GitLab that echoes the token back in its error, as a careless proxy might.
    let gitlab = MockServer::start(Reply::new(
        400,
        &format!(r#"{{"message":"token {TRIGGER_TOKEN} is not valid for this project"}}"#),
    ))
    .await;
    let mirror = MockServer::start(Reply::new(200, "ok")).await;

    let dir = tempfile::tempdir().unwrap();
    let gh_file = dir.path().join("github.secret");
    std::fs::write(&gh_file, format!("{GH_SECRET}\n")).unwrap();
    let trigger_file = dir.path().join("trigger.token");
    std::fs::write(&trigger_file, TRIGGER_TOKEN).unwrap();
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "127.0.0.1:0"

[store]
url = "sqlite://{db}"

[delivery]
attempts = 1

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = {{ file = "{gh_file}" }}

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = {{ env = "TEST_GL_TOKEN" }}

[sources.gt]
provider = "gitea"
path = "/hooks/gitea"
secret = "{GT_SECRET}"

[[routes]]
name = "everything"
events = ["push", "tag"]
to = ["circle", "deploy", "deploy-payload", "mirror"]

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = {{ env = "TEST_CIRCLE_TOKEN" }}

[targets.deploy]
kind = "gitlab"
base_url = "{gitlab}"
project = "acme/deploy"
token = {{ file = "{trigger_file}" }}

[targets.deploy-payload]
kind = "gitlab"
base_url = "{gitlab}"
project = "acme/deploy"
token = {{ file = "{trigger_file}" }}
forward_payload = true

[targets.mirror]
kind = "http"
url = "{mirror}/hook"
sign = {{ secret = {{ env = "TEST_MIRROR_SECRET" }} }}
"#,
        db = dir.path().join("relay.db").display(),
        gh_file = gh_file.display(),
        trigger_file = trigger_file.display(),
        circle = circle.url(),
        gitlab = gitlab.url(),
        mirror = mirror.url(),
    );
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, &config).unwrap();
    let env = [
        ("TEST_GL_TOKEN", GL_TOKEN),
        ("TEST_CIRCLE_TOKEN", CIRCLE_TOKEN),
        ("TEST_MIRROR_SECRET", MIRROR_SECRET),
    ];
    let daemon = Daemon::start(&config_path, &env);

    let push = json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222",
        "repository": { "full_name": "acme/api" }, "pusher": { "name": "ada" },
        "head_commit": { "message": "go" }, "commits": []
    })
    .to_string();
    let mut answers = Vec::new();
    let (status, answer) = post_to(
        &daemon.url("/hooks/github"),
        &sign::github(GH_SECRET, "push", "d-1", push.as_bytes()),
        push.clone(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    // Refusals: wrong signature, wrong token, wrong Gitea secret.
    answers.push(
        post_to(
            &daemon.url("/hooks/github"),
            &sign::github("guess", "push", "d-2", push.as_bytes()),
            push.clone(),
        )
        .await,
    );
    answers.push(
        post_to(
            &daemon.url("/hooks/gitlab"),
            &sign::gitlab("guess", "Push Hook", "d-3"),
            "{}",
        )
        .await,
    );
    answers.push(
        post_to(
            &daemon.url("/hooks/gitlab"),
            &sign::gitlab("", "Push Hook", "d-4"),
            "{}",
        )
        .await,
    );
    // An old Gitea (before 1.14) sends the webhook secret inside the payload.
    let legacy = json!({
        "secret": GT_SECRET, "ref": "refs/heads/main",
        "before": "1111111111111111111111111111111111111111", "after": "3333333333333333333333333333333333333333",
        "repository": { "full_name": "acme/api" }, "pusher": { "login": "ada" }, "commits": []
    })
    .to_string();
    let (status, answer) = post_to(
        &daemon.url("/hooks/gitea"),
        &sign::gitea(GT_SECRET, "push", "d-5", legacy.as_bytes()),
        legacy,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    for (status, body) in &answers {
        assert_eq!(*status, 401, "{body}");
        assert_clean("an error answer", body);
    }

    circle.wait_for(2).await;
    gitlab.wait_for(4).await;
    let mirrored = mirror.wait_for(2).await;
    for r in &mirrored {
        assert_clean(
            "the body forwarded to an http target",
            &String::from_utf8_lossy(&r.body),
        );
    }
    // The tokens did go where they belong.
    assert_eq!(circle.requests()[0].header("circle-token"), Some(CIRCLE_TOKEN));

    let db = dir.path().join("relay.db");
    let admin = daemon.admin.expect("the admin listener");
    let deadline = std::time::Instant::now() + crate::support::PATIENCE;
    loop {
        let queued = api_get(admin, "/api/jobs?state=queued").await;
        let in_flight = api_get(admin, "/api/jobs?state=in_flight").await;
        if queued["jobs"] == json!([]) && in_flight["jobs"] == json!([]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "jobs did not finish");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // What GitLab answered, as the jobs API shows it: its echo of the token
    // is redacted.
    let dead = api_get(admin, "/api/jobs?state=dead").await;
    let mut excerpts = Vec::new();
    for job in dead["jobs"].as_array().unwrap() {
        let detail = api_get(admin, &format!("/api/jobs/{}", job["id"].as_str().unwrap())).await;
        assert_clean("a dead job in the jobs API", &detail.to_string());
        for attempt in detail["history"].as_array().unwrap() {
            if attempt["status"] == 400 {
                excerpts.push(attempt["excerpt"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(excerpts.len(), 4, "two GitLab targets, two webhooks");
    for e in &excerpts {
        assert!(e.contains("token [redacted] is not valid"), "{e}");
    }
    let (status, logs) = daemon.terminate();
    assert!(status.success(), "relay exited with {status}");
    assert_clean("relay's log", &logs);
    assert!(
        logs.contains("job is dead"),
        "the 400 from GitLab should be logged:\n{logs}"
    );
    assert!(
        logs.contains("/ref/main/trigger/pipeline?variables[RELAY_HOP]=1&token=[redacted]\""),
        "the webhook-style trigger's URL is logged with its token redacted:\n{logs}"
    );

    // Every byte of the store: the database and any WAL left beside it.
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(bytes) = std::fs::read(&path) {
            assert_clean(
                &format!("the store file {path}"),
                &String::from_utf8_lossy(&bytes),
            );
        }
    }
    // And every stored body as it reads once unpacked: a compressed one
    // (codec 1) would hide a secret from the scan above.
    let bodies = crate::support::stored_bodies(&db, None);
    assert_eq!(bodies.len(), 2, "the push and the legacy Gitea push are stored");
    for stored in bodies {
        for plain in std::iter::once(stored.body).chain(stored.payload) {
            assert_clean("a stored event body", &String::from_utf8_lossy(&plain));
        }
    }

    // relay check and relay explain, with the same environment.
    let explain_payload = dir.path().join("push.json");
    std::fs::write(&explain_payload, &push).unwrap();
    for args in [
        vec!["check", "-c"],
        vec!["explain", "-s", "gh", "-e", "push", "-c"],
    ] {
        let mut command = Command::new(relay_binary());
        command.args(&args).arg(&config_path);
        if args[0] == "explain" {
            command.arg(&explain_payload);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "relay {} failed: {}",
            args[0],
            String::from_utf8_lossy(&output.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_clean(&format!("relay {}", args[0]), &text);
        if args[0] == "explain" {
            assert!(text.contains("Circle-Token: [redacted]"), "{text}");
            assert!(text.contains("token=[redacted]"), "{text}");
            assert!(text.contains(r#""token":"[redacted]""#), "{text}");
            assert!(text.contains("X-Hub-Signature-256: sha256=[redacted]"), "{text}");
        }
    }
}
