//! The normalized event: what every provider's payload is turned into, and
//! the names of the template context that routes and targets read.
//!
//! A verified webhook (`ingress::Webhook`) yields zero or more [`Event`]s (a
//! Bitbucket push carries several changes). Nothing here parses provider JSON
//! or touches the network; providers build these values in `ingress/`, and
//! routing turns them into the template context (`routing::context`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The Git host that sent a webhook; decides how it is verified and parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Github,
    Gitlab,
    Bitbucket,
    Gitea,
    Circleci,
    Generic,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Bitbucket => "bitbucket",
            Provider::Gitea => "gitea",
            Provider::Circleci => "circleci",
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
    /// A CI outcome (GitLab Pipeline Hook, GitHub workflow_run, CircleCI
    /// workflow-completed, a generic source with `kind = "pipeline"`, …).
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

/// Details only CI-outcome events carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub status: String,
    /// The CI's id of the pipeline, as text: GitLab's and GitHub's numeric
    /// ids in decimal, CircleCI's UUID. The template context gives a
    /// decimal id as a number (see `routing::context`).
    pub id: String,
    /// The pipeline's number within its project (CircleCI's `number`); 0 when
    /// the sender gives none.
    pub number: u64,
    /// The workflow's name (CircleCI's `workflow.name`); empty when none.
    pub workflow: String,
    pub source: String,
    pub variables: BTreeMap<String, String>,
}

/// The trigger that started the pipeline a `pipeline` event reports, when
/// relay started it: found by the pipeline's id among the jobs' pipelines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The event whose route triggered the pipeline.
    pub event_id: String,
    pub route: String,
    pub target: String,
    /// That event's own hop count; the pipeline ran one hop further.
    pub hop: u32,
    /// The repository and commit of that event (its first, for a Bitbucket
    /// push of several).
    pub repo: String,
    pub sha: String,
    /// When the trigger's job was created.
    pub triggered_at: std::time::SystemTime,
    /// Whether this report changed the pipeline's recorded state (a
    /// repeated report does not).
    pub state_changed: bool,
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
    "pipeline_number",
    "workflow",
    "pipeline_source",
    "variables",
    "upstream",
];

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
