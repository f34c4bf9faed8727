//! GitHub (github.com and GHES): `X-Hub-Signature-256` over the raw body, JSON
//! or form-encoded (`payload=`) bodies, `push` and `ping`.
//!
//! A tag push arrives as both `push` and `create`; only `push` is routed, so a
//! tag never triggers twice. `create`, `delete` and other events parse to kind
//! `other`. SHA-1 (`X-Hub-Signature`) is accepted only with `allow_sha1`.

use std::borrow::Cow;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, form_payload, from_json, header_str,
    required_header,
};
use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, EventKind, Files, Pipeline, ZERO_SHA, changed_paths, is_zero_sha};
use crate::secret::Secret;
use crate::signature::{self, Algorithm};

#[derive(Debug)]
pub struct Settings {
    secret: Secret,
    allow_sha1: bool,
}

impl Settings {
    pub fn compile(key: &str, raw: &RawSource, c: &mut Compiler) -> Option<Settings> {
        Some(Settings {
            secret: super::required_secret(
                key,
                raw,
                c,
                "GitHub signs each delivery with the webhook's secret",
            )?,
            allow_sha1: raw.allow_sha1.unwrap_or(false),
        })
    }

    pub fn describe(&self) -> String {
        let sha1 = if self.allow_sha1 { ", sha1 allowed" } else { "" };
        format!("X-Hub-Signature-256, secret from {}{sha1}", self.secret.origin())
    }
}

const SIG256: &str = "x-hub-signature-256";

/// The headers GitHub would send with this body.
pub(super) fn sign(
    settings: &Settings,
    hook: &str,
    body: &[u8],
    delivery: &str,
) -> Vec<(&'static str, String)> {
    let tag = signature::sign(Algorithm::Sha256, settings.secret.expose(), &[body]);
    vec![
        ("X-GitHub-Event", hook.to_owned()),
        ("X-GitHub-Delivery", delivery.to_owned()),
        ("X-Hub-Signature-256", format!("sha256={}", hex::encode(tag))),
    ]
}
const SIG1: &str = "x-hub-signature";

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
) -> Result<Received, super::IngressError> {
    verify(settings, source, headers, body)?;
    let hook = required_header(headers, "x-github-event")?;
    let payload = match content {
        ContentKind::Json => body.clone(),
        ContentKind::Form => form_payload(body)?,
    };
    Ok(Received {
        body: None,
        hook,
        delivery: header_str(headers, "x-github-delivery").map(str::to_owned),
        payload,
    })
}

fn verify(settings: &Settings, source: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), SignatureError> {
    let (header, algorithm, prefix) = match (header_str(headers, SIG256), header_str(headers, SIG1)) {
        (Some(_), _) => (SIG256, Algorithm::Sha256, "sha256="),
        (None, Some(_)) if settings.allow_sha1 => (SIG1, Algorithm::Sha1, "sha1="),
        _ => {
            return Err(SignatureError::Missing {
                header: "X-Hub-Signature-256",
                config_source: source.to_owned(),
            });
        }
    };
    let display = if header == SIG256 {
        "X-Hub-Signature-256"
    } else {
        "X-Hub-Signature"
    };
    let value = header_str(headers, header).unwrap_or_default().trim();
    if value.is_empty() {
        return Err(SignatureError::Empty {
            header: display,
            config_source: source.to_owned(),
        });
    }
    let presented = value
        .strip_prefix(prefix)
        .and_then(|hex_part| algorithm.decode_hex(hex_part))
        .ok_or(SignatureError::Malformed {
            header: display,
            expected: if header == SIG256 {
                "sha256= followed by 64 hex digits"
            } else {
                "sha1= followed by 40 hex digits"
            },
        })?;
    if signature::verify(algorithm, &settings.secret, &[body], &presented) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch {
            header: display,
            config_source: source.to_owned(),
        })
    }
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    #[serde(default)]
    html_url: Option<String>,
}

/// A push, borrowing from the body where it can: the commit list is most of
/// a push's bytes, and only its file names and the head's message are kept.
#[derive(Deserialize)]
struct Push<'a> {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    forced: bool,
    repository: Repository,
    #[serde(default)]
    pusher: Option<Named>,
    #[serde(default)]
    sender: Option<Login>,
    #[serde(default, borrow)]
    head_commit: Option<Commit<'a>>,
    /// Parsed only when needed (see [`Files`]): as it stands in the body.
    #[serde(default, borrow)]
    commits: Option<&'a RawValue>,
    /// Gitea's count of all pushed commits (its list is capped lower).
    #[serde(default)]
    total_commits: Option<usize>,
}

/// GitHub names the pusher `name`; Gitea sends a user with `login`/`username`.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: String,
    #[serde(default)]
    login: String,
    #[serde(default)]
    username: String,
}

impl Named {
    fn into_name(self) -> String {
        [self.name, self.login, self.username]
            .into_iter()
            .find(|n| !n.is_empty())
            .unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Login {
    #[serde(default)]
    login: String,
}

#[derive(Deserialize)]
struct Commit<'a> {
    #[serde(default, borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
    /// Absent (not empty) when the sender does not list files: Gitea does
    /// not in some versions, and then nothing is known about the paths.
    #[serde(default, borrow)]
    added: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    modified: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    removed: Option<Vec<Cow<'a, str>>>,
}

impl Commit<'_> {
    fn lists_files(&self) -> bool {
        self.added.is_some() && self.modified.is_some() && self.removed.is_some()
    }

    fn files(&self) -> impl Iterator<Item = &str> {
        [&self.added, &self.modified, &self.removed]
            .into_iter()
            .flatten()
            .flatten()
            .map(|file| &**file)
    }
}

/// `create` and `delete`: parsed for the record, never routed as pushes.
#[derive(Deserialize)]
struct RefChange {
    #[serde(rename = "ref")]
    git_ref: String,
    ref_type: String,
    repository: Repository,
    #[serde(default)]
    sender: Option<Login>,
}

/// `workflow_run`: a CI outcome, routed only by routes that ask for `pipeline`.
#[derive(Deserialize)]
struct WorkflowRunHook {
    workflow_run: WorkflowRun,
    repository: Repository,
}

#[derive(Deserialize)]
struct WorkflowRun {
    id: u64,
    #[serde(default)]
    head_branch: Option<String>,
    #[serde(default)]
    head_sha: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
}

/// Whatever else GitHub sends; only the repository is read, if present.
#[derive(Deserialize)]
struct AnyHook {
    #[serde(default)]
    repository: Option<Repository>,
}

/// GitHub's commit list is capped (20 in the payload); beyond it the file
/// list is partial, which routes with `paths` must know.
const COMMIT_LIST_CAP: usize = 20;

pub(super) fn parse(hook: &str, payload: &[u8], files: Files) -> Result<Parsed, PayloadError> {
    match hook {
        "ping" => Ok(Parsed::Ping),
        "push" => Ok(Parsed::Events(vec![push_event(payload, COMMIT_LIST_CAP, files)?])),
        "create" | "delete" => {
            let change: RefChange = from_json(payload)?;
            let mut event = repo_event(change.repository);
            event.pusher = change.sender.map(|s| s.login).unwrap_or_default();
            event.deleted = hook == "delete";
            event.created = hook == "create";
            if event.deleted {
                event.sha = ZERO_SHA.to_owned();
            }
            match change.ref_type.as_str() {
                "tag" => {
                    event.git_ref = format!("refs/tags/{}", change.git_ref);
                    event.tag = change.git_ref;
                }
                _ => {
                    event.git_ref = format!("refs/heads/{}", change.git_ref);
                    event.branch = change.git_ref;
                }
            }
            Ok(Parsed::Events(vec![event]))
        }
        "workflow_run" => {
            let run: WorkflowRunHook = from_json(payload)?;
            let mut event = repo_event(run.repository);
            event.kind = EventKind::Pipeline;
            let branch = run.workflow_run.head_branch.unwrap_or_default();
            event.git_ref = format!("refs/heads/{branch}");
            event.branch = branch;
            event.sha = run.workflow_run.head_sha;
            event.pipeline = Some(Pipeline {
                status: run
                    .workflow_run
                    .conclusion
                    .or(run.workflow_run.status)
                    .unwrap_or_default(),
                id: run.workflow_run.id.to_string(),
                source: run.workflow_run.event,
                ..Pipeline::default()
            });
            Ok(Parsed::Events(vec![event]))
        }
        _ => {
            let any: AnyHook = from_json(payload)?;
            let mut event = any.repository.map(repo_event).unwrap_or_default();
            if matches!(hook, "check_suite" | "check_run" | "status") {
                // CI outcomes: routed only where a route names `pipeline`.
                event.kind = EventKind::Pipeline;
            }
            Ok(Parsed::Events(vec![event]))
        }
    }
}

fn repo_event(repo: Repository) -> Event {
    Event {
        repo: repo.full_name,
        repo_url: repo.html_url.unwrap_or_default(),
        ..Event::default()
    }
}

/// A GitHub-shaped push (GitHub's and Gitea's); `commit_cap` is the length
/// at which the sender starts leaving commits out of the list.
pub(super) fn push_event(payload: &[u8], commit_cap: usize, files: Files) -> Result<Event, PayloadError> {
    let push: Push = from_json(payload)?;
    // The commit list is read for its files, or for the head's message
    // where the sender left `head_commit` out (Gitea may).
    let commits: Vec<Commit> = match push.commits {
        Some(raw) if files == Files::Read || push.head_commit.is_none() => from_json(raw.get().as_bytes())?,
        _ => Vec::new(),
    };
    let mut event = repo_event(push.repository);
    event.deleted = push.deleted || is_zero_sha(&push.after);
    event.created = push.created || is_zero_sha(&push.before);
    event.forced = push.forced;
    event.sha = push.after;
    event.before = push.before;
    event.pusher = push
        .pusher
        .map(Named::into_name)
        .filter(|n| !n.is_empty())
        .or_else(|| push.sender.map(|s| s.login))
        .unwrap_or_default();
    // Gitea may leave head_commit out; the listed commit at `after` is the head.
    event.message = push
        .head_commit
        .as_ref()
        .or_else(|| commits.iter().find(|c| c.id == event.sha))
        .map(|c| c.message.clone().into_owned())
        .unwrap_or_default();
    if files == Files::Read {
        let listed = commits.len();
        event.paths_complete = listed > 0
            && listed < commit_cap
            && push.total_commits.is_none_or(|total| total <= listed)
            && commits.iter().all(Commit::lists_files);
        event.paths = changed_paths(commits.iter().flat_map(Commit::files));
    }
    event.set_ref(&push.git_ref);
    Ok(event)
}
