//! Answers a person can act on: a dead job says what to do, not only what
//! the target said, for the refusals whose meaning the CI APIs do not spell
//! out (PROTOCOLS.md B1–B4). Each case uses the answer the API gives.

use crate::support::{Backend, MockServer, Relay, Reply, post_github_push};

crate::on_both_backends! {
    cases: [refusals_whose_meaning_is_known_say_what_to_do],
}

const GH_SECRET: &str = "gh-source-secret-5e0c1a";
const SHA: &str = "4e1243bd22c66e76c2ba9eddc1f91394e57f9f83";

/// One target per refusal: its name, kind-specific table lines, the answer,
/// and the dead job's exact `last_error`.
struct Case {
    name: &'static str,
    table: &'static str,
    status: u16,
    body: &'static str,
    last_error: &'static str,
}

const CASES: [Case; 7] = [
    Case {
        name: "gl-token",
        table: "kind = \"gitlab\"\nproject = \"acme/api\"\ntoken = \"glpat-personal-0123456789\"",
        status: 404,
        body: r#"{"message":"404 Not Found"}"#,
        last_error: "404: 404 Not Found; a pipeline trigger token is needed here, not a personal access token (or the project id is wrong)",
    },
    Case {
        name: "gl-ref",
        table: "kind = \"gitlab\"\nproject = \"acme/api\"\ntoken = \"glptt-trigger-3b9e77a1d5\"",
        status: 400,
        body: r#"{"message":{"base":["Reference not found"]}}"#,
        last_error: r#"400: {"base":["Reference not found"]}; the ref does not exist in that project"#,
    },
    Case {
        name: "gl-rules",
        table: "kind = \"gitlab\"\nproject = \"acme/api\"\ntoken = \"glptt-trigger-3b9e77a1d5\"",
        status: 400,
        body: r#"{"message":{"base":["Pipeline will not run for the selected trigger. The rules configuration prevented any jobs from being added to the pipeline."]}}"#,
        last_error: r#"400: {"base":["Pipeline will not run for the selected trigger. The rules configuration prevented any jobs from being added to the pipeline."]}; check `workflow:rules`: a rule may refuse `CI_PIPELINE_SOURCE == "trigger"`"#,
    },
    Case {
        name: "gl-loop",
        table: "kind = \"gitlab\"\nproject = \"acme/api\"\ntoken = \"glptt-trigger-3b9e77a1d5\"",
        status: 403,
        body: r#"{"message":"403 Forbidden"}"#,
        last_error: "403: 403 Forbidden; GitLab's own loop guard refused it: it takes no trigger sent with `X-Gitlab-Event: Pipeline Hook` (relay passes on no incoming header; look for something in between that adds it)",
    },
    Case {
        name: "gl-variables",
        table: "kind = \"gitlab\"\nproject = \"acme/api\"\ntoken = \"glptt-trigger-3b9e77a1d5\"",
        status: 400,
        body: r#"{"error":"variables needs to be a map of key-valued strings"}"#,
        last_error: "400: variables needs to be a map of key-valued strings",
    },
    Case {
        name: "cci-app-legacy",
        table: "kind = \"circleci\"\nproject = \"circleci/89xcrx7UvWQfzcUPAEmu5Q/63AY3yf3XeUQojmQcGZTtB\"\ntoken = \"cci-token-8f41d2b9c07e\"",
        status: 400,
        body: r#"{"message":"Unexpected request body provided."}"#,
        last_error: "400: Unexpected request body provided.; projects set up through the GitHub App or GitLab take only pipeline/run: set definition_id (Project Settings › Pipelines)",
    },
    Case {
        name: "cci-v1-21",
        table: "kind = \"circleci_v1\"\nproject = \"gh/acme/api\"\ntoken = \"cci-token-8f41d2b9c07e\"\njob = \"build\"",
        status: 400,
        body: r#"{"message":"Triggering a new job with a branch is not currently supported with configurations that specify version: 2.1."}"#,
        last_error: "400: Triggering a new job with a branch is not currently supported with configurations that specify version: 2.1.; v1.1 job triggers do not work with `version: 2.1`; use a `circleci` target (API v2)",
    },
];

async fn refusals_whose_meaning_is_known_say_what_to_do(backend: Backend) {
    let mut mocks = Vec::new();
    let mut tables = String::new();
    for case in &CASES {
        let mock = MockServer::start(Reply::new(case.status, case.body)).await;
        tables.push_str(&format!(
            "\n[targets.{}]\nbase_url = \"{}\"\n{}\n",
            case.name,
            mock.url(),
            case.table
        ));
        mocks.push(mock);
    }
    let names: Vec<String> = CASES.iter().map(|c| format!("{:?}", c.name)).collect();
    let text = format!(
        r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{GH_SECRET}"

[[routes]]
name = "ci"
to = [{}]
{tables}"#,
        names.join(", ")
    );
    let relay = Relay::start_on(&backend, &text).await;
    post_github_push(&relay, GH_SECRET, "refs/heads/main", SHA, "d-advice").await;

    relay.wait_jobs("state=dead", CASES.len()).await;
    for (case, mock) in CASES.iter().zip(&mocks) {
        assert_eq!(
            mock.requests().len(),
            1,
            "{}: a {} is not retried",
            case.name,
            case.status
        );
        let job = relay.job_for(case.name).await;
        assert_eq!(job["last_error"], case.last_error, "{}", case.name);
        assert_eq!(job["history"][0]["excerpt"], case.last_error, "{}", case.name);
    }
    relay.stop().await;
}
