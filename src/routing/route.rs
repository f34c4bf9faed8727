//! One `[[routes]]` entry: compiled once (globs with `!` exclusions, events,
//! `when`), then asked per event whether it takes it, with the first
//! predicate that refused it. Pure: reads the event and the compiled
//! templates; never renders a request, stores, sends or logs.

use std::fmt;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::config::compiler::Compiler;
use crate::config::raw::{RawReport, RawRoute};
use crate::event::{Event, EventKind};
use crate::report::{DEFAULT_CONTEXT, ReportContext};
use crate::template::{Condition, Context, Templates};

/// The sources and targets the config declares, whether or not they
/// compiled: a route that names one with problems of its own is not also
/// told that it does not exist.
#[derive(Debug, Default)]
pub struct Declared {
    pub sources: Vec<String>,
    pub targets: Vec<String>,
    /// The sources with an `api`, which can post commit statuses.
    pub reporting: Vec<String>,
}

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
    /// Post each non-shadow target's pipeline state on the pushed commit,
    /// under this context.
    pub report: Option<ReportContext>,
}

/// Globs with `!` exclusions: a value matches when some include matches (or
/// there are only exclusions) and no exclusion does.
#[derive(Debug)]
struct Patterns {
    include: GlobSet,
    exclude: GlobSet,
    written: Vec<String>,
    /// The patterns when all are literal (no glob character, no
    /// exclusion): they then match exactly these strings, compared as
    /// strings at a fraction of a glob set's cost, which routing pays for
    /// every route it asks (a branch filter is most often `main`).
    exact: Option<Vec<String>>,
    /// The include globs, each as compiled into `include` (none: only
    /// exclusions): the route index matches every glob route's in one set.
    includes: Vec<Glob>,
}

impl Patterns {
    fn compile(key: &str, list: &[String], c: &mut Compiler) -> Option<Patterns> {
        if list.is_empty() {
            c.problem(key, "is empty; leave it out to match everything");
            return None;
        }
        let mut include = GlobSetBuilder::new();
        let mut exclude = GlobSetBuilder::new();
        let mut includes = Vec::new();
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
                    includes.push(g.clone());
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
            (true, Some(include), Some(exclude)) => {
                let literal =
                    |p: &String| !p.is_empty() && !p.contains(['*', '?', '[', ']', '{', '}', '\\', '!']);
                Some(Patterns {
                    include,
                    exclude,
                    written: list.to_vec(),
                    exact: list.iter().all(literal).then(|| list.to_vec()),
                    includes,
                })
            }
            (true, _, _) => {
                c.problem(key, "these globs cannot be combined");
                None
            }
            _ => None,
        }
    }

    fn matches(&self, value: &str) -> bool {
        if let Some(exact) = &self.exact {
            return exact.iter().any(|literal| literal == value);
        }
        (self.includes.is_empty() || self.include.is_match(value)) && !self.exclude.is_match(value)
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

/// `report`: the context template, and sources that can post statuses.
fn compile_report(key: &str, raw: &RawRoute, declared: &Declared, c: &mut Compiler) -> Option<ReportContext> {
    let source = match raw.report.as_ref()? {
        RawReport::Switch(false) => return None,
        RawReport::Switch(true) => DEFAULT_CONTEXT,
        RawReport::Context(text) => text.as_str(),
    };
    let key = format!("{key}.report");
    let Some(from) = &raw.from else {
        c.problem(
            &key,
            "needs from = [...]: statuses are posted through each source's api, so name the sources",
        );
        return None;
    };
    for name in from {
        if declared.sources.contains(name) && !declared.reporting.contains(name) {
            c.problem(
                &key,
                format!("sources.{name} has no api = {{ token = … }} to post commit statuses with"),
            );
        }
    }
    match ReportContext::new(source) {
        Ok(context) => Some(context),
        Err(why) => {
            c.problem(key, why);
            None
        }
    }
}

impl Route {
    pub fn compile(index: usize, raw: RawRoute, declared: &Declared, c: &mut Compiler) -> Option<Route> {
        let key = format!("routes[{index}]");
        let before = c.problem_count();
        if raw.name.trim().is_empty() {
            c.problem(format!("{key}.name"), "must not be empty");
        }
        if let Some(from) = &raw.from {
            for (i, name) in from.iter().enumerate() {
                if !declared.sources.iter().any(|s| s == name) {
                    let known: Vec<&str> = declared.sources.iter().map(String::as_str).collect();
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
            if !declared.targets.iter().any(|t| t == name) {
                let known: Vec<&str> = declared.targets.iter().map(String::as_str).collect();
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
        let report = compile_report(&key, &raw, declared, c);
        if c.problem_count() > before {
            return None;
        }
        Some(Route {
            report,
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

    /// Whether this route takes the event, or the first predicate that
    /// refused it and why, in words (`relay explain`).
    pub fn evaluate(&self, templates: &Templates, source: &str, event: &Event, ctx: &Context<'_>) -> Verdict {
        self.judge(templates, source, event, ctx, Reasons::Written)
    }

    /// Whether this route takes the event: [`Route::evaluate`]'s decision
    /// without the words, which the accept path never reads and which cost
    /// an allocation and a formatting for every route asked.
    pub fn takes(&self, templates: &Templates, source: &str, event: &Event, ctx: &Context<'_>) -> bool {
        self.judge(templates, source, event, ctx, Reasons::Skipped) == Verdict::Match
    }

    fn judge(
        &self,
        templates: &Templates,
        source: &str,
        event: &Event,
        ctx: &Context<'_>,
        reasons: Reasons,
    ) -> Verdict {
        if let Some(from) = &self.from
            && !from.iter().any(|s| s == source)
        {
            return reasons.miss("from", || {
                format!("source {source} is not in [{}]", from.join(", "))
            });
        }
        if !self.events.contains(&event.kind) {
            return reasons.miss("events", || {
                let names: Vec<&str> = self.events.iter().map(|k| k.as_str()).collect();
                format!("event {} is not in [{}]", event.kind, names.join(", "))
            });
        }
        if let Some(repos) = &self.repos
            && !repos.matches(&event.repo)
        {
            return reasons.miss("repos", || {
                format!("repo {:?} does not match [{repos}]", event.repo)
            });
        }
        if let Some(verdict) = self.ref_verdict(event, reasons) {
            return verdict;
        }
        if let (Some(paths), EventKind::Push) = (&self.paths, event.kind)
            && event.paths_complete
            && !event.paths.iter().any(|p| paths.matches(p))
        {
            return reasons.miss("paths", || {
                format!(
                    "none of the {} changed files matches [{paths}]",
                    event.paths.len()
                )
            });
        }
        if let Some(when) = &self.when {
            match templates.test(when, ctx) {
                Ok(true) => {}
                Ok(false) => return reasons.miss("when", || format!("{:?} is false", when.source())),
                Err(e) => {
                    return reasons.miss("when", || format!("{:?} failed: {}", when.source(), e.message));
                }
            }
        }
        Verdict::Match
    }

    /// Branch and tag filters, with GitHub Actions' rule: a route that filters
    /// only branches takes no tag events, and the reverse.
    fn ref_verdict(&self, event: &Event, reasons: Reasons) -> Option<Verdict> {
        let (own, other, value, noun) = if !event.tag.is_empty() {
            (&self.tags, &self.branches, &event.tag, "tag")
        } else if !event.branch.is_empty() {
            (&self.branches, &self.tags, &event.branch, "branch")
        } else {
            return None;
        };
        let field = if noun == "tag" { "tags" } else { "branches" };
        match (own, other) {
            (Some(patterns), _) if !patterns.matches(value) => {
                Some(reasons.miss(field, || format!("{noun} {value:?} does not match [{patterns}]")))
            }
            (None, Some(_)) => Some(reasons.miss(field, || {
                format!(
                    "the route filters only {}, and this is a {noun}",
                    if noun == "tag" { "branches" } else { "tags" }
                )
            })),
            _ => None,
        }
    }

    /// The sources named in `from`; `None` is every source.
    pub(super) fn sources(&self) -> Option<&[String]> {
        self.from.as_deref()
    }

    /// The event kinds the route takes.
    pub(super) fn event_kinds(&self) -> &[EventKind] {
        &self.events
    }

    /// The repositories `repos` names, when it names only literal ones (it
    /// then matches exactly those); `None` for a glob, an exclusion, or no
    /// `repos` at all.
    pub(super) fn literal_repos(&self) -> Option<&[String]> {
        self.repos.as_ref().and_then(|p| p.exact.as_deref())
    }

    /// The globs of `repos` one of which a repository must match for the
    /// route to take its events (its exclusions aside); `None` when any
    /// repository may: no `repos`, or only exclusions.
    pub(super) fn repo_globs(&self) -> Option<&[Glob]> {
        self.repos
            .as_ref()
            .filter(|p| !p.includes.is_empty())
            .map(|p| p.includes.as_slice())
    }

    /// Whether this route decides on the files a push changed.
    pub fn filters_paths(&self) -> bool {
        self.paths.is_some()
    }

    /// Whether events of `repo` can match this route's `repos` filter.
    pub fn accepts_repo(&self, repo: &str) -> bool {
        self.repos.as_ref().is_none_or(|p| p.matches(repo))
    }

    /// Whether this route takes pipeline events at all.
    pub fn takes_pipelines(&self) -> bool {
        self.events.contains(&EventKind::Pipeline)
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
        let report = if self.report.is_some() {
            " (reported on the commit)"
        } else {
            ""
        };
        format!("{} → {}{report}", parts.join("; "), self.to.join(", "))
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

/// Whether a refusal says why in words: for `relay explain`, not for the
/// accept path, which asks only whether a route takes the event.
#[derive(Debug, Clone, Copy)]
enum Reasons {
    Written,
    Skipped,
}

impl Reasons {
    fn miss(self, predicate: &'static str, reason: impl FnOnce() -> String) -> Verdict {
        let reason = match self {
            Reasons::Written => reason(),
            Reasons::Skipped => String::new(),
        };
        Verdict::Miss { predicate, reason }
    }
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
    fn literal_patterns_compare_strings_and_agree_with_their_globs() {
        let literal = patterns(&["main", "release-1.0", "acme/api", "Main"]);
        assert!(literal.exact.is_some(), "all literal: compared as strings");
        for pattern in [&["main", "release/*"][..], &["!main"][..], &["ma?n"][..]] {
            assert!(
                patterns(pattern).exact.is_none(),
                "{pattern:?} is matched as globs"
            );
        }
        for value in [
            "main",
            "Main",
            "MAIN",
            "mai",
            "main2",
            "release-1.0",
            "release-1x0",
            "acme/api",
            "acme/api/x",
            "",
        ] {
            let by_glob = (literal.includes.is_empty() || literal.include.is_match(value))
                && !literal.exclude.is_match(value);
            assert_eq!(literal.matches(value), by_glob, "{value:?}");
        }
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

    #[test]
    fn bad_glob_names_the_key() {
        let mut c = Compiler::default();
        assert!(Patterns::compile("routes[0].tags", &["v[".to_owned()], &mut c).is_none());
        let problems = c.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "routes[0].tags[0]");
        assert!(
            problems[0].message.starts_with("\"v[\" is not a valid glob"),
            "{}",
            problems[0].message
        );
    }
}
