//! Reporting back: what relay says on the commit that started a pipeline.
//!
//! A trigger of a route with `report` carries a [`ReportSpec`] (whose API
//! posts it, on which repository and commit, under which context), kept with
//! its job. Each time the job's pipeline changes state, or the trigger dies,
//! the store queues a report job holding that spec and the pipeline as it
//! stood; at send time it becomes a [`StatusReport`], which says the
//! [`Verdict`] and a sentence a person reads. Each host's status API
//! (`targets::status`) turns that into its own request.
//!
//! What this module must never do: I/O, or put anything from a payload into
//! a URL unchecked ([`ReportSpec::new`] checks the repository and the sha).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::pipeline::PipelineState;

/// The prefix of the job target name that posts a source's statuses: the
/// reports of source `github` are jobs of target `status:github`.
pub const STATUS_TARGET_PREFIX: &str = "status:";

/// What a report job that was never sent says: a newer report of the same
/// trigger took its place.
pub const SUPERSEDED: &str = "superseded by a newer report of the same pipeline";

/// The name of the target that posts `source`'s statuses.
pub fn status_target(source: &str) -> String {
    format!("{STATUS_TARGET_PREFIX}{source}")
}

/// A route's `report`: the status's context, as a template of `target` and
/// `route` (`relay/{{ target }}` unless set).
#[derive(Debug)]
pub struct ReportContext {
    env: minijinja::Environment<'static>,
}

/// The context a route reports under when `report = true`.
pub const DEFAULT_CONTEXT: &str = "relay/{{ target }}";

impl ReportContext {
    /// The context template, or why it is not one: it may read only
    /// `target` and `route`.
    pub fn new(source: &str) -> Result<ReportContext, String> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned("context", source.to_owned())
            .map_err(|e| format!("is not a valid template: {e}"))?;
        let template = env
            .get_template("context")
            .map_err(|e| format!("is not a valid template: {e}"))?;
        let unknown: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|name| name != "target" && name != "route")
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "may name only target and route, not {}",
                unknown.join(", ")
            ));
        }
        Ok(ReportContext { env })
    }

    /// The context for `target`'s pipelines on `route`.
    pub fn render(&self, route: &str, target: &str) -> String {
        self.env
            .get_template("context")
            .and_then(|t| t.render(minijinja::context! { target, route }))
            .unwrap_or_else(|_| format!("relay/{target}"))
    }
}

/// The most characters of a status description (GitHub's limit is 140).
const MAX_DESCRIPTION: usize = 140;

/// Where and how a trigger's pipeline is reported, fixed when the trigger
/// is planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportSpec {
    /// The source whose API posts the status.
    pub source: String,
    /// The repository, as the Git host names it (`owner/name`, GitLab's
    /// `group/sub/name`).
    pub repo: String,
    pub sha: String,
    /// The status's context (GitHub, Gitea), name (GitLab) or key (Bitbucket).
    pub context: String,
    /// The target whose pipeline it is.
    pub target: String,
    /// What the target starts, for the description: "CircleCI pipeline",
    /// "GitLab pipeline", "CircleCI build"; empty for a plain delivery.
    #[serde(default)]
    pub label: String,
    /// When the trigger was planned, in milliseconds since the epoch: the
    /// description's "in 4 min 12 s" counts from here.
    pub since_ms: u64,
    /// The repository's page, for hosts that require a link (Bitbucket)
    /// when the pipeline has no page of its own; empty when unknown.
    #[serde(default)]
    pub link: String,
}

impl ReportSpec {
    /// A spec, or why the event cannot be reported on: a repository or sha
    /// that is not what a Git host sends is never put into a URL.
    pub fn new(
        source: &str,
        repo: &str,
        sha: &str,
        context: String,
        target: &str,
        label: &str,
        since: SystemTime,
    ) -> Result<ReportSpec, String> {
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if repo.split('/').count() < 2 || !repo.split('/').all(segment_ok) {
            return Err(format!(
                "{repo:?} is not a repository path a status can be posted on"
            ));
        }
        let hex = sha.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex && (sha.len() == 40 || sha.len() == 64)) {
            return Err(format!("{sha:?} is not a commit sha a status can be posted on"));
        }
        Ok(ReportSpec {
            source: source.to_owned(),
            repo: repo.to_owned(),
            sha: sha.to_ascii_lowercase(),
            context,
            target: target.to_owned(),
            label: label.to_owned(),
            since_ms: since
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            link: String::new(),
        })
    }

    /// With the repository's page as the fallback link, if it is an
    /// `https://` URL (it comes from the payload: shown, never requested).
    pub fn with_link(mut self, repo_url: &str) -> ReportSpec {
        if repo_url.starts_with("https://") && repo_url.len() <= 500 {
            self.link = repo_url.to_owned();
        }
        self
    }

    fn since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.since_ms)
    }
}

/// One report as it goes out: the spec, and the pipeline as it stood when
/// the report was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub spec: ReportSpec,
    /// The pipeline's state; `None` when the trigger's answer named none.
    pub state: Option<PipelineState>,
    pub number: Option<u64>,
    /// The pipeline's page: the status's link.
    pub url: Option<String>,
    /// Set when the trigger died: why.
    pub trigger_error: Option<String>,
    /// When the report was queued.
    pub at: SystemTime,
}

/// What a report says, before each host's words for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    Running,
    Success,
    Failure,
    Canceled,
    Error,
}

impl StatusReport {
    pub fn verdict(&self) -> Verdict {
        if self.trigger_error.is_some() {
            return Verdict::Error;
        }
        match self.state {
            // A plain delivery (an `http` target) ends when it is delivered.
            None if self.spec.label.is_empty() => Verdict::Success,
            None | Some(PipelineState::Created) => Verdict::Pending,
            Some(PipelineState::Running) => Verdict::Running,
            Some(PipelineState::Success) => Verdict::Success,
            Some(PipelineState::Failed) => Verdict::Failure,
            Some(PipelineState::Canceled) => Verdict::Canceled,
            Some(PipelineState::Error) => Verdict::Error,
        }
    }

    /// The sentence a person reads beside the status, at most 140
    /// characters: "CircleCI pipeline #130 passed in 4 min 12 s".
    pub fn description(&self) -> String {
        let what = match (self.spec.label.as_str(), self.number) {
            ("", _) => format!("the trigger of {}", self.spec.target),
            (label, Some(n)) => format!("{label} #{n}"),
            (label, None) => label.to_owned(),
        };
        let took = human_duration(self.at.duration_since(self.spec.since()).unwrap_or_default());
        let text = match (&self.trigger_error, self.verdict()) {
            (Some(error), _) => format!("relay could not trigger {}: {error}", self.spec.target),
            (None, Verdict::Pending) if self.state.is_none() => {
                format!("{what} was accepted; relay cannot tell which pipeline it started")
            }
            (None, Verdict::Pending) => format!("{what} is queued"),
            (None, Verdict::Running) => format!("{what} is running"),
            (None, Verdict::Success) if self.spec.label.is_empty() => format!("{what} was delivered"),
            (None, Verdict::Success) => format!("{what} passed in {took}"),
            (None, Verdict::Failure) => format!("{what} failed after {took}"),
            (None, Verdict::Canceled) => format!("{what} was canceled after {took}"),
            (None, Verdict::Error) => format!("{what} could not run ({took})"),
        };
        shorten(&text, MAX_DESCRIPTION)
    }
}

/// "4 min 12 s", "58 s", "1 h 3 min".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

fn shorten(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit - 1) {
        Some((cut, _)) if text.chars().count() > limit => format!("{}…", &text[..cut]),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(label: &str) -> ReportSpec {
        ReportSpec::new(
            "github",
            "acme/api",
            "9B2C1D0E8F7A6B5C4D3E2F1A0B9C8D7E6F5A4B3C",
            "relay/app".into(),
            "app",
            label,
            UNIX_EPOCH + Duration::from_secs(1_000),
        )
        .unwrap()
    }

    fn report(label: &str, state: Option<PipelineState>, after: u64) -> StatusReport {
        StatusReport {
            spec: spec(label),
            state,
            number: Some(130),
            url: None,
            trigger_error: None,
            at: UNIX_EPOCH + Duration::from_secs(1_000 + after),
        }
    }

    #[test]
    fn descriptions_say_what_happened_in_a_sentence() {
        let cci = |state, after| report("CircleCI pipeline", Some(state), after).description();
        assert_eq!(
            cci(PipelineState::Success, 252),
            "CircleCI pipeline #130 passed in 4 min 12 s"
        );
        assert_eq!(
            cci(PipelineState::Failed, 58),
            "CircleCI pipeline #130 failed after 58 s"
        );
        assert_eq!(cci(PipelineState::Created, 1), "CircleCI pipeline #130 is queued");
        assert_eq!(
            cci(PipelineState::Canceled, 3780),
            "CircleCI pipeline #130 was canceled after 1 h 3 min"
        );
        assert_eq!(
            report("", None, 1).description(),
            "the trigger of app was delivered"
        );
        assert_eq!(report("", None, 1).verdict(), Verdict::Success);
        let unnamed = report("GitLab pipeline", None, 1);
        assert_eq!(unnamed.verdict(), Verdict::Pending);
        let mut dead = report("CircleCI pipeline", None, 5);
        dead.trigger_error = Some(format!("404: Project not found; {}", "x".repeat(200)));
        assert_eq!(dead.verdict(), Verdict::Error);
        let text = dead.description();
        assert!(
            text.starts_with("relay could not trigger app: 404: Project not found"),
            "{text}"
        );
        assert_eq!(text.chars().count(), 140);
    }

    #[test]
    fn contexts_name_the_target_or_the_route() {
        let default = ReportContext::new(DEFAULT_CONTEXT).unwrap();
        assert_eq!(default.render("builds", "app"), "relay/app");
        let own = ReportContext::new("ci/{{ route }}/{{ target }}").unwrap();
        assert_eq!(own.render("builds", "app"), "ci/builds/app");
        let wrong = ReportContext::new("ci/{{ branch }}").unwrap_err();
        assert_eq!(wrong, "may name only target and route, not branch");
        assert!(ReportContext::new("ci/{{ target").is_err());
    }

    #[test]
    fn only_real_repositories_and_shas_are_reported_on() {
        assert_eq!(spec("x").sha, "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c");
        let sha = "9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
        let new = |repo: &str, sha: &str| ReportSpec::new("s", repo, sha, String::new(), "t", "", UNIX_EPOCH);
        assert!(new("group/sub/app", sha).is_ok());
        for repo in [
            "",
            "acme",
            "acme/../admin",
            "acme/api?x=1",
            "acme//api",
            "acme/api#",
            "https://x/y",
        ] {
            assert!(new(repo, sha).is_err(), "{repo}");
        }
        for bad in ["", "abc", "zz2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c", "9b2c/../"] {
            assert!(new("acme/api", bad).is_err(), "{bad}");
        }
    }
}
