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
use super::{Kind, Outbound, Target, circleci_answers, circleci_v1, gitlab, response_message};
use crate::pipeline::Pipeline;
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
    /// The pipeline a 2xx answer named, read by the target's kind.
    pub pipeline: Option<Pipeline>,
}

impl AttemptResult {
    pub fn dead_request(message: String) -> AttemptResult {
        AttemptResult::without_answer(Outcome::DeadRequest, message)
    }

    /// An attempt that got no answer to read (a dry run, a transport error).
    pub fn without_answer(outcome: Outcome, message: String) -> AttemptResult {
        AttemptResult {
            outcome,
            status: None,
            retry_after: None,
            message,
            pipeline: None,
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
            return AttemptResult::without_answer(Outcome::DryRun, text);
        }
        let wire = match self.authorize(request, payload) {
            Ok(wire) => wire,
            Err(e) => return AttemptResult::dead_request(e.to_string()),
        };
        let mut sending = outbound.client.post(wire.url).timeout(timeout).body(wire.body);
        for (name, value) in &wire.headers {
            sending = sending.header(name.as_str(), value.as_str());
        }
        let mut result = match sending.send().await {
            Ok(response) => self.read_answer(request, response, now).await,
            Err(e) => {
                // The proxy's own address only, never the URL (its token).
                let via = e.url().and_then(|url| outbound.proxy_for(url.as_str()));
                let (outcome, message) = outcome::of_transport_error(&e, timeout, via.as_deref());
                AttemptResult::without_answer(outcome, message)
            }
        };
        result.message = self.scrub(result.message);
        result
    }
}

impl Target {
    /// Classifies an answer by its status, with the target's message; a
    /// 2xx is read by the target's kind for the pipeline it started.
    async fn read_answer(
        &self,
        request: &PreparedRequest,
        response: reqwest::Response,
        now: SystemTime,
    ) -> AttemptResult {
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
        let mut message = match (status, location) {
            (300..=399, Some(location)) => format!(
                "{status}: redirected to {location}; relay does not follow redirects for triggers, so point the target at the final address"
            ),
            _ => format!("{status}: {}", response_message(&body)),
        };
        let outcome = Outcome::of_status(status);
        if outcome == Outcome::DeadStatus
            && let Some(advice) = self.advice(request, status, &body)
        {
            message = format!("{message}; {advice}");
        }
        let pipeline = match (outcome, self.read_pipeline(request, &body)) {
            (Outcome::Delivered, Some(Ok(pipeline))) => Some(pipeline),
            (Outcome::Delivered, Some(Err(why))) => {
                message = format!("{message} ({why})");
                None
            }
            _ => None,
        };
        AttemptResult {
            outcome,
            status: Some(status),
            retry_after,
            message,
            pipeline,
        }
    }

    /// What to do about a refusal, where the kind's API is known to mean
    /// something its message does not say.
    fn advice(&self, request: &PreparedRequest, status: u16, body: &[u8]) -> Option<&'static str> {
        match &self.kind {
            Kind::CircleCi(_) => circleci_answers::advice(request, status),
            Kind::CircleCiV1(_) => circleci_v1::advice(status, body),
            Kind::Gitlab(_) => gitlab::advice(status, body),
            Kind::Status(api) => api.advice(status, body),
            Kind::Http(_) => None,
        }
    }

    /// The pipeline a 2xx answer names, each kind reading its own API's
    /// answer; `None` for kinds that start no pipeline (`http`).
    fn read_pipeline(&self, request: &PreparedRequest, body: &[u8]) -> Option<Result<Pipeline, String>> {
        match &self.kind {
            Kind::CircleCi(_) => Some(circleci_answers::pipeline(request, body)),
            Kind::CircleCiV1(_) => Some(circleci_v1::pipeline(body)),
            Kind::Gitlab(_) => Some(gitlab::pipeline(body)),
            Kind::Http(_) | Kind::Status(_) => None,
        }
    }
}

/// The start of the response body; the rest is not needed for the record
/// (nor for a poll: a CI's pipeline JSON is far smaller).
pub(super) async fn read_limited(mut response: reqwest::Response) -> Bytes {
    let mut buffer = BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.extend_from_slice(&chunk);
        if buffer.len() >= RESPONSE_READ_LIMIT {
            break;
        }
    }
    buffer.freeze()
}
