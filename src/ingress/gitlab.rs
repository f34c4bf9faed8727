//! GitLab: `X-Gitlab-Token` (a shared secret compared in constant time) and
//! GitLab 19's signing token (Standard Webhooks: `webhook-signature` over
//! `id.timestamp.body`, five minutes of clock tolerance). When both are
//! configured, both must hold.
//!
//! `Push Hook` and `Tag Push Hook` become push/tag events; `Pipeline Hook`
//! becomes a `pipeline` event carrying status, id, source and variables.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, from_json, header_str, required_header,
};
use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, EventKind, Pipeline, changed_paths, is_zero_sha};
use crate::secret::Secret;
use crate::signature::{self, Algorithm};

/// Standard Webhooks' recommended tolerance between sender and receiver clocks.
const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Settings {
    token: Option<Secret>,
    /// The decoded HMAC key(s) behind `whsec_…`.
    signing_key: Option<Secret>,
}

impl Settings {
    pub fn compile(key: &str, raw: &RawSource, c: &mut Compiler) -> Option<Settings> {
        if raw.token.is_none() && raw.signing_token.is_none() {
            c.problem(
                format!("{key}.token"),
                "is required (or signing_token): GitLab sends the webhook's secret token in X-Gitlab-Token",
            );
            return None;
        }
        let before = c.problem_count();
        let token = raw
            .token
            .as_ref()
            .and_then(|spec| c.secret(&format!("{key}.token"), spec));
        let signing_key = raw.signing_token.as_ref().and_then(|spec| {
            let signing_key_name = format!("{key}.signing_token");
            let token = c.secret(&signing_key_name, spec)?;
            match decode_signing_tokens(&token) {
                Ok(decoded) => Some(decoded),
                Err(message) => {
                    c.problem(signing_key_name, message);
                    None
                }
            }
        });
        (c.problem_count() == before).then_some(Settings { token, signing_key })
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.token {
            parts.push(format!("X-Gitlab-Token from {}", t.origin()));
        }
        if let Some(k) = &self.signing_key {
            parts.push(format!("webhook-signature from {}", k.origin()));
        }
        parts.join(", ")
    }
}

/// `whsec_<base64>` → the raw key bytes, for every rotation value.
fn decode_signing_tokens(token: &Secret) -> Result<Secret, String> {
    let mut keys = Vec::new();
    for value in token.candidates() {
        let text = std::str::from_utf8(value).map_err(|_| "is not text".to_owned())?;
        let encoded = text.strip_prefix("whsec_").unwrap_or(text);
        let key = BASE64
            .decode(encoded)
            .map_err(|_| "must be GitLab's whsec_ token: whsec_ followed by base64".to_owned())?;
        keys.push(key);
    }
    let mut keys = keys.into_iter();
    let first = keys.next().ok_or("is empty")?;
    let mut secret = Secret::from_bytes(first, token.origin());
    for more in keys {
        secret = secret.with_rotation(more);
    }
    Ok(secret)
}

/// The headers GitLab would send with this body.
pub(super) fn sign(
    settings: &Settings,
    hook: &str,
    body: &[u8],
    delivery: &str,
    now: SystemTime,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("X-Gitlab-Event", hook.to_owned()),
        ("Idempotency-Key", delivery.to_owned()),
    ];
    if let Some(token) = &settings.token {
        headers.push((
            "X-Gitlab-Token",
            String::from_utf8_lossy(token.expose()).into_owned(),
        ));
    }
    if let Some(key) = &settings.signing_key {
        let timestamp = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let tag = signature::sign(
            Algorithm::Sha256,
            key.expose(),
            &[delivery.as_bytes(), b".", timestamp.as_bytes(), b".", body],
        );
        headers.push(("webhook-id", delivery.to_owned()));
        headers.push(("webhook-timestamp", timestamp));
        headers.push(("webhook-signature", format!("v1,{}", BASE64.encode(tag))));
    }
    headers
}

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
    now: SystemTime,
) -> Result<Received, super::IngressError> {
    if let Some(token) = &settings.token {
        verify_token(token, source, headers)?;
    }
    if let Some(key) = &settings.signing_key {
        verify_signature(key, source, headers, body, now)?;
    }
    if content != ContentKind::Json {
        return Err(PayloadError::Invalid("GitLab sends JSON; this body is form-encoded".to_owned()).into());
    }
    let hook = required_header(headers, "x-gitlab-event")?;
    // Idempotency-Key stays the same across GitLab's retries (17.4+); older
    // versions only send the event UUID.
    let delivery = header_str(headers, "idempotency-key")
        .or_else(|| header_str(headers, "x-gitlab-event-uuid"))
        .map(str::to_owned);
    Ok(Received {
        body: None,
        hook,
        delivery,
        payload: body.clone(),
    })
}

fn verify_token(token: &Secret, source: &str, headers: &HeaderMap) -> Result<(), SignatureError> {
    let header = "X-Gitlab-Token";
    let presented = header_str(headers, header).ok_or_else(|| SignatureError::Missing {
        header,
        config_source: source.to_owned(),
    })?;
    if presented.is_empty() {
        return Err(SignatureError::Empty {
            header,
            config_source: source.to_owned(),
        });
    }
    if signature::token_matches(token, presented.as_bytes()) {
        Ok(())
    } else {
        Err(SignatureError::TokenMismatch {
            header,
            config_source: source.to_owned(),
        })
    }
}

fn verify_signature(
    key: &Secret,
    source: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), SignatureError> {
    let missing = |header| SignatureError::Missing {
        header,
        config_source: source.to_owned(),
    };
    let id = header_str(headers, "webhook-id").ok_or_else(|| missing("webhook-id"))?;
    let timestamp = header_str(headers, "webhook-timestamp").ok_or_else(|| missing("webhook-timestamp"))?;
    let signatures = header_str(headers, "webhook-signature").ok_or_else(|| missing("webhook-signature"))?;
    let seconds: u64 = timestamp.trim().parse().map_err(|_| SignatureError::Malformed {
        header: "webhook-timestamp",
        expected: "Unix seconds",
    })?;
    let sent = UNIX_EPOCH + Duration::from_secs(seconds);
    let skew = now
        .duration_since(sent)
        .or_else(|_| sent.duration_since(now))
        .unwrap_or_default();
    if skew > TIMESTAMP_TOLERANCE {
        return Err(SignatureError::Stale {
            skew_secs: skew.as_secs(),
        });
    }
    // Several space-separated `v1,<base64>` entries may be present during a
    // sender's own key rotation; one valid entry is enough.
    let mut any_v1 = false;
    for entry in signatures.split_whitespace() {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            continue;
        };
        any_v1 = true;
        let Ok(presented) = BASE64.decode(encoded) else {
            continue;
        };
        if signature::verify(
            Algorithm::Sha256,
            key,
            &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
            &presented,
        ) {
            return Ok(());
        }
    }
    if !any_v1 {
        return Err(SignatureError::Malformed {
            header: "webhook-signature",
            expected: "v1,<base64 signature>",
        });
    }
    Err(SignatureError::Mismatch {
        header: "webhook-signature",
        config_source: source.to_owned(),
    })
}

#[derive(Deserialize)]
struct Kind {
    #[serde(default)]
    object_kind: String,
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: String,
    #[serde(default)]
    web_url: Option<String>,
}

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    user_username: Option<String>,
    #[serde(default)]
    user_name: Option<String>,
    project: Project,
    #[serde(default)]
    commits: Vec<Commit>,
    #[serde(default)]
    total_commits_count: Option<usize>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Commit {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
}

#[derive(Deserialize)]
struct PipelineHook {
    object_attributes: PipelineAttributes,
    project: Project,
    #[serde(default)]
    user: Option<User>,
    #[serde(default)]
    commit: Option<Commit>,
}

#[derive(Deserialize)]
struct PipelineAttributes {
    id: u64,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    tag: bool,
    #[serde(default)]
    sha: String,
    #[serde(default)]
    before_sha: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    variables: Vec<Variable>,
}

#[derive(Deserialize)]
struct Variable {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
struct AnyHook {
    #[serde(default)]
    project: Option<Project>,
}

pub(super) fn parse(hook: &str, payload: &[u8]) -> Result<Parsed, PayloadError> {
    // System hooks carry push events under a different header; the body's
    // object_kind is authoritative.
    let kind: Kind = from_json(payload)?;
    let object_kind = if kind.object_kind.is_empty() {
        match hook {
            "Push Hook" => "push",
            "Tag Push Hook" => "tag_push",
            "Pipeline Hook" => "pipeline",
            _ => "",
        }
    } else {
        kind.object_kind.as_str()
    };
    let event = match object_kind {
        "push" | "tag_push" => push_event(from_json(payload)?),
        "pipeline" => pipeline_event(from_json(payload)?),
        "build" => {
            let any: AnyHook = from_json(payload)?;
            let mut event = any.project.map(project_event).unwrap_or_default();
            event.kind = EventKind::Pipeline;
            event
        }
        _ => {
            let any: AnyHook = from_json(payload)?;
            any.project.map(project_event).unwrap_or_default()
        }
    };
    Ok(Parsed::Events(vec![event]))
}

fn project_event(project: Project) -> Event {
    Event {
        repo: project.path_with_namespace,
        repo_url: project.web_url.unwrap_or_default(),
        ..Event::default()
    }
}

fn push_event(push: Push) -> Event {
    let mut event = project_event(push.project);
    event.deleted = is_zero_sha(&push.after);
    event.created = is_zero_sha(&push.before);
    event.pusher = push
        .user_username
        .filter(|u| !u.is_empty())
        .or(push.user_name)
        .unwrap_or_default();
    event.message = push
        .commits
        .iter()
        .find(|c| c.id == push.after)
        .or(push.commits.last())
        .map(|c| c.message.clone())
        .or(push.message)
        .unwrap_or_default();
    let listed = push.commits.len();
    event.paths_complete = listed > 0 && push.total_commits_count.is_none_or(|total| total <= listed);
    event.paths = changed_paths(
        push.commits
            .iter()
            .flat_map(|c| c.added.iter().chain(&c.modified).chain(&c.removed))
            .map(String::as_str),
    );
    event.sha = push.after;
    event.before = push.before;
    event.set_ref(&push.git_ref);
    event
}

fn pipeline_event(hook: PipelineHook) -> Event {
    let mut event = project_event(hook.project);
    let attrs = hook.object_attributes;
    if attrs.tag {
        event.git_ref = format!("refs/tags/{}", attrs.git_ref);
        event.tag = attrs.git_ref;
    } else {
        event.git_ref = format!("refs/heads/{}", attrs.git_ref);
        event.branch = attrs.git_ref;
    }
    event.kind = EventKind::Pipeline;
    event.sha = attrs.sha;
    event.before = attrs.before_sha;
    event.pusher = hook.user.map(|u| u.username).unwrap_or_default();
    event.message = hook.commit.map(|c| c.message).unwrap_or_default();
    event.pipeline = Some(Pipeline {
        status: attrs.status,
        id: attrs.id.to_string(),
        source: attrs.source,
        variables: attrs
            .variables
            .into_iter()
            .map(|v| (v.key, v.value))
            .collect::<BTreeMap<_, _>>(),
        ..Pipeline::default()
    });
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_headers(key: &[u8], id: &str, ts: u64, body: &[u8]) -> HeaderMap {
        let sig = signature::sign(
            Algorithm::Sha256,
            key,
            &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body],
        );
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert(
            "webhook-signature",
            format!("v1,{}", BASE64.encode(sig)).parse().unwrap(),
        );
        h
    }

    #[test]
    fn standard_webhooks_signature_and_tolerance() {
        let key_bytes = b"0123456789abcdef0123456789abcdef";
        let token = Secret::from_bytes(format!("whsec_{}", BASE64.encode(key_bytes)), "test");
        let key = decode_signing_tokens(&token).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let body = br#"{"object_kind":"push"}"#;
        let h = signed_headers(key_bytes, "msg_1", 1_800_000_000, body);
        assert!(verify_signature(&key, "gl", &h, body, now).is_ok());
        assert!(matches!(
            verify_signature(&key, "gl", &h, b"{}", now),
            Err(SignatureError::Mismatch { .. })
        ));
        let late = now + Duration::from_secs(301);
        assert!(matches!(
            verify_signature(&key, "gl", &h, body, late),
            Err(SignatureError::Stale { skew_secs: 301 })
        ));
        let early = now - Duration::from_secs(299);
        assert!(verify_signature(&key, "gl", &h, body, early).is_ok());
    }
}
