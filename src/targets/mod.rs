//! Targets: the CI systems relay triggers, and a trigger's whole life with
//! one. One file per kind, each with the same shape: its settings compiled
//! from `[targets.NAME]`, and `render`, which turns an event into a
//! [`PreparedRequest`]; [`Target::authorize`] adds the credential from the
//! current config at send time, `exchange` sends it and reads the answer,
//! and `outcome` holds the status classes every kind shares.
//!
//! `proxy` says how a target's requests reach it; `sends` keeps a client
//! for each distinct setting. `urls` keeps the URLs a target's jobs go to
//! parsed. `follow` polls a CI for a pipeline's state.
//!
//! A prepared request holds everything but the credential; it is what the
//! store keeps, so no token ever reaches the database. Only `exchange` and
//! `follow` do I/O; nothing here touches the store or decides about retries
//! or when to poll.

mod circleci;
mod circleci_answers;
mod circleci_v1;
mod exchange;
mod follow;
mod gitlab;
pub mod hooks;
mod http;
mod message;
pub mod outcome;
pub mod proxy;
mod status;
mod urls;

pub use exchange::AttemptResult;
pub use follow::{Follow, PollAnswer};
pub use message::response_message;
pub use outcome::Outcome;
pub use proxy::{Outbound, ProxySetting};

use std::time::SystemTime;

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::compiler::Compiler;

use crate::config::raw::{ParamValue, RawApi, RawTarget, TargetKindName};

use crate::guard::BurstSetting;

use crate::event::Event;
use crate::ingress::Webhook;
use crate::payload::PayloadUrls;
use crate::request::{Auth, AuthorizeError, PreparedRequest, WireRequest};
use crate::secret::{MIN_SCRUBBED_SECRET, REDACTED, Secret};
use crate::signature;
use crate::template::{Context, RenderError, TemplateStr, Templates};

/// A `[targets.NAME]`, compiled.
#[derive(Debug)]
pub struct Target {
    pub name: String,
    /// Record and log the exact request instead of sending it.
    pub dry_run: bool,
    /// In-flight sends allowed at once; `None` takes `delivery.concurrency`.
    pub concurrency: Option<usize>,
    /// Overrides `loop_guard.burst` for this target.
    pub burst: Option<BurstSetting>,
    /// How requests reach the target: the environment's proxy, direct, or a named proxy.
    pub proxy: ProxySetting,
    /// Poll the CI for the state of each pipeline a trigger starts.
    pub follow: Option<Follow>,
    /// Triggered and followed for real, never reported as a status of its
    /// route's commit; compared with the route's other targets instead.
    pub shadow: bool,
    pub kind: Kind,
    /// The URLs its jobs went to, parsed.
    urls: urls::ParsedUrls,
}

#[derive(Debug)]
pub enum Kind {
    CircleCi(circleci::CircleCi),
    CircleCiV1(circleci_v1::CircleCiV1),
    Gitlab(gitlab::Gitlab),
    Http(http::HttpTarget),
    /// A source's commit status API: posts the reports of routes with
    /// `report` (never named in a route's `to`).
    Status(status::StatusApi),
}

impl Target {
    pub fn compile(name: &str, raw: RawTarget, c: &mut Compiler) -> Option<Target> {
        let key = format!("targets.{name}");
        let before = c.problem_count();
        let dry_run = raw.dry_run.unwrap_or(false);
        if raw.concurrency == Some(0) {
            c.problem(format!("{key}.concurrency"), "must be at least 1");
        }
        let present = raw.present();
        let owner = format!("kind {:?}", raw.kind.as_str());
        let kind = match raw.kind {
            TargetKindName::Circleci => {
                c.only_keys(&key, &present, circleci::KEYS, &owner);
                circleci::CircleCi::compile(&key, &raw, dry_run, c).map(Kind::CircleCi)
            }
            TargetKindName::CircleciV1 => {
                c.only_keys(&key, &present, circleci_v1::KEYS, &owner);
                circleci_v1::CircleCiV1::compile(&key, &raw, dry_run, c).map(Kind::CircleCiV1)
            }
            TargetKindName::Gitlab => {
                c.only_keys(&key, &present, gitlab::KEYS, &owner);
                gitlab::Gitlab::compile(&key, &raw, dry_run, c).map(Kind::Gitlab)
            }
            TargetKindName::Http => {
                c.only_keys(&key, &present, http::KEYS, &owner);
                http::HttpTarget::compile(&key, &raw, dry_run, c).map(Kind::Http)
            }
        };
        let proxy = ProxySetting::compile(&key, raw.proxy.as_ref(), c);
        let reader = match raw.kind {
            TargetKindName::Gitlab => follow::Reader::OwnToken {
                hint: "a token with the read_api scope, like { env = \"GITLAB_API_TOKEN\" } (a trigger token cannot read pipelines)",
            },
            _ => follow::Reader::TriggerToken,
        };
        let follow = Follow::compile(&format!("{key}.follow"), raw.follow.as_ref(), reader, c);
        if c.problem_count() > before {
            return None;
        }
        Some(Target {
            name: name.to_owned(),
            dry_run,
            concurrency: raw.concurrency,
            proxy,
            follow,
            shadow: raw.shadow.unwrap_or(false),
            burst: raw.burst.map(|b| c.burst(&format!("{key}.burst"), b)),
            kind: kind?,
            urls: urls::ParsedUrls::default(),
        })
    }

    /// The target that posts source `source`'s commit statuses through its
    /// `api` (`sources.NAME.api`), named [`crate::report::status_target`].
    pub fn status(
        source: &str,
        provider: crate::event::Provider,
        raw: &RawApi,
        c: &mut Compiler,
    ) -> Option<Target> {
        let api = status::StatusApi::compile(&format!("sources.{source}.api"), provider, raw, c)?;
        Some(Target {
            name: crate::report::status_target(source),
            dry_run: false,
            concurrency: None,
            burst: None,
            proxy: ProxySetting::Environment,
            follow: None,
            shadow: false,
            kind: Kind::Status(api),
            urls: urls::ParsedUrls::default(),
        })
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::CircleCi(_) => "circleci",
            Kind::CircleCiV1(_) => "circleci_v1",
            Kind::Gitlab(_) => "gitlab",
            Kind::Http(_) => "http",
            Kind::Status(_) => "status",
        }
    }

    /// What a trigger of this target starts, for a status's description;
    /// empty for a plain delivery.
    pub fn pipeline_label(&self) -> &'static str {
        match &self.kind {
            Kind::CircleCi(_) => "CircleCI pipeline",
            Kind::CircleCiV1(_) => "CircleCI build",
            Kind::Gitlab(_) => "GitLab pipeline",
            Kind::Http(_) | Kind::Status(_) => "",
        }
    }

    /// The request that posts `report` (a `status:` target's job).
    pub fn render_status(
        &self,
        report: &crate::report::StatusReport,
    ) -> Result<PreparedRequest, RenderFailure> {
        match &self.kind {
            Kind::Status(api) => api.render(report),
            _ => Err(RenderFailure::Missing(format!(
                "target {} posts no commit statuses",
                self.name
            ))),
        }
    }

    /// Builds the request this event asks of the target, without credentials.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        match &self.kind {
            Kind::CircleCi(t) => t.render(input),
            Kind::CircleCiV1(t) => t.render(input),
            Kind::Gitlab(t) => t.render(input),
            Kind::Http(t) => t.render(input),
            Kind::Status(_) => Err(RenderFailure::Missing(
                "a commit status API is not a trigger target".into(),
            )),
        }
    }

    /// An `http` target's URL as configured; `None` for the CI kinds.
    pub fn http_url(&self) -> Option<&str> {
        match &self.kind {
            Kind::Http(t) => Some(t.url_source()),
            _ => None,
        }
    }

    /// The repository whose pipeline this target starts, as a Git host names
    /// it (`acme/api`), where the config says so statically: CircleCI slugs
    /// `gh/acme/api`, `github/acme/api`, `bb/…`; GitLab paths. `None` for
    /// numeric ids, templates and plain URLs.
    pub fn built_repo(&self) -> Option<String> {
        let (project, vcs_prefixed) = match &self.kind {
            Kind::CircleCi(t) => (t.project_source(), true),
            Kind::CircleCiV1(t) => (t.project_source(), true),
            Kind::Gitlab(t) => (t.project_source(), false),
            Kind::Http(_) | Kind::Status(_) => return None,
        };
        if project.contains("{{") || project.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !vcs_prefixed {
            return Some(project.to_owned());
        }
        let (vcs, rest) = project.split_once('/')?;
        matches!(vcs, "gh" | "github" | "bb" | "bitbucket").then(|| rest.to_owned())
    }

    /// Whether requests for this target carry a payload URL.
    pub fn uses_payload_urls(&self) -> bool {
        matches!(&self.kind, Kind::CircleCi(t) if t.uses_payload_urls())
    }

    fn credential(&self) -> Option<&Secret> {
        match &self.kind {
            Kind::CircleCi(t) => t.token.as_ref(),
            Kind::CircleCiV1(t) => t.token.as_ref(),
            Kind::Gitlab(t) => t.token.as_ref(),
            Kind::Http(t) => t.secret(),
            Kind::Status(t) => t.token.as_ref(),
        }
    }

    /// `text` with this target's credential and its proxy's password
    /// replaced by `[redacted]`, for anything a target (or its proxy)
    /// answered that gets stored or logged (a target may echo the token it
    /// was sent).
    pub fn scrub(&self, text: String) -> String {
        let mut text = text;
        let follow_token = self.follow.as_ref().and_then(Follow::token);
        for secret in [self.credential(), follow_token, self.proxy.password()]
            .into_iter()
            .flatten()
        {
            let value = String::from_utf8_lossy(secret.expose()).into_owned();
            // A value this short would shred ordinary words and hide nothing
            // (the config warns about it).
            if value.chars().count() >= MIN_SCRUBBED_SECRET && text.contains(&value) {
                text = text.replace(&value, REDACTED);
            }
        }
        text
    }

    /// A one-line description for `relay check`: where requests go.
    pub fn describe(&self) -> String {
        let endpoint = match &self.kind {
            Kind::CircleCi(t) => t.describe(),
            Kind::CircleCiV1(t) => t.describe(),
            Kind::Gitlab(t) => t.describe(),
            Kind::Http(t) => t.describe(),
            Kind::Status(t) => t.describe(),
        };
        let dry = if self.dry_run { " (dry run)" } else { "" };
        let shadow = if self.shadow { " (shadow)" } else { "" };
        let follow = match &self.follow {
            Some(f) => format!(
                ", follows each pipeline by polling (first after {}, at most every {}, for {})",
                humantime::format_duration(f.first),
                humantime::format_duration(f.max),
                humantime::format_duration(f.deadline)
            ),
            None => String::new(),
        };
        let proxy = self
            .proxy
            .describe()
            .map(|p| format!(", {p}"))
            .unwrap_or_default();
        format!("{} {endpoint}{dry}{shadow}{follow}{proxy}", self.kind_name())
    }

    /// The request as it goes on the wire: credentials added now, from this
    /// config, never from the store.
    pub fn authorize(
        &self,
        prepared: &PreparedRequest,
        payload: Option<&Bytes>,
    ) -> Result<WireRequest, AuthorizeError> {
        let body = prepared.body_bytes(payload)?;
        let mut url = self.urls.parse(&prepared.url).map_err(|e| AuthorizeError::Url {
            reason: e.to_string(),
        })?;
        let mut headers = prepared.headers.clone();
        let mut body = body;
        if prepared.auth != Auth::None {
            let secret = self.credential().ok_or_else(|| AuthorizeError::NoCredential {
                target: self.name.clone(),
            })?;
            let value = || String::from_utf8_lossy(secret.expose()).into_owned();
            match &prepared.auth {
                Auth::None => {}
                Auth::Header { name } => headers.push((name.clone(), value())),
                Auth::Scheme { scheme } => {
                    headers.push(("Authorization".to_owned(), format!("{scheme} {}", value())))
                }
                Auth::Query { name } => {
                    let token = value();
                    let encoded = utf8_percent_encode(&token, COMPONENT);
                    let query = match url.query() {
                        Some(query) => format!("{query}&{name}={encoded}"),
                        None => format!("{name}={encoded}"),
                    };
                    url.set_query(Some(&query));
                }
                Auth::JsonField { name } => {
                    let mut doc: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_slice(&body).map_err(|_| AuthorizeError::Body)?;
                    doc.insert(name.clone(), serde_json::Value::String(value()));
                    body = Bytes::from(serde_json::to_vec(&doc).map_err(|_| AuthorizeError::Body)?);
                }
                Auth::Hmac {
                    header,
                    algorithm,
                    prefix,
                } => {
                    let tag = signature::sign(*algorithm, secret.expose(), &[&body]);
                    headers.push((header.clone(), format!("{prefix}{}", hex::encode(tag))));
                }
            }
        }
        Ok(WireRequest { url, headers, body })
    }
}

/// What a target kind's `render` reads.
#[derive(Debug)]
pub struct RenderInput<'a> {
    /// The templates every target field was compiled into.
    pub templates: &'a Templates,
    /// Set when payload URLs can be made (`server.public_url`, `server.payload_key`).
    pub payload_urls: Option<&'a PayloadUrls>,
    /// `loop_guard.hop_variable`: the pipeline variable that carries the hop count.
    pub hop_variable: &'a str,
    pub webhook: &'a Webhook,
    pub event: &'a Event,
    pub ctx: &'a Context<'a>,
    /// Relay hops that led to this event; the trigger carries one more.
    pub hop: u32,
    pub now: SystemTime,
}

impl RenderInput<'_> {
    fn text(&self, field: &TemplateStr) -> Result<String, RenderFailure> {
        Ok(self.templates.render(field, self.ctx)?.into_owned())
    }

    /// The hop count the trigger carries: one more than the event's.
    fn next_hop(&self) -> u32 {
        self.hop + 1
    }

    /// A signed, expiring URL from which the webhook's body can be fetched.
    fn payload_url(&self) -> Result<String, RenderFailure> {
        let settings = self.payload_urls.ok_or_else(|| {
            RenderFailure::Missing("payload URLs need server.public_url and server.payload_key".to_owned())
        })?;
        Ok(crate::payload::signed_url(settings, self.webhook.id(), self.now))
    }

    /// The name of the pipeline variable that carries the hop count.
    fn hop_variable(&self) -> &str {
        self.hop_variable
    }

    /// A typed parameter: literals keep their type, templates render to strings.
    fn param(&self, value: &Param) -> Result<serde_json::Value, RenderFailure> {
        Ok(match value {
            Param::Typed(v) => v.clone(),
            Param::Text(t) => serde_json::Value::String(self.text(t)?),
        })
    }
}

/// A parameter value from config: typed literal or a string template.
#[derive(Debug, Clone)]
enum Param {
    Typed(serde_json::Value),
    Text(TemplateStr),
}

fn compile_params<'a>(
    key: &str,
    raw: impl IntoIterator<Item = (&'a String, &'a ParamValue)>,
    c: &mut Compiler,
) -> Vec<(String, Param)> {
    let mut out = Vec::new();
    for (name, value) in raw {
        let param = match value {
            ParamValue::Bool(b) => Param::Typed(serde_json::Value::Bool(*b)),
            ParamValue::Int(i) => Param::Typed(serde_json::Value::from(*i)),
            ParamValue::Float(f) => Param::Typed(serde_json::Value::from(*f)),
            ParamValue::Str(s) => match compile_text(&format!("{key}.{name}"), s, c) {
                Some(t) => Param::Text(t),
                None => continue,
            },
        };
        out.push((name.clone(), param));
    }
    out
}

/// Compiles a string field, reporting a bad template at its key.
fn compile_text(key: &str, source: &str, c: &mut Compiler) -> Option<TemplateStr> {
    match c.templates.field(key, source) {
        Ok(t) => Some(t),
        Err(e) => {
            c.problem(e.key, e.message);
            None
        }
    }
}

/// A target's credential: required to send, optional in a dry run (where a
/// missing one only warns, so the sample config runs without credentials).
fn compile_credential(
    key: &str,
    spec: Option<&crate::secret::SecretSpec>,
    dry_run: bool,
    c: &mut Compiler,
) -> Option<Secret> {
    let Some(spec) = spec else {
        if !dry_run {
            c.problem(key, "is required unless the target is dry_run");
        }
        return None;
    };
    if dry_run {
        match spec.resolve() {
            Ok(secret) => Some(secret),
            Err(e) => {
                c.warn(format!("{key}: {e}; fine while the target is dry_run"));
                None
            }
        }
    } else {
        c.secret(key, spec)
    }
}

fn base_url(key: &str, raw: Option<&String>, default: &str, c: &mut Compiler) -> String {
    let url = raw.map(String::as_str).unwrap_or(default).trim_end_matches('/');
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        c.problem(key, "must start with https:// or http://");
    }
    url.to_owned()
}

/// Characters left alone in a path segment; everything else is escaped, so a
/// GitLab path `group/sub/app` becomes one segment `group%2Fsub%2Fapp`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_component(value: &str) -> String {
    utf8_percent_encode(value, COMPONENT).to_string()
}

/// Why an event cannot become a request for this target; the job is dead at
/// once with this reason rather than sent to fail.
#[derive(Debug, thiserror::Error)]
pub enum RenderFailure {
    #[error("template {0}")]
    Template(#[from] RenderError),
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Missing(String),
}

/// The user agent on every outbound request.
pub const USER_AGENT: &str = concat!("relay/", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_paths_become_one_segment() {
        assert_eq!(encode_component("group/sub/app"), "group%2Fsub%2Fapp");
        assert_eq!(encode_component("feature/x-1.2_a~b"), "feature%2Fx-1.2_a~b");
    }
}
