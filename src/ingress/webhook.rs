//! The verified webhook: the bytes as received plus what the headers said.
//!
//! Its fields are private and its one constructor is private to `ingress`,
//! so holding a [`Webhook`] means its signature checked out: routing, the
//! accept path and the store take nothing less.

use bytes::Bytes;
use uuid::Uuid;

use crate::event::Provider;

#[derive(Debug, Clone)]
pub struct Webhook {
    /// The event id relay assigns; returned in the 202 and stored as the key.
    id: Uuid,
    /// The configured source name (`[sources.NAME]`).
    source: String,
    provider: Provider,
    /// The sender's own event name (`push`, `Tag Push Hook`, `repo:push`).
    hook: String,
    /// The sender's delivery id, the key for redelivery dedupe.
    delivery: Option<String>,
    content_type: String,
    /// The request body exactly as received.
    body: Bytes,
    /// The JSON document: the body itself, or the `payload` field of a form post.
    payload: Bytes,
    /// Relay hops recorded on the request (0 for a webhook from a Git host).
    hop: u32,
}

/// A verified webhook's parts, as `Source::receive` assembles them.
pub(super) struct Verified {
    pub source: String,
    pub provider: Provider,
    pub hook: String,
    pub delivery: Option<String>,
    pub content_type: String,
    pub body: Bytes,
    pub payload: Bytes,
    pub hop: u32,
}

/// What the store kept of a webhook relay verified when it arrived: enough
/// to build it again ([`super::Source::restore`]), to explain it under the
/// config in force or to route it again (a replay).
#[derive(Debug, Clone)]
pub struct Kept {
    pub hook: String,
    /// The sender's delivery id; a replay leaves it out, so the store does
    /// not take it for the sender's redelivery.
    pub delivery: Option<String>,
    pub content_type: String,
    pub body: Bytes,
    /// The JSON document when it differs from the body (form posts).
    pub payload: Option<Bytes>,
    /// The hops that led to it: a replay keeps them.
    pub hop: u32,
}

impl Webhook {
    /// The one way to build a webhook: from what a verifier checked (now,
    /// or when it arrived and was stored).
    pub(super) fn verified(parts: Verified) -> Webhook {
        Webhook {
            id: Uuid::now_v7(),
            source: parts.source,
            provider: parts.provider,
            hook: parts.hook,
            delivery: parts.delivery,
            content_type: parts.content_type,
            body: parts.body,
            payload: parts.payload,
            hop: parts.hop,
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn hook(&self) -> &str {
        &self.hook
    }

    pub fn delivery(&self) -> Option<&str> {
        self.delivery.as_deref()
    }

    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    pub fn hop(&self) -> u32 {
        self.hop
    }

    /// Whether the JSON document is the body itself (not a form post's field).
    pub fn payload_is_body(&self) -> bool {
        self.payload == self.body
    }
}
