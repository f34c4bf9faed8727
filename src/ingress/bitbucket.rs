//! Bitbucket Cloud: `X-Hub-Signature: sha256=<hex>` over the raw body (the
//! header name lacks `-256`, the algorithm is SHA-256 all the same).
//!
//! One `repo:push` carries several changes, and each becomes its own event;
//! `new: null` is a deletion. Bitbucket lists no changed files, so `paths` is
//! always marked incomplete.

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, from_json, header_str, required_header,
};
use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, ZERO_SHA};
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
                "Bitbucket signs each delivery with the webhook's secret",
            )?,
        })
    }

    pub fn describe(&self) -> String {
        format!("X-Hub-Signature sha256, secret from {}", self.secret.origin())
    }
}

const SIGNATURE: &str = "X-Hub-Signature";

/// The headers Bitbucket Cloud would send with this body.
pub(super) fn sign(
    settings: &Settings,
    hook: &str,
    body: &[u8],
    delivery: &str,
) -> Vec<(&'static str, String)> {
    let tag = signature::sign(Algorithm::Sha256, settings.secret.expose(), &[body]);
    vec![
        ("X-Event-Key", hook.to_owned()),
        ("X-Request-UUID", delivery.to_owned()),
        (SIGNATURE, format!("sha256={}", hex::encode(tag))),
    ]
}

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
) -> Result<Received, super::IngressError> {
    let value = header_str(headers, SIGNATURE).ok_or_else(|| SignatureError::Missing {
        header: SIGNATURE,
        config_source: source.to_owned(),
    })?;
    if value.trim().is_empty() {
        return Err(SignatureError::Empty {
            header: SIGNATURE,
            config_source: source.to_owned(),
        }
        .into());
    }
    let presented = value
        .trim()
        .strip_prefix("sha256=")
        .and_then(|h| Algorithm::Sha256.decode_hex(h))
        .ok_or(SignatureError::Malformed {
            header: SIGNATURE,
            expected: "sha256= followed by 64 hex digits",
        })?;
    if !signature::verify(Algorithm::Sha256, &settings.secret, &[body], &presented) {
        return Err(SignatureError::Mismatch {
            header: SIGNATURE,
            config_source: source.to_owned(),
        }
        .into());
    }
    if content != ContentKind::Json {
        return Err(
            PayloadError::Invalid("Bitbucket sends JSON; this body is form-encoded".to_owned()).into(),
        );
    }
    Ok(Received {
        body: None,
        hook: required_header(headers, "x-event-key")?,
        delivery: header_str(headers, "x-request-uuid").map(str::to_owned),
        payload: body.clone(),
    })
}

#[derive(Deserialize)]
struct RepoPush {
    repository: Repository,
    #[serde(default)]
    actor: Option<Actor>,
    push: PushBody,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    #[serde(default)]
    links: Option<Links>,
}

#[derive(Deserialize)]
struct Links {
    #[serde(default)]
    html: Option<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: String,
}

#[derive(Deserialize)]
struct Actor {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct PushBody {
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    new: Option<RefState>,
    old: Option<RefState>,
    #[serde(default)]
    forced: bool,
}

#[derive(Deserialize)]
struct RefState {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    target: Target,
}

#[derive(Deserialize)]
struct Target {
    hash: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct AnyHook {
    #[serde(default)]
    repository: Option<Repository>,
}

pub(super) fn parse(hook: &str, payload: &[u8]) -> Result<Parsed, PayloadError> {
    if hook != "repo:push" {
        let any: AnyHook = from_json(payload)?;
        let event = any.repository.map(|r| repo_event(&r, "")).unwrap_or_default();
        return Ok(Parsed::Events(vec![event]));
    }
    let push: RepoPush = from_json(payload)?;
    let pusher = push
        .actor
        .and_then(|a| a.nickname.or(a.username).or(a.display_name))
        .unwrap_or_default();
    let repo = push.repository;
    let mut events = Vec::with_capacity(push.push.changes.len());
    for change in push.push.changes {
        let mut event = repo_event(&repo, &pusher);
        let Some(reference) = change.new.as_ref().or(change.old.as_ref()) else {
            return Err(PayloadError::Invalid(
                "a push change has neither new nor old".to_owned(),
            ));
        };
        let is_tag = matches!(reference.kind.as_str(), "tag" | "annotated_tag");
        event.deleted = change.new.is_none();
        event.created = change.old.is_none();
        event.forced = change.forced;
        // A created ref had no commit before, a deleted one has none after:
        // zeros, as GitHub and GitLab send.
        let hash = |state: &Option<RefState>| {
            state
                .as_ref()
                .map_or_else(|| ZERO_SHA.to_owned(), |s| s.target.hash.clone())
        };
        event.before = hash(&change.old);
        event.sha = hash(&change.new);
        event.message = change
            .new
            .as_ref()
            .and_then(|n| n.target.message.clone())
            .unwrap_or_default();
        event.set_ref(&if is_tag {
            format!("refs/tags/{}", reference.name)
        } else {
            format!("refs/heads/{}", reference.name)
        });
        events.push(event);
    }
    Ok(Parsed::Events(events))
}

fn repo_event(repo: &Repository, pusher: &str) -> Event {
    Event {
        repo: repo.full_name.clone(),
        repo_url: repo
            .links
            .as_ref()
            .and_then(|l| l.html.as_ref())
            .map(|h| h.href.clone())
            .unwrap_or_default(),
        pusher: pusher.to_owned(),
        paths_complete: false,
        ..Event::default()
    }
}
