//! GitLab pipeline triggers, two ways:
//! - `POST {base_url}/api/v4/projects/{id}/trigger/pipeline` with a JSON body
//!   `{token, ref, variables, inputs}`;
//! - with `forward_payload = true`, the webhook-style
//!   `POST …/projects/{id}/ref/{ref}/trigger/pipeline?token=…` carrying the
//!   webhook's JSON body byte for byte, which the pipeline reads from the file
//!   variable `TRIGGER_PAYLOAD`; variables then ride in the query string.
//!
//! GitLab refuses variables that are not strings, so they are strings here.
//! Every trigger carries `loop_guard.hop_variable` (`RELAY_HOP`) = hops + 1.

use serde_json::{Map, Value, json};

use super::{Param, RenderFailure, RenderInput, USER_AGENT, encode_component};
use crate::config::compiler::Compiler;
use crate::config::raw::RawTarget;
use crate::pipeline::{Pipeline, PipelineState};
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::secret::Secret;
use crate::template::TemplateStr;

pub const KEYS: &[&str] = &[
    "base_url",
    "project",
    "token",
    "ref",
    "variables",
    "inputs",
    "forward_payload",
];

#[derive(Debug)]
pub struct Gitlab {
    base_url: String,
    /// A numeric id or a `group/sub/name` path (URL-encoded when sent).
    project: TemplateStr,
    pub(super) token: Option<Secret>,
    git_ref: Option<TemplateStr>,
    variables: Vec<(String, TemplateStr)>,
    inputs: Vec<(String, Param)>,
    forward_payload: bool,
}

impl Gitlab {
    pub fn compile(key: &str, raw: &RawTarget, dry_run: bool, c: &mut Compiler) -> Option<Gitlab> {
        let base_url = super::base_url(
            &format!("{key}.base_url"),
            raw.base_url.as_ref(),
            "https://gitlab.com",
            c,
        );
        let project = match &raw.project {
            Some(p) => super::compile_text(&format!("{key}.project"), p, c),
            None => {
                c.problem(
                    format!("{key}.project"),
                    "is required: a numeric id or a path like \"acme/deploy\"",
                );
                None
            }
        };
        let git_ref = raw
            .git_ref
            .as_ref()
            .and_then(|r| super::compile_text(&format!("{key}.ref"), r, c));
        let mut variables = Vec::new();
        for (name, value) in raw.variables.clone().unwrap_or_default() {
            if let Some(t) = super::compile_text(&format!("{key}.variables.{name}"), &value, c) {
                variables.push((name, t));
            }
        }
        let forward_payload = raw.forward_payload.unwrap_or(false);
        let inputs = super::compile_params(&format!("{key}.inputs"), raw.inputs.iter().flatten(), c);
        if forward_payload && !inputs.is_empty() {
            c.problem(
                format!("{key}.inputs"),
                "cannot be sent with forward_payload: the body is the webhook itself; use variables",
            );
        }
        let token = super::compile_credential(&format!("{key}.token"), raw.token.as_ref(), dry_run, c);
        Some(Gitlab {
            base_url,
            project: project?,
            token,
            git_ref,
            variables,
            inputs,
            forward_payload,
        })
    }

    pub fn project_source(&self) -> &str {
        self.project.source()
    }

    pub fn describe(&self) -> String {
        if self.forward_payload {
            format!(
                "POST {}/api/v4/projects/{}/ref/{{ref}}/trigger/pipeline (TRIGGER_PAYLOAD)",
                self.base_url,
                self.project.source()
            )
        } else {
            format!(
                "POST {}/api/v4/projects/{}/trigger/pipeline",
                self.base_url,
                self.project.source()
            )
        }
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        let project = encode_component(&input.text(&self.project)?);
        let git_ref = match &self.git_ref {
            Some(r) => input.text(r)?,
            None => input.event.short_ref().to_owned(),
        };
        if git_ref.is_empty() {
            return Err(RenderFailure::Missing(
                "the event has no branch or tag; set ref on the target".into(),
            ));
        }
        let mut variables = Vec::with_capacity(self.variables.len() + 1);
        for (name, value) in &self.variables {
            if name != input.hop_variable() {
                variables.push((name.clone(), input.text(value)?));
            }
        }
        // The hop count rides along so the pipeline's own events, coming
        // back as Pipeline Hooks, show how deep the chain is.
        variables.push((input.hop_variable().to_owned(), input.next_hop().to_string()));
        variables.sort();
        let mut headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("Accept".to_owned(), "application/json".to_owned()),
            ("User-Agent".to_owned(), USER_AGENT.to_owned()),
        ];
        if self.forward_payload {
            let query: Vec<String> = variables
                .iter()
                .map(|(k, v)| format!("variables[{}]={}", encode_component(k), encode_component(v)))
                .collect();
            let mut url = format!(
                "{}/api/v4/projects/{project}/ref/{}/trigger/pipeline",
                self.base_url,
                encode_component(&git_ref)
            );
            if !query.is_empty() {
                url = format!("{url}?{}", query.join("&"));
            }
            headers.retain(|(name, _)| name != "Accept");
            return Ok(PreparedRequest {
                url,
                headers,
                body: RequestBody::Payload,
                auth: Auth::Query { name: "token".into() },
            });
        }
        let mut body = Map::new();
        body.insert("ref".into(), json!(git_ref));
        if !variables.is_empty() {
            body.insert(
                "variables".into(),
                Value::Object(
                    variables
                        .into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                ),
            );
        }
        if !self.inputs.is_empty() {
            let mut inputs = Map::new();
            for (name, param) in &self.inputs {
                inputs.insert(name.clone(), input.param(param)?);
            }
            body.insert("inputs".into(), Value::Object(inputs));
        }
        Ok(PreparedRequest {
            url: format!("{}/api/v4/projects/{project}/trigger/pipeline", self.base_url),
            headers,
            body: RequestBody::Text(Value::Object(body).to_string()),
            auth: Auth::JsonField { name: "token".into() },
        })
    }
}

/// The pipeline a GitLab trigger answer names: `{id, iid, web_url, status}`
/// (PROTOCOLS.md B4).
pub(super) fn pipeline(body: &[u8]) -> Result<Pipeline, String> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: Option<u64>,
        iid: Option<u64>,
        web_url: Option<String>,
        status: Option<String>,
    }
    let created: Created =
        serde_json::from_slice(body).map_err(|_| "the answer is not GitLab's pipeline JSON".to_owned())?;
    let state = match created.status.as_deref() {
        Some("running") => PipelineState::Running,
        Some("success") => PipelineState::Success,
        Some("failed") => PipelineState::Failed,
        Some("canceled" | "skipped") => PipelineState::Canceled,
        _ => PipelineState::Created,
    };
    Pipeline::new(
        created.id.map(|id| id.to_string()),
        created.iid,
        created.web_url,
        state,
    )
}

/// What a refusal from the trigger API means (PROTOCOLS.md B4).
pub(super) fn advice(status: u16, body: &[u8]) -> Option<&'static str> {
    match status {
        404 => Some(
            "a pipeline trigger token is needed here, not a personal access token (or the project id is wrong)",
        ),
        400 => {
            let text = String::from_utf8_lossy(body);
            if text.contains("Reference not found") {
                Some("the ref does not exist in that project")
            } else if text.contains("variables") {
                None
            } else {
                Some("check `workflow:rules`: a rule may refuse `CI_PIPELINE_SOURCE == \"trigger\"`")
            }
        }
        403 => Some(
            "GitLab's own loop guard refused it: it takes no trigger sent with `X-Gitlab-Event: Pipeline Hook` (relay passes on no incoming header; look for something in between that adds it)",
        ),
        401 => Some("the trigger token is invalid or has expired"),
        _ => None,
    }
}
