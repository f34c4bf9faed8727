//! Gitea and Forgejo: a bare-hex HMAC-SHA256 in `X-Forgejo-Signature` or
//! `X-Gitea-Signature`, computed over the JSON document, which for a form post
//! is the decoded `payload` field, not the body on the wire. An empty header
//! means the hook has no secret, which relay refuses.
//!
//! The push payload is GitHub-shaped. Gitea sends no push for a deleted branch,
//! only a `delete` event, so that one becomes `branch_delete`; a deleted tag
//! does get a push (zero SHA), so its `delete` stays unrouted.

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;

use super::{ContentKind, Parsed, PayloadError, Received, SignatureError, form_payload, from_json, github};
use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, EventKind, Files, ZERO_SHA};
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
                "Gitea and Forgejo sign each delivery with the webhook's secret",
            )?,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "X-Gitea-Signature/X-Forgejo-Signature, secret from {}",
            self.secret.origin()
        )
    }
}

/// The headers Gitea would send with this JSON body.
pub(super) fn sign(
    settings: &Settings,
    hook: &str,
    body: &[u8],
    delivery: &str,
) -> Vec<(&'static str, String)> {
    let tag = signature::sign(Algorithm::Sha256, settings.secret.expose(), &[body]);
    vec![
        ("X-Gitea-Event", hook.to_owned()),
        ("X-Gitea-Delivery", delivery.to_owned()),
        ("X-Gitea-Signature", hex::encode(tag)),
    ]
}

/// Forgejo sends its own headers beside Gitea's (and Gogs'); the first present wins.
fn first_header<'a>(headers: &'a HeaderMap, names: [&'static str; 3]) -> Option<(&'static str, &'a str)> {
    names
        .into_iter()
        .find_map(|name| super::header_str(headers, name).map(|value| (name, value)))
}

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
) -> Result<Received, super::IngressError> {
    let Some((name, value)) = first_header(
        headers,
        ["x-forgejo-signature", "x-gitea-signature", "x-gogs-signature"],
    ) else {
        return Err(SignatureError::Missing {
            header: "X-Gitea-Signature",
            config_source: source.to_owned(),
        }
        .into());
    };
    let display = display_name(name);
    if value.trim().is_empty() {
        return Err(SignatureError::Empty {
            header: display,
            config_source: source.to_owned(),
        }
        .into());
    }
    let presented = Algorithm::Sha256
        .decode_hex(value.trim())
        .ok_or(SignatureError::Malformed {
            header: display,
            expected: "64 hex digits, no prefix",
        })?;
    // Gitea signs the JSON document; only for form posts does that differ from
    // the body, and decoding the form is then the one step before the check.
    let payload = match content {
        ContentKind::Json => body.clone(),
        ContentKind::Form => form_payload(body)?,
    };
    if !signature::verify(Algorithm::Sha256, &settings.secret, &[&payload], &presented) {
        return Err(SignatureError::Mismatch {
            header: display,
            config_source: source.to_owned(),
        }
        .into());
    }
    let hook = first_header(headers, ["x-forgejo-event", "x-gitea-event", "x-gogs-event"])
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or(PayloadError::MissingHeader {
            header: "X-Gitea-Event",
        })?;
    let delivery = first_header(
        headers,
        ["x-forgejo-delivery", "x-gitea-delivery", "x-gogs-delivery"],
    )
    .map(|(_, v)| v.to_owned());
    let (payload, body) = match strip_legacy_secret(&payload) {
        Some(stripped) if content == ContentKind::Json => (stripped.clone(), Some(stripped)),
        Some(stripped) => {
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("payload", &String::from_utf8_lossy(&stripped))
                .finish();
            (stripped, Some(Bytes::from(form)))
        }
        None => (payload, None),
    };
    Ok(Received {
        hook,
        delivery,
        body,
        payload,
    })
}

/// Gitea before 1.14 put the webhook's secret into the payload as `secret`.
/// It must never be stored or forwarded, so, once the signature checked out,
/// the document is re-written without it. `None`: nothing to remove.
fn strip_legacy_secret(payload: &[u8]) -> Option<Bytes> {
    let needle: &[u8] = b"\"secret\"";
    if !payload.windows(needle.len()).any(|w| w == needle) {
        return None;
    }
    let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    doc.remove("secret")?;
    serde_json::to_vec(&doc).ok().map(Bytes::from)
}

fn display_name(header: &str) -> &'static str {
    match header {
        "x-forgejo-signature" => "X-Forgejo-Signature",
        "x-gogs-signature" => "X-Gogs-Signature",
        _ => "X-Gitea-Signature",
    }
}

/// Gitea's default `UI.FEED_MAX_COMMIT_NUM`: longer pushes list only this many.
const COMMIT_LIST_CAP: usize = 5;

#[derive(Deserialize)]
struct RefChange {
    #[serde(rename = "ref")]
    git_ref: String,
    ref_type: String,
    #[serde(default)]
    sha: String,
    repository: Repository,
    #[serde(default)]
    sender: Option<User>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    #[serde(default)]
    html_url: String,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    login: String,
}

#[derive(Deserialize)]
struct AnyHook {
    #[serde(default)]
    repository: Option<Repository>,
}

pub(super) fn parse(hook: &str, payload: &[u8], files: Files) -> Result<Parsed, PayloadError> {
    let event = match hook {
        "push" => github::push_event(payload, COMMIT_LIST_CAP, files)?,
        "create" | "delete" => {
            let change: RefChange = from_json(payload)?;
            let mut event = Event {
                repo: change.repository.full_name,
                repo_url: change.repository.html_url,
                pusher: change.sender.map(|s| s.login).unwrap_or_default(),
                // A deleted ref points nowhere: zeros, as a push would say.
                sha: if hook == "delete" && change.sha.is_empty() {
                    ZERO_SHA.to_owned()
                } else {
                    change.sha
                },
                deleted: hook == "delete",
                created: hook == "create",
                ..Event::default()
            };
            if change.ref_type == "tag" {
                let tag = change
                    .git_ref
                    .strip_prefix("refs/tags/")
                    .unwrap_or(&change.git_ref);
                event.git_ref = format!("refs/tags/{tag}");
                event.tag = tag.to_owned();
            } else {
                let branch = change
                    .git_ref
                    .strip_prefix("refs/heads/")
                    .unwrap_or(&change.git_ref);
                event.git_ref = format!("refs/heads/{branch}");
                event.branch = branch.to_owned();
                if hook == "delete" {
                    event.kind = EventKind::BranchDelete;
                }
            }
            event
        }
        _ => {
            let any: AnyHook = from_json(payload)?;
            any.repository
                .map(|r| Event {
                    repo: r.full_name,
                    repo_url: r.html_url,
                    ..Event::default()
                })
                .unwrap_or_default()
        }
    };
    Ok(Parsed::Events(vec![event]))
}
