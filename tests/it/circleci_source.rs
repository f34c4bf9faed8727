//! CircleCI's outbound webhooks as a source (`provider = "circleci"`), and
//! `generic` sources with `kind = "pipeline"`, end to end: relay on loopback,
//! a mock CircleCI API as the target. A workflow-completed is a `pipeline`
//! event routed by routes that take pipeline events and dropped with
//! `ci_outcome` otherwise; job-completed is recorded, not routed; a
//! redelivery (the same body `id`) is a duplicate; the signature is a
//! versioned list with secret rotation.

use serde_json::{Value, json};

use crate::support::{MockServer, Relay, Reply, hex, hmac_sha256, sign};

const CREATED: &str = r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":42,"created_at":"2026-11-22T10:00:00Z"}"#;
const PIPELINE_ID: &str = "877c620f-900a-455b-ad51-1a772b5a3eab";

/// A CircleCI source with a rotated secret, `pipeline_routes` (TOML), and a
/// CircleCI target whose parameters render the pipeline's context.
fn config(circle: &MockServer, routes: &str) -> String {
    format!(
        r#"
[sources.cci]
provider = "circleci"
path = "/hooks/circleci"
secret = ["new-secret", "old-secret"]

[sources.gen]
provider = "generic"
path = "/hooks/generic"
secret = "gen-secret"
signature = {{ header = "X-Signature", algorithm = "sha256", prefix = "sha256=" }}
kind = "pipeline"
fields = {{ repo = "/project", ref = "/ref", sha = "/sha", status = "/outcome", pipeline_id = "/run/id", pipeline_number = "/run/number", workflow = "/run/name", delivery = "/id" }}

{routes}

[targets.next]
kind = "circleci"
base_url = "{}"
project = "gh/acme/deploy"
token = "circle-token"
parameters = {{ upstream = "{{{{ pipeline_id }}}}", number = "{{{{ pipeline_number }}}}", workflow = "{{{{ workflow }}}}", status = "{{{{ status }}}}", repo = "{{{{ repo }}}}" }}
"#,
        circle.url()
    )
}

const PIPELINE_ROUTE: &str = r#"
[[routes]]
name = "after-ci"
events = ["pipeline"]
when = "status == 'success'"
to = ["next"]
"#;

const PUSH_ROUTE: &str = r#"
[[routes]]
name = "pushes"
to = ["next"]
"#;

/// A workflow-completed as CircleCI sends it (PROTOCOLS.md A5).
fn workflow_completed(id: &str, status: &str) -> Vec<u8> {
    json!({
        "type": "workflow-completed",
        "id": id,
        "happened_at": "2026-11-22T10:00:00Z",
        "webhook": { "id": "w", "name": "relay" },
        "workflow": { "id": "wf-1", "name": "build-and-test", "status": status,
                      "url": "https://app.circleci.com/pipelines/github/acme/api/4/workflows/wf-1" },
        "pipeline": {
            "id": PIPELINE_ID, "number": 4, "trigger": { "type": "webhook" },
            "vcs": { "provider_name": "github",
                     "origin_repository_url": "https://github.com/acme/api",
                     "target_repository_url": "https://github.com/acme/api",
                     "revision": "a".repeat(40), "branch": "main",
                     "commit": { "subject": "work", "body": "" } }
        },
        "project": { "id": "p", "name": "api", "slug": "github/acme/api" },
        "organization": { "id": "o", "name": "acme" }
    })
    .to_string()
    .into_bytes()
}

fn job_completed(id: &str) -> Vec<u8> {
    let mut body: Value = serde_json::from_slice(&workflow_completed(id, "success")).unwrap();
    body["type"] = json!("job-completed");
    body["workflow"].as_object_mut().unwrap().remove("status");
    body["job"] = json!({ "id": "j", "name": "test", "number": 6, "status": "failed" });
    body.to_string().into_bytes()
}

async fn post(relay: &Relay, headers: &[(String, String)], body: Vec<u8>) -> (u16, Value) {
    relay.post("/hooks/circleci", headers, body).await
}

/// Posts `body` as CircleCI would, signed with the current secret.
async fn post_signed(relay: &Relay, event: &str, body: Vec<u8>) -> (u16, Value) {
    let headers = sign::circleci("new-secret", event, &body);
    post(relay, &headers, body).await
}

#[tokio::test]
async fn a_successful_workflow_triggers_the_pipeline_route_with_its_context() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PIPELINE_ROUTE)).await;

    let failed = workflow_completed("e-1", "failed");
    let (status, answer) = post_signed(&relay, "workflow-completed", failed).await;
    assert_eq!((status, answer["jobs"].clone()), (202, json!(0)), "{answer}");

    let body = workflow_completed("e-2", "success");
    let (status, answer) = post_signed(&relay, "workflow-completed", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 1);
    assert_eq!(answer["routes"], json!(["after-ci"]));
    let trigger = &circle.wait_for(1).await[0];
    assert_eq!(trigger.path(), "/api/v2/project/gh/acme/deploy/pipeline");
    assert_eq!(trigger.json()["branch"], "main");
    let parameters = &trigger.json()["parameters"];
    assert_eq!(parameters["upstream"], PIPELINE_ID);
    assert_eq!(parameters["number"], "4");
    assert_eq!(parameters["workflow"], "build-and-test");
    assert_eq!(parameters["status"], "success");
    assert_eq!(parameters["repo"], "acme/api");
    relay.stop().await;
}

#[tokio::test]
async fn without_a_pipeline_route_a_workflow_is_dropped_as_a_ci_outcome() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PUSH_ROUTE)).await;
    let body = workflow_completed("e-1", "success");
    let (status, answer) = post_signed(&relay, "workflow-completed", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 0);
    assert_eq!(answer["dropped"][0]["rule"], "ci_outcome", "{answer}");
    assert_eq!(
        relay.metric("relay_dropped_total{rule=\"ci_outcome\"}").await,
        1.0
    );
    assert!(circle.requests().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn job_completed_is_recorded_and_acknowledged_but_not_routed() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, &format!("{PIPELINE_ROUTE}{PUSH_ROUTE}"))).await;
    let body = job_completed("job-1");
    let (status, answer) = post_signed(&relay, "job-completed", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 0);
    assert_eq!(answer["dropped"], json!([]), "{answer}");
    let events = relay.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["delivery"], "job-1", "{events:?}");
    assert!(circle.requests().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn a_redelivery_with_the_same_body_id_is_a_duplicate() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PIPELINE_ROUTE)).await;
    let body = workflow_completed("630a6132-5bf1-3600-b26d-a020d41358f9", "success");
    let headers = sign::circleci("new-secret", "workflow-completed", &body);
    let (first, answer) = post(&relay, &headers, body.clone()).await;
    assert_eq!(first, 202, "{answer}");
    let (again, duplicate) = post(&relay, &headers, body).await;
    assert_eq!((again, duplicate), (200, json!({ "duplicate": answer["event"] })));
    assert_eq!(relay.events().await.len(), 1);
    assert_eq!(relay.jobs("").await.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn signatures_are_a_versioned_list_checked_against_every_secret() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PIPELINE_ROUTE)).await;
    let body = workflow_completed("e-1", "failed");
    let good = format!("v1={}", hex(&hmac_sha256(b"new-secret", &[&body])));
    let with = |signature: Option<&str>| {
        let mut headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("Circleci-Event-Type".to_owned(), "workflow-completed".to_owned()),
        ];
        if let Some(value) = signature {
            headers.push(("Circleci-Signature".to_owned(), value.to_owned()));
        }
        headers
    };

    let (status, answer) = post(&relay, &with(None), body.clone()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("signature_missing"))
    );
    assert!(
        answer["message"].as_str().unwrap().contains("Circleci-Signature"),
        "{answer}"
    );
    assert!(
        answer["message"].as_str().unwrap().contains("sources.cci"),
        "{answer}"
    );

    let wrong = format!("v1={}", hex(&hmac_sha256(b"someone-else", &[&body])));
    let (status, answer) = post(&relay, &with(Some(&wrong)), body.clone()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("signature_mismatch"))
    );
    assert!(
        answer["message"].as_str().unwrap().contains("Circleci-Signature"),
        "{answer}"
    );

    let (status, answer) = post(&relay, &with(Some("v1=not-hex")), body.clone()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("signature_malformed"))
    );

    // An unknown version before a good v1 is ignored.
    let listed = format!("v2={},{good}", "f".repeat(64));
    let (status, answer) = post(&relay, &with(Some(&listed)), body.clone()).await;
    assert_eq!(status, 202, "{answer}");

    // Rotation: the second secret of the list verifies too.
    let body = workflow_completed("e-2", "failed");
    let (status, answer) = post(
        &relay,
        &sign::circleci("old-secret", "workflow-completed", &body),
        body,
    )
    .await;
    assert_eq!(status, 202, "{answer}");

    // The event type is required, as every provider's event header is.
    let body = workflow_completed("e-3", "failed");
    let mut headers = sign::circleci("new-secret", "workflow-completed", &body);
    headers.retain(|(name, _)| name != "Circleci-Event-Type");
    let (status, answer) = post(&relay, &headers, body).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("missing_header")),
        "{answer}"
    );

    // CircleCI sends JSON only: a signed form post is refused like GitLab's.
    let form = b"payload=%7B%7D".to_vec();
    let mut headers = sign::circleci("new-secret", "workflow-completed", &form);
    headers[0].1 = "application/x-www-form-urlencoded".to_owned();
    let (status, answer) = post(&relay, &headers, form).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("bad_payload")),
        "{answer}"
    );
    assert_eq!(relay.events().await.len(), 2);
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// generic sources with kind = "pipeline"
// ---------------------------------------------------------------------------

fn generic_outcome(id: &str, outcome: &str) -> (Vec<(String, String)>, Vec<u8>) {
    let body = json!({
        "id": id, "project": "acme/api", "ref": "refs/heads/main", "sha": "b".repeat(40),
        "outcome": outcome, "run": { "id": 7001, "number": 12, "name": "nightly" }
    })
    .to_string()
    .into_bytes();
    let headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        (
            "X-Signature".to_owned(),
            format!("sha256={}", hex(&hmac_sha256(b"gen-secret", &[&body]))),
        ),
    ];
    (headers, body)
}

#[tokio::test]
async fn a_generic_pipeline_source_meets_ci_outcome_without_a_pipeline_route() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PUSH_ROUTE)).await;
    let (headers, body) = generic_outcome("g-1", "success");
    let (status, answer) = relay.post("/hooks/generic", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 0);
    assert_eq!(answer["dropped"][0]["rule"], "ci_outcome", "{answer}");
    assert!(circle.requests().is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn a_generic_pipeline_source_is_routed_and_deduplicated_on_its_body_id() {
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let relay = Relay::start(&config(&circle, PIPELINE_ROUTE)).await;
    let (headers, body) = generic_outcome("g-1", "success");
    let (status, answer) = relay.post("/hooks/generic", &headers, body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], 1);
    let trigger = &circle.wait_for(1).await[0];
    let parameters = &trigger.json()["parameters"];
    assert_eq!(parameters["upstream"], "7001");
    assert_eq!(parameters["number"], "12");
    assert_eq!(parameters["workflow"], "nightly");
    assert_eq!(parameters["repo"], "acme/api");

    let (again, duplicate) = relay.post("/hooks/generic", &headers, body).await;
    assert_eq!((again, duplicate), (200, json!({ "duplicate": answer["event"] })));

    // A failed outcome is a pipeline event the route's `when` declines.
    let (headers, body) = generic_outcome("g-2", "failed");
    let (status, answer) = relay.post("/hooks/generic", &headers, body).await;
    assert_eq!((status, answer["jobs"].clone()), (202, json!(0)), "{answer}");

    // The body must carry the id fields.delivery points at.
    let (headers, body) = {
        let body = br#"{"project":"acme/api","ref":"main","outcome":"success","run":{"id":1}}"#.to_vec();
        let headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            (
                "X-Signature".to_owned(),
                format!("sha256={}", hex(&hmac_sha256(b"gen-secret", &[&body]))),
            ),
        ];
        (headers, body)
    };
    let (status, answer) = relay.post("/hooks/generic", &headers, body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("/id"), "{answer}");
    assert_eq!(relay.events().await.len(), 2);
    relay.stop().await;
}

#[test]
fn config_names_what_a_circleci_or_generic_pipeline_source_lacks_or_does_not_take() {
    let check = |text: &str| {
        relay::config::Config::from_toml(text)
            .err()
            .map(|e| e.to_string())
    };
    let missing = check("[sources.c]\nprovider = \"circleci\"\npath = \"/hooks/c\"\n").unwrap();
    assert!(missing.contains("sources.c.secret"), "{missing}");
    let described = relay::config::Config::from_toml(
        "[sources.c]\nprovider = \"circleci\"\npath = \"/hooks/c\"\nsecret = [\"a\", \"b\"]\n",
    )
    .unwrap();
    let described = described.source("c").unwrap().describe();
    assert!(
        described.starts_with("circleci POST /hooks/c (Circleci-Signature v1, secret from"),
        "{described}"
    );
    let misplaced =
        check("[sources.c]\nprovider = \"circleci\"\npath = \"/hooks/c\"\nsecret = \"s\"\ntoken = \"t\"\n")
            .unwrap();
    assert!(
        misplaced.contains("sources.c.token") && misplaced.contains("provider \"circleci\""),
        "{misplaced}"
    );
    let generic = "[sources.g]\nprovider = \"generic\"\npath = \"/hooks/g\"\nsecret = \"s\"\n\
                   signature = { header = \"X-Sig\" }\n";
    let without_status = check(&format!(
        "{generic}kind = \"pipeline\"\nfields = {{ pipeline_id = \"/id\" }}\n"
    ))
    .unwrap();
    assert!(
        without_status.contains("sources.g.fields.status"),
        "{without_status}"
    );
    let status_on_push = check(&format!("{generic}fields = {{ status = \"/status\" }}\n")).unwrap();
    assert!(
        status_on_push.contains("sources.g.fields.status") && status_on_push.contains(r#"kind = "pipeline""#),
        "{status_on_push}"
    );
    assert!(check(&format!(
        "{generic}kind = \"pipeline\"\nfields = {{ status = \"/s\", pipeline_id = \"/id\", delivery = \"/id\" }}\n"
    ))
    .is_none());
}
