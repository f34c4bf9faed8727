//! The normalized event: what every provider's payload is turned into, and the
//! template context that routes and targets read.
//!
//! A verified webhook ([`Webhook`]) yields zero or more [`Event`]s (a Bitbucket
//! push carries several changes). Nothing here parses provider JSON or touches
//! the network; providers build these values in `ingress/`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The Git host that sent a webhook; decides how it is verified and parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Github,
    Gitlab,
    Bitbucket,
    Gitea,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Bitbucket => "bitbucket",
            Provider::Gitea => "gitea",
            Provider::Generic => "generic",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, in relay's vocabulary. Routes select on these names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Commits pushed to a branch (including branch creation).
    Push,
    /// A tag created or moved.
    Tag,
    BranchDelete,
    TagDelete,
    /// A CI outcome (GitLab Pipeline Hook, GitHub workflow_run, …).
    Pipeline,
    /// The sender checking that the hook works; answered, never stored.
    Ping,
    /// Parsed but never routed (GitHub `create`/`delete`, issues, …).
    #[default]
    Other,
}

impl EventKind {
    /// The kinds a route may name in `events`.
    pub const ROUTABLE: [EventKind; 5] = [
        EventKind::Push,
        EventKind::Tag,
        EventKind::BranchDelete,
        EventKind::TagDelete,
        EventKind::Pipeline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::Tag => "tag",
            EventKind::BranchDelete => "branch_delete",
            EventKind::TagDelete => "tag_delete",
            EventKind::Pipeline => "pipeline",
            EventKind::Ping => "ping",
            EventKind::Other => "other",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        [
            EventKind::Push,
            EventKind::Tag,
            EventKind::BranchDelete,
            EventKind::TagDelete,
            EventKind::Pipeline,
            EventKind::Ping,
            EventKind::Other,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SHA Git hosts send for "no commit" (created or deleted refs).
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

pub fn is_zero_sha(sha: &str) -> bool {
    !sha.is_empty() && sha.bytes().all(|b| b == b'0')
}

/// Whether a parser reads the files each pushed commit touched: most of a
/// push's bytes, and read by nothing unless a route filters on `paths` or a
/// template reads them (`Config::files`). Skipped, an event's `paths` are
/// empty and `paths_complete` is false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    Read,
    Skip,
}

/// The sorted, de-duplicated list of files the pushed commits touched.
pub fn changed_paths<'a>(files: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut paths: Vec<&str> = files.collect();
    paths.sort_unstable();
    paths.dedup();
    paths.into_iter().map(str::to_owned).collect()
}

/// A verified webhook request: the bytes as received plus what the headers said.
///
/// Only `ingress` constructs one, and only after the signature checked out, so
/// holding a `Webhook` means the body is authentic.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The event id relay assigns; returned in the 202 and stored as the key.
    pub id: Uuid,
    /// The configured source name (`[sources.NAME]`).
    pub source: String,
    pub provider: Provider,
    /// The sender's own event name (`push`, `Tag Push Hook`, `repo:push`).
    pub hook: String,
    /// The sender's delivery id, the key for redelivery dedupe.
    pub delivery: Option<String>,
    pub content_type: String,
    /// The request body exactly as received.
    pub body: Bytes,
    /// The JSON document: the body itself, or the `payload` field of a form post.
    pub payload: Bytes,
    /// Relay hops recorded on the request (0 for a webhook from a Git host).
    pub hop: u32,
}

impl Webhook {
    /// Whether the JSON document differs from the body (form-encoded posts).
    pub fn payload_is_body(&self) -> bool {
        self.payload == self.body
    }
}

/// Details only CI-outcome events carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub status: String,
    pub id: u64,
    pub source: String,
    pub variables: BTreeMap<String, String>,
}

/// One normalized event. Absent strings are empty, so templates never print "none".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// `owner/name`, or GitLab's `group/sub/name`.
    pub repo: String,
    pub repo_url: String,
    /// The full ref (`refs/heads/main`, `refs/tags/v1`).
    pub git_ref: String,
    pub branch: String,
    pub tag: String,
    /// The commit the ref points to after the push (zeros when deleted).
    pub sha: String,
    pub before: String,
    pub created: bool,
    pub deleted: bool,
    pub forced: bool,
    pub pusher: String,
    /// The head commit's message.
    pub message: String,
    /// Files added, modified or removed by the pushed commits.
    pub paths: Vec<String>,
    /// False when the sender listed no files or only some (commit lists are capped).
    pub paths_complete: bool,
    pub pipeline: Option<Pipeline>,
}

impl Event {
    /// Fills `branch`/`tag` and the push kind from a full ref and the delete flag.
    pub fn set_ref(&mut self, git_ref: &str) {
        self.git_ref = git_ref.to_owned();
        if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
            self.tag = tag.to_owned();
            self.kind = if self.deleted {
                EventKind::TagDelete
            } else {
                EventKind::Tag
            };
        } else if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
            self.branch = branch.to_owned();
            self.kind = if self.deleted {
                EventKind::BranchDelete
            } else {
                EventKind::Push
            };
        } else {
            self.kind = EventKind::Other;
        }
    }

    /// The short ref name: the branch, else the tag.
    pub fn short_ref(&self) -> &str {
        if self.branch.is_empty() {
            &self.tag
        } else {
            &self.branch
        }
    }

    /// The template and `when` context for this event.
    ///
    /// `payload` is exposed lazily: the raw JSON is parsed only if a template
    /// or expression actually reads it.
    /// `hop` is how many relay hops led here (see `guard::hop`).
    pub fn context(&self, webhook: &Webhook, hop: u32) -> Value {
        let mut map: BTreeMap<&'static str, Value> = BTreeMap::new();
        map.insert("source", Value::from(webhook.source.as_str()));
        map.insert("provider", Value::from(webhook.provider.as_str()));
        map.insert("event", Value::from(self.kind.as_str()));
        map.insert("hook", Value::from(webhook.hook.as_str()));
        map.insert("repo", Value::from(self.repo.as_str()));
        map.insert("repo_url", Value::from(self.repo_url.as_str()));
        map.insert("ref", Value::from(self.git_ref.as_str()));
        map.insert("branch", Value::from(self.branch.as_str()));
        map.insert("tag", Value::from(self.tag.as_str()));
        map.insert("sha", Value::from(self.sha.as_str()));
        map.insert("before", Value::from(self.before.as_str()));
        map.insert("created", Value::from(self.created));
        map.insert("deleted", Value::from(self.deleted));
        map.insert("forced", Value::from(self.forced));
        map.insert("pusher", Value::from(self.pusher.as_str()));
        map.insert("message", Value::from(self.message.as_str()));
        map.insert("paths", Value::from(self.paths.clone()));
        map.insert(
            "delivery",
            Value::from(webhook.delivery.as_deref().unwrap_or_default()),
        );
        map.insert("event_id", Value::from(webhook.id.to_string()));
        map.insert("hop", Value::from(hop));
        map.insert(
            "payload",
            Value::from_object(LazyPayload::new(webhook.payload.clone())),
        );
        let pipeline = self.pipeline.clone().unwrap_or_default();
        map.insert("status", Value::from(pipeline.status));
        map.insert("pipeline_id", Value::from(pipeline.id));
        map.insert("pipeline_source", Value::from(pipeline.source));
        map.insert("variables", Value::from(pipeline.variables));
        Value::from(map)
    }
}

/// Every name a template or `when` expression may read; checked at config load.
pub const CONTEXT_FIELDS: &[&str] = &[
    "source",
    "provider",
    "event",
    "hook",
    "repo",
    "repo_url",
    "ref",
    "branch",
    "tag",
    "sha",
    "before",
    "created",
    "deleted",
    "forced",
    "pusher",
    "message",
    "paths",
    "delivery",
    "event_id",
    "hop",
    "payload",
    "status",
    "pipeline_id",
    "pipeline_source",
    "variables",
];

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
    fn set_ref_classifies_branches_tags_and_deletes() {
        let mut e = Event::default();
        e.set_ref("refs/heads/feature/x");
        assert_eq!(e.kind, EventKind::Push);
        assert_eq!(e.branch, "feature/x");

        let mut e = Event {
            deleted: true,
            ..Event::default()
        };
        e.set_ref("refs/tags/v1.2");
        assert_eq!(e.kind, EventKind::TagDelete);
        assert_eq!(e.tag, "v1.2");

        let mut e = Event::default();
        e.set_ref("refs/notes/commits");
        assert_eq!(e.kind, EventKind::Other);
    }

    #[test]
    fn zero_sha_detection() {
        assert!(is_zero_sha(ZERO_SHA));
        assert!(!is_zero_sha(""));
        assert!(!is_zero_sha("0000000000000000000000000000000000000001"));
    }
}
