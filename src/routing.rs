//! Routes: compiled once from `[[routes]]` (globs, `when`), then evaluated for
//! each event into the jobs to queue.
//!
//! Evaluation is pure: it reads the event and the config and renders each
//! target's request, but never stores, sends or logs. Every route yields a
//! [`Verdict`] naming the first predicate that failed, which `relay explain`
//! prints and the ingress logs summarize.

use std::collections::BTreeSet;
use std::fmt;
use std::time::SystemTime;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use minijinja::value::Value;
use serde_json::json;
use uuid::Uuid;

use crate::config::{Compiler, Config};

use crate::event::{Event, EventKind, Webhook};
use crate::guard;
use crate::guard::{Dropped, JobLimits};
use crate::ingress::Source;
use crate::request::PreparedRequest;
use crate::targets::{RenderInput, Target};
use crate::template::Condition;

/// A `[[routes]]` entry, compiled.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// Source names; `None` is every source.
    from: Option<Vec<String>>,
    repos: Option<Patterns>,
    events: Vec<EventKind>,
    branches: Option<Patterns>,
    tags: Option<Patterns>,
    paths: Option<Patterns>,
    when: Option<Condition>,
    pub to: Vec<String>,
}

/// Globs with `!` exclusions: a value matches when some include matches (or
/// there are only exclusions) and no exclusion does.
#[derive(Debug)]
struct Patterns {
    include: GlobSet,
    exclude: GlobSet,
    has_include: bool,
    written: Vec<String>,
}

impl Patterns {
    fn compile(key: &str, list: &[String], c: &mut Compiler) -> Option<Patterns> {
        if list.is_empty() {
            c.problem(key, "is empty; leave it out to match everything");
            return None;
        }
        let mut include = GlobSetBuilder::new();
        let mut exclude = GlobSetBuilder::new();
        let mut has_include = false;
        let mut ok = true;
        for (i, pattern) in list.iter().enumerate() {
            let (negated, text) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern.as_str()),
            };
            match glob(text) {
                Ok(g) if negated => {
                    exclude.add(g);
                }
                Ok(g) => {
                    has_include = true;
                    include.add(g);
                }
                Err(e) => {
                    c.problem(
                        format!("{key}[{i}]"),
                        format!("{pattern:?} is not a valid glob: {e}"),
                    );
                    ok = false;
                }
            }
        }
        let build = |b: GlobSetBuilder| b.build().ok();
        match (ok, build(include), build(exclude)) {
            (true, Some(include), Some(exclude)) => Some(Patterns {
                include,
                exclude,
                has_include,
                written: list.to_vec(),
            }),
            (true, _, _) => {
                c.problem(key, "these globs cannot be combined");
                None
            }
            _ => None,
        }
    }

    fn matches(&self, value: &str) -> bool {
        (!self.has_include || self.include.is_match(value)) && !self.exclude.is_match(value)
    }
}

impl fmt::Display for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written.join(", "))
    }
}

/// `*` stops at `/` and `**` crosses it, as in GitHub Actions filters, so
/// `release/*` matches `release/1.0` but not `release/1.0/hotfix`.
fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern).literal_separator(true).build()
}

impl Route {
    pub fn compile(
        index: usize,
        raw: crate::config::RawRoute,
        sources: &[Source],
        targets: &std::collections::BTreeMap<String, Target>,
        c: &mut Compiler,
    ) -> Option<Route> {
        let key = format!("routes[{index}]");
        let before = c.problem_count();
        if raw.name.trim().is_empty() {
            c.problem(format!("{key}.name"), "must not be empty");
        }
        if let Some(from) = &raw.from {
            for (i, name) in from.iter().enumerate() {
                if !sources.iter().any(|s| &s.name == name) {
                    let known: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                    c.problem(
                        format!("{key}.from[{i}]"),
                        format!("no source is named {name:?} ({})", listing("sources", &known)),
                    );
                }
            }
        }
        if raw.to.is_empty() {
            c.problem(format!("{key}.to"), "names no target");
        }
        for (i, name) in raw.to.iter().enumerate() {
            if !targets.contains_key(name) {
                let known: Vec<&str> = targets.keys().map(String::as_str).collect();
                c.problem(
                    format!("{key}.to[{i}]"),
                    format!("no target is named {name:?} ({})", listing("targets", &known)),
                );
            }
        }
        let events = match &raw.events {
            None => vec![EventKind::Push, EventKind::Tag],
            Some(names) => {
                let mut kinds = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    match EventKind::parse(name).filter(|k| EventKind::ROUTABLE.contains(k)) {
                        Some(kind) => kinds.push(kind),
                        None => c.problem(
                            format!("{key}.events[{i}]"),
                            format!(
                                "{name:?} is not an event relay routes (push, tag, branch_delete, tag_delete, pipeline)"
                            ),
                        ),
                    }
                }
                kinds
            }
        };
        let patterns = |field: &str, list: &Option<Vec<String>>, c: &mut Compiler| {
            list.as_ref()
                .and_then(|l| Patterns::compile(&format!("{key}.{field}"), l, c))
        };
        let repos = patterns("repos", &raw.repos, c);
        let branches = patterns("branches", &raw.branches, c);
        let tags = patterns("tags", &raw.tags, c);
        let paths = patterns("paths", &raw.paths, c);
        let when =
            raw.when
                .as_ref()
                .and_then(|expr| match c.templates.condition(&format!("{key}.when"), expr) {
                    Ok(cond) => Some(cond),
                    Err(e) => {
                        c.problem(e.key, e.message);
                        None
                    }
                });
        if c.problem_count() > before {
            return None;
        }
        Some(Route {
            name: raw.name,
            from: raw.from,
            repos,
            events,
            branches,
            tags,
            paths,
            when,
            to: raw.to,
        })
    }

    /// Whether this route takes the event, or the first predicate that refused it.
    pub fn evaluate(&self, config: &Config, source: &str, event: &Event, ctx: &Value) -> Verdict {
        if let Some(from) = &self.from
            && !from.iter().any(|s| s == source)
        {
            return Verdict::miss("from", format!("source {source} is not in [{}]", from.join(", ")));
        }
        if !self.events.contains(&event.kind) {
            let names: Vec<&str> = self.events.iter().map(|k| k.as_str()).collect();
            return Verdict::miss(
                "events",
                format!("event {} is not in [{}]", event.kind, names.join(", ")),
            );
        }
        if let Some(repos) = &self.repos
            && !repos.matches(&event.repo)
        {
            return Verdict::miss("repos", format!("repo {:?} does not match [{repos}]", event.repo));
        }
        if let Some(verdict) = self.ref_verdict(event) {
            return verdict;
        }
        if let (Some(paths), EventKind::Push) = (&self.paths, event.kind)
            && event.paths_complete
            && !event.paths.iter().any(|p| paths.matches(p))
        {
            return Verdict::miss(
                "paths",
                format!(
                    "none of the {} changed files matches [{paths}]",
                    event.paths.len()
                ),
            );
        }
        if let Some(when) = &self.when {
            match config.templates.test(when, ctx) {
                Ok(true) => {}
                Ok(false) => return Verdict::miss("when", format!("{:?} is false", when.source())),
                Err(e) => {
                    return Verdict::miss("when", format!("{:?} failed: {}", when.source(), e.message));
                }
            }
        }
        Verdict::Match
    }

    /// Branch and tag filters, with GitHub Actions' rule: a route that filters
    /// only branches takes no tag events, and the reverse.
    fn ref_verdict(&self, event: &Event) -> Option<Verdict> {
        let (own, other, value, noun) = if !event.tag.is_empty() {
            (&self.tags, &self.branches, &event.tag, "tag")
        } else if !event.branch.is_empty() {
            (&self.branches, &self.tags, &event.branch, "branch")
        } else {
            return None;
        };
        let field = if noun == "tag" { "tags" } else { "branches" };
        match (own, other) {
            (Some(patterns), _) if !patterns.matches(value) => Some(Verdict::miss(
                field,
                format!("{noun} {value:?} does not match [{patterns}]"),
            )),
            (None, Some(_)) => Some(Verdict::miss(
                field,
                format!(
                    "the route filters only {}, and this is a {noun}",
                    if noun == "tag" { "branches" } else { "tags" }
                ),
            )),
            _ => None,
        }
    }

    /// Whether this route decides on the files a push changed.
    pub fn filters_paths(&self) -> bool {
        self.paths.is_some()
    }

    /// Whether events of `repo` can match this route's `repos` filter.
    pub fn accepts_repo(&self, repo: &str) -> bool {
        self.repos.as_ref().is_none_or(|p| p.matches(repo))
    }

    /// Whether this route takes pipeline events from the named source.
    pub fn takes_pipelines_from(&self, source: &str) -> bool {
        self.events.contains(&EventKind::Pipeline)
            && self.from.as_ref().is_none_or(|f| f.iter().any(|s| s == source))
    }

    /// A one-line description for `relay check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(from) = &self.from {
            parts.push(format!("from {}", from.join(", ")));
        }
        let events: Vec<&str> = self.events.iter().map(|k| k.as_str()).collect();
        parts.push(format!("events {}", events.join(", ")));
        for (label, p) in [
            ("repos", &self.repos),
            ("branches", &self.branches),
            ("tags", &self.tags),
            ("paths", &self.paths),
        ] {
            if let Some(p) = p {
                parts.push(format!("{label} {p}"));
            }
        }
        if let Some(when) = &self.when {
            parts.push(format!("when {:?}", when.source()));
        }
        format!("{} → {}", parts.join("; "), self.to.join(", "))
    }
}

/// "targets: a, b" or "no targets are configured".
fn listing(what: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {what} are configured")
    } else {
        format!("{what}: {}", names.join(", "))
    }
}

/// A route's decision for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Miss { predicate: &'static str, reason: String },
}

impl Verdict {
    fn miss(predicate: &'static str, reason: String) -> Verdict {
        Verdict::Miss { predicate, reason }
    }
}

/// One job to queue: a route's target, with its request rendered.
#[derive(Debug)]
pub struct PlannedJob {
    pub id: Uuid,
    /// Which of the webhook's events it is for.
    pub event_index: usize,
    pub route: String,
    pub target: String,
    /// The request without credentials, or why it cannot be built (the job
    /// is then dead at once, with that reason).
    pub request: Result<PreparedRequest, String>,
    pub limits: JobLimits,
}

/// An event a guard rule kept from routing.
#[derive(Debug)]
pub struct EventDrop {
    pub event_index: usize,
    pub dropped: Dropped,
}

/// Everything routing decided for one webhook.
#[derive(Debug, Default)]
pub struct Plan {
    pub jobs: Vec<PlannedJob>,
    pub dropped: Vec<EventDrop>,
    /// Every route's verdict for every event, for `relay explain`.
    pub trace: Vec<(usize, String, Verdict)>,
}

impl Plan {
    /// The names of the routes that produced jobs, in config order, once each.
    pub fn route_names(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.jobs
            .iter()
            .filter(|j| seen.insert(j.route.as_str()))
            .map(|j| j.route.as_str())
            .collect()
    }

    /// Jobs that are dead on arrival, with the reason.
    pub fn rejected_json(&self) -> serde_json::Value {
        self.jobs
            .iter()
            .filter_map(|j| {
                j.request
                    .as_ref()
                    .err()
                    .map(|reason| json!({ "route": j.route, "target": j.target, "reason": reason }))
            })
            .collect()
    }
}

/// Evaluates every route for every event and renders the requests to queue.
/// `now` dates what rendering needs dated (payload URLs' expiry).
pub fn plan(config: &Config, source: &Source, webhook: &Webhook, events: &[Event], now: SystemTime) -> Plan {
    let mut plan = Plan::default();
    let origin = guard::Origin {
        source: &source.name,
        ignore_pushers: &source.ignore_pushers,
        pipelines_routed: config.routes.iter().any(|r| r.takes_pipelines_from(&source.name)),
        request_hop: webhook.hop,
    };
    for (index, event) in events.iter().enumerate() {
        let hop = guard::hop(&config.loop_guard, &origin, event);
        if let Some(dropped) = guard::screen(&config.loop_guard, &origin, event, hop) {
            plan.dropped.push(EventDrop {
                event_index: index,
                dropped,
            });
            continue;
        }
        let ctx = event.context(webhook, hop);
        // Two routes sending one event to the same target would trigger it
        // twice with the same request; the first route wins.
        let mut targeted: BTreeSet<&str> = BTreeSet::new();
        for route in &config.routes {
            let verdict = route.evaluate(config, &source.name, event, &ctx);
            let matched = verdict == Verdict::Match;
            plan.trace.push((index, route.name.clone(), verdict));
            if !matched {
                continue;
            }
            for target_name in &route.to {
                if !targeted.insert(target_name.as_str()) {
                    continue;
                }
                let Some(target) = config.targets.get(target_name) else {
                    continue;
                };
                let input = RenderInput {
                    config,
                    webhook,
                    event,
                    ctx: &ctx,
                    hop,
                    now,
                };
                let request = target.render(&input).map_err(|e| e.to_string());
                plan.jobs.push(PlannedJob {
                    id: Uuid::now_v7(),
                    event_index: index,
                    route: route.name.clone(),
                    target: target_name.clone(),
                    request,
                    limits: JobLimits::for_trigger(&config.loop_guard, target.burst, event),
                });
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Patterns {
        let mut c = Compiler::default();
        let list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        Patterns::compile("k", &list, &mut c).unwrap()
    }

    #[test]
    fn globs_with_exclusions() {
        let tags = patterns(&["v*", "!v*-rc*"]);
        assert!(tags.matches("v1.2.0"));
        assert!(!tags.matches("v1.2.0-rc1"));
        assert!(!tags.matches("release-1"));
        let only_excl = patterns(&["!dependabot/**"]);
        assert!(only_excl.matches("main"));
        assert!(!only_excl.matches("dependabot/npm/x"));
    }

    #[test]
    fn star_stops_at_slash_and_double_star_crosses_it() {
        let p = patterns(&["release/*"]);
        assert!(p.matches("release/1.0"));
        assert!(!p.matches("release/1.0/hotfix"));
        let p = patterns(&["services/api/**"]);
        assert!(p.matches("services/api/src/main.rs"));
        assert!(!p.matches("services/web/index.ts"));
    }

    /// The commits' file lists are read exactly when something reads
    /// `paths`: a route's filter, a `when`, or a target's template.
    #[test]
    fn files_are_read_only_for_a_config_that_reads_paths() {
        let files = |route: &str, target: &str| {
            let text = format!(
                r#"
[server]
listen = ["127.0.0.1:0"]

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "r"
to = ["ci"]
{route}

[targets.ci]
kind = "circleci"
project = "gh/acme/api"
token = "t"
dry_run = true
{target}
"#
            );
            Config::from_toml(&text).unwrap().files()
        };
        use crate::event::Files;
        assert_eq!(files("", ""), Files::Skip);
        assert_eq!(
            files("branches = [\"main\"]", "parameters = { sha = \"{{ sha }}\" }"),
            Files::Skip
        );
        assert_eq!(files("paths = [\"docs/**\"]", ""), Files::Read);
        assert_eq!(files("when = \"paths | length > 0\"", ""), Files::Read);
        assert_eq!(
            files("", "parameters = { changed = \"{{ paths | join(',') }}\" }"),
            Files::Read
        );
    }

    #[test]
    fn bad_glob_names_the_key() {
        let mut c = Compiler::default();
        assert!(Patterns::compile("routes[0].tags", &["v[".to_owned()], &mut c).is_none());
        assert_eq!(c.problem_count(), 1);
    }
}
