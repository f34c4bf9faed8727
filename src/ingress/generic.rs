//! Any other sender: an HMAC in a configured header (algorithm, prefix, hex
//! or base64), and JSON pointers that say where the ref, SHA and repository
//! are. The defaults read a GitHub-shaped push.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, form_payload, from_json, header_str,
};
use crate::config::compiler::Compiler;
use crate::config::raw::{Encoding, RawSource};
use crate::event::{Event, is_zero_sha};
use crate::secret::Secret;
use crate::signature::{self, Algorithm};

/// The event fields a generic source can map, with their default pointers.
const FIELD_DEFAULTS: &[(&str, &str)] = &[
    ("repo", "/repository/full_name"),
    ("repo_url", "/repository/html_url"),
    ("ref", "/ref"),
    ("sha", "/after"),
    ("before", "/before"),
    ("pusher", "/pusher/name"),
    ("message", "/head_commit/message"),
];

#[derive(Debug)]
pub struct Settings {
    secret: Secret,
    header: String,
    algorithm: Algorithm,
    prefix: String,
    encoding: Encoding,
    event_header: Option<String>,
    delivery_header: Option<String>,
    /// Event field → JSON pointer into the payload.
    fields: BTreeMap<String, String>,
}

impl Settings {
    pub fn compile(key: &str, raw: &RawSource, c: &mut Compiler) -> Option<Settings> {
        let before = c.problem_count();
        let secret = match &raw.secret {
            Some(spec) => c.secret(&format!("{key}.secret"), spec),
            None => {
                c.problem(
                    format!("{key}.secret"),
                    "is required: it verifies the sender's HMAC",
                );
                None
            }
        };
        let Some(signature) = &raw.signature else {
            c.problem(
                format!("{key}.signature"),
                "is required, like { header = \"X-Signature\", algorithm = \"sha256\", prefix = \"sha256=\" }",
            );
            return None;
        };
        let mut fields: BTreeMap<String, String> = FIELD_DEFAULTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for (field, pointer) in raw.fields.clone().unwrap_or_default() {
            let field_key = format!("{key}.fields.{field}");
            match fields.get_mut(&field) {
                None => {
                    let known: Vec<&str> = FIELD_DEFAULTS.iter().map(|(k, _)| *k).collect();
                    c.problem(
                        field_key,
                        format!(
                            "is not an event field a generic source can map ({})",
                            known.join(", ")
                        ),
                    );
                }
                Some(_) if !pointer.is_empty() && !pointer.starts_with('/') => {
                    c.problem(field_key, "must be a JSON pointer like /repository/full_name");
                }
                Some(slot) => *slot = pointer,
            }
        }
        if c.problem_count() > before {
            return None;
        }
        Some(Settings {
            secret: secret?,
            header: signature.header.to_ascii_lowercase(),
            algorithm: signature.algorithm,
            prefix: signature.prefix.clone(),
            encoding: signature.encoding,
            event_header: raw.event_header.as_ref().map(|h| h.to_ascii_lowercase()),
            delivery_header: raw.delivery_header.as_ref().map(|h| h.to_ascii_lowercase()),
            fields,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {}, secret from {}",
            self.header,
            self.algorithm.as_str(),
            self.secret.origin()
        )
    }
}

/// The headers this source's sender would send with this body.
pub(super) fn sign(settings: &Settings, hook: &str, body: &[u8], delivery: &str) -> Vec<(String, String)> {
    let tag = signature::sign(settings.algorithm, settings.secret.expose(), &[body]);
    let encoded = match settings.encoding {
        Encoding::Hex => hex::encode(tag),
        Encoding::Base64 => BASE64.encode(tag),
    };
    let mut headers = vec![(settings.header.clone(), format!("{}{encoded}", settings.prefix))];
    if let Some(h) = &settings.event_header {
        headers.push((h.clone(), hook.to_owned()));
    }
    if let Some(h) = &settings.delivery_header {
        headers.push((h.clone(), delivery.to_owned()));
    }
    headers
}

pub(super) fn receive(
    settings: &Settings,
    source: &str,
    headers: &HeaderMap,
    body: &Bytes,
    content: ContentKind,
) -> Result<Received, super::IngressError> {
    // Header names are configured, so these messages use a fixed label.
    let label = "signature header";
    let value = header_str(headers, &settings.header).ok_or_else(|| SignatureError::Missing {
        header: label,
        config_source: source.to_owned(),
    })?;
    let encoded = value
        .trim()
        .strip_prefix(settings.prefix.as_str())
        .ok_or(SignatureError::Malformed {
            header: label,
            expected: "the configured prefix followed by the signature",
        })?;
    let presented = match settings.encoding {
        Encoding::Hex => settings.algorithm.decode_hex(encoded),
        Encoding::Base64 => BASE64
            .decode(encoded)
            .ok()
            .filter(|b| b.len() == settings.algorithm.digest_len()),
    }
    .ok_or(SignatureError::Malformed {
        header: label,
        expected: "a hex or base64 signature, as configured",
    })?;
    if !signature::verify(settings.algorithm, &settings.secret, &[body], &presented) {
        return Err(SignatureError::Mismatch {
            header: label,
            config_source: source.to_owned(),
        }
        .into());
    }
    let payload = match content {
        ContentKind::Json => body.clone(),
        ContentKind::Form => form_payload(body)?,
    };
    let hook = settings
        .event_header
        .as_deref()
        .and_then(|h| header_str(headers, h))
        .unwrap_or("push")
        .to_owned();
    let delivery = settings
        .delivery_header
        .as_deref()
        .and_then(|h| header_str(headers, h))
        .map(str::to_owned);
    Ok(Received {
        body: None,
        hook,
        delivery,
        payload,
    })
}

pub(super) fn parse(settings: &Settings, hook: &str, payload: &[u8]) -> Result<Parsed, PayloadError> {
    if hook == "ping" {
        return Ok(Parsed::Ping);
    }
    let doc: Value = from_json(payload)?;
    let field = |name: &str| -> String {
        let pointer = settings.fields.get(name).map(String::as_str).unwrap_or("");
        match doc.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => String::new(),
        }
    };
    let git_ref = field("ref");
    if git_ref.is_empty() {
        return Err(PayloadError::Field(format!(
            "no ref at {} (set fields.ref to the JSON pointer of the full ref)",
            settings.fields.get("ref").map(String::as_str).unwrap_or("")
        )));
    }
    let mut event = Event {
        repo: field("repo"),
        repo_url: field("repo_url"),
        sha: field("sha"),
        before: field("before"),
        pusher: field("pusher"),
        message: field("message"),
        ..Event::default()
    };
    event.deleted = is_zero_sha(&event.sha);
    event.created = is_zero_sha(&event.before);
    let full_ref = if git_ref.starts_with("refs/") {
        git_ref
    } else {
        format!("refs/heads/{git_ref}")
    };
    event.set_ref(&full_ref);
    Ok(Parsed::Events(vec![event]))
}
