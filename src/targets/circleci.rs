//! CircleCI API v2: `POST {base_url}/api/v2/project/{slug}/pipeline` with a
//! `Circle-Token` header and `{branch | tag, parameters}`.
//!
//! CircleCI limits parameters to 100 keys, 128-character names and
//! 512-character values; a request over them is refused here, at render
//! time, so the job is dead with the reason instead of failing remotely.
//! `hop_parameter` carries the hop count; `payload_parameter` a signed URL
//! to the webhook's body, since no parameter can hold a whole payload.

use serde_json::{Map, Value, json};

use super::{Param, RenderFailure, RenderInput, USER_AGENT};
use crate::config::compiler::Compiler;
use crate::config::raw::RawTarget;
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::secret::Secret;
use crate::template::TemplateStr;

pub const KEYS: &[&str] = &[
    "base_url",
    "project",
    "token",
    "branch",
    "tag",
    "parameters",
    "hop_parameter",
    "payload_parameter",
];

const MAX_PARAMETERS: usize = 100;
const MAX_KEY_CHARS: usize = 128;
const MAX_VALUE_CHARS: usize = 512;

#[derive(Debug)]
pub struct CircleCi {
    base_url: String,
    /// `gh/org/repo`, `bb/org/repo` or `circleci/<org-id>/<project-id>`.
    project: TemplateStr,
    pub(super) token: Option<Secret>,
    branch: Option<TemplateStr>,
    tag: Option<TemplateStr>,
    parameters: Vec<(String, Param)>,
    /// Set to hops + 1 (an integer), for pipelines that declare it.
    hop_parameter: Option<String>,
    /// Set to a signed URL from which the pipeline fetches the webhook body.
    payload_parameter: Option<String>,
}

impl CircleCi {
    pub fn compile(key: &str, raw: &RawTarget, dry_run: bool, c: &mut Compiler) -> Option<CircleCi> {
        let base_url = super::base_url(
            &format!("{key}.base_url"),
            raw.base_url.as_ref(),
            "https://circleci.com",
            c,
        );
        let project = match &raw.project {
            Some(p) => super::compile_text(&format!("{key}.project"), p, c),
            None => {
                c.problem(format!("{key}.project"), "is required, like \"gh/acme/api\"");
                None
            }
        };
        if raw.branch.is_some() && raw.tag.is_some() {
            c.problem(
                format!("{key}.tag"),
                "cannot be set together with branch: CircleCI takes one or the other",
            );
        }
        let branch = raw
            .branch
            .as_ref()
            .and_then(|b| super::compile_text(&format!("{key}.branch"), b, c));
        let tag = raw
            .tag
            .as_ref()
            .and_then(|t| super::compile_text(&format!("{key}.tag"), t, c));
        let params = raw.parameters.clone().unwrap_or_default();
        if params.len() > MAX_PARAMETERS {
            c.problem(
                format!("{key}.parameters"),
                format!(
                    "has {} entries; CircleCI accepts at most {MAX_PARAMETERS}",
                    params.len()
                ),
            );
        }
        for name in params.keys() {
            if name.chars().count() > MAX_KEY_CHARS {
                c.problem(
                    format!("{key}.parameters.{name}"),
                    format!("the name is longer than CircleCI's {MAX_KEY_CHARS} characters"),
                );
            }
        }
        let parameters = super::compile_params(&format!("{key}.parameters"), &params, c);
        for (field, name) in [
            ("hop_parameter", &raw.hop_parameter),
            ("payload_parameter", &raw.payload_parameter),
        ] {
            if let Some(name) = name {
                if name.is_empty() || name.chars().count() > MAX_KEY_CHARS {
                    c.problem(
                        format!("{key}.{field}"),
                        "must be a parameter name of 1 to 128 characters",
                    );
                }
                if params.contains_key(name) {
                    c.problem(
                        format!("{key}.{field}"),
                        format!("{name:?} is also set in parameters"),
                    );
                }
            }
        }
        let token = super::compile_credential(&format!("{key}.token"), raw.token.as_ref(), dry_run, c);
        Some(CircleCi {
            base_url,
            project: project?,
            token,
            branch,
            tag,
            parameters,
            hop_parameter: raw.hop_parameter.clone(),
            payload_parameter: raw.payload_parameter.clone(),
        })
    }

    pub fn uses_payload_urls(&self) -> bool {
        self.payload_parameter.is_some()
    }

    pub fn project_source(&self) -> &str {
        self.project.source()
    }

    pub fn describe(&self) -> String {
        format!(
            "POST {}/api/v2/project/{}/pipeline",
            self.base_url,
            self.project.source()
        )
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        let project = input.text(&self.project)?;
        let mut body = Map::new();
        match (&self.branch, &self.tag) {
            (Some(branch), _) => {
                body.insert("branch".into(), json!(input.text(branch)?));
            }
            (None, Some(tag)) => {
                body.insert("tag".into(), json!(input.text(tag)?));
            }
            (None, None) if !input.event.tag.is_empty() => {
                body.insert("tag".into(), json!(input.event.tag));
            }
            (None, None) if !input.event.branch.is_empty() => {
                body.insert("branch".into(), json!(input.event.branch));
            }
            (None, None) => {
                return Err(RenderFailure::Missing(
                    "the event has no branch or tag; set branch or tag on the target".into(),
                ));
            }
        }
        let mut parameters = Map::new();
        for (name, param) in &self.parameters {
            let value = input.param(param)?;
            check_value(name, &value)?;
            parameters.insert(name.clone(), value);
        }
        if let Some(name) = &self.hop_parameter {
            parameters.insert(name.clone(), json!(input.next_hop()));
        }
        if let Some(name) = &self.payload_parameter {
            let url = input.payload_url()?;
            check_value(name, &json!(url))?;
            parameters.insert(name.clone(), json!(url));
        }
        if !parameters.is_empty() {
            body.insert("parameters".into(), Value::Object(parameters));
        }
        Ok(PreparedRequest {
            url: format!("{}/api/v2/project/{project}/pipeline", self.base_url),
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

fn check_value(name: &str, value: &Value) -> Result<(), RenderFailure> {
    let chars = match value {
        Value::String(s) => s.chars().count(),
        other => other.to_string().chars().count(),
    };
    if chars > MAX_VALUE_CHARS {
        return Err(RenderFailure::Limit(format!(
            "parameter {name} renders to {chars} characters; CircleCI accepts at most {MAX_VALUE_CHARS}"
        )));
    }
    Ok(())
}
