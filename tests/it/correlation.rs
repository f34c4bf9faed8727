//! Correlation: a pipeline event that names a pipeline one of relay's jobs
//! started updates that job's pipeline state, inherits the hop count of the
//! event that triggered it, and carries `upstream` into its templates. So a
//! CircleCI → GitLab → CircleCI chain stops at `max_hops` although neither
//! completion here carries a variable back: the test plays both CIs,
//! answering each trigger by posting the pipeline's completion to relay.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply, fixture, sign};

crate::on_both_backends! {
    cases: [a_chain_through_cis_that_carry_no_variables_stops_at_max_hops],
}

const CCI_SECRET: &str = "cci-hook-secret-0123456789";
const GL_TOKEN: &str = "gl-hook-token-0123456789";

fn config(gitlab: &str, circle: &str) -> String {
    format!(
        r#"
[sources.circleci]
provider = "circleci"
path = "/hooks/circleci"
secret = "{CCI_SECRET}"

[sources.gitlab]
provider = "gitlab"
path = "/hooks/gitlab"
token = "{GL_TOKEN}"

[[routes]]
name = "cci-to-gl"
from = ["circleci"]
events = ["pipeline"]
when = "status == 'success'"
to = ["deploy"]

[[routes]]
name = "gl-to-cci"
from = ["gitlab"]
events = ["pipeline"]
when = "status == 'success'"
to = ["verify"]

[targets.deploy]
kind = "gitlab"
base_url = "{gitlab}"
project = "acme/deploy"
ref = "main"
token = "glptt-trigger-3b9e77a1d5"

[targets.verify]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "cci-token-8f41d2b9c07e"
parameters = {{ upstream_event = "{{{{ upstream.event_id }}}}", upstream_route = "{{{{ upstream.route }}}}" }}

[loop_guard]
max_hops = 3
dedupe_window = "0s"
"#
    )
}

/// CircleCI's `workflow-completed` for `pipeline_id`, number `number`, as its
/// fixture, with its own delivery id.
fn circleci_completed(pipeline_id: &str, number: u64, delivery: &str) -> Option<Vec<u8>> {
    let mut body: Value =
        serde_json::from_slice(&fixture("circleci/workflow-completed-github.json")?).unwrap();
    body["id"] = json!(delivery);
    body["pipeline"]["id"] = json!(pipeline_id);
    body["pipeline"]["number"] = json!(number);
    body["workflow"]["status"] = json!("success");
    Some(serde_json::to_vec(&body).unwrap())
}

/// GitLab's Pipeline Hook for pipeline `id`, succeeded, with no variables:
/// nothing in it says how many hops led here.
fn gitlab_completed(id: u64) -> Option<Vec<u8>> {
    let mut body: Value = serde_json::from_slice(&fixture("gitlab/pipeline-hook-docs.json")?).unwrap();
    body["object_attributes"]["id"] = json!(id);
    body["object_attributes"]["status"] = json!("success");
    body["object_attributes"]["variables"] = json!([]);
    Some(serde_json::to_vec(&body).unwrap())
}

async fn post_circleci(relay: &Relay, body: Vec<u8>) -> Value {
    let headers = sign::circleci(CCI_SECRET, "workflow-completed", &body);
    let (status, answer) = relay.post("/hooks/circleci", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

async fn post_gitlab(relay: &Relay, body: Vec<u8>, delivery: &str) -> Value {
    let headers = sign::gitlab(GL_TOKEN, "Pipeline Hook", delivery);
    let (status, answer) = relay.post("/hooks/gitlab", &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

async fn a_chain_through_cis_that_carry_no_variables_stops_at_max_hops(backend: Backend) {
    let (Some(start), Some(_)) = (
        circleci_completed("0b1f2a3c-0000-4000-8000-000000000000", 1, "d-cci-0"),
        gitlab_completed(1),
    ) else {
        return;
    };
    let gitlab = MockServer::start(Reply::new(201, "{}")).await;
    gitlab.script([
        Reply::new(201, r#"{"id":101,"iid":1,"status":"created","web_url":"https://gitlab.example.com/acme/deploy/-/pipelines/101"}"#),
        Reply::new(201, r#"{"id":102,"iid":2,"status":"created","web_url":"https://gitlab.example.com/acme/deploy/-/pipelines/102"}"#),
    ]);
    let circle = MockServer::start(Reply::new(
        201,
        r#"{"id":"c1c1c1c1-0000-4000-8000-000000000001","state":"created","number":1,"created_at":"2026-12-04T09:00:00Z"}"#,
    ))
    .await;
    let relay = Relay::start_on(&backend, &config(&gitlab.url(), &circle.url())).await;

    // Hop 0: a CircleCI pipeline relay did not start triggers the deploy.
    let first = post_circleci(&relay, start).await;
    assert_eq!(first["jobs"], 1, "{first}");
    let triggers = gitlab.wait_for(1).await;
    assert_eq!(triggers[0].json()["variables"]["RELAY_HOP"], "1");
    relay.wait_done(1).await;

    // GitLab reports pipeline 101 without variables: relay knows it started
    // it (hop 0 → this is hop 1), records its state, and passes on where it
    // came from.
    let second = post_gitlab(&relay, gitlab_completed(101).unwrap(), "d-gl-101").await;
    assert_eq!(second["jobs"], 1, "{second}");
    let deploy = relay.job_for("deploy").await;
    assert_eq!(deploy["pipeline"]["id"], "101");
    assert_eq!(
        deploy["pipeline"]["state"], "success",
        "the completion updated the job: {deploy}"
    );
    let verify = circle.wait_for(1).await;
    assert_eq!(
        verify[0].json()["parameters"],
        json!({ "upstream_event": first["event"], "upstream_route": "cci-to-gl" })
    );
    relay.wait_done(2).await;

    // CircleCI reports the pipeline relay started (hop 2): deploy again.
    let third = post_circleci(
        &relay,
        circleci_completed("c1c1c1c1-0000-4000-8000-000000000001", 1, "d-cci-1").unwrap(),
    )
    .await;
    assert_eq!(third["jobs"], 1, "{third}");
    let triggers = gitlab.wait_for(2).await;
    assert_eq!(triggers[1].json()["variables"]["RELAY_HOP"], "3");
    relay.wait_done(3).await;

    // GitLab reports that one: hop 3 is max_hops, and the chain stops.
    let fourth = post_gitlab(&relay, gitlab_completed(102).unwrap(), "d-gl-102").await;
    assert_eq!(fourth["jobs"], 0, "{fourth}");
    assert_eq!(fourth["dropped"][0]["rule"], "hop_limit", "{fourth}");
    assert_eq!(
        fourth["dropped"][0]["reason"],
        "the event is 3 relay hops deep; loop_guard.max_hops is 3"
    );
    assert_eq!(gitlab.requests().len(), 2);
    assert_eq!(circle.requests().len(), 1);

    // Each pipeline relay started and saw end is counted once, by target.
    assert_eq!(
        relay
            .metric(r#"relay_pipelines_finished_total{target="deploy",state="success"}"#)
            .await,
        2.0
    );
    assert_eq!(
        relay
            .metric(r#"relay_pipelines_finished_total{target="verify",state="success"}"#)
            .await,
        1.0
    );
    assert_eq!(
        relay
            .metric(r#"relay_pipeline_duration_seconds_count{target="deploy"}"#)
            .await,
        2.0
    );
    // The first completion was of a pipeline relay did not start: not
    // counted. The same report again (GitLab resends on a retry) changes
    // nothing more.
    let again = post_gitlab(&relay, gitlab_completed(102).unwrap(), "d-gl-102-again").await;
    assert_eq!(again["dropped"][0]["rule"], "hop_limit", "{again}");
    assert_eq!(
        relay
            .metric(r#"relay_pipelines_finished_total{target="deploy",state="success"}"#)
            .await,
        2.0
    );
    relay.stop().await;
}
