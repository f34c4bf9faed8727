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
//!
//! With `follow = { token }`, the pipeline is polled through `GET
//! …/projects/{id}/pipelines/{pipeline}` with that token as `PRIVATE-TOKEN`
//! (PROTOCOLS.md F): a trigger token cannot read pipelines.

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
    "follow",
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

impl Gitlab {
    /// The poll of pipeline `pipeline_id`, in the project the trigger at
    /// `request_url` named (both trigger URLs name it right after
    /// `/projects/`, already encoded as one segment).
    pub(super) fn poll_url(&self, request_url: &str, pipeline_id: &str) -> Result<String, String> {
        if pipeline_id.is_empty() || !pipeline_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{pipeline_id:?} is not a GitLab pipeline id"));
        }
        let prefix = format!("{}/api/v4/projects/", self.base_url);
        let project = request_url
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('/').next())
            .filter(|project| !project.is_empty())
            .ok_or_else(|| {
                format!(
                    "the trigger was not sent under this target's base_url ({}); the config changed since",
                    self.base_url
                )
            })?;
        Ok(format!("{prefix}{project}/pipelines/{pipeline_id}"))
    }
}

/// A polled pipeline's state: `{id, status, …}` (PROTOCOLS.md F).
pub(super) fn read_poll(body: &[u8]) -> Result<PipelineState, String> {
    #[derive(serde::Deserialize)]
    struct Polled {
        status: String,
    }
    serde_json::from_slice::<Polled>(body)
        .map(|polled| PipelineState::of_ci_status(&polled.status))
        .map_err(|_| "the answer is not GitLab's pipeline JSON".to_owned())
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::pipeline::PipelineState;

    #[test]
    fn a_poll_names_the_project_the_trigger_named() {
        let config = Config::from_toml(
            r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "r"
to = ["deploy"]

[targets.deploy]
kind = "gitlab"
base_url = "https://gitlab.example.com/"
project = "{{ repo }}"
token = "glptt-x"
follow = { token = "glpat-y" }
"#,
        )
        .unwrap();
        let super::super::Kind::Gitlab(t) = &config.targets["deploy"].kind else {
            panic!("not gitlab");
        };
        let triggered = "https://gitlab.example.com/api/v4/projects/acme%2Fdeploy/trigger/pipeline";
        assert_eq!(
            t.poll_url(triggered, "4242").unwrap(),
            "https://gitlab.example.com/api/v4/projects/acme%2Fdeploy/pipelines/4242"
        );
        let forwarded = "https://gitlab.example.com/api/v4/projects/77/ref/main/trigger/pipeline?variables%5BRELAY_HOP%5D=1";
        assert_eq!(
            t.poll_url(forwarded, "9").unwrap(),
            "https://gitlab.example.com/api/v4/projects/77/pipelines/9"
        );
        assert!(t.poll_url(triggered, "42/../../x").is_err());
        let moved = t.poll_url("https://old.example.com/api/v4/projects/1/trigger/pipeline", "4");
        assert!(moved.unwrap_err().contains("the config changed since"));
        assert_eq!(
            super::read_poll(br#"{"id":1,"status":"manual"}"#),
            Ok(PipelineState::Created)
        );
        assert_eq!(
            super::read_poll(br#"{"status":"canceled"}"#),
            Ok(PipelineState::Canceled)
        );
        assert!(super::read_poll(b"<html>").is_err());
    }
}
