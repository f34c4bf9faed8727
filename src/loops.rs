//! The static trigger graph `relay check` draws: which repositories each
//! route sends to which targets, which repository each target builds, and
//! the cycles this makes possible (route A triggers B's repository, whose
//! pipeline's outcome routes back to A).
//!
//! What comes back from a triggered pipeline is its outcome, a `pipeline`
//! event, so an edge runs from a target back only to the routes that take
//! pipeline events of the repository it builds; an `http` target that posts
//! to relay itself hands the webhook back whole, so it leads to every route.
//! A push route that triggers CI is not a cycle.
//!
//! A warning, not an error: a cycle can be intended (pipelines chained with
//! `when` on the status) and the loop guard bounds it at run time. Pure:
//! reads the config, nothing else.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::config::Config;
use crate::targets::Target;

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
            let target = config.targets.get(target_name);
            if target.is_some_and(|t| posts_to_relay(config, t)) {
                let _ = writeln!(text, "  {} → {target_name} posts to relay itself", route.name);
                for j in 0..routes.len() {
                    edges.push(Edge {
                        from: i,
                        to: j,
                        target: target_name.clone(),
                        repo: "relay itself".to_owned(),
                    });
                }
                continue;
            }
            let built = target.and_then(|t| t.built_repo());
            let shown = built.as_deref().unwrap_or("(not known statically)");
            let _ = writeln!(text, "  {} → {target_name} builds {shown}", route.name);
            let Some(repo) = built else { continue };
            for (j, next) in routes.iter().enumerate() {
                if next.takes_pipelines() && next.accepts_repo(&repo) {
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

/// Whether a target's requests come back to relay: an `http` target whose
/// URL is relay's own `server.public_url` or one of its `server.listen`
/// addresses (or `localhost` on a listened port).
fn posts_to_relay(config: &Config, target: &Target) -> bool {
    let Some(url) = target.http_url() else {
        return false;
    };
    let Some(authority) = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
    else {
        return false;
    };
    if let Some(public) = &config.server.public_url
        && public
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
            == Some(authority)
    {
        return true;
    }
    config.server.listen.iter().any(|addr| {
        let port = addr.port();
        authority == addr.to_string()
            || authority == format!("localhost:{port}")
            || (addr.ip().is_unspecified() && authority.ends_with(&format!(":{port}")))
    })
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
    fn a_route_that_takes_its_own_pipelines_is_a_cycle_and_a_push_route_is_not() {
        let c = config(&format!(
            r#"{SOURCES}
[[routes]]
name = "pushes"
to = ["t"]

[[routes]]
name = "chain"
events = ["pipeline"]
repos = ["acme/x"]
to = ["t"]

[targets.t]
kind = "gitlab"
project = "acme/x"
dry_run = true

[[routes]]
name = "numeric"
repos = ["acme/y"]
events = ["pipeline"]
to = ["n"]

[targets.n]
kind = "gitlab"
project = "1234"
dry_run = true
"#
        ));
        let (text, cycles) = report(&c);
        // acme/x's pipeline comes back as a pipeline event: `chain` takes
        // it, `pushes` does not; numeric's target is not known statically.
        assert_eq!(cycles, vec![vec!["chain".to_owned()]], "{text}");
    }

    #[test]
    fn an_http_target_posting_to_relay_itself_leads_back_to_every_route() {
        let c = config(&format!(
            r#"{SOURCES}
[server]
listen = ["127.0.0.1:8080"]

[[routes]]
name = "forward"
to = ["self", "elsewhere"]

[targets.self]
kind = "http"
url = "http://127.0.0.1:8080/gl"
dry_run = true

[targets.elsewhere]
kind = "http"
url = "http://127.0.0.1:9999/hook"
dry_run = true
"#
        ));
        let (text, cycles) = report(&c);
        assert!(text.contains("forward → self posts to relay itself"), "{text}");
        assert!(
            text.contains("forward → elsewhere builds (not known statically)"),
            "{text}"
        );
        assert_eq!(cycles, vec![vec!["forward".to_owned()]], "{text}");
    }

    #[test]
    fn the_sample_config_has_no_cycle() {
        let sample = Config::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/relay.toml"
        )));
        let Ok(sample) = sample else {
            // Its targets read credentials from the environment only when
            // not dry_run; the sample is all dry_run, so it always loads.
            panic!("the sample relay.toml does not load: {}", sample.unwrap_err());
        };
        let (text, cycles) = report(&sample);
        assert!(cycles.is_empty(), "{text}");
    }
}
