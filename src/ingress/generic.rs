//! Any other sender: an HMAC in a configured header (algorithm, prefix, hex
//! or base64), and JSON pointers that say where the ref, SHA and repository
//! are. The defaults read a GitHub-shaped push.
//!
//! With `kind = "pipeline"` every delivery is a CI outcome (event
//! `pipeline`): `fields.status` and `fields.pipeline_id` are required
//! pointers (`pipeline_number`, `pipeline_source` and `workflow` optional),
//! the ref is optional, and the loop guard's `ci_outcome` rule applies as to
//! any provider's pipeline events. `fields.delivery` points at the body's
//! delivery id where the sender puts it there rather than in a header
//! (`delivery_header`, read first), so redeliveries are deduplicated.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::{
    ContentKind, Parsed, PayloadError, Received, SignatureError, bounded, form_payload, from_json, header_str,
};
use crate::config::compiler::Compiler;
use crate::config::raw::{Encoding, GenericKind, RawSource};
use crate::event::{Event, EventKind, Pipeline, is_zero_sha};
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
    // Unset unless configured (an empty pointer reads nothing here).
    ("delivery", ""),
    ("status", ""),
    ("pipeline_id", ""),
    ("pipeline_number", ""),
    ("pipeline_source", ""),
    ("workflow", ""),
];

/// The fields only a `kind = "pipeline"` source reads.
const PIPELINE_FIELDS: &[&str] = &[
    "status",
    "pipeline_id",
    "pipeline_number",
    "pipeline_source",
    "workflow",
];
/// The fields a `kind = "pipeline"` source cannot do without.
const REQUIRED_PIPELINE_FIELDS: &[&str] = &["status", "pipeline_id"];
/// The most kept of one field read from the body.
const MAX_FIELD: usize = 1024;
/// The longest delivery id taken from a body.
const MAX_DELIVERY: usize = 256;

#[derive(Debug)]
pub struct Settings {
    secret: Secret,
    header: String,
    algorithm: Algorithm,
    prefix: String,
    encoding: Encoding,
    event_header: Option<String>,
    delivery_header: Option<String>,
    kind: GenericKind,
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
        let kind = raw.kind.unwrap_or_default();
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
                Some(_) if kind != GenericKind::Pipeline && PIPELINE_FIELDS.contains(&field.as_str()) => {
                    c.problem(field_key, "is read only by a source with kind = \"pipeline\"");
                }
                Some(slot) => *slot = pointer,
            }
        }
        if kind == GenericKind::Pipeline {
            for field in REQUIRED_PIPELINE_FIELDS {
                if fields.get(*field).is_none_or(String::is_empty) {
                    c.problem(
                        format!("{key}.fields.{field}"),
                        "is required with kind = \"pipeline\": the JSON pointer to it, like /pipeline/status",
                    );
                }
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
            kind,
            fields,
        })
    }

    pub fn describe(&self) -> String {
        let kind = match self.kind {
            GenericKind::Push => "",
            GenericKind::Pipeline => ", pipeline events",
        };
        format!(
            "{} {}, secret from {}{kind}",
            self.header,
            self.algorithm.as_str(),
            self.secret.origin()
        )
    }

    /// The configured pointer of `field`, if one is set.
    fn pointer(&self, field: &str) -> Option<&str> {
        self.fields
            .get(field)
            .map(String::as_str)
            .filter(|p| !p.is_empty())
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
    let from_header = settings
        .delivery_header
        .as_deref()
        .and_then(|h| header_str(headers, h))
        .map(str::to_owned);
    let delivery = match (from_header, settings.pointer("delivery")) {
        (Some(delivery), _) => Some(delivery),
        (None, Some(pointer)) => Some(body_delivery(&payload, pointer)?),
        (None, None) => None,
    };
    Ok(Received {
        body: None,
        hook,
        delivery,
        payload,
    })
}

/// The delivery id at `pointer` in the JSON document: text or a number.
fn body_delivery(payload: &[u8], pointer: &str) -> Result<String, PayloadError> {
    let doc: Value = from_json(payload)?;
    let delivery = scalar(doc.pointer(pointer));
    if delivery.trim().is_empty() {
        return Err(PayloadError::Field(format!(
            "no delivery id at {pointer} (fields.delivery points there)"
        )));
    }
    if delivery.len() > MAX_DELIVERY {
        return Err(PayloadError::Invalid(format!(
            "the delivery id at {pointer} is longer than {MAX_DELIVERY} characters"
        )));
    }
    Ok(delivery)
}

/// A JSON scalar as text; anything else (absent, null, an object) is empty.
fn scalar(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

pub(super) fn parse(settings: &Settings, hook: &str, payload: &[u8]) -> Result<Parsed, PayloadError> {
    if hook == "ping" {
        return Ok(Parsed::Ping);
    }
    let doc: Value = from_json(payload)?;
    let field = |name: &str| -> String {
        bounded(
            scalar(settings.pointer(name).and_then(|p| doc.pointer(p))),
            MAX_FIELD,
        )
    };
    let git_ref = field("ref");
    if settings.kind == GenericKind::Pipeline {
        let mut event = Event {
            repo: field("repo"),
            repo_url: field("repo_url"),
            sha: field("sha"),
            before: field("before"),
            pusher: field("pusher"),
            message: field("message"),
            ..Event::default()
        };
        if !git_ref.is_empty() {
            event.set_ref(&full_ref(git_ref));
        }
        event.kind = EventKind::Pipeline;
        event.pipeline = Some(Pipeline {
            status: field("status"),
            id: field("pipeline_id"),
            number: field("pipeline_number").trim().parse().unwrap_or(0),
            workflow: field("workflow"),
            source: field("pipeline_source"),
            variables: BTreeMap::new(),
        });
        return Ok(Parsed::Events(vec![event]));
    }
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
    event.set_ref(&full_ref(git_ref));
    Ok(Parsed::Events(vec![event]))
}

/// A ref as configured senders give it: full, or a bare branch name.
fn full_ref(git_ref: String) -> String {
    if git_ref.starts_with("refs/") {
        git_ref
    } else {
        format!("refs/heads/{git_ref}")
    }
}
