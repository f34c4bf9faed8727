//! The template and `when` context of an event: every name in
//! `event::CONTEXT_FIELDS`, bound to the event and the webhook it came in.
//! The raw JSON is exposed lazily, parsed only if something reads `payload`.
//! `pipeline_id` is a number where the CI's id is one (GitLab, GitHub) and
//! text otherwise (CircleCI's UUID).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Value};

use crate::event::{CONTEXT_FIELDS, Event, Upstream};
use crate::ingress::Webhook;

/// The template and `when` context for one event of a webhook.
///
/// `payload` is exposed lazily: the raw JSON is parsed only if a template
/// or expression actually reads it.
/// `hop` is how many relay hops led here (see `guard::hop`).
pub fn context(event: &Event, webhook: &Webhook, hop: u32, upstream: Option<&Upstream>) -> Value {
    let pipeline = event.pipeline.as_ref();
    let field = |name: &str| -> Value {
        match name {
            "source" => Value::from(webhook.source()),
            "provider" => Value::from(webhook.provider().as_str()),
            "event" => Value::from(event.kind.as_str()),
            "hook" => Value::from(webhook.hook()),
            "repo" => Value::from(event.repo.as_str()),
            "repo_url" => Value::from(event.repo_url.as_str()),
            "ref" => Value::from(event.git_ref.as_str()),
            "branch" => Value::from(event.branch.as_str()),
            "tag" => Value::from(event.tag.as_str()),
            "sha" => Value::from(event.sha.as_str()),
            "before" => Value::from(event.before.as_str()),
            "created" => Value::from(event.created),
            "deleted" => Value::from(event.deleted),
            "forced" => Value::from(event.forced),
            "pusher" => Value::from(event.pusher.as_str()),
            "message" => Value::from(event.message.as_str()),
            "paths" => Value::from(event.paths.clone()),
            "delivery" => Value::from(webhook.delivery().unwrap_or_default()),
            "event_id" => Value::from(webhook.id().to_string()),
            "hop" => Value::from(hop),
            "payload" => Value::from_object(LazyPayload::new(webhook.payload().clone())),
            // Empty (or 0) for an event that reports no pipeline.
            "status" => Value::from(pipeline.map_or("", |p| p.status.as_str())),
            "pipeline_id" => pipeline_id(pipeline.map_or("", |p| p.id.as_str())),
            "pipeline_number" => Value::from(pipeline.map_or(0, |p| p.number)),
            "workflow" => Value::from(pipeline.map_or("", |p| p.workflow.as_str())),
            "pipeline_source" => Value::from(pipeline.map_or("", |p| p.source.as_str())),
            "variables" => Value::from(pipeline.map(|p| p.variables.clone()).unwrap_or_default()),
            "upstream" => {
                // Empty strings, not none, for an event relay did not start.
                let field = |f: fn(&Upstream) -> &str| Value::from(upstream.map_or("", f));
                Value::from(BTreeMap::from([
                    ("event_id", field(|u| &u.event_id)),
                    ("route", field(|u| &u.route)),
                    ("target", field(|u| &u.target)),
                    ("repo", field(|u| &u.repo)),
                    ("sha", field(|u| &u.sha)),
                ]))
            }
            _ => Value::UNDEFINED,
        }
    };
    Value::from_object(Fields(std::array::from_fn(|at| field(CONTEXT_FIELDS[at]))))
}

/// The context's fields, in `CONTEXT_FIELDS`' order: an object read by
/// name, where a map was built for every event before (a sorted insert of
/// each of the 28 names: 2% of relay's CPU at 32 connections). It lists
/// its names sorted, as that map did.
#[derive(Debug)]
struct Fields([Value; CONTEXT_FIELDS.len()]);

impl Object for Fields {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let at = CONTEXT_FIELDS.iter().position(|field| *field == name)?;
        self.0.get(at).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut names = CONTEXT_FIELDS.to_vec();
        names.sort_unstable();
        Enumerator::Values(names.into_iter().map(Value::from).collect())
    }
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
    fn every_context_field_is_defined_and_the_names_list_sorted() {
        let config = crate::config::Config::from_toml(
            "[sources.gh]\nprovider = \"github\"\npath = \"/h\"\nsecret = \"s\"\n\n[[routes]]\nname = \"r\"\nto = [\"t\"]\n\n[targets.t]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n",
        )
        .unwrap();
        let webhook = crate::routing::signed_test_push(config.source("gh").unwrap());
        let mut event = Event::default();
        event.set_ref("refs/heads/main");
        event.repo = "acme/api".into();
        let ctx = context(&event, &webhook, 2, None);
        for name in CONTEXT_FIELDS {
            let value = ctx.get_attr(name).unwrap();
            assert!(!value.is_undefined(), "{name} is undefined");
        }
        assert_eq!(ctx.get_attr("repo").unwrap(), Value::from("acme/api"));
        assert_eq!(ctx.get_attr("hop").unwrap(), Value::from(2));
        assert_eq!(ctx.get_attr("pipeline_id").unwrap(), Value::from(0u64));
        assert_eq!(
            ctx.get_attr("upstream").unwrap().get_attr("route").unwrap(),
            Value::from("")
        );
        assert!(ctx.get_attr("nothing").unwrap().is_undefined());
        let names: Vec<String> = ctx.try_iter().unwrap().map(|k| k.to_string()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), CONTEXT_FIELDS.len());
    }

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
