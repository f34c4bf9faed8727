//! CircleCI's `pipeline/run` (PROTOCOLS.md B2): a `circleci` target with a
//! `definition_id` posts `{definition_id, config, checkout, parameters}` to
//! `…/project/{slug}/pipeline/run`. Every body is checked field by field and
//! against the `pipelineRequest` schema of CircleCI's own OpenAPI document
//! (which allows no other property), and the 400/401/404 answers it declares
//! make the job dead at once with CircleCI's message.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Recorded, Relay, Reply, fixture, post_github_push};

crate::on_both_backends! {
    cases: [
        a_branch_push_runs_the_definition_with_config_and_checkout_from_the_branch,
        a_tag_push_checks_out_the_tag_and_reads_config_from_the_configured_branch,
        the_answers_the_api_declares_for_failure_make_the_job_dead_at_once,
    ],
}

const GH_SECRET: &str = "gh-source-secret-5e0c1a";
const CIRCLE_TOKEN: &str = "cci-token-8f41d2b9c07e";
const DEFINITION: &str = "2338d0ae-5541-4bbf-88a2-55e9f7281f80";
const APP_SLUG: &str = "circleci/89xcrx7UvWQfzcUPAEmu5Q/63AY3yf3XeUQojmQcGZTtB";
const SHA: &str = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";
const CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":42,"created_at":"2026-11-22T10:00:00Z"}"#;

/// One GitHub source and a route for pushes and tags to `to`.
fn config(to: &[&str], targets: &str) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{GH_SECRET}"

[[routes]]
name = "ci"
events = ["push", "tag"]
to = [{}]

[delivery]
backoff = {{ first = "50ms", max = "200ms", factor = 2.0 }}
{targets}
"#,
        to.join(", ")
    )
}

fn app_target(name: &str, base: &str, extra: &str) -> String {
    format!(
        r#"
[targets.{name}]
kind = "circleci"
base_url = "{base}"
project = "{APP_SLUG}"
token = "{CIRCLE_TOKEN}"
definition_id = "{DEFINITION}"
{extra}
"#
    )
}

/// The request's envelope: path, method, headers, and a body that CircleCI's
/// `pipelineRequest` schema accepts; returns the body.
fn assert_pipeline_run(r: &Recorded) -> Value {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path(), format!("/api/v2/project/{APP_SLUG}/pipeline/run"));
    assert_eq!(r.query(), None, "nothing rides in the query");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("circle-token"), Some(CIRCLE_TOKEN));
    assert_eq!(r.header("authorization"), None);
    let body = r.json();
    assert_fits_pipeline_request(&body);
    body
}

/// Checks `body` against `components.schemas.pipelineRequest` in CircleCI's
/// OpenAPI document: only declared properties (it sets
/// `additionalProperties: false`, as do `config` and `checkout`), each of its
/// declared type, a UUID where the format says so, and `branch` and `tag`
/// never together.
fn assert_fits_pipeline_request(body: &Value) {
    let Some(spec) = fixture("specs/circleci-api-v2-openapi.json") else {
        return;
    };
    let spec: Value = serde_json::from_slice(&spec).unwrap();
    let schema = &spec["components"]["schemas"]["pipelineRequest"];
    assert_eq!(schema["additionalProperties"], json!(false));
    let object = body.as_object().expect("the body is a JSON object");
    for (name, value) in object {
        let property = &schema["properties"][name];
        assert!(property.is_object(), "{name} is not in pipelineRequest: {body}");
        match property["type"].as_str() {
            Some("string") => {
                let text = value
                    .as_str()
                    .unwrap_or_else(|| panic!("{name} must be a string"));
                if property["format"] == json!("uuid") {
                    assert!(
                        uuid::Uuid::parse_str(text).is_ok(),
                        "{name} is not a UUID: {text}"
                    );
                }
            }
            Some("object") => {
                let fields = value
                    .as_object()
                    .unwrap_or_else(|| panic!("{name} must be an object"));
                if property["additionalProperties"] == json!(false) {
                    for (field, inner) in fields {
                        let declared = &property["properties"][field];
                        assert!(
                            declared.is_object(),
                            "{name}.{field} is not in the schema: {body}"
                        );
                        assert_eq!(declared["type"], json!("string"));
                        assert!(inner.is_string(), "{name}.{field} must be a string");
                    }
                    assert!(
                        !(fields.contains_key("branch") && fields.contains_key("tag")),
                        "{name}: branch and tag are mutually exclusive"
                    );
                }
            }
            other => panic!("{name}: unexpected schema type {other:?}"),
        }
    }
}

async fn a_branch_push_runs_the_definition_with_config_and_checkout_from_the_branch(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, CREATED)).await;
    let target = app_target(
        "app",
        &mock.url(),
        r#"parameters = { deploy = false, count = 3, sha = "{{ sha }}" }
hop_parameter = "relay_hop""#,
    );
    let relay = Relay::start_on(&backend, &config(&["app"], &target)).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-run-branch").await;

    let requests = mock.wait_for(1).await;
    assert_eq!(requests.len(), 1);
    let body = assert_pipeline_run(&requests[0]);
    assert_eq!(
        body,
        json!({
            "definition_id": DEFINITION,
            "config": { "branch": "main" },
            "checkout": { "branch": "main" },
            "parameters": { "deploy": false, "count": 3, "sha": SHA, "relay_hop": 1 }
        })
    );
    relay.wait_done(1).await;
    relay.stop().await;
}

async fn a_tag_push_checks_out_the_tag_and_reads_config_from_the_configured_branch(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, CREATED)).await;
    let target = app_target("app", &mock.url(), r#"config = { branch = "main" }"#);
    let relay = Relay::start_on(&backend, &config(&["app"], &target)).await;
    post_github_push(&relay, GH_SECRET, "refs/tags/v1.4.0", SHA, "d-run-tag").await;

    let requests = mock.wait_for(1).await;
    let body = assert_pipeline_run(&requests[0]);
    assert_eq!(
        body,
        json!({
            "definition_id": DEFINITION,
            "config": { "branch": "main" },
            "checkout": { "tag": "v1.4.0" }
        })
    );
    relay.wait_done(1).await;
    relay.stop().await;
}

async fn the_answers_the_api_declares_for_failure_make_the_job_dead_at_once(backend: Backend) {
    // The 400, 401 and 404 answers the OpenAPI document declares for
    // pipeline/run, with their documented messages.
    let answers = [
        ("bad", 400, "Unexpected request body provided."),
        ("token", 401, "Invalid token provided."),
        ("missing", 404, "Project does not exist."),
    ];
    // What relay adds for a person to act on: a 401 or 404 from API v2 is
    // most often a project token.
    const TOKEN_ADVICE: &str = "; API v2 needs a personal API token (a project API token does not work here), or the project slug is wrong";
    let mut mocks = Vec::new();
    let mut targets = String::new();
    for (name, status, message) in answers {
        let mock = MockServer::start(Reply::new(status, &json!({ "message": message }).to_string())).await;
        targets.push_str(&app_target(name, &mock.url(), ""));
        mocks.push(mock);
    }
    let names: Vec<&str> = answers.iter().map(|(name, ..)| *name).collect();
    let relay = Relay::start_on(&backend, &config(&names, &targets)).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-run-fail").await;

    relay.wait_jobs("state=dead", answers.len()).await;
    for ((name, status, message), mock) in answers.iter().zip(&mocks) {
        let requests = mock.requests();
        assert_eq!(requests.len(), 1, "{name}: a {status} is not retried");
        assert_pipeline_run(&requests[0]);
        let job = relay.job_for(name).await;
        assert_eq!(job["state"], "dead", "{job}");
        let advice = if *status == 400 { "" } else { TOKEN_ADVICE };
        assert_eq!(
            job["last_error"],
            json!(format!("{status}: {message}{advice}")),
            "{job}"
        );
    }
    relay.stop().await;
}
