//! The request a job sends, as the store keeps it: everything but the
//! credential. [`PreparedRequest::redacted`] shows it with the credential's
//! place marked, for dry runs and `relay explain`; a target kind adds the
//! credential at send time, producing a [`WireRequest`] that is never
//! stored or logged. Nothing here reads the config or does I/O.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::secret::REDACTED;
use crate::signature::Algorithm;

/// The rendered request the store keeps: everything but the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedRequest {
    /// Always POST; the URL never holds a credential.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: RequestBody,
    /// Where the credential goes when the request is sent.
    pub auth: Auth,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestBody {
    /// A body relay composed (JSON text).
    Text(String),
    /// The webhook's JSON document, byte for byte, read from the event at send
    /// time rather than copied into every job.
    Payload,
}

/// Where a target's credential goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", try_from = "StoredAuth")]
pub enum Auth {
    None,
    /// `Circle-Token: <token>`.
    Header {
        name: String,
    },
    /// `Authorization: <scheme> <token>` (`Bearer`, Gitea's `token`).
    Scheme {
        scheme: String,
    },
    /// `?token=<token>` (GitLab's webhook-style trigger).
    Query {
        name: String,
    },
    /// `"token": "<token>"` added to the JSON body (GitLab's trigger API).
    JsonField {
        name: String,
    },
    /// An HMAC of the body under the target's secret.
    Hmac {
        header: String,
        algorithm: Algorithm,
        prefix: String,
    },
}

/// An [`Auth`] as it is read back: every kind's fields side by side, the
/// tag among them. serde reads an internally tagged enum by first copying
/// the whole object aside (its tag may come last), which was a tenth of
/// reading back a claimed job. The stored form is unchanged.
#[derive(Deserialize)]
struct StoredAuth {
    #[serde(rename = "type")]
    kind: AuthKind,
    name: Option<String>,
    scheme: Option<String>,
    header: Option<String>,
    algorithm: Option<Algorithm>,
    prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum AuthKind {
    None,
    Header,
    Scheme,
    Query,
    JsonField,
    Hmac,
}

impl TryFrom<StoredAuth> for Auth {
    type Error = String;

    fn try_from(stored: StoredAuth) -> Result<Auth, String> {
        fn field<T>(value: Option<T>, name: &str) -> Result<T, String> {
            value.ok_or_else(|| format!("missing field `{name}`"))
        }
        Ok(match stored.kind {
            AuthKind::None => Auth::None,
            AuthKind::Header => Auth::Header {
                name: field(stored.name, "name")?,
            },
            AuthKind::Scheme => Auth::Scheme {
                scheme: field(stored.scheme, "scheme")?,
            },
            AuthKind::Query => Auth::Query {
                name: field(stored.name, "name")?,
            },
            AuthKind::JsonField => Auth::JsonField {
                name: field(stored.name, "name")?,
            },
            AuthKind::Hmac => Auth::Hmac {
                header: field(stored.header, "header")?,
                algorithm: field(stored.algorithm, "algorithm")?,
                prefix: field(stored.prefix, "prefix")?,
            },
        })
    }
}

impl PreparedRequest {
    pub fn needs_payload(&self) -> bool {
        self.body == RequestBody::Payload
    }

    pub fn body_bytes(&self, payload: Option<&Bytes>) -> Result<Bytes, AuthorizeError> {
        match &self.body {
            RequestBody::Text(text) => Ok(Bytes::from(text.clone())),
            RequestBody::Payload => payload.cloned().ok_or(AuthorizeError::PayloadMissing),
        }
    }

    /// The URL as sent, but with a credential that rides in the query
    /// shown as `[redacted]`: the form logs use.
    pub fn redacted_url(&self) -> String {
        match &self.auth {
            Auth::Query { name } => {
                let separator = if self.url.contains('?') { '&' } else { '?' };
                format!("{}{separator}{name}={REDACTED}", self.url)
            }
            _ => self.url.clone(),
        }
    }

    /// The request as text with the credential's place marked `[redacted]`:
    /// what a dry run logs and `relay explain` prints.
    pub fn redacted(&self, payload: Option<&Bytes>) -> String {
        let url = self.redacted_url();
        let mut headers = self.headers.clone();
        let mut body = match &self.body {
            RequestBody::Text(text) => text.clone(),
            RequestBody::Payload => match payload {
                Some(p) => String::from_utf8_lossy(p).into_owned(),
                None => "<the webhook's JSON body>".to_owned(),
            },
        };
        match &self.auth {
            Auth::None => {}
            Auth::Header { name } => headers.push((name.clone(), REDACTED.to_owned())),
            Auth::Scheme { scheme } => {
                headers.push(("Authorization".to_owned(), format!("{scheme} {REDACTED}")))
            }
            Auth::Query { .. } => {}
            Auth::JsonField { name } => {
                if let Ok(mut doc) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&body)
                {
                    doc.insert(name.clone(), serde_json::Value::String(REDACTED.to_owned()));
                    body = serde_json::Value::Object(doc).to_string();
                }
            }
            Auth::Hmac { header, prefix, .. } => {
                headers.push((header.clone(), format!("{prefix}{REDACTED}")))
            }
        }
        let mut out = format!("POST {url}\n");
        for (name, value) in headers {
            let _ = writeln!(out, "{name}: {value}");
        }
        out.push('\n');
        out.push_str(&body);
        out
    }
}

/// A request ready for the wire, credential included. Never stored or logged.
pub struct WireRequest {
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl std::fmt::Debug for WireRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL and headers may carry the credential.
        f.debug_struct("WireRequest")
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("target {target} has no credential configured (it was dry_run when this job was queued?)")]
    NoCredential { target: String },
    #[error("the stored request body is not a JSON object")]
    Body,
    #[error("the webhook's body is no longer in the store")]
    PayloadMissing,
    /// The parser's reason only: the URL itself is the target's, or a
    /// template's rendering, and is in the job for whoever needs it.
    #[error("the request's URL is not a valid URL: {reason}")]
    Url { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_marks_every_credential_place() {
        let base = PreparedRequest {
            url: "https://x/api".into(),
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: RequestBody::Text(r#"{"ref":"main"}"#.into()),
            auth: Auth::JsonField { name: "token".into() },
        };
        let text = base.redacted(None);
        assert!(text.contains(r#""token":"[redacted]""#), "{text}");
        let q = PreparedRequest {
            auth: Auth::Query { name: "token".into() },
            url: "https://x/api?variables[A]=1".into(),
            ..base.clone()
        };
        assert!(
            q.redacted(None)
                .starts_with("POST https://x/api?variables[A]=1&token=[redacted]\n")
        );
    }

    #[test]
    fn every_credential_place_reads_back_as_it_was_stored() {
        let kinds = [
            (Auth::None, r#"{"type":"none"}"#),
            (
                Auth::Header {
                    name: "Circle-Token".into(),
                },
                r#"{"type":"header","name":"Circle-Token"}"#,
            ),
            (
                Auth::Scheme {
                    scheme: "Bearer".into(),
                },
                r#"{"type":"scheme","scheme":"Bearer"}"#,
            ),
            (
                Auth::Query { name: "token".into() },
                r#"{"type":"query","name":"token"}"#,
            ),
            (
                Auth::JsonField { name: "token".into() },
                r#"{"type":"json_field","name":"token"}"#,
            ),
            (
                Auth::Hmac {
                    header: "X-Signature".into(),
                    algorithm: Algorithm::Sha256,
                    prefix: "sha256=".into(),
                },
                r#"{"type":"hmac","header":"X-Signature","algorithm":"sha256","prefix":"sha256="}"#,
            ),
        ];
        for (auth, stored) in kinds {
            assert_eq!(serde_json::to_string(&auth).unwrap(), stored);
            assert_eq!(serde_json::from_str::<Auth>(stored).unwrap(), auth, "{stored}");
        }
        // The tag may come anywhere; another kind's field is ignored.
        assert_eq!(
            serde_json::from_str::<Auth>(r#"{"scheme":"x","name":"Circle-Token","type":"header"}"#).unwrap(),
            Auth::Header {
                name: "Circle-Token".into()
            }
        );
        for broken in [
            r#"{"type":"header"}"#,
            r#"{"type":"hmac","header":"X-Signature","prefix":""}"#,
            r#"{"type":"header","name":"a","name":"b"}"#,
            r#"{"type":"cookie","name":"a"}"#,
            r#"{"name":"a"}"#,
        ] {
            assert!(serde_json::from_str::<Auth>(broken).is_err(), "{broken}");
        }
    }
}
