//! The static trigger graph `relay check` draws: which repositories each
//! route sends to which targets, which repository each target builds, and
//! the cycles this makes possible (route A triggers B's repository, whose
//! events route back to A).
//!
//! A warning, not an error: a cycle can be intended (pipelines chained with
//! `when` on the status) and the loop guard bounds it at run time. Pure:
//! reads the config, nothing else.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::config::Config;

/// One edge: a route's trigger of a target that builds `repo`, which
/// `next` takes events of.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: usize,
    to: usize,
    target: String,
    repo: String,
}

/// The graph's text for `relay check`, and its cycles (route names each).
pub fn report(config: &Config) -> (String, Vec<Vec<String>>) {
    let routes = &config.routes;
    let mut text = String::new();
    let mut edges = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        for target_name in &route.to {
            let built = config.targets.get(target_name).and_then(|t| t.built_repo());
            let shown = built.as_deref().unwrap_or("(not known statically)");
            let _ = writeln!(text, "  {} → {target_name} builds {shown}", route.name);
            let Some(repo) = built else { continue };
            for (j, next) in routes.iter().enumerate() {
                if next.accepts_repo(&repo) {
                    edges.push(Edge {
                        from: i,
                        to: j,
                        target: target_name.clone(),
                        repo: repo.clone(),
                    });
                }
            }
        }
    }
    edges.sort();
    edges.dedup();
    let cycles: Vec<Vec<String>> = strongly_connected(routes.len(), &edges)
        .into_iter()
        .filter(|c| c.len() > 1 || edges.iter().any(|e| e.from == c[0] && e.to == c[0]))
        .map(|c| c.into_iter().map(|i| routes[i].name.clone()).collect())
        .collect();
    for (i, cycle) in cycles.iter().enumerate() {
        let via: BTreeSet<String> = edges
            .iter()
            .filter(|e| cycle.contains(&routes[e.from].name) && cycle.contains(&routes[e.to].name))
            .map(|e| format!("{} → {} ({})", routes[e.from].name, e.target, e.repo))
            .collect();
        let _ = writeln!(
            text,
            "  cycle {}: routes {} can trigger each other through {}",
            i + 1,
            cycle.join(", "),
            via.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    (text, cycles)
}

/// Tarjan's algorithm: the strongly connected components of the route
/// graph, each sorted, in a stable order.
fn strongly_connected(nodes: usize, edges: &[Edge]) -> Vec<Vec<usize>> {
    struct State<'a> {
        edges: &'a [Edge],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State<'_>, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        let successors: Vec<usize> = s.edges.iter().filter(|e| e.from == v).map(|e| e.to).collect();
        for w in successors {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            component.sort_unstable();
            s.out.push(component);
        }
    }
    let mut s = State {
        edges,
        index: vec![None; nodes],
        low: vec![0; nodes],
        on_stack: vec![false; nodes],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..nodes {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    const SOURCES: &str = r#"
[sources.gl]
provider = "gitlab"
path = "/gl"
token = "t"
"#;

    #[test]
    fn a_to_b_to_a_is_a_cycle_naming_both_routes() {
        let c = config(&format!(
            r#"{SOURCES}
[[routes]]
name = "a-to-b"
repos = ["acme/a"]
events = ["pipeline"]
to = ["b"]

[[routes]]
name = "b-to-a"
repos = ["acme/b"]
events = ["pipeline"]
to = ["a"]

[[routes]]
name = "c-only"
repos = ["acme/c"]
to = ["web"]

[targets.a]
kind = "gitlab"
project = "acme/a"
dry_run = true

[targets.b]
kind = "circleci"
project = "gh/acme/b"
dry_run = true

[targets.web]
kind = "http"
url = "http://x"
dry_run = true
"#
        ));
        let (text, cycles) = report(&c);
        assert_eq!(cycles, vec![vec!["a-to-b".to_owned(), "b-to-a".to_owned()]]);
        assert!(text.contains("a-to-b → b builds acme/b"), "{text}");
        assert!(
            text.contains("c-only → web builds (not known statically)"),
            "{text}"
        );
        assert!(
            text.contains("cycle 1: routes a-to-b, b-to-a can trigger each other through a-to-b → b (acme/b), b-to-a → a (acme/a)"),
            "{text}"
        );
    }

    #[test]
    fn a_route_that_triggers_its_own_repository_is_a_cycle() {
        let c = config(&format!(
            r#"{SOURCES}
[[routes]]
name = "self"
to = ["t"]

[targets.t]
kind = "gitlab"
project = "acme/x"
dry_run = true

[[routes]]
name = "numeric"
repos = ["acme/y"]
to = ["n"]

[targets.n]
kind = "gitlab"
project = "1234"
dry_run = true
"#
        ));
        let (_, cycles) = report(&c);
        // `self` takes every repo, so it takes acme/x's events and numeric's target is unknown.
        assert_eq!(cycles, vec![vec!["self".to_owned()]]);
    }
}
