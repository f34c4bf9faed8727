//! Plain HTTP: forward the webhook's JSON body to a URL, re-signed with the
//! target's own secret (`X-Hub-Signature-256: sha256=…` by default), so the
//! receiver verifies relay rather than the original sender.
//!
//! No incoming header is passed on; relay adds its own `X-Relay-*` headers
//! naming the event, its source, its id, and the hop count (one more than
//! the event's), which a relay receiving this request reads back.

use super::{RenderFailure, RenderInput, USER_AGENT};
use crate::config::compiler::Compiler;
use crate::config::raw::RawTarget;
use crate::request::{Auth, PreparedRequest, RequestBody};
use crate::secret::Secret;
use crate::template::TemplateStr;

pub const KEYS: &[&str] = &["url", "sign"];

#[derive(Debug)]
pub struct HttpTarget {
    url: TemplateStr,
    signing: Option<Signing>,
}

#[derive(Debug)]
struct Signing {
    secret: Option<Secret>,
    header: String,
    algorithm: crate::signature::Algorithm,
    prefix: String,
}

impl HttpTarget {
    pub fn compile(key: &str, raw: &RawTarget, dry_run: bool, c: &mut Compiler) -> Option<HttpTarget> {
        let url = match &raw.url {
            Some(u) => {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    c.problem(format!("{key}.url"), "must start with https:// or http://");
                }
                super::compile_text(&format!("{key}.url"), u, c)
            }
            None => {
                c.problem(format!("{key}.url"), "is required");
                None
            }
        };
        let signing = raw.sign.as_ref().map(|sign| Signing {
            secret: super::compile_credential(&format!("{key}.sign.secret"), Some(&sign.secret), dry_run, c),
            header: sign.header.clone(),
            algorithm: sign.algorithm,
            prefix: sign
                .prefix
                .clone()
                .unwrap_or_else(|| format!("{}=", sign.algorithm.as_str())),
        });
        Some(HttpTarget { url: url?, signing })
    }

    pub(super) fn secret(&self) -> Option<&Secret> {
        self.signing.as_ref().and_then(|s| s.secret.as_ref())
    }

    /// The URL as configured (a template, or a plain address).
    pub fn url_source(&self) -> &str {
        self.url.source()
    }

    pub fn describe(&self) -> String {
        let signed = match &self.signing {
            Some(s) => format!(", signed in {}", s.header),
            None => ", unsigned".to_owned(),
        };
        format!("POST {}{signed}", self.url.source())
    }

    pub fn render(&self, input: &RenderInput<'_>) -> Result<PreparedRequest, RenderFailure> {
        let webhook = input.webhook;
        let headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("User-Agent".to_owned(), USER_AGENT.to_owned()),
            ("X-Relay-Event".to_owned(), input.event.kind.as_str().to_owned()),
            ("X-Relay-Source".to_owned(), webhook.source().to_owned()),
            ("X-Relay-Event-Id".to_owned(), webhook.id().to_string()),
            (
                crate::ingress::HOP_HEADER_NAME.to_owned(),
                input.next_hop().to_string(),
            ),
        ];
        Ok(PreparedRequest {
            url: input.text(&self.url)?,
            headers,
            body: RequestBody::Payload,
            auth: match &self.signing {
                Some(s) => Auth::Hmac {
                    header: s.header.clone(),
                    algorithm: s.algorithm,
                    prefix: s.prefix.clone(),
                },
                None => Auth::None,
            },
        })
    }
}
