//! CircleCI's outbound webhooks (PROTOCOLS.md A5): `Circleci-Signature`, a
//! comma-separated list of versioned signatures (`v1=<hex HMAC-SHA256 of the
//! raw body>,v2=…`), of which any `v1` may match and unknown versions are
//! ignored; JSON bodies only; the event name in `Circleci-Event-Type`; the
//! body's `id` (one per event, kept across CircleCI's retries) is the
//! delivery id that redeliveries are deduplicated on.
//!
//! `workflow-completed` becomes a `pipeline` event: `status` is the
//! workflow's, the pipeline's id (a UUID), number and trigger type, the
//! workflow's name. The repository, ref and commit come from `pipeline.vcs`
//! (GitHub OAuth and Bitbucket projects), else from
//! `pipeline.trigger_parameters.git` (GitHub App and GitLab projects). The
//! repository is the path of the target repository's URL (`owner/name`,
//! GitLab's `group/sub/name`), else of `trigger_parameters.git.checkout_url`,
//! else the project slug without its VCS prefix (`github/org/repo` →
//! `org/repo`; a `circleci/<org-id>/<project-id>` slug is kept whole).
//! `job-completed` and anything else parse to kind `other`: recorded and
//! acknowledged, never routed. CircleCI names no pusher.

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, bounded, from_json, header_str,
    required_header,
};
use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, EventKind, Pipeline};
use crate::secret::Secret;
use crate::signature::{self, Algorithm};

#[derive(Debug)]
pub struct Settings {
    secret: Secret,
}

impl Settings {
    pub fn compile(key: &str, raw: &RawSource, c: &mut Compiler) -> Option<Settings> {
        Some(Settings {
            secret: super::required_secret(
                key,
                raw,
                c,
                "CircleCI signs each delivery with the webhook's signing secret",
            )?,
        })
    }

    pub fn describe(&self) -> String {
        format!("Circleci-Signature v1, secret from {}", self.secret.origin())
    }
}

const SIGNATURE: &str = "circleci-signature";
const SIGNATURE_DISPLAY: &str = "Circleci-Signature";
const EVENT_TYPE: &str = "circleci-event-type";
/// Signatures read from one header; CircleCI sends one per version.
const MAX_SIGNATURES: usize = 8;
/// CircleCI's event ids are UUIDs; anything much longer is not one.
const MAX_ID: usize = 128;
/// The most kept of a short field (status, name, id) or a commit message.
const MAX_FIELD: usize = 1024;
const MAX_MESSAGE: usize = 16 * 1024;

/// The headers CircleCI would send with this body (its delivery id is the
/// body's `id`, so `delivery` is not sent).
pub(super) fn sign(settings: &Settings, hook: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let tag = signature::sign(Algorithm::Sha256, settings.secret.expose(), &[body]);
    vec![
        ("Circleci-Event-Type", hook.to_owned()),
        ("Circleci-Signature", format!("v1={}", hex::encode(tag))),
    ]
}

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
) -> Result<Received, super::IngressError> {
    verify(&settings.secret, source, headers, body)?;
    if content != ContentKind::Json {
        return Err(
            PayloadError::Invalid("CircleCI sends JSON; this body is form-encoded".to_owned()).into(),
        );
    }
    let hook = required_header(headers, EVENT_TYPE)?;
    let head: Head = from_json(body)?;
    if head.id.trim().is_empty() || head.id.len() > MAX_ID {
        return Err(PayloadError::Invalid(format!(
            "the body's id must be CircleCI's event id (a UUID, at most {MAX_ID} characters)"
        ))
        .into());
    }
    Ok(Received {
        body: None,
        hook,
        delivery: Some(head.id),
        payload: body.clone(),
    })
}

/// `Circleci-Signature`: any `v1` entry that is the body's HMAC under any
/// value of the secret; other versions are ignored.
fn verify(secret: &Secret, source: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), SignatureError> {
    let value = header_str(headers, SIGNATURE)
        .ok_or_else(|| SignatureError::Missing {
            header: SIGNATURE_DISPLAY,
            config_source: source.to_owned(),
        })?
        .trim();
    if value.is_empty() {
        return Err(SignatureError::Empty {
            header: SIGNATURE_DISPLAY,
            config_source: source.to_owned(),
        });
    }
    let malformed = || SignatureError::Malformed {
        header: SIGNATURE_DISPLAY,
        expected: "a comma-separated list of versioned signatures with a v1, like v1=<64 hex digits>",
    };
    let mut presented = Vec::new();
    for entry in value.split(',').take(MAX_SIGNATURES) {
        let (version, tag) = entry.trim().split_once('=').ok_or_else(malformed)?;
        if version.trim() == "v1" {
            presented.push(Algorithm::Sha256.decode_hex(tag.trim()).ok_or_else(malformed)?);
        }
    }
    if presented.is_empty() {
        return Err(malformed());
    }
    if presented
        .iter()
        .any(|tag| signature::verify(Algorithm::Sha256, secret, &[body], tag))
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch {
            header: SIGNATURE_DISPLAY,
            config_source: source.to_owned(),
        })
    }
}

/// What `receive` reads of the body: the event id.
#[derive(Deserialize)]
struct Head {
    id: String,
}

/// Either kind of event; the maps are open, so only what relay keeps is named.
#[derive(Deserialize)]
struct Hook {
    #[serde(default)]
    project: Option<Project>,
    #[serde(default)]
    pipeline: Option<PipelineInfo>,
    #[serde(default)]
    workflow: Option<Workflow>,
}

#[derive(Deserialize)]
struct Project {
    #[serde(default)]
    slug: Option<String>,
}

#[derive(Deserialize)]
struct PipelineInfo {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    number: Option<u64>,
    #[serde(default)]
    trigger: Option<Trigger>,
    #[serde(default)]
    vcs: Option<Vcs>,
    #[serde(default)]
    trigger_parameters: Option<TriggerParameters>,
}

#[derive(Deserialize)]
struct Trigger {
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Vcs {
    #[serde(default)]
    origin_repository_url: Option<String>,
    #[serde(default)]
    target_repository_url: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    commit: Option<VcsCommit>,
}

#[derive(Deserialize)]
struct VcsCommit {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
struct TriggerParameters {
    #[serde(default)]
    git: Option<Git>,
    #[serde(default)]
    gitlab: Option<GitlabParameters>,
}

#[derive(Deserialize)]
struct Git {
    #[serde(default, rename = "ref")]
    git_ref: Option<String>,
    #[serde(default)]
    branch: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    checkout_sha: Option<String>,
    #[serde(default)]
    checkout_url: Option<String>,
}

#[derive(Deserialize)]
struct GitlabParameters {
    #[serde(default)]
    commit_message: Option<String>,
}

#[derive(Deserialize)]
struct Workflow {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

pub(super) fn parse(hook: &str, payload: &[u8]) -> Result<Parsed, PayloadError> {
    let parsed: Hook = from_json(payload)?;
    let slug = parsed.project.and_then(|p| p.slug).unwrap_or_default();
    let mut event = Event::default();
    let mut pipeline = Pipeline::default();
    if let Some(info) = parsed.pipeline {
        read_source(&mut event, &info);
        pipeline.id = bounded(info.id.unwrap_or_default(), MAX_FIELD);
        pipeline.number = info.number.unwrap_or(0);
        pipeline.source = bounded(info.trigger.and_then(|t| t.kind).unwrap_or_default(), MAX_FIELD);
    }
    if event.repo.is_empty() {
        event.repo = bounded(repo_from_slug(&slug).to_owned(), MAX_FIELD);
    }
    if hook != "workflow-completed" {
        event.kind = EventKind::Other;
        return Ok(Parsed::Events(vec![event]));
    }
    let workflow = parsed
        .workflow
        .ok_or_else(|| PayloadError::Field("a workflow-completed event without its workflow".to_owned()))?;
    pipeline.status = bounded(workflow.status.unwrap_or_default(), MAX_FIELD);
    pipeline.workflow = bounded(workflow.name.unwrap_or_default(), MAX_FIELD);
    event.kind = EventKind::Pipeline;
    event.pipeline = Some(pipeline);
    Ok(Parsed::Events(vec![event]))
}

/// Repository, ref, commit and message: from `vcs`, else from
/// `trigger_parameters.git` (GitHub App and GitLab projects).
fn read_source(event: &mut Event, info: &PipelineInfo) {
    if let Some(vcs) = &info.vcs {
        let url = [&vcs.target_repository_url, &vcs.origin_repository_url]
            .into_iter()
            .map(text)
            .find(|url| !url.is_empty())
            .unwrap_or("");
        set_repository(event, url);
        event.sha = bounded(text(&vcs.revision).to_owned(), MAX_FIELD);
        set_short_ref(event, text(&vcs.branch), text(&vcs.tag));
        if let Some(commit) = &vcs.commit {
            let (subject, body) = (text(&commit.subject), text(&commit.body));
            let message = if body.is_empty() {
                subject.to_owned()
            } else {
                format!("{subject}\n\n{body}")
            };
            event.message = bounded(message, MAX_MESSAGE);
        }
    } else if let Some(parameters) = &info.trigger_parameters {
        if let Some(git) = &parameters.git {
            set_repository(event, text(&git.checkout_url));
            event.sha = bounded(text(&git.checkout_sha).to_owned(), MAX_FIELD);
            let full = text(&git.git_ref);
            if full.starts_with("refs/heads/") || full.starts_with("refs/tags/") {
                set_full_ref(event, full);
            } else {
                set_short_ref(event, text(&git.branch), text(&git.tag));
            }
        }
        if let Some(gitlab) = &parameters.gitlab {
            event.message = bounded(text(&gitlab.commit_message).to_owned(), MAX_MESSAGE);
        }
    }
}

/// An optional field as trimmed text, empty when absent.
fn text(value: &Option<String>) -> &str {
    value.as_deref().map(str::trim).unwrap_or("")
}

fn set_full_ref(event: &mut Event, full: &str) {
    event.set_ref(&bounded(full.to_owned(), MAX_FIELD));
}

fn set_short_ref(event: &mut Event, branch: &str, tag: &str) {
    if !tag.is_empty() {
        set_full_ref(event, &format!("refs/tags/{tag}"));
    } else if !branch.is_empty() {
        set_full_ref(event, &format!("refs/heads/{branch}"));
    }
}

/// `repo` and `repo_url` from a repository URL: `https://host/owner/name`,
/// `ssh://git@host/owner/name.git` or `git@host:owner/name.git`.
fn set_repository(event: &mut Event, url: &str) {
    let Some((host, path)) = split_repository_url(url) else {
        return;
    };
    event.repo = bounded(path.to_owned(), MAX_FIELD);
    event.repo_url = bounded(
        if url.starts_with("https://") || url.starts_with("http://") {
            url.trim_end_matches('/').trim_end_matches(".git").to_owned()
        } else {
            format!("https://{host}/{path}")
        },
        MAX_FIELD,
    );
}

fn split_repository_url(url: &str) -> Option<(&str, &str)> {
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?,
        None => url.split_once(':')?,
    };
    let host = rest.0.rsplit('@').next().unwrap_or(rest.0);
    let path = rest
        .1
        .trim_matches('/')
        .trim_end_matches(".git")
        .trim_end_matches('/');
    (!host.is_empty() && path.contains('/')).then_some((host, path))
}

/// The repository a project slug names: `github/org/repo` → `org/repo`; a
/// `circleci/<org-id>/<project-id>` slug names no repository and is kept.
fn repo_from_slug(slug: &str) -> &str {
    match slug.split_once('/') {
        Some(("github" | "gh" | "bitbucket" | "bb" | "gitlab", rest)) => rest,
        _ => slug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(signature: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(value) = signature {
            h.insert(SIGNATURE, value.parse().unwrap());
        }
        h
    }

    fn v1(key: &[u8], body: &[u8]) -> String {
        format!(
            "v1={}",
            hex::encode(signature::sign(Algorithm::Sha256, key, &[body]))
        )
    }

    #[test]
    fn any_v1_in_the_list_verifies_and_other_versions_are_ignored() {
        let secret = Secret::from_bytes("new", "test").with_rotation(b"old".to_vec());
        let body = br#"{"id":"x"}"#;
        let good = v1(b"old", body);
        let bad = v1(b"other", body);
        for value in [
            good.clone(),
            format!("v2=zz-not-hex,{good}"),
            format!("{bad}, {good}"),
            format!("{good},v9=anything"),
        ] {
            assert!(
                verify(&secret, "cci", &headers(Some(&value)), body).is_ok(),
                "{value}"
            );
        }
        assert!(matches!(
            verify(&secret, "cci", &headers(Some(&bad)), body),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            verify(&secret, "cci", &headers(None), body),
            Err(SignatureError::Missing {
                header: "Circleci-Signature",
                ..
            })
        ));
        for value in ["v2=abc", "v1=xyz", "nonsense", "v1=abcd"] {
            assert!(
                matches!(
                    verify(&secret, "cci", &headers(Some(value)), body),
                    Err(SignatureError::Malformed { .. })
                ),
                "{value}"
            );
        }
    }

    #[test]
    fn repository_urls_and_slugs() {
        assert_eq!(
            split_repository_url("git@gitlab.com:group/sub/app.git"),
            Some(("gitlab.com", "group/sub/app"))
        );
        assert_eq!(
            split_repository_url("https://github.com/acme/app/"),
            Some(("github.com", "acme/app"))
        );
        assert_eq!(
            split_repository_url("ssh://git@example.org:22/acme/app.git"),
            Some(("example.org:22", "acme/app"))
        );
        assert_eq!(split_repository_url("https://github.com/"), None);
        assert_eq!(split_repository_url(""), None);
        assert_eq!(repo_from_slug("gh/acme/app"), "acme/app");
        assert_eq!(repo_from_slug("circleci/org/proj"), "circleci/org/proj");
    }
}
