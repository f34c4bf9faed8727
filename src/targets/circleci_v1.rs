//! CircleCI API v1.1: `POST {base_url}/api/v1.1/project/{vcs}/{org}/{repo}/tree/{branch}`
//! with `build_parameters[CIRCLE_JOB]` choosing the job and `revision` the
//! commit. A tag event posts to the project endpoint with `tag` instead, since
//! the tree endpoint takes only branches (and `revision` cannot go with `tag`).

use serde_json::{Map, Value, json};

use super::{RenderFailure, RenderInput, USER_AGENT, encode_component};
use crate::config::compiler::Compiler;
use crate::config::raw::RawTarget;
use crate::event::is_zero_sha;
use crate::pipeline::{Pipeline, PipelineState};
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::secret::Secret;
use crate::template::TemplateStr;

pub const KEYS: &[&str] = &[
    "base_url",
    "project",
    "token",
    "job",
    "branch",
    "build_parameters",
];

#[derive(Debug)]
pub struct CircleCiV1 {
    base_url: String,
    /// `github/org/repo` or `bitbucket/org/repo`.
    project: TemplateStr,
    pub(super) token: Option<Secret>,
    job: TemplateStr,
    branch: Option<TemplateStr>,
    build_parameters: Vec<(String, TemplateStr)>,
}

impl CircleCiV1 {
    pub fn compile(key: &str, raw: &RawTarget, dry_run: bool, c: &mut Compiler) -> Option<CircleCiV1> {
        let base_url = super::base_url(
            &format!("{key}.base_url"),
            raw.base_url.as_ref(),
            "https://circleci.com",
            c,
        );
        let project = match &raw.project {
            Some(p) => {
                if !p.contains('{') && p.split('/').count() != 3 {
                    c.problem(
                        format!("{key}.project"),
                        "must be vcs/org/repo, like \"github/acme/api\"",
                    );
                }
                super::compile_text(&format!("{key}.project"), p, c)
            }
            None => {
                c.problem(format!("{key}.project"), "is required, like \"github/acme/api\"");
                None
            }
        };
        let job = match &raw.job {
            Some(j) => super::compile_text(&format!("{key}.job"), j, c),
            None => {
                c.problem(
                    format!("{key}.job"),
                    "is required: it is sent as build_parameters[CIRCLE_JOB]",
                );
                None
            }
        };
        let branch = raw
            .branch
            .as_ref()
            .and_then(|b| super::compile_text(&format!("{key}.branch"), b, c));
        let mut build_parameters = Vec::new();
        for (name, value) in raw.build_parameters.clone().unwrap_or_default() {
            if name == "CIRCLE_JOB" {
                c.problem(
                    format!("{key}.build_parameters.CIRCLE_JOB"),
                    "is set by `job`; set the job there",
                );
                continue;
            }
            if let Some(t) = super::compile_text(&format!("{key}.build_parameters.{name}"), &value, c) {
                build_parameters.push((name, t));
            }
        }
        let token = super::compile_credential(&format!("{key}.token"), raw.token.as_ref(), dry_run, c);
        Some(CircleCiV1 {
            base_url,
            project: project?,
            token,
            job: job?,
            branch,
            build_parameters,
        })
    }

    pub fn project_source(&self) -> &str {
        self.project.source()
    }

    pub fn describe(&self) -> String {
        format!(
            "POST {}/api/v1.1/project/{}/tree/{{branch}} job {}",
            self.base_url,
            self.project.source(),
            self.job.source()
        )
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        let project = input.text(&self.project)?;
        let mut parameters = Map::new();
        parameters.insert("CIRCLE_JOB".into(), json!(input.text(&self.job)?));
        for (name, value) in &self.build_parameters {
            parameters.insert(name.clone(), json!(input.text(value)?));
        }
        let mut body = Map::new();
        let event = input.event;
        let url = match &self.branch {
            Some(branch) => {
                let branch = input.text(branch)?;
                format!(
                    "{}/api/v1.1/project/{project}/tree/{}",
                    self.base_url,
                    encode_component(&branch)
                )
            }
            None if !event.branch.is_empty() => {
                if !event.sha.is_empty() && !is_zero_sha(&event.sha) {
                    body.insert("revision".into(), json!(event.sha));
                }
                format!(
                    "{}/api/v1.1/project/{project}/tree/{}",
                    self.base_url,
                    encode_component(&event.branch)
                )
            }
            None if !event.tag.is_empty() => {
                body.insert("tag".into(), json!(event.tag));
                format!("{}/api/v1.1/project/{project}", self.base_url)
            }
            None => {
                return Err(RenderFailure::Missing(
                    "the event has no branch or tag; set branch on the target".into(),
                ));
            }
        };
        body.insert("build_parameters".into(), Value::Object(parameters));
        Ok(PreparedRequest {
            url,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Accept".into(), "application/json".into()),
                ("User-Agent".into(), USER_AGENT.into()),
            ],
            body: RequestBody::Text(Value::Object(body).to_string()),
            auth: Auth::Header {
                name: "Circle-Token".into(),
            },
        })
    }
}

/// The build a v1.1 trigger answer names: `{build_num, build_url,
/// lifecycle, outcome}` (PROTOCOLS.md B3).
pub(super) fn pipeline(body: &[u8]) -> Result<Pipeline, String> {
    #[derive(serde::Deserialize)]
    struct Build {
        build_num: Option<u64>,
        build_url: Option<String>,
        lifecycle: Option<String>,
        outcome: Option<String>,
    }
    let build: Build =
        serde_json::from_slice(body).map_err(|_| "the answer is not CircleCI's build JSON".to_owned())?;
    let state = match (build.lifecycle.as_deref(), build.outcome.as_deref()) {
        (Some("running"), _) => PipelineState::Running,
        (Some("finished"), Some("success")) => PipelineState::Success,
        (Some("finished"), Some("failed" | "timedout" | "infrastructure_fail")) => PipelineState::Failed,
        (Some("finished"), Some("canceled")) => PipelineState::Canceled,
        (Some("finished"), _) => PipelineState::Error,
        _ => PipelineState::Created,
    };
    Pipeline::new(
        build.build_num.map(|n| n.to_string()),
        build.build_num,
        build.build_url,
        state,
    )
}

/// What a refusal from API v1.1 means: it cannot trigger a job of a
/// `version: 2.1` config (PROTOCOLS.md B3).
pub(super) fn advice(status: u16, body: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(body);
    (status == 400 && text.contains("2.1"))
        .then_some("v1.1 job triggers do not work with `version: 2.1`; use a `circleci` target (API v2)")
}
