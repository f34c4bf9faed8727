//! The routes indexed by what an event names first: its source, its kind
//! and its repository. For one event, [`RouteIndex::candidates`] gives the
//! positions (config order) of the only routes that can take it; every
//! other route refuses it at `from`, `events` or `repos`, so routing need
//! not ask them. Literal repositories are keys; the globs of every route
//! of a source and kind are one glob set, matched once an event, and a
//! route is a candidate when one of its globs matches (its exclusions are
//! left to the route). A route with no `repos`, or only exclusions, is a
//! candidate for every repository of its sources and kinds.
//!
//! Built once per config, never per event. Knows positions, not routes:
//! it must be built from the very route list it is asked about.

use std::collections::HashMap;

use globset::{Candidate, Glob, GlobSet, GlobSetBuilder};

use super::Route;
use crate::event::EventKind;

/// Positions of routes, for one source (or every source) and one kind.
#[derive(Debug, Default)]
struct Bucket {
    /// Routes whose `repos` names only literal repositories, by repository.
    by_repo: HashMap<String, Vec<usize>>,
    /// Routes whose `repos` has globs: each glob, with its route's position.
    globs: Vec<(Glob, usize)>,
    /// `globs` as one set (built by [`Bucket::seal`]), and the position of
    /// the route of each of its globs.
    glob_set: GlobSet,
    glob_routes: Vec<usize>,
    /// Routes that may take any repository: no `repos`, or only exclusions.
    any_repo: Vec<usize>,
}

/// What a route's `repos` says to the index.
enum RepoKey<'a> {
    Literal(&'a [String]),
    Globs(&'a [Glob]),
    Any,
}

impl Bucket {
    fn add(&mut self, position: usize, repos: &RepoKey<'_>) {
        match repos {
            RepoKey::Literal(repos) => {
                for repo in *repos {
                    let at = self.by_repo.entry(repo.clone()).or_default();
                    // A repository written twice in one route lists it once.
                    if at.last() != Some(&position) {
                        at.push(position);
                    }
                }
            }
            RepoKey::Globs(globs) => self.globs.extend(globs.iter().map(|g| (g.clone(), position))),
            RepoKey::Any => self.any_repo.push(position),
        }
    }

    /// Builds the glob set once every route is in. Each route's globs
    /// compiled into a set of their own; should their union not (a size
    /// limit), the routes are asked for every repository instead.
    fn seal(&mut self) {
        let mut set = GlobSetBuilder::new();
        for (glob, _) in &self.globs {
            set.add(glob.clone());
        }
        match set.build() {
            Ok(built) => {
                self.glob_set = built;
                self.glob_routes = self.globs.iter().map(|(_, at)| *at).collect();
            }
            Err(_) => {
                self.any_repo.extend(self.globs.iter().map(|(_, at)| *at));
                self.any_repo.sort_unstable();
                self.any_repo.dedup();
            }
        }
        self.globs = Vec::new();
    }

    /// Adds this bucket's candidates for `repo` (also as a glob-matching
    /// `candidate`, made once an event) to `into`; `matched` is scratch.
    fn extend_candidates(
        &self,
        repo: &str,
        candidate: &Candidate<'_>,
        matched: &mut Vec<usize>,
        into: &mut Vec<usize>,
    ) {
        into.extend_from_slice(&self.any_repo);
        if let Some(at) = self.by_repo.get(repo) {
            into.extend_from_slice(at);
        }
        if !self.glob_routes.is_empty() {
            self.glob_set.matches_candidate_into(candidate, matched);
            into.extend(matched.iter().map(|&glob| self.glob_routes[glob]));
        }
    }
}

/// The routes of one config, indexed; see the module docs.
#[derive(Debug, Default)]
pub struct RouteIndex {
    /// Routes with `from`, by source, then kind.
    by_source: HashMap<String, HashMap<EventKind, Bucket>>,
    /// Routes without `from` (every source), by kind.
    every_source: HashMap<EventKind, Bucket>,
    /// Sources some route takes pipeline events from.
    pipelines_from: Vec<String>,
    /// A route without `from` takes pipeline events: from every source.
    any_source_pipelines: bool,
}

impl RouteIndex {
    pub fn new(routes: &[Route]) -> RouteIndex {
        let mut index = RouteIndex::default();
        for (position, route) in routes.iter().enumerate() {
            let key = match (route.literal_repos(), route.repo_globs()) {
                (Some(repos), _) => RepoKey::Literal(repos),
                (None, Some(globs)) => RepoKey::Globs(globs),
                (None, None) => RepoKey::Any,
            };
            for &kind in route.event_kinds() {
                match route.sources() {
                    Some(sources) => {
                        let mut seen: Vec<&str> = Vec::new();
                        for source in sources {
                            if seen.contains(&source.as_str()) {
                                continue;
                            }
                            seen.push(source);
                            index
                                .by_source
                                .entry(source.clone())
                                .or_default()
                                .entry(kind)
                                .or_default()
                                .add(position, &key);
                        }
                    }
                    None => index.every_source.entry(kind).or_default().add(position, &key),
                }
            }
            if route.takes_pipelines() {
                match route.sources() {
                    Some(sources) => index.pipelines_from.extend(sources.iter().cloned()),
                    None => index.any_source_pipelines = true,
                }
            }
        }
        let buckets = index.by_source.values_mut().flat_map(HashMap::values_mut);
        for bucket in buckets.chain(index.every_source.values_mut()) {
            bucket.seal();
        }
        index
    }

    /// The positions, in config order, of the routes that may take an event
    /// of `kind` about `repo` from `source`; no route left out could.
    pub fn candidates(&self, source: &str, kind: EventKind, repo: &str) -> Vec<usize> {
        let mut found = Vec::new();
        let candidate = Candidate::new(repo);
        let mut matched = Vec::new();
        let buckets = [
            self.by_source.get(source).and_then(|kinds| kinds.get(&kind)),
            self.every_source.get(&kind),
        ];
        for bucket in buckets.into_iter().flatten() {
            bucket.extend_candidates(repo, &candidate, &mut matched, &mut found);
        }
        // Each list is in config order; merged, they must be again.
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Whether some route takes pipeline events from `source`
    /// (`Route::takes_pipelines_from` over every route).
    pub fn pipelines_routed(&self, source: &str) -> bool {
        self.any_source_pipelines || self.pipelines_from.iter().any(|s| s == source)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::time::{Duration, SystemTime};

    use crate::config::Config;
    use crate::event::{Event, EventKind};
    use crate::routing::{Plan, Trace, Verdict, plan, plan_indexed, plan_with};

    /// A fixed-seed xorshift: the same cases on every run, no dependency.
    struct Cases(u64);

    impl Cases {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[(self.next() % from.len() as u64) as usize]
        }
        fn chance(&mut self, in_four: u64) -> bool {
            self.next() % 4 < in_four
        }
    }

    const REPOS: [&str; 6] = [
        "acme/api",
        "acme/web",
        "acme/api-v2",
        "other/api",
        "acme/API",
        "acme/web-1",
    ];
    const GLOBS: [&str; 8] = [
        "acme/*",
        "acme/web-*",
        "!acme/web",
        "*/api",
        "acme/ap?",
        "acme/{api,web}",
        "acme/**",
        "acme/[aw]*",
    ];
    /// A fixed time: plans are compared, not dated.
    fn fixed_now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    const KINDS: [&str; 5] = ["push", "tag", "branch_delete", "tag_delete", "pipeline"];

    fn list(items: &[&str]) -> String {
        let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// A config of `n` routes drawn from every kind of filter the index
    /// reads (sources, kinds, literal and glob repositories, duplicates)
    /// and some it does not (branches, tags, `when`).
    fn config(cases: &mut Cases, n: usize) -> Config {
        let mut text = String::from(
            r#"
[server]
listen = ["127.0.0.1:0"]

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[sources.gl]
provider = "gitlab"
path = "/hooks/gitlab"
token = "t"
"#,
        );
        for target in ["a", "b", "c"] {
            let _ = write!(
                text,
                "\n[targets.{target}]\nkind = \"circleci\"\nproject = \"gh/acme/{target}\"\ntoken = \"t\"\ndry_run = true\n"
            );
        }
        for i in 0..n {
            let _ = write!(
                text,
                "\n[[routes]]\nname = \"r{i}\"\nto = [{:?}]\n",
                cases.pick(&["a", "b", "c"])
            );
            match cases.next() % 6 {
                0 => text.push_str("from = [\"gh\"]\n"),
                1 => text.push_str("from = [\"gl\"]\n"),
                2 => text.push_str("from = [\"gh\", \"gl\"]\n"),
                3 => text.push_str("from = [\"gh\", \"gh\"]\n"),
                _ => {}
            }
            if cases.chance(2) {
                let mut kinds: Vec<&str> = (0..1 + cases.next() % 3).map(|_| *cases.pick(&KINDS)).collect();
                kinds.dedup();
                let _ = writeln!(text, "events = {}", list(&kinds));
            }
            match cases.next() % 4 {
                0 => {}
                1 => {
                    let repos: Vec<&str> = (0..1 + cases.next() % 3).map(|_| *cases.pick(&REPOS)).collect();
                    let _ = writeln!(text, "repos = {}", list(&repos));
                }
                2 => {
                    let repos = [*cases.pick(&GLOBS), *cases.pick(&REPOS)];
                    let _ = writeln!(text, "repos = {}", list(&repos));
                }
                _ => {
                    let _ = writeln!(text, "repos = {}", list(&[*cases.pick(&GLOBS)]));
                }
            }
            if cases.chance(1) {
                let _ = writeln!(
                    text,
                    "branches = {}",
                    list(&[*cases.pick(&["main", "release/*", "!main"])])
                );
            }
            if cases.chance(1) {
                text.push_str("tags = [\"v*\"]\n");
            }
            if cases.chance(1) {
                let _ = writeln!(
                    text,
                    "when = {:?}",
                    cases.pick(&["pusher != 'bot'", "'[skip]' not in message"])
                );
            }
        }
        Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn event(cases: &mut Cases) -> Event {
        let kind = *cases.pick(&[
            EventKind::Push,
            EventKind::Tag,
            EventKind::BranchDelete,
            EventKind::TagDelete,
            EventKind::Pipeline,
        ]);
        let repos = [&REPOS[..], &["acme/api/", "zzz/x", ""]].concat();
        let mut event = Event {
            kind,
            repo: (*cases.pick(&repos)).to_owned(),
            sha: "2".repeat(40),
            pusher: (*cases.pick(&["ada", "bot"])).to_owned(),
            message: (*cases.pick(&["fix", "[skip] docs"])).to_owned(),
            ..Event::default()
        };
        match kind {
            EventKind::Tag | EventKind::TagDelete => event.tag = (*cases.pick(&["v1", "x1"])).to_owned(),
            _ => event.branch = (*cases.pick(&["main", "release/1", "dev"])).to_owned(),
        }
        event
    }

    /// What two plans must agree on: everything but the jobs' fresh ids
    /// and the trace.
    fn decided(plan: &Plan) -> Vec<String> {
        let mut out: Vec<String> = plan
            .jobs
            .iter()
            .map(|j| {
                format!(
                    "job {} {} {} {:?} {:?} {:?} {}",
                    j.event_index, j.route, j.target, j.request, j.limits, j.report, j.shadow
                )
            })
            .collect();
        out.extend(
            plan.dropped
                .iter()
                .map(|d| format!("drop {} {:?}", d.event_index, d.dropped)),
        );
        out.extend(plan.unreported.iter().map(|u| format!("unreported {u:?}")));
        out.push(format!("hop {}", plan.hop));
        out
    }

    #[test]
    fn the_index_plans_exactly_what_asking_every_route_plans() {
        let mut cases = Cases(0x5eed_2026_0018);
        let now = fixed_now();
        let mut matched = 0;
        for round in 0..150 {
            let n = 1 + (cases.next() % 60) as usize;
            let config = config(&mut cases, n);
            let github = config.source("gh").unwrap();
            let webhook = crate::routing::signed_test_push(github);
            for source in ["gh", "gl"] {
                let source = config.source(source).unwrap();
                assert_eq!(
                    config.route_index.pipelines_routed(&source.name),
                    config.routes.iter().any(|r| r.takes_pipelines_from(&source.name)),
                    "round {round}"
                );
                let events: Vec<Event> = (0..1 + cases.next() % 3).map(|_| event(&mut cases)).collect();
                let every = plan(&config.router(), source, &webhook, &events, &[], now);
                let indexed = plan_indexed(&config.router(), source, &webhook, &events, &[], now);
                assert_eq!(decided(&indexed), decided(&every), "round {round}, {events:?}");
                assert!(indexed.trace.is_empty(), "the accept path keeps no trace");
                let router = config.router();
                let indexed = plan_with(
                    &router,
                    Some((router.index, Trace::Kept)),
                    source,
                    &webhook,
                    &events,
                    &[],
                    now,
                );
                assert_eq!(decided(&indexed), decided(&every), "round {round}, {events:?}");
                matched += every.jobs.len();
                // The routes asked are a subsequence of every route, with
                // the same verdicts; each one left out refused the event at
                // a predicate the index reads.
                let mut asked = indexed.trace.iter().peekable();
                for entry in &every.trace {
                    if asked.peek() == Some(&entry) {
                        asked.next();
                        continue;
                    }
                    match &entry.2 {
                        Verdict::Miss { predicate, .. } => assert!(
                            ["from", "events", "repos"].contains(predicate),
                            "round {round}: {entry:?} left out"
                        ),
                        Verdict::Match => panic!("round {round}: {entry:?} matched but was not asked"),
                    }
                }
                assert!(asked.next().is_none(), "round {round}: asked out of order");
            }
        }
        // The cases must exercise matches, not only refusals.
        assert!(matched > 100, "{matched}");
    }

    #[test]
    fn literal_repositories_are_keyed_and_globs_matched_in_one_set() {
        let text = r#"
[server]
listen = ["127.0.0.1:0"]

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[targets.a]
kind = "circleci"
project = "gh/acme/a"
token = "t"
dry_run = true

[[routes]]
name = "literal"
repos = ["acme/api", "acme/api"]
to = ["a"]

[[routes]]
name = "glob"
repos = ["acme/*"]
to = ["a"]

[[routes]]
name = "tags-only"
events = ["tag"]
to = ["a"]

[[routes]]
name = "other-literal"
from = ["gh"]
repos = ["acme/web"]
to = ["a"]

[[routes]]
name = "anywhere"
to = ["a"]

[[routes]]
name = "except-legacy"
repos = ["acme/*", "!acme/legacy-*"]
to = ["a"]

[[routes]]
name = "all-but-web"
repos = ["!acme/web"]
to = ["a"]
"#;
        let config = Config::from_toml(text).unwrap();
        let index = super::RouteIndex::new(&config.routes);
        assert_eq!(
            index.candidates("gh", EventKind::Push, "acme/api"),
            vec![0, 1, 4, 5, 6]
        );
        // Exclusions are the route's to apply: all-but-web is still asked.
        assert_eq!(
            index.candidates("gh", EventKind::Push, "acme/web"),
            vec![1, 3, 4, 5, 6]
        );
        assert_eq!(
            index.candidates("gh", EventKind::Push, "acme/legacy-x"),
            vec![1, 4, 5, 6]
        );
        assert_eq!(
            index.candidates("gh", EventKind::Tag, "acme/api"),
            vec![0, 1, 2, 4, 5, 6]
        );
        assert_eq!(
            index.candidates("gh", EventKind::Pipeline, "acme/api"),
            Vec::<usize>::new()
        );
        // No glob matches: the glob routes are not asked.
        assert_eq!(index.candidates("gl", EventKind::Push, "zzz/x"), vec![4, 6]);
        // `*` stops at `/`, as the route's own match does.
        assert_eq!(index.candidates("gh", EventKind::Push, "acme/api/x"), vec![4, 6]);
        assert!(!index.pipelines_routed("gh"));
    }
}
