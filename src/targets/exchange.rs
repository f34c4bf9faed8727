//! A trigger's exchange with its target: add the credential, send, read a
//! bounded start of the answer, and classify it into an [`Outcome`].
//!
//! No redirect is followed and no incoming header is passed on. What a
//! target answered is scrubbed of its credential before it is kept. Nothing
//! here decides about retries or touches the store.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tracing::info;

use super::outcome::{self, Outcome};
use super::{Outbound, Target, response_message};
use crate::request::PreparedRequest;

/// How much of a target's answer is kept for the attempt record.
const RESPONSE_READ_LIMIT: usize = 64 * 1024;

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub outcome: Outcome,
    pub status: Option<u16>,
    /// The target's `Retry-After`, already turned into a wait.
    pub retry_after: Option<Duration>,
    /// The target's message, or what went wrong on the way.
    pub message: String,
}

impl AttemptResult {
    pub fn dead_request(message: String) -> AttemptResult {
        AttemptResult {
            outcome: Outcome::DeadRequest,
            status: None,
            retry_after: None,
            message,
        }
    }
}

impl Target {
    /// Sends `request` once (or, for a dry run, records it) through the
    /// client `sends` keeps for this target's proxy setting: the credential
    /// is added now, from this config, never from the store.
    pub async fn send(
        &self,
        outbound: &Outbound,
        request: &PreparedRequest,
        payload: Option<&Bytes>,
        timeout: Duration,
        now: SystemTime,
    ) -> AttemptResult {
        if self.dry_run {
            let text = request.redacted(payload);
            info!(request = %text, "dry run: this request was recorded, not sent");
            return AttemptResult {
                outcome: Outcome::DryRun,
                status: None,
                retry_after: None,
                message: text,
            };
        }
        let wire = match self.authorize(request, payload) {
            Ok(wire) => wire,
            Err(e) => return AttemptResult::dead_request(e.to_string()),
        };
        let mut sending = outbound.client.post(&wire.url).timeout(timeout).body(wire.body);
        for (name, value) in &wire.headers {
            sending = sending.header(name.as_str(), value.as_str());
        }
        let mut result = match sending.send().await {
            Ok(response) => read_answer(response, now).await,
            Err(e) => {
                let via = outbound.proxy_for(&wire.url);
                let (outcome, message) = outcome::of_transport_error(&e, timeout, via.as_deref());
                AttemptResult {
                    outcome,
                    status: None,
                    retry_after: None,
                    message,
                }
            }
        };
        result.message = self.scrub(result.message);
        result
    }
}

/// Classifies an answer by its status, with the target's message.
async fn read_answer(response: reqwest::Response, now: SystemTime) -> AttemptResult {
    let status = response.status().as_u16();
    let header = |name: http::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after = header(http::header::RETRY_AFTER).and_then(|v| outcome::parse_retry_after(&v, now));
    let location = header(http::header::LOCATION);
    let body = read_limited(response).await;
    let message = match (status, location) {
        (300..=399, Some(location)) => format!(
            "{status}: redirected to {location}; relay does not follow redirects for triggers, so point the target at the final address"
        ),
        _ => format!("{status}: {}", response_message(&body)),
    };
    AttemptResult {
        outcome: Outcome::of_status(status),
        status: Some(status),
        retry_after,
        message,
    }
}

/// The start of the response body; the rest is not needed for the record.
async fn read_limited(mut response: reqwest::Response) -> Bytes {
    let mut buffer = BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.extend_from_slice(&chunk);
        if buffer.len() >= RESPONSE_READ_LIMIT {
            break;
        }
    }
    buffer.freeze()
}
