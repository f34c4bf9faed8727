//! What CircleCI's API v2 answers, read: the pipeline a trigger's 201
//! names (PROTOCOLS.md B1, B2), a followed pipeline's workflows and its own
//! state (F), and what a refusal means where CircleCI's message does not
//! say. Reads answers only: what to send is `circleci`'s.
//!
//! What this module must never do: panic on an answer of any shape (each
//! read is a typed parse that fails with a sentence), or let an answer
//! choose a URL: the one link it builds is CircleCI's own page, from the
//! request's slug and the pipeline's number.

use crate::pipeline::{Pipeline, PipelineState};
use crate::request::PreparedRequest;

/// The pipeline a 201 from either endpoint names: `{id, number, state}`
/// (PROTOCOLS.md B1, B2). Its page is
/// `https://app.circleci.com/pipelines/{slug}/{number}`, the slug read back
/// from the request's own URL with CircleCI's long VCS names.
pub(super) fn pipeline(request: &PreparedRequest, body: &[u8]) -> Result<Pipeline, String> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: Option<String>,
        number: Option<u64>,
        state: Option<String>,
    }
    let created: Created =
        serde_json::from_slice(body).map_err(|_| "the answer is not CircleCI's pipeline JSON".to_owned())?;
    let state = created_state(created.state.as_deref());
    let url = created.number.and_then(|number| {
        let path = request.url.split_once("/api/v2/project/")?.1;
        let slug = path
            .strip_suffix("/pipeline/run")
            .or_else(|| path.strip_suffix("/pipeline"))?;
        let slug = match slug.split_once('/') {
            Some(("gh", rest)) => format!("github/{rest}"),
            Some(("bb", rest)) => format!("bitbucket/{rest}"),
            _ => slug.to_owned(),
        };
        Some(format!("https://app.circleci.com/pipelines/{slug}/{number}"))
    });
    Pipeline::new(created.id, created.number, url, state)
}

/// One page of workflows: those on it, and the next page's token.
pub(super) fn read_workflow_page(body: &[u8]) -> Result<(Vec<Workflow>, Option<String>), String> {
    let page: WorkflowPage =
        serde_json::from_slice(body).map_err(|_| "the answer is not CircleCI's workflow list".to_owned())?;
    Ok((page.items, page.next_page_token.filter(|t| !t.is_empty())))
}

/// The state of a pipeline without workflows, from `GET /pipeline/{id}`:
/// `errored` is its end (its config could not run); anything else is not
/// started yet.
pub(super) fn read_pipeline_state(body: &[u8]) -> Result<PipelineState, String> {
    #[derive(serde::Deserialize)]
    struct Created {
        state: Option<String>,
    }
    let created: Created =
        serde_json::from_slice(body).map_err(|_| "the answer is not CircleCI's pipeline JSON".to_owned())?;
    Ok(created_state(created.state.as_deref()))
}

/// A pipeline's `state` as CircleCI writes it in a 201 and in `GET
/// /pipeline/{id}`: `errored` is its end (its config could not run);
/// anything else is not started yet.
fn created_state(state: Option<&str>) -> PipelineState {
    match state {
        Some("errored") => PipelineState::Error,
        _ => PipelineState::Created,
    }
}

#[derive(Debug, serde::Deserialize)]
struct WorkflowPage {
    #[serde(default)]
    items: Vec<Workflow>,
    next_page_token: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Workflow {
    name: String,
    status: String,
    #[serde(default)]
    created_at: String,
}

/// A pipeline's state from its workflows; `None` when it has none yet. A
/// workflow rerun appears as a second one of the same name: only the latest
/// of each name counts, as on CircleCI's own page. The pipeline has ended
/// when every workflow has; then a failure outweighs an error, an error a
/// cancellation, and a cancellation a success.
pub(super) fn workflows_state(workflows: &[Workflow]) -> Option<PipelineState> {
    let mut latest: std::collections::BTreeMap<&str, &Workflow> = std::collections::BTreeMap::new();
    for workflow in workflows {
        let newer = latest
            .get(workflow.name.as_str())
            .is_none_or(|seen| workflow.created_at > seen.created_at);
        if newer {
            latest.insert(&workflow.name, workflow);
        }
    }
    if latest.is_empty() {
        return None;
    }
    let statuses: Vec<&str> = latest.values().map(|w| w.status.as_str()).collect();
    const FINAL: [&str; 6] = [
        "success",
        "failed",
        "error",
        "canceled",
        "unauthorized",
        "not_run",
    ];
    if statuses.iter().any(|s| !FINAL.contains(s)) {
        return Some(PipelineState::Running);
    }
    let any = |wanted: &[&str]| statuses.iter().any(|s| wanted.contains(s));
    Some(if any(&["failed"]) {
        PipelineState::Failed
    } else if any(&["error", "unauthorized"]) {
        PipelineState::Error
    } else if any(&["success"]) && !any(&["canceled"]) {
        PipelineState::Success
    } else {
        PipelineState::Canceled
    })
}

/// What a refusal from API v2 means (PROTOCOLS.md B1, B2): the legacy
/// endpoint refuses GitHub App and GitLab projects whatever it says, and a
/// 401 or 404 is most often a project token, which v2 does not take.
pub(super) fn advice(request: &PreparedRequest, status: u16) -> Option<&'static str> {
    let app_project = request.url.contains("/api/v2/project/circleci/");
    if app_project && request.url.ends_with("/pipeline") {
        return Some(
            "projects set up through the GitHub App or GitLab take only pipeline/run: set definition_id (Project Settings › Pipelines)",
        );
    }
    matches!(status, 401 | 404).then_some(
        "API v2 needs a personal API token (a project API token does not work here), or the project slug is wrong",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pipeline_has_ended_when_the_latest_run_of_each_workflow_has() {
        use super::{Workflow, workflows_state};
        use crate::pipeline::PipelineState::*;
        let w = |name: &str, status: &str, at: &str| Workflow {
            name: name.into(),
            status: status.into(),
            created_at: at.into(),
        };
        let t0 = "2026-12-04T09:00:00Z";
        let t1 = "2026-12-04T09:05:00Z";
        assert_eq!(workflows_state(&[]), None);
        assert_eq!(
            workflows_state(&[w("b", "success", t0), w("d", "running", t0)]),
            Some(Running)
        );
        assert_eq!(workflows_state(&[w("b", "on_hold", t0)]), Some(Running));
        assert_eq!(workflows_state(&[w("b", "failing", t0)]), Some(Running));
        assert_eq!(
            workflows_state(&[w("b", "success", t0), w("d", "failed", t0)]),
            Some(Failed)
        );
        assert_eq!(
            workflows_state(&[w("b", "failed", t0), w("b", "success", t1)]),
            Some(Success)
        );
        assert_eq!(
            workflows_state(&[w("b", "success", t1), w("b", "failed", t0)]),
            Some(Success)
        );
        assert_eq!(workflows_state(&[w("b", "unauthorized", t0)]), Some(Error));
        assert_eq!(
            workflows_state(&[w("b", "error", t0), w("d", "canceled", t0)]),
            Some(Error)
        );
        assert_eq!(
            workflows_state(&[w("b", "success", t0), w("d", "canceled", t0)]),
            Some(Canceled)
        );
        assert_eq!(
            workflows_state(&[w("b", "success", t0), w("d", "not_run", t0)]),
            Some(Success)
        );
        assert_eq!(workflows_state(&[w("b", "not_run", t0)]), Some(Canceled));
    }

    #[test]
    fn an_errored_pipeline_has_ended_in_a_201_and_when_polled() {
        use super::{pipeline, read_pipeline_state};
        use crate::pipeline::PipelineState::*;
        use crate::request::{Auth, PreparedRequest, RequestBody};
        let request = PreparedRequest {
            url: "https://circleci.com/api/v2/project/gh/acme/api/pipeline".into(),
            headers: Vec::new(),
            body: RequestBody::Text("{}".into()),
            auth: Auth::None,
        };
        let id = "5034460f-c7c4-4c43-9457-de07e2029e7b";
        for (state, expected) in [("errored", Error), ("created", Created), ("setup", Created)] {
            let body = format!(r#"{{"id":"{id}","number":7,"state":"{state}"}}"#);
            let started = pipeline(&request, body.as_bytes()).unwrap();
            assert_eq!(started.state, expected, "{state} in a 201");
            assert_eq!(
                started.url.as_deref(),
                Some("https://app.circleci.com/pipelines/github/acme/api/7")
            );
            assert_eq!(
                read_pipeline_state(body.as_bytes()),
                Ok(expected),
                "{state} polled"
            );
        }
        assert!(read_pipeline_state(b"<html>").is_err());
    }
}
