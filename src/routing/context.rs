//! The template and `when` context of an event: every name in
//! `event::CONTEXT_FIELDS`, bound to the event and the webhook it came in.
//! The raw JSON is exposed lazily, parsed only if something reads `payload`.
//! `pipeline_id` is a number where the CI's id is one (GitLab, GitHub) and
//! text otherwise (CircleCI's UUID).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Value};

use crate::event::{Event, Upstream};
use crate::ingress::Webhook;

/// The template and `when` context for one event of a webhook.
///
/// `payload` is exposed lazily: the raw JSON is parsed only if a template
/// or expression actually reads it.
/// `hop` is how many relay hops led here (see `guard::hop`).
pub fn context(event: &Event, webhook: &Webhook, hop: u32, upstream: Option<&Upstream>) -> Value {
    let mut map: BTreeMap<&'static str, Value> = BTreeMap::new();
    map.insert("source", Value::from(webhook.source()));
    map.insert("provider", Value::from(webhook.provider().as_str()));
    map.insert("event", Value::from(event.kind.as_str()));
    map.insert("hook", Value::from(webhook.hook()));
    map.insert("repo", Value::from(event.repo.as_str()));
    map.insert("repo_url", Value::from(event.repo_url.as_str()));
    map.insert("ref", Value::from(event.git_ref.as_str()));
    map.insert("branch", Value::from(event.branch.as_str()));
    map.insert("tag", Value::from(event.tag.as_str()));
    map.insert("sha", Value::from(event.sha.as_str()));
    map.insert("before", Value::from(event.before.as_str()));
    map.insert("created", Value::from(event.created));
    map.insert("deleted", Value::from(event.deleted));
    map.insert("forced", Value::from(event.forced));
    map.insert("pusher", Value::from(event.pusher.as_str()));
    map.insert("message", Value::from(event.message.as_str()));
    map.insert("paths", Value::from(event.paths.clone()));
    map.insert("delivery", Value::from(webhook.delivery().unwrap_or_default()));
    map.insert("event_id", Value::from(webhook.id().to_string()));
    map.insert("hop", Value::from(hop));
    map.insert(
        "payload",
        Value::from_object(LazyPayload::new(webhook.payload().clone())),
    );
    let pipeline = event.pipeline.clone().unwrap_or_default();
    map.insert("status", Value::from(pipeline.status));
    map.insert("pipeline_id", pipeline_id(&pipeline.id));
    map.insert("pipeline_number", Value::from(pipeline.number));
    map.insert("workflow", Value::from(pipeline.workflow));
    map.insert("pipeline_source", Value::from(pipeline.source));
    map.insert("variables", Value::from(pipeline.variables));
    // Empty strings, not none, for an event relay did not start.
    let field = |f: fn(&Upstream) -> &str| Value::from(upstream.map_or("", f));
    let upstream_map: BTreeMap<&str, Value> = BTreeMap::from([
        ("event_id", field(|u| &u.event_id)),
        ("route", field(|u| &u.route)),
        ("target", field(|u| &u.target)),
        ("repo", field(|u| &u.repo)),
        ("sha", field(|u| &u.sha)),
    ]);
    map.insert("upstream", Value::from(upstream_map));
    Value::from(map)
}

/// `pipeline_id` as templates and `when` have always seen it: a number for a
/// decimal id (GitLab, GitHub), so `pipeline_id == 42` holds and it renders
/// as before; 0 for an event without a pipeline; otherwise the text itself
/// (CircleCI's UUID).
fn pipeline_id(id: &str) -> Value {
    if id.is_empty() {
        return Value::from(0u64);
    }
    match id.parse::<u64>() {
        Ok(number) if number.to_string() == id => Value::from(number),
        _ => Value::from(id),
    }
}

/// The original JSON document, parsed on first access.
#[derive(Debug)]
struct LazyPayload {
    raw: Bytes,
    parsed: OnceLock<Value>,
}

impl LazyPayload {
    fn new(raw: Bytes) -> Self {
        LazyPayload {
            raw,
            parsed: OnceLock::new(),
        }
    }

    fn value(&self) -> &Value {
        self.parsed.get_or_init(|| {
            // The body already parsed once during ingress, so this cannot fail
            // for a real webhook; an empty map keeps templates total if it does.
            serde_json::from_slice::<serde_json::Value>(&self.raw)
                .map(|json| Value::from(Serde(json)))
                .unwrap_or_else(|_| Value::from(BTreeMap::<String, Value>::new()))
        })
    }
}

impl Object for LazyPayload {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.value().get_item(key).ok().filter(|v| !v.is_undefined())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.value().try_iter() {
            Ok(keys) => Enumerator::Values(keys.collect()),
            Err(_) => Enumerator::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decimal_pipeline_id_stays_a_number_and_a_uuid_is_text() {
        assert_eq!(pipeline_id("42"), Value::from(42u64));
        assert_eq!(pipeline_id("42").to_string(), "42");
        assert_eq!(pipeline_id(""), Value::from(0u64));
        let uuid = "877c620f-900a-455b-ad51-1a772b5a3eab";
        assert_eq!(pipeline_id(uuid), Value::from(uuid));
        assert_eq!(pipeline_id("042"), Value::from("042"));
    }
}
