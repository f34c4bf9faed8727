//! Each job knows the pipeline its trigger started: every target kind reads
//! its own 2xx answer (CircleCI v2 `id`/`number`/`state`, v1.1
//! `build_num`/`build_url`, GitLab `id`/`iid`/`web_url`/`status`;
//! PROTOCOLS.md B1–B4) into the job's pipeline, which the admin API shows as
//! `{id, number, url, state, updated_at}` — `null` where an answer names none,
//! with the attempt saying why.

use serde_json::{Value, json};

use crate::support::{Backend, MockServer, Relay, Reply, post_github_push};

crate::on_both_backends! {
    cases: [
        every_kind_reads_the_pipeline_its_answer_names,
        an_answer_without_an_id_leaves_the_job_done_without_a_pipeline_and_says_why,
    ],
}

const GH_SECRET: &str = "gh-source-secret-5e0c1a";
const SHA: &str = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";
const APP_SLUG: &str = "circleci/89xcrx7UvWQfzcUPAEmu5Q/63AY3yf3XeUQojmQcGZTtB";

fn config(targets: &[(&str, String)]) -> String {
    let names: Vec<String> = targets.iter().map(|(name, _)| format!("{name:?}")).collect();
    let tables: Vec<&str> = targets.iter().map(|(_, table)| table.as_str()).collect();
    format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{GH_SECRET}"

[[routes]]
name = "ci"
to = [{}]
{}
"#,
        names.join(", "),
        tables.join("\n")
    )
}

/// The job's pipeline without its time, and whether the time is RFC 3339.
fn pipeline_of(job: &Value) -> Value {
    let mut pipeline = job["pipeline"].clone();
    if let Some(fields) = pipeline.as_object_mut() {
        // Not followed here (tests/it/follow.rs is about following).
        assert_eq!(fields.remove("follow"), Some(Value::Null));
        let updated = fields.remove("updated_at").expect("updated_at");
        let updated = updated.as_str().expect("updated_at is a string");
        assert!(
            humantime::parse_rfc3339(updated).is_ok(),
            "updated_at is RFC 3339: {updated}"
        );
    }
    pipeline
}

async fn every_kind_reads_the_pipeline_its_answer_names(backend: Backend) {
    let legacy = MockServer::start(Reply::new(
        201,
        r#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","state":"created","number":42,"created_at":"2026-11-22T10:00:00Z"}"#,
    ))
    .await;
    let run = MockServer::start(Reply::new(
        201,
        r#"{"id":"0d7b9c1e-7a31-4a3c-8d2e-5f6a7b8c9d0e","state":"errored","number":7,"created_at":"2026-11-22T10:00:00Z"}"#,
    ))
    .await;
    let v1 = MockServer::start(Reply::new(
        201,
        r#"{"build_num":318,"build_url":"https://circleci.com/gh/acme/api/318","lifecycle":"not_running","outcome":null}"#,
    ))
    .await;
    let gitlab = MockServer::start(Reply::new(
        201,
        r#"{"id":4242,"iid":17,"project_id":1234,"ref":"main","status":"pending","web_url":"https://gitlab.example.com/acme/api/-/pipelines/4242"}"#,
    ))
    .await;
    let http = MockServer::start(Reply::new(200, "ok")).await;
    let targets = [
        (
            "legacy",
            format!(
                "[targets.legacy]\nkind = \"circleci\"\nbase_url = \"{}\"\nproject = \"gh/acme/api\"\ntoken = \"cci-token-8f41d2b9c07e\"\n",
                legacy.url()
            ),
        ),
        (
            "run",
            format!(
                "[targets.run]\nkind = \"circleci\"\nbase_url = \"{}\"\nproject = \"{APP_SLUG}\"\ntoken = \"cci-token-8f41d2b9c07e\"\ndefinition_id = \"2338d0ae-5541-4bbf-88a2-55e9f7281f80\"\n",
                run.url()
            ),
        ),
        (
            "v1",
            format!(
                "[targets.v1]\nkind = \"circleci_v1\"\nbase_url = \"{}\"\nproject = \"gh/acme/api\"\ntoken = \"cci-token-8f41d2b9c07e\"\njob = \"build\"\n",
                v1.url()
            ),
        ),
        (
            "gitlab",
            format!(
                "[targets.gitlab]\nkind = \"gitlab\"\nbase_url = \"{}\"\nproject = \"acme/api\"\ntoken = \"glptt-trigger-3b9e77a1d5\"\n",
                gitlab.url()
            ),
        ),
        (
            "web",
            format!("[targets.web]\nkind = \"http\"\nurl = \"{}/hook\"\n", http.url()),
        ),
    ];
    let relay = Relay::start_on(&backend, &config(&targets)).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-pipelines").await;
    relay.wait_done(targets.len()).await;

    let expected = [
        (
            "legacy",
            json!({ "id": "5034460f-c7c4-4c43-9457-de07e2029e7b", "number": 42,
                    "url": "https://app.circleci.com/pipelines/github/acme/api/42", "state": "created" }),
        ),
        (
            "run",
            json!({ "id": "0d7b9c1e-7a31-4a3c-8d2e-5f6a7b8c9d0e", "number": 7,
                    "url": format!("https://app.circleci.com/pipelines/{APP_SLUG}/7"), "state": "error" }),
        ),
        (
            "v1",
            json!({ "id": "318", "number": 318, "url": "https://circleci.com/gh/acme/api/318", "state": "created" }),
        ),
        (
            "gitlab",
            json!({ "id": "4242", "number": 17,
                    "url": "https://gitlab.example.com/acme/api/-/pipelines/4242", "state": "created" }),
        ),
        ("web", Value::Null),
    ];
    for (target, pipeline) in expected {
        let job = relay.job_for(target).await;
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(pipeline_of(&job), pipeline, "{target}: {job}");
        // The list shows the same pipeline as the job's own page.
        let listed = relay.jobs(&format!("target={target}")).await;
        assert_eq!(pipeline_of(&listed[0]), pipeline, "{target} listed");
    }
    let web = relay.job_for("web").await;
    assert_eq!(
        web["history"][0]["excerpt"], "200: ok",
        "an http target starts no pipeline: {web}"
    );
    relay.stop().await;
}

async fn an_answer_without_an_id_leaves_the_job_done_without_a_pipeline_and_says_why(backend: Backend) {
    let mock = MockServer::start(Reply::new(201, r#"{"state":"created"}"#)).await;
    let target = format!(
        "[targets.circle]\nkind = \"circleci\"\nbase_url = \"{}\"\nproject = \"gh/acme/api\"\ntoken = \"cci-token-8f41d2b9c07e\"\n",
        mock.url()
    );
    let relay = Relay::start_on(&backend, &config(&[("circle", target)])).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-pipelines").await;
    relay.wait_done(1).await;

    let job = relay.job_for("circle").await;
    assert_eq!(job["state"], "done");
    assert_eq!(job["pipeline"], Value::Null);
    assert_eq!(
        job["history"][0]["excerpt"],
        r#"201: {"state":"created"} (the answer names no pipeline id, so relay cannot tell which pipeline it started)"#,
        "{job}"
    );
    relay.stop().await;
}
