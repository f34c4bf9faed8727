//! The secrets sweep: every kind of secret `relay.toml` can hold (each
//! provider's webhook secret or token, a rotation's older value, GitLab's
//! signing token, every target kind's token, an http target's signing
//! secret, a proxy password, the admin token, the payload-URL key, a
//! source's API token for commit statuses, a followed target's polling
//! token, and on PostgreSQL the store's password), each a distinctive string, is absent
//! from everything relay shows or keeps after real traffic: text and JSON
//! logs, every error body (401, 400, 403, 404, 405, 503), every admin API
//! answer and `/metrics`, `relay check` and `relay explain`, and the store
//! read directly (the SQLite file, its WAL and every body decompressed; each
//! PostgreSQL table copied out whole). Targets fail on purpose (one echoes
//! its token, one is unreachable, one sits behind a refusing proxy) so the
//! error paths write their messages too. Runs the real binary.
//!
//! `tests/it/secrets.rs` is the narrower story test (one secret per way of
//! configuring it); this one is the exhaustive scan.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::on_both_backends;
use crate::support::{
    Backend, Daemon, MockServer, PATIENCE, Reply, b64, fixture, hex, hmac_sha256, post_to, relay_binary,
    sign, store_bytes, stored_bodies, test_client,
};
use relay::config::StoreLocation;

const GH_SECRET: &str = "sweep-gh-new-Q81z";
const GH_OLD_SECRET: &str = "sweep-gh-old-Q82z";
const GL_TOKEN: &str = "sweep-gl-token-Q83z";
/// GitLab's signing token is `whsec_` and the base64 of this key.
const GL_SIGNING_KEY: &str = "sweep-gl-signing-Q84z";
const BB_SECRET: &str = "sweep-bb-secret-Q85z";
const GT_SECRET: &str = "sweep-gt-secret-Q86z";
const CC_SOURCE_SECRET: &str = "sweep-cc-source-Q87z";
const GENERIC_SECRET: &str = "sweep-generic-Q88z";
const CIRCLE_TOKEN: &str = "sweep-circle-token-Q89z";
const V1_TOKEN: &str = "sweep-v1-token-Q90z";
const TRIGGER_TOKEN: &str = "sweep-trigger-Q91z";
const HTTP_SIGN_SECRET: &str = "sweep-http-sign-Q92z";
const PROXY_PASSWORD: &str = "sweep-proxy-pw-Q93z";
const ADMIN_TOKEN: &str = "sweep-admin-token-Q94z";
const PAYLOAD_KEY: &str = "sweep-payload-key-Q95z";
/// The GitHub API token commit statuses are posted with (`sources.gh.api`).
const API_TOKEN: &str = "sweep-api-token-Q96z";
/// The GitLab API token a followed pipeline is polled with (`follow.token`).
const FOLLOW_TOKEN: &str = "sweep-follow-token-Q97z";

/// Every configured secret, and the encoded forms relay itself makes of
/// some (a proxy's Basic credentials, the whsec_ token as configured).
fn secrets(store_password: Option<&str>) -> Vec<String> {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut all: Vec<String> = [
        GH_SECRET,
        GH_OLD_SECRET,
        GL_TOKEN,
        GL_SIGNING_KEY,
        BB_SECRET,
        GT_SECRET,
        CC_SOURCE_SECRET,
        GENERIC_SECRET,
        CIRCLE_TOKEN,
        V1_TOKEN,
        TRIGGER_TOKEN,
        HTTP_SIGN_SECRET,
        PROXY_PASSWORD,
        ADMIN_TOKEN,
        PAYLOAD_KEY,
        API_TOKEN,
        FOLLOW_TOKEN,
    ]
    .map(str::to_owned)
    .to_vec();
    all.push(signing_token());
    all.push(base64.encode(format!("relay-bot:{PROXY_PASSWORD}")));
    all.extend(store_password.map(str::to_owned));
    all
}

fn signing_token() -> String {
    format!("whsec_{}", b64(GL_SIGNING_KEY.as_bytes()))
}

/// Fails naming the place and the secret when `text` holds any of `secrets`.
fn assert_clean(secrets: &[String], place: &str, text: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{place} contains the secret {secret}:\n{text}"
        );
    }
}

/// The mock servers the targets send to.
struct Upstreams {
    circle: MockServer,
    legacy: MockServer,
    gitlab: MockServer,
    mirror: MockServer,
    proxy: MockServer,
    /// GitHub's API, which refuses the statuses, echoing the token.
    api: MockServer,
    /// A GitLab whose pipeline relay follows by polling.
    followed: MockServer,
}

impl Upstreams {
    async fn start() -> Upstreams {
        Upstreams {
            circle: MockServer::start(Reply::new(201, r#"{"id":"p-1","number":1,"state":"created"}"#)).await,
            // A CircleCI 1.1 that fails inside: a 500, retried until dead.
            legacy: MockServer::start(Reply::new(500, r#"{"message":"internal error"}"#)).await,
            // A GitLab that echoes the token in its refusal.
            gitlab: MockServer::start(Reply::new(
                400,
                &format!(r#"{{"message":"token {TRIGGER_TOKEN} is not valid"}}"#),
            ))
            .await,
            mirror: MockServer::start(Reply::new(200, "ok")).await,
            // A forward proxy that refuses the credentials it is sent.
            proxy: MockServer::start(Reply::new(407, "proxy authentication required")).await,
            api: MockServer::start(Reply::new(
                401,
                &format!(r#"{{"message":"Bad credentials: {API_TOKEN}"}}"#),
            ))
            .await,
            followed: MockServer::start(Reply::new(
                201,
                r#"{"id":7,"iid":1,"status":"running","web_url":"https://gitlab.test/acme/deploy/-/pipelines/7"}"#,
            ))
            .await,
        }
    }
}

/// `relay.toml` holding every kind of secret, each from a different place
/// (file, environment, literal, a rotation list). `store` is the whole
/// `[store]` table.
fn config(dir: &Path, store: &str, up: &Upstreams) -> String {
    let gh_file = dir.join("github.secret");
    std::fs::write(&gh_file, format!("{GH_SECRET}\n")).unwrap();
    let trigger_file = dir.join("trigger.token");
    std::fs::write(&trigger_file, TRIGGER_TOKEN).unwrap();
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
public_url = "http://relay.test"
payload_key = {{ env = "SWEEP_PAYLOAD_KEY" }}

[admin]
listen = "127.0.0.1:0"
token = {{ env = "SWEEP_ADMIN_TOKEN" }}

{store}

[delivery]
attempts = 1
timeout = "2s"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = [{{ file = "{gh_file}" }}, "{GH_OLD_SECRET}"]
api = {{ token = {{ env = "SWEEP_API_TOKEN" }}, url = "{api}" }}

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = {{ env = "SWEEP_GL_TOKEN" }}
signing_token = {{ env = "SWEEP_GL_SIGNING" }}

[sources.bb]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = "{BB_SECRET}"

[sources.gt]
provider = "gitea"
path = "/hooks/gitea"
secret = "{GT_SECRET}"

[sources.cc]
provider = "circleci"
path = "/hooks/circleci"
secret = {{ env = "SWEEP_CC_SOURCE" }}

[sources.gen]
provider = "generic"
path = "/hooks/generic"
secret = "{GENERIC_SECRET}"
signature = {{ header = "X-Signature", algorithm = "sha256", prefix = "sha256=" }}

[[routes]]
name = "everything"
events = ["push", "tag"]
to = ["circle", "legacy", "deploy", "deploy-payload", "mirror", "proxied", "unreachable"]

[[routes]]
name = "reported"
from = ["gh"]
events = ["push"]
to = ["followed"]
report = true

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = {{ env = "SWEEP_CIRCLE_TOKEN" }}
payload_parameter = "payload_url"

[targets.legacy]
kind = "circleci_v1"
base_url = "{legacy}"
project = "github/acme/api"
token = "{V1_TOKEN}"
job = "build"

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

[targets.followed]
kind = "gitlab"
base_url = "{followed}"
project = "acme/deploy"
ref = "main"
token = {{ file = "{trigger_file}" }}
follow = {{ token = {{ env = "SWEEP_FOLLOW_TOKEN" }}, first = "100ms", max = "200ms" }}

[targets.mirror]
kind = "http"
url = "{mirror}/hook"
sign = {{ secret = {{ env = "SWEEP_HTTP_SIGN" }} }}

[targets.proxied]
kind = "http"
url = "http://ci.invalid/hook"
proxy = {{ url = "{proxy}", username = "relay-bot", password = {{ env = "SWEEP_PROXY_PASSWORD" }} }}
sign = {{ secret = {{ env = "SWEEP_HTTP_SIGN" }} }}

[targets.unreachable]
kind = "http"
url = "http://127.0.0.1:1/hook"
sign = {{ secret = {{ env = "SWEEP_HTTP_SIGN" }} }}
"#,
        gh_file = gh_file.display(),
        trigger_file = trigger_file.display(),
        circle = up.circle.url(),
        legacy = up.legacy.url(),
        gitlab = up.gitlab.url(),
        mirror = up.mirror.url(),
        proxy = up.proxy.url(),
        api = up.api.url(),
        followed = up.followed.url(),
    )
}

/// The environment relay runs with (the `env` secrets, and the store's
/// password on PostgreSQL).
fn environment(store_password: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("SWEEP_PAYLOAD_KEY", PAYLOAD_KEY.to_owned()),
        ("SWEEP_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("SWEEP_GL_TOKEN", GL_TOKEN.to_owned()),
        ("SWEEP_GL_SIGNING", signing_token()),
        ("SWEEP_CC_SOURCE", CC_SOURCE_SECRET.to_owned()),
        ("SWEEP_CIRCLE_TOKEN", CIRCLE_TOKEN.to_owned()),
        ("SWEEP_HTTP_SIGN", HTTP_SIGN_SECRET.to_owned()),
        ("SWEEP_PROXY_PASSWORD", PROXY_PASSWORD.to_owned()),
        ("SWEEP_API_TOKEN", API_TOKEN.to_owned()),
        ("SWEEP_FOLLOW_TOKEN", FOLLOW_TOKEN.to_owned()),
    ];
    if let Some(pw) = store_password {
        env.push(("SWEEP_STORE_PASSWORD", pw.to_owned()));
    }
    env
}

/// `[store]` for the backend: on PostgreSQL the URL's password moves to
/// `store.password` (a secret from the environment), so it is swept too.
fn store_table(backend: &Backend, dir: &Path) -> (String, Option<String>) {
    match backend {
        Backend::Sqlite => (
            format!("[store]\nurl = \"sqlite://{}\"\n", dir.join("relay.db").display()),
            None,
        ),
        Backend::Postgres(url) => {
            let (scheme, rest) = url.split_once("://").unwrap();
            let (userinfo, host) = rest.split_once('@').expect("the test database URL has a user");
            let (user, password) = userinfo
                .split_once(':')
                .expect("the test database URL has a password");
            (
                format!(
                    "[store]\nurl = \"{scheme}://{user}@{host}\"\npassword = {{ env = \"SWEEP_STORE_PASSWORD\" }}\n"
                ),
                Some(password.to_owned()),
            )
        }
    }
}

/// A push body in GitHub's shape (also what the generic source reads).
fn github_push(sha: &str) -> Vec<u8> {
    json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111", "after": sha,
        "repository": { "full_name": "acme/api", "html_url": "https://github.test/acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "id": sha, "message": "go" }, "commits": []
    })
    .to_string()
    .into_bytes()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sends one accepted webhook per source and a refusal of each kind;
/// returns every refusal's (what, status, body).
async fn traffic(daemon: &Daemon, round: u32) -> Vec<(String, u16, String)> {
    let sha = format!("{round}{}", "a".repeat(39));
    let delivery = |name: &str| format!("{name}-{round}");
    let mut refusals = Vec::new();
    let accept = async |path: &str, headers: Vec<(String, String)>, body: Vec<u8>| {
        let (status, answer) = post_to(&daemon.url(path), &headers, body).await;
        assert_eq!(status, 202, "{path}: {answer}");
        answer
    };

    let push = github_push(&sha);
    // The rotation's older secret is still accepted.
    accept(
        "/hooks/github",
        sign::github(GH_OLD_SECRET, "push", &delivery("gh"), &push),
        push.clone(),
    )
    .await;
    let mut gl_headers = sign::gitlab_signed(
        GL_SIGNING_KEY.as_bytes(),
        "Push Hook",
        &delivery("gl"),
        unix_now(),
        &gitlab_push(&sha),
    );
    gl_headers.push(("X-Gitlab-Token".into(), GL_TOKEN.into()));
    accept("/hooks/gitlab", gl_headers, gitlab_push(&sha)).await;
    let bb = bitbucket_push(&sha);
    accept(
        "/hooks/bitbucket",
        sign::bitbucket(BB_SECRET, "repo:push", &delivery("bb"), &bb),
        bb,
    )
    .await;
    // An old Gitea puts the webhook secret inside the payload.
    let mut legacy: serde_json::Value = serde_json::from_slice(&push).unwrap();
    legacy["secret"] = json!(GT_SECRET);
    let legacy = legacy.to_string().into_bytes();
    accept(
        "/hooks/gitea",
        sign::gitea(GT_SECRET, "push", &delivery("gt"), &legacy),
        legacy,
    )
    .await;
    let mut workflow: serde_json::Value = serde_json::from_slice(
        &fixture("circleci/workflow-completed-github.json").expect("../shared/fixtures"),
    )
    .unwrap();
    workflow["id"] = json!(format!("00000000-0000-4000-8000-00000000000{round}"));
    let workflow = workflow.to_string().into_bytes();
    accept(
        "/hooks/circleci",
        sign::circleci(CC_SOURCE_SECRET, "workflow-completed", &workflow),
        workflow,
    )
    .await;
    let generic = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        (
            "X-Signature".to_owned(),
            format!(
                "sha256={}",
                hex(&hmac_sha256(GENERIC_SECRET.as_bytes(), &[&push]))
            ),
        ),
    ];
    accept("/hooks/generic", generic, push.clone()).await;

    // Refusals: each provider's wrong secret, a secret one character off,
    // a signed body that is not JSON, no such path, the wrong method.
    let mut refuse = async |what: &str, path: &str, headers: Vec<(String, String)>, body: Vec<u8>| {
        let (status, answer) = post_to(&daemon.url(path), &headers, body).await;
        refusals.push((what.to_owned(), status, answer));
    };
    let almost = format!("{}x", &GH_SECRET[..GH_SECRET.len() - 1]);
    refuse(
        "github, a secret one character off",
        "/hooks/github",
        sign::github(&almost, "push", "bad-1", &push),
        push.clone(),
    )
    .await;
    refuse(
        "gitlab, the wrong token",
        "/hooks/gitlab",
        sign::gitlab("guess", "Push Hook", "bad-2"),
        b"{}".to_vec(),
    )
    .await;
    refuse(
        "gitlab, the right token, no signature",
        "/hooks/gitlab",
        sign::gitlab(GL_TOKEN, "Push Hook", "bad-3"),
        b"{}".to_vec(),
    )
    .await;
    refuse(
        "bitbucket, wrong secret",
        "/hooks/bitbucket",
        sign::bitbucket("guess", "repo:push", "bad-4", &push),
        push.clone(),
    )
    .await;
    refuse(
        "gitea, wrong secret",
        "/hooks/gitea",
        sign::gitea("guess", "push", "bad-5", &push),
        push.clone(),
    )
    .await;
    refuse(
        "circleci, wrong secret",
        "/hooks/circleci",
        sign::circleci("guess", "workflow-completed", &push),
        push.clone(),
    )
    .await;
    refuse(
        "generic, no signature",
        "/hooks/generic",
        vec![("Content-Type".to_owned(), "application/json".to_owned())],
        push.clone(),
    )
    .await;
    let not_json = b"this is not json".to_vec();
    refuse(
        "github, signed but not JSON",
        "/hooks/github",
        sign::github(GH_SECRET, "push", "bad-6", &not_json),
        not_json,
    )
    .await;
    refuse(
        "no such source",
        "/hooks/nowhere",
        sign::github(GH_SECRET, "push", "bad-7", &push),
        push.clone(),
    )
    .await;
    let response = test_client()
        .get(daemon.url("/hooks/github"))
        .send()
        .await
        .unwrap();
    refusals.push((
        "GET on a source".to_owned(),
        response.status().as_u16(),
        response.text().await.unwrap(),
    ));
    refusals
}

fn gitlab_push(sha: &str) -> Vec<u8> {
    json!({
        "object_kind": "push", "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": sha, "user_username": "ada",
        "project": { "path_with_namespace": "acme/api", "web_url": "https://gitlab.test/acme/api" },
        "commits": [], "total_commits_count": 0
    })
    .to_string()
    .into_bytes()
}

fn bitbucket_push(sha: &str) -> Vec<u8> {
    json!({
        "actor": { "nickname": "lin" },
        "repository": { "full_name": "acme/api", "links": { "html": { "href": "https://bitbucket.test/acme/api" } } },
        "push": { "changes": [{
            "new": { "type": "branch", "name": "main", "target": { "hash": sha, "message": "m" } },
            "old": { "type": "branch", "name": "main", "target": { "hash": "1111111111111111111111111111111111111111" } },
            "created": false, "closed": false, "forced": false
        }] }
    })
    .to_string()
    .into_bytes()
}

/// An admin call: (status, body), with the token or without.
async fn admin(daemon: &Daemon, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = daemon.admin.expect("the admin listener");
    let client = test_client();
    let url = format!("http://{addr}{path}");
    let mut request = match method {
        "POST" => client.post(url),
        _ => client.get(url),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Waits until no job is queued or in flight; returns every job's id.
async fn settled_jobs(daemon: &Daemon) -> Vec<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (_, text) = admin(daemon, "GET", "/api/jobs?limit=1000", Some(ADMIN_TOKEN)).await;
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        let jobs = answer["jobs"].as_array().unwrap().clone();
        let open = jobs
            .iter()
            .filter(|j| j["state"] == "queued" || j["state"] == "in_flight")
            .count();
        if open == 0 && !jobs.is_empty() {
            return jobs
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_owned())
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs did not settle: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every admin answer there is, with the token and without; each must be
/// free of secrets. Returns how many were read.
async fn sweep_admin(daemon: &Daemon, secrets: &[String]) -> usize {
    let jobs = settled_jobs(daemon).await;
    let (_, events) = admin(daemon, "GET", "/api/events?limit=1000", Some(ADMIN_TOKEN)).await;
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let mut calls: Vec<(&str, String)> = vec![
        ("GET", "/healthz".into()),
        ("GET", "/readyz".into()),
        ("GET", "/metrics".into()),
        ("GET", "/api/events".into()),
        ("GET", "/api/jobs".into()),
        ("GET", "/api/jobs?state=done".into()),
        ("GET", "/api/jobs?state=dead".into()),
        ("GET", "/api/jobs?state=queued".into()),
        ("GET", "/api/jobs?state=in_flight".into()),
        ("GET", "/api/jobs?state=bogus".into()),
        ("GET", "/api/jobs?target=deploy".into()),
        ("GET", "/api/jobs/not-a-job".into()),
        ("GET", "/api/nothing".into()),
        ("POST", "/api/jobs/retry?target=unreachable".into()),
        ("POST", "/api/jobs/retry?target=deploy&since=1h".into()),
        ("GET", "/api/shadow".into()),
        ("POST", "/api/catch-up?source=github".into()),
        ("GET", "/".into()),
        ("GET", "/events".into()),
        ("GET", "/dead".into()),
        ("GET", "/nothing".into()),
    ];
    for id in &jobs {
        calls.push(("GET", format!("/api/jobs/{id}")));
        calls.push(("POST", format!("/api/jobs/{id}/retry")));
    }
    for event in events["events"].as_array().unwrap() {
        let id = event["id"].as_str().unwrap();
        calls.push(("GET", format!("/api/jobs?event={id}")));
        calls.push(("GET", format!("/api/events/{id}")));
        calls.push(("GET", format!("/api/events/{id}/explain")));
        calls.push(("GET", format!("/events/{id}")));
    }
    let mut unauthorized = 0;
    for (method, path) in &calls {
        for token in [Some(ADMIN_TOKEN), None, Some("sweep-wrong-token")] {
            let (status, body) = admin(daemon, method, path, token).await;
            unauthorized += usize::from(status == 401);
            assert_clean(secrets, &format!("{method} {path} ({status})"), &body);
        }
    }
    assert!(unauthorized > 0, "no admin call was refused for its token");
    calls.len()
}

/// Holds the store's write lock (SQLite) or the events table's (PostgreSQL)
/// long enough that a webhook cannot be recorded in `SENDERS_DEADLINE`:
/// the sender gets a 503.
async fn refused_by_a_held_store(daemon: &Daemon, store: &StoreLocation) -> (u16, String) {
    let push = github_push(&"e".repeat(40));
    let headers = sign::github(GH_SECRET, "push", "held-1", &push);
    match store {
        StoreLocation::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            let answer = post_to(&daemon.url("/hooks/github"), &headers, push).await;
            conn.execute_batch("ROLLBACK").unwrap();
            answer
        }
        StoreLocation::Postgres(pg) => {
            let (mut client, connection) = pg.connect.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let tx = client.transaction().await.unwrap();
            tx.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            let answer = post_to(&daemon.url("/hooks/github"), &headers, push).await;
            tx.rollback().await.unwrap();
            answer
        }
    }
}

/// What the CLI prints: `relay check` and `relay explain` for every source.
fn sweep_cli(config: &Path, env: &[(&'static str, String)], dir: &Path, secrets: &[String]) {
    let push = dir.join("push.json");
    std::fs::write(&push, github_push(&"c".repeat(40))).unwrap();
    let gitlab = dir.join("gitlab.json");
    std::fs::write(&gitlab, gitlab_push(&"c".repeat(40))).unwrap();
    let bb = dir.join("bitbucket.json");
    std::fs::write(&bb, bitbucket_push(&"c".repeat(40))).unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec!["check"],
        vec!["explain", "-s", "gh", "-e", "push"],
        vec!["explain", "-s", "gen", "-e", "push"],
        vec!["explain", "-s", "gt", "-e", "push"],
        vec!["explain", "-s", "gl", "-e", "Push Hook"],
        vec!["explain", "-s", "bb", "-e", "repo:push"],
        // A refusal: not JSON for this source.
        vec!["explain", "-s", "cc", "-e", "workflow-completed"],
    ];
    for args in runs {
        let mut command = Command::new(relay_binary());
        command.args(&args).arg("-c").arg(config);
        let source = args.get(2).copied().unwrap_or_default();
        if args[0] == "explain" {
            command.arg(match source {
                "gl" => &gitlab,
                "bb" => &bb,
                _ => &push,
            });
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() || source == "cc",
            "relay {args:?} failed: {text}"
        );
        assert_clean(secrets, &format!("relay {args:?}"), &text);
        if args == ["explain", "-s", "gh", "-e", "push"] {
            // The sweep reads what explain shows in the credentials' place.
            assert!(text.contains("Circle-Token: [redacted]"), "{text}");
            assert!(text.contains("token=[redacted]"), "{text}");
        }
    }
}

async fn sweep(backend: Backend) {
    let up = Upstreams::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (store, store_password) = store_table(&backend, dir.path());
    let secrets = secrets(store_password.as_deref());
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, config(dir.path(), &store, &up)).unwrap();
    let env = environment(store_password.as_deref());
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Where the test itself reads the store (with the password in the URL).
    let location = match &backend {
        Backend::Sqlite => StoreLocation::Sqlite(dir.path().join("relay.db")),
        Backend::Postgres(url) => {
            relay::config::Config::from_toml(&format!("[store]\nurl = \"{url}\"\n"))
                .unwrap_or_else(|e| panic!("{e}"))
                .store
                .location
        }
    };

    // Two runs on the one store: JSON logs, then text logs (and a store
    // held past the senders' deadline, for the 503).
    let mut all_refusals = Vec::new();
    for round in 1..=2u32 {
        let daemon = if round == 1 {
            Daemon::start(&config_path, &env_refs)
        } else {
            Daemon::start_text(&config_path, &env_refs)
        };
        all_refusals.extend(traffic(&daemon, round).await);
        if round == 2 {
            let (status, body) = refused_by_a_held_store(&daemon, &location).await;
            all_refusals.push(("a store held past the deadline".to_owned(), status, body));
        }
        up.circle.wait_for(round as usize).await;
        let calls = sweep_admin(&daemon, &secrets).await;
        assert!(calls > 20, "only {calls} admin calls");

        // A payload URL, as the CircleCI target received it, and a forged one.
        let sent = up.circle.requests();
        let url = sent.last().unwrap().json()["parameters"]["payload_url"]
            .as_str()
            .expect("the circle target gets a payload URL")
            .replace("http://relay.test", &daemon.url(""));
        for (what, url) in [
            ("payload URL", url.clone()),
            ("forged payload URL", format!("{url}0")),
        ] {
            let response = test_client().get(&url).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_clean(&secrets, &format!("the {what} ({status})"), &body);
            all_refusals.push((what.to_owned(), status, body));
        }

        let (status, logs) = daemon.terminate();
        assert!(status.success(), "relay exited with {status}");
        let format = if round == 1 { "JSON" } else { "text" };
        assert_clean(&secrets, &format!("relay's {format} log"), &logs);
        assert!(
            logs.contains("job is dead"),
            "the failing targets are logged:\n{logs}"
        );
        if round == 2 {
            assert!(
                !logs.trim_start().starts_with('{'),
                "the second run's log is text:\n{logs}"
            );
        }
    }

    for (what, status, body) in &all_refusals {
        assert_clean(&secrets, &format!("the answer to {what} ({status})"), body);
    }
    let statuses: std::collections::BTreeSet<u16> = all_refusals.iter().map(|(_, s, _)| *s).collect();
    for expected in [200, 400, 401, 403, 404, 405, 503] {
        assert!(
            statuses.contains(&expected),
            "no answer with status {expected} was swept: {all_refusals:?}"
        );
    }
    // The targets got their credentials (so the sweep is not vacuous).
    assert_eq!(up.circle.requests()[0].header("circle-token"), Some(CIRCLE_TOKEN));
    assert!(!up.legacy.requests().is_empty() && !up.proxy.requests().is_empty());
    assert!(!up.gitlab.requests().is_empty() && !up.mirror.requests().is_empty());
    assert_eq!(
        up.api.requests()[0].header("authorization"),
        Some(format!("Bearer {API_TOKEN}").as_str()),
        "the commit status went out with the API token"
    );
    let polled = up.followed.requests();
    assert!(
        polled.iter().any(|r| r.method == "GET"),
        "the followed pipeline was polled: {polled:?}"
    );

    // The store, read directly: every byte of the SQLite file and its WAL or
    // of every PostgreSQL table, and on SQLite each body unpacked.
    let bytes = store_bytes(&location).await;
    assert!(
        bytes.len() > 1000,
        "the store is nearly empty: {} bytes",
        bytes.len()
    );
    assert_clean(&secrets, "the store", &String::from_utf8_lossy(&bytes));
    if let StoreLocation::Sqlite(db) = &location {
        let bodies = stored_bodies(db, None);
        // Six accepted webhooks per run, and perhaps the one refused with a
        // 503 in the second: its commit goes on after the senders' deadline
        // (accept.rs), and lands once the held lock is released.
        assert!(
            (12..=13).contains(&bodies.len()),
            "six accepted webhooks per run: {} bodies",
            bodies.len()
        );
        for stored in bodies {
            for plain in std::iter::once(stored.body).chain(stored.payload) {
                assert_clean(
                    &secrets,
                    "a stored body, unpacked",
                    &String::from_utf8_lossy(&plain),
                );
            }
        }
    }

    sweep_cli(&config_path, &env, dir.path(), &secrets);
}

on_both_backends!(cases: [sweep]);
