//! The commit status APIs of the Git hosts (PROTOCOLS.md D): a source's
//! `api = { token, url }`, compiled into the target that posts its reports
//! (`status:<source>`), and each report rendered into its host's request:
//!
//! - GitHub / GHES: `POST {api}/repos/{owner}/{repo}/statuses/{sha}`
//!   `{state, target_url, description, context}`, `Authorization: Bearer`;
//! - GitLab: `POST {api}/api/v4/projects/{path}/statuses/{sha}`
//!   `{state, name, target_url, description}`, `PRIVATE-TOKEN`;
//! - Bitbucket Cloud: `POST {api}/2.0/repositories/{workspace}/{slug}/commit/
//!   {sha}/statuses/build` `{key, state, name, url, description}`, `Bearer`;
//! - Gitea / Forgejo: `POST {api}/api/v1/repos/{owner}/{repo}/statuses/{sha}`
//!   `{state, target_url, description, context}`, `Authorization: token`.
//!
//! A report is rendered when it is sent, from the report job's snapshot; the
//! repository and sha in it were checked when the trigger was planned
//! (`report::ReportSpec::new`), and each path segment is encoded again here.

use serde_json::{Map, Value, json};

use super::{RenderFailure, USER_AGENT, encode_component};
use crate::config::compiler::Compiler;
use crate::config::raw::RawApi;
use crate::event::Provider;
use crate::report::{StatusReport, Verdict};
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::secret::Secret;

/// A source's host API, for posting commit statuses.
#[derive(Debug)]
pub struct StatusApi {
    provider: Provider,
    /// No trailing slash.
    url: String,
    pub(super) token: Option<Secret>,
}

impl StatusApi {
    /// `sources.NAME.api` for a source of `provider`.
    pub fn compile(key: &str, provider: Provider, raw: &RawApi, c: &mut Compiler) -> Option<StatusApi> {
        let default = match provider {
            Provider::Github => Some("https://api.github.com"),
            Provider::Gitlab => Some("https://gitlab.com"),
            Provider::Bitbucket => Some("https://api.bitbucket.org"),
            Provider::Gitea => None,
            Provider::Circleci | Provider::Generic => {
                c.problem(
                    key,
                    format!(
                        "provider {:?} has no commit status API to report to",
                        provider.as_str()
                    ),
                );
                return None;
            }
        };
        let url = match (raw.url.as_ref(), default) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(default)) => default.to_owned(),
            (None, None) => {
                c.problem(
                    format!("{key}.url"),
                    "is required for gitea: the server's address, like \"https://gitea.example.com\"",
                );
                return None;
            }
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            c.problem(format!("{key}.url"), "must start with https:// or http://");
        }
        let token = c.secret(&format!("{key}.token"), &raw.token);
        Some(StatusApi { provider, url, token })
    }

    /// The API's base URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn describe(&self) -> String {
        let path = match self.provider {
            Provider::Gitlab => "/api/v4/projects/{repo}/statuses/{sha}",
            Provider::Bitbucket => "/2.0/repositories/{repo}/commit/{sha}/statuses/build",
            Provider::Gitea => "/api/v1/repos/{repo}/statuses/{sha}",
            _ => "/repos/{repo}/statuses/{sha}",
        };
        format!("POST {}{path}", self.url)
    }

    /// The request that posts `report` on its commit.
    pub fn render(&self, report: &StatusReport) -> Result<PreparedRequest, RenderFailure> {
        let spec = &report.spec;
        let verdict = report.verdict();
        let description = report.description();
        let link = report.url.clone().or_else(|| {
            (self.provider == Provider::Bitbucket && !spec.link.is_empty()).then(|| spec.link.clone())
        });
        let segments = || -> String {
            spec.repo
                .split('/')
                .map(encode_component)
                .collect::<Vec<_>>()
                .join("/")
        };
        let sha = encode_component(&spec.sha);
        let mut body = Map::new();
        let (url, auth) = match self.provider {
            Provider::Gitlab => {
                body.insert("state".into(), json!(gitlab_state(verdict)));
                body.insert("name".into(), json!(spec.context));
                (
                    format!(
                        "{}/api/v4/projects/{}/statuses/{sha}",
                        self.url,
                        encode_component(&spec.repo)
                    ),
                    Auth::Header {
                        name: "PRIVATE-TOKEN".into(),
                    },
                )
            }
            Provider::Bitbucket => {
                body.insert("key".into(), json!(bitbucket_key(&spec.context)));
                body.insert("state".into(), json!(bitbucket_state(verdict)));
                body.insert("name".into(), json!(spec.context));
                (
                    format!(
                        "{}/2.0/repositories/{}/commit/{sha}/statuses/build",
                        self.url,
                        segments()
                    ),
                    Auth::Scheme {
                        scheme: "Bearer".into(),
                    },
                )
            }
            Provider::Gitea => {
                body.insert("state".into(), json!(github_state(verdict)));
                body.insert("context".into(), json!(spec.context));
                (
                    format!("{}/api/v1/repos/{}/statuses/{sha}", self.url, segments()),
                    Auth::Scheme {
                        scheme: "token".into(),
                    },
                )
            }
            _ => {
                body.insert("state".into(), json!(github_state(verdict)));
                body.insert("context".into(), json!(spec.context));
                (
                    format!("{}/repos/{}/statuses/{sha}", self.url, segments()),
                    Auth::Scheme {
                        scheme: "Bearer".into(),
                    },
                )
            }
        };
        body.insert("description".into(), json!(description));
        if let Some(link) = link {
            let field = if self.provider == Provider::Bitbucket {
                "url"
            } else {
                "target_url"
            };
            body.insert(field.into(), json!(link));
        } else if self.provider == Provider::Bitbucket {
            return Err(RenderFailure::Missing(
                "Bitbucket requires a link for a status, and neither the pipeline nor the repository has a page".into(),
            ));
        }
        let mut headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("User-Agent".to_owned(), USER_AGENT.to_owned()),
        ];
        match self.provider {
            Provider::Github => {
                headers.push(("Accept".to_owned(), "application/vnd.github+json".to_owned()));
                headers.push(("X-GitHub-Api-Version".to_owned(), "2022-11-28".to_owned()));
            }
            _ => headers.push(("Accept".to_owned(), "application/json".to_owned())),
        }
        Ok(PreparedRequest {
            url,
            headers,
            body: RequestBody::Text(Value::Object(body).to_string()),
            auth,
        })
    }

    /// What a refusal means for a status post (PROTOCOLS.md D).
    pub(super) fn advice(&self, status: u16, body: &[u8]) -> Option<&'static str> {
        let text = String::from_utf8_lossy(body);
        match (self.provider, status) {
            (Provider::Github, 422) if text.contains("more than") || text.contains("1000") => {
                Some("GitHub keeps at most 1,000 statuses per commit and context, and this one is full")
            }
            (Provider::Github, 401 | 403 | 404) => Some(
                "the api token needs \"Commit statuses: write\" on this repository (classic tokens: repo:status), or the repository is wrong",
            ),
            (Provider::Gitlab, 401 | 403 | 404) => Some(
                "the api token needs the api scope and at least the Developer role in this project, or the project is wrong",
            ),
            (Provider::Bitbucket, 401 | 403 | 404) => Some(
                "the api token needs repository write access (a repository or workspace access token), or the repository is wrong",
            ),
            (Provider::Gitea, 401 | 403 | 404) => {
                Some("the api token needs write:repository on this repository, or the repository is wrong")
            }
            _ => None,
        }
    }
}

fn github_state(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pending | Verdict::Running => "pending",
        Verdict::Success => "success",
        Verdict::Failure => "failure",
        // GitHub and Gitea have no "canceled".
        Verdict::Canceled | Verdict::Error => "error",
    }
}

fn gitlab_state(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pending => "pending",
        Verdict::Running => "running",
        Verdict::Success => "success",
        Verdict::Failure | Verdict::Error => "failed",
        Verdict::Canceled => "canceled",
    }
}

fn bitbucket_state(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pending | Verdict::Running => "INPROGRESS",
        Verdict::Success => "SUCCESSFUL",
        Verdict::Failure | Verdict::Error => "FAILED",
        Verdict::Canceled => "STOPPED",
    }
}

/// Bitbucket's key: at most 40 characters.
fn bitbucket_key(context: &str) -> String {
    context.chars().take(40).collect()
}
