//! CircleCI API v2, two endpoints, both with a `Circle-Token` header:
//! - `POST {base_url}/api/v2/project/{slug}/pipeline` with `{branch | tag,
//!   parameters}`, for GitHub OAuth and Bitbucket projects;
//! - with `definition_id`, `POST …/project/{slug}/pipeline/run` with
//!   `{definition_id, config: {branch | tag}, checkout: {branch | tag},
//!   parameters}`, the only one GitHub App projects (`circleci/<org-id>/
//!   <project-id>`) accept. `checkout` is the ref to build (the target's
//!   `branch`/`tag`, else the event's); `config` where CircleCI reads its
//!   config from, the checkout ref unless set.
//!
//! CircleCI limits parameters to 100 keys, 128-character names and
//! 512-character values; a request over them is refused here, at render
//! time, so the job is dead with the reason instead of failing remotely.
//! `hop_parameter` carries the hop count; `payload_parameter` a signed URL
//! to the webhook's body, since no parameter can hold a whole payload.
//!
//! With `follow`, the pipeline is polled through `GET /api/v2/pipeline/{id}/
//! workflow` (PROTOCOLS.md F), with the trigger's token unless `follow` has
//! one of its own. What those answers say is read in `circleci_answers`.

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
    "definition_id",
    "config",
    "follow",
];

/// The header API v2 takes its token in, for triggers and polls alike.
pub(super) const TOKEN_HEADER: &str = "Circle-Token";

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
    /// Present: trigger through `pipeline/run` with this pipeline definition.
    run: Option<PipelineRun>,
}

/// What `pipeline/run` needs beyond the legacy endpoint.
#[derive(Debug)]
struct PipelineRun {
    definition_id: uuid::Uuid,
    /// The ref CircleCI reads `.circleci/config.yml` from; `None`: the checkout ref.
    config: Option<Ref>,
}

/// A branch or a tag, templated.
#[derive(Debug)]
enum Ref {
    Branch(TemplateStr),
    Tag(TemplateStr),
}

impl Ref {
    fn render(&self, input: &RenderInput<'_>) -> Result<Value, RenderFailure> {
        Ok(match self {
            Ref::Branch(b) => json!({ "branch": input.text(b)? }),
            Ref::Tag(t) => json!({ "tag": input.text(t)? }),
        })
    }
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
        let run = compile_run(key, raw, c);
        Some(CircleCi {
            base_url,
            project: project?,
            token,
            branch,
            tag,
            parameters,
            hop_parameter: raw.hop_parameter.clone(),
            payload_parameter: raw.payload_parameter.clone(),
            run,
        })
    }

    pub fn uses_payload_urls(&self) -> bool {
        self.payload_parameter.is_some()
    }

    pub fn project_source(&self) -> &str {
        self.project.source()
    }

    pub fn describe(&self) -> String {
        match &self.run {
            Some(run) => format!(
                "POST {}/api/v2/project/{}/pipeline/run (definition {})",
                self.base_url,
                self.project.source(),
                run.definition_id
            ),
            None => format!(
                "POST {}/api/v2/project/{}/pipeline",
                self.base_url,
                self.project.source()
            ),
        }
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        let project = input.text(&self.project)?;
        let checkout = self.checkout(input)?;
        let mut body = Map::new();
        let path = match &self.run {
            Some(run) => {
                body.insert("definition_id".into(), json!(run.definition_id.to_string()));
                let config = match &run.config {
                    Some(config) => config.render(input)?,
                    None => checkout.clone(),
                };
                body.insert("config".into(), config);
                body.insert("checkout".into(), checkout);
                "pipeline/run"
            }
            None => {
                if let Value::Object(fields) = checkout {
                    body.extend(fields);
                }
                "pipeline"
            }
        };
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
            url: format!("{}/api/v2/project/{project}/{path}", self.base_url),
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Accept".into(), "application/json".into()),
                ("User-Agent".into(), USER_AGENT.into()),
            ],
            body: RequestBody::Text(Value::Object(body).to_string()),
            auth: Auth::Header {
                name: TOKEN_HEADER.into(),
            },
        })
    }
}

impl CircleCi {
    /// The ref to build, as `{"branch": …}` or `{"tag": …}`: the target's
    /// own, else the event's.
    fn checkout(&self, input: &RenderInput<'_>) -> Result<Value, RenderFailure> {
        Ok(match (&self.branch, &self.tag) {
            (Some(branch), _) => json!({ "branch": input.text(branch)? }),
            (None, Some(tag)) => json!({ "tag": input.text(tag)? }),
            (None, None) if !input.event.tag.is_empty() => json!({ "tag": input.event.tag }),
            (None, None) if !input.event.branch.is_empty() => json!({ "branch": input.event.branch }),
            (None, None) => {
                return Err(RenderFailure::Missing(
                    "the event has no branch or tag; set branch or tag on the target".into(),
                ));
            }
        })
    }
}

/// `definition_id` (a UUID) and the `config` ref that only `pipeline/run` reads.
fn compile_run(key: &str, raw: &RawTarget, c: &mut Compiler) -> Option<PipelineRun> {
    let Some(id) = &raw.definition_id else {
        if raw.config.is_some() {
            c.problem(
                format!("{key}.config"),
                "is read only by pipeline/run: set definition_id too (Project Settings › Pipelines in CircleCI)",
            );
        }
        return None;
    };
    let definition_id = match uuid::Uuid::parse_str(id.trim()) {
        Ok(uuid) => uuid,
        Err(_) => {
            c.problem(
                format!("{key}.definition_id"),
                format!(
                    "{id:?} is not a pipeline definition id: CircleCI shows it as a UUID under Project Settings › Pipelines"
                ),
            );
            return None;
        }
    };
    let config = match &raw.config {
        None => None,
        Some(r) => match (&r.branch, &r.tag) {
            (Some(_), Some(_)) => {
                c.problem(
                    format!("{key}.config"),
                    "takes a branch or a tag, not both: CircleCI reads the config from one ref",
                );
                None
            }
            (Some(branch), None) => {
                super::compile_text(&format!("{key}.config.branch"), branch, c).map(Ref::Branch)
            }
            (None, Some(tag)) => super::compile_text(&format!("{key}.config.tag"), tag, c).map(Ref::Tag),
            (None, None) => {
                c.problem(
                    format!("{key}.config"),
                    "names no ref: write { branch = \"…\" } or { tag = \"…\" }",
                );
                None
            }
        },
    };
    Some(PipelineRun {
        definition_id,
        config,
    })
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

impl CircleCi {
    /// A page of the pipeline's workflows (PROTOCOLS.md F); the id must be
    /// the UUID CircleCI gave.
    pub(super) fn workflows_url(
        &self,
        pipeline_id: &str,
        page_token: Option<&str>,
    ) -> Result<String, String> {
        let id = pipeline_uuid(pipeline_id)?;
        Ok(match page_token {
            Some(token) => format!(
                "{}/api/v2/pipeline/{id}/workflow?page-token={}",
                self.base_url,
                super::encode_component(token)
            ),
            None => format!("{}/api/v2/pipeline/{id}/workflow", self.base_url),
        })
    }

    /// The pipeline itself, which says `errored` when its config could not run.
    pub(super) fn pipeline_url(&self, pipeline_id: &str) -> Result<String, String> {
        Ok(format!(
            "{}/api/v2/pipeline/{}",
            self.base_url,
            pipeline_uuid(pipeline_id)?
        ))
    }
}

fn pipeline_uuid(pipeline_id: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(pipeline_id).map_err(|_| format!("{pipeline_id:?} is not a CircleCI pipeline id"))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn target(extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(&format!(
            r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "r"
to = ["app"]

[targets.app]
kind = "circleci"
project = "circleci/org-id/project-id"
token = "t"
dry_run = true
{extra}
"#
        ))
    }

    /// Every problem the config has: the target's own, and no second one
    /// at the route that names it (it is declared, only broken).
    fn problems(extra: &str) -> Vec<(String, String)> {
        match target(extra) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| (p.key, p.message)).collect(),
        }
    }

    #[test]
    fn check_names_the_endpoint_each_target_uses() {
        let config = target("definition_id = \"2338d0ae-5541-4bbf-88a2-55e9f7281f80\"").unwrap();
        assert_eq!(
            config.targets["app"].describe(),
            "circleci POST https://circleci.com/api/v2/project/circleci/org-id/project-id/pipeline/run \
             (definition 2338d0ae-5541-4bbf-88a2-55e9f7281f80) (dry run)"
        );
        let legacy = target("").unwrap();
        assert_eq!(
            legacy.targets["app"].describe(),
            "circleci POST https://circleci.com/api/v2/project/circleci/org-id/project-id/pipeline (dry run)"
        );
    }

    #[test]
    fn a_definition_id_must_be_a_uuid_and_config_needs_one() {
        let bad = problems("definition_id = \"my-pipeline\"");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0, "targets.app.definition_id");
        assert!(
            bad[0]
                .1
                .starts_with("\"my-pipeline\" is not a pipeline definition id"),
            "{bad:?}"
        );

        let orphan = problems("config = { branch = \"main\" }");
        assert_eq!(orphan.len(), 1, "{orphan:?}");
        assert_eq!(orphan[0].0, "targets.app.config");
        assert!(orphan[0].1.contains("set definition_id too"), "{orphan:?}");

        let both = problems(
            "definition_id = \"2338d0ae-5541-4bbf-88a2-55e9f7281f80\"\nconfig = { branch = \"main\", tag = \"v1\" }",
        );
        assert_eq!(both.len(), 1, "{both:?}");
        assert_eq!(both[0].0, "targets.app.config");
        assert!(
            both[0].1.starts_with("takes a branch or a tag, not both"),
            "{both:?}"
        );

        let unknown =
            problems("definition_id = \"2338d0ae-5541-4bbf-88a2-55e9f7281f80\"\nconfig = { sha = \"abc\" }");
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert!(unknown[0].0.starts_with("targets.app.config"), "{unknown:?}");
    }

    #[test]
    fn poll_urls_take_only_a_uuid_and_encode_the_page_token() {
        let config = target("follow = true").unwrap();
        let super::super::Kind::CircleCi(t) = &config.targets["app"].kind else {
            panic!("not circleci");
        };
        let id = "5034460f-c7c4-4c43-9457-de07e2029e7b";
        assert_eq!(
            t.workflows_url(id, Some("a/b&c")).unwrap(),
            format!("https://circleci.com/api/v2/pipeline/{id}/workflow?page-token=a%2Fb%26c")
        );
        assert_eq!(
            t.pipeline_url(id).unwrap(),
            format!("https://circleci.com/api/v2/pipeline/{id}")
        );
        assert!(t.workflows_url("../../admin", None).is_err());
    }
}
