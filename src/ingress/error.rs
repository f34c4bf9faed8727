//! Why ingress refuses a request, each way with the status the sender gets
//! and a stable code; messages say what to fix and never carry a secret or
//! the value a check expected.

use std::net::IpAddr;

use http::{Method, StatusCode, header};
use serde_json::json;

use crate::web::{Body, json_response};

/// Why a signature or token check refused a request. Messages say what to
/// fix; none carries the secret or the expected value.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "missing {header} header: the sender signed nothing; give the webhook the secret configured in sources.{config_source}"
    )]
    Missing {
        header: &'static str,
        config_source: String,
    },
    #[error(
        "{header} is empty: the webhook in the Git host has no secret; set it to the secret configured in sources.{config_source}"
    )]
    Empty {
        header: &'static str,
        config_source: String,
    },
    #[error("{header} is malformed: expected {expected}")]
    Malformed {
        header: &'static str,
        expected: &'static str,
    },
    #[error(
        "{header} does not match the body: the webhook's secret differs from sources.{config_source}, or the body was changed on the way"
    )]
    Mismatch {
        header: &'static str,
        config_source: String,
    },
    #[error("{header} does not match the token configured in sources.{config_source}")]
    TokenMismatch {
        header: &'static str,
        config_source: String,
    },
    #[error(
        "webhook-timestamp is {skew_secs}s away from relay's clock; more than 300s is refused as a possible replay"
    )]
    Stale { skew_secs: u64 },
}

impl SignatureError {
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing { .. } => "signature_missing",
            SignatureError::Empty { .. } => "signature_empty",
            SignatureError::Malformed { .. } => "signature_malformed",
            SignatureError::Mismatch { .. } => "signature_mismatch",
            SignatureError::TokenMismatch { .. } => "token_mismatch",
            SignatureError::Stale { .. } => "signature_stale",
        }
    }
}

/// A verified body relay cannot use.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("missing {header} header: relay reads the event name from it")]
    MissingHeader { header: &'static str },
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the JSON body lacks a field relay needs or has one of the wrong type: {0}")]
    Field(String),
    #[error("the form-encoded body has no payload field (the JSON document is sent as payload=…)")]
    NoFormPayload,
    #[error("{0}")]
    Invalid(String),
}

/// Everything that stops a webhook from being accepted, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("no source is configured at {path}")]
    NotFound { path: String },
    #[error("{method} is not accepted here; Git hosts deliver webhooks with POST")]
    MethodNotAllowed { method: Method },
    #[error("{client} is not in this source's allow_ips")]
    Forbidden { client: IpAddr },
    #[error("the body is larger than server.max_body ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error(
        "content type {content_type:?} is not accepted; use application/json or application/x-www-form-urlencoded"
    )]
    UnsupportedMediaType { content_type: String },
    #[error("the request did not arrive within server.request_timeout")]
    Timeout,
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error(
        "relay holds as many request bodies as server.body_memory allows and this one could not wait longer; it was not recorded, so retry later"
    )]
    Busy,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::NotFound { .. } => StatusCode::NOT_FOUND,
            IngressError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            IngressError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngressError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngressError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngressError::Timeout => StatusCode::REQUEST_TIMEOUT,
            IngressError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngressError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            IngressError::Signature(_) => StatusCode::UNAUTHORIZED,
            IngressError::Payload(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A stable, machine-readable code for the JSON body and the logs.
    pub fn code(&self) -> &'static str {
        match self {
            IngressError::NotFound { .. } => "not_found",
            IngressError::MethodNotAllowed { .. } => "method_not_allowed",
            IngressError::Forbidden { .. } => "forbidden",
            IngressError::TooLarge { .. } => "too_large",
            IngressError::UnsupportedMediaType { .. } => "unsupported_media_type",
            IngressError::Timeout => "timeout",
            IngressError::BodyRead(_) => "body_unreadable",
            IngressError::Busy => "busy",
            IngressError::Signature(e) => e.code(),
            IngressError::Payload(PayloadError::MissingHeader { .. }) => "missing_header",
            IngressError::Payload(PayloadError::NotJson(_)) => "not_json",
            IngressError::Payload(_) => "bad_payload",
        }
    }

    /// The answer the sender gets: the status, and `{"error", "message"}`.
    pub fn into_response(self) -> http::Response<Body> {
        let mut response = json_response(
            self.status(),
            &json!({ "error": self.code(), "message": self.to_string() }),
        );
        let headers = response.headers_mut();
        match self {
            IngressError::MethodNotAllowed { .. } => {
                headers.insert(header::ALLOW, http::HeaderValue::from_static("POST"));
            }
            IngressError::Busy => {
                headers.insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_body_budget_is_a_503_the_sender_retries() {
        let response = IngressError::Busy.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"5"[..])
        );
    }
}
