//! The route sets of the routes curve: N `[[routes]]` of the kinds a busy
//! organisation writes (literal repositories, globs on repo and branch,
//! `when` expressions, other sources and event kinds), of which most do not
//! take the load's push (acme/api, main, pushed by ada) and a few do.
//!
//! Deterministic: the same N gives the same config, so two builds are
//! measured on the same routes. Never names anything but loopback.

use std::net::SocketAddr;

/// How many routes of a set take the load's push: three (one for a set of
/// fewer), all to the one CircleCI target, so each webhook still makes one
/// job (relay triggers a target once per event, for the first route that
/// names it) and the curve shows what routing costs, not what more jobs do.
pub fn matching(n: usize) -> usize {
    n.min(3)
}

/// `[[routes]]` for a set of `n`, and the sources and targets they name
/// beyond the GitHub source and the CircleCI target every config has.
pub fn config(n: usize, mock: SocketAddr) -> (String, String) {
    let takers = taker_positions(n);
    let mut routes = String::new();
    for i in 0..n {
        let route = match takers.iter().position(|&t| t == i) {
            Some(which) => taker(i, which),
            None => other(i),
        };
        routes.push_str(&route);
    }
    let extra = format!(
        r#"
[sources.gitlab]
provider = "gitlab"
path = "/hooks/gitlab"
token = "bench-gitlab-token"

[targets.gitlab-deploy]
kind = "gitlab"
base_url = "http://{mock}"
project = "acme/deploy"
token = "bench-gitlab-trigger"
variables = {{ UPSTREAM_SHA = "{{{{ sha }}}}" }}
"#
    );
    (routes, extra)
}

/// Where the routes that take the push sit: first, middle and last, so an
/// evaluation that stopped early, or looked only at the start, would show.
fn taker_positions(n: usize) -> Vec<usize> {
    let mut at = vec![0, n / 2, n.saturating_sub(1)];
    at.dedup();
    at.truncate(matching(n));
    at
}

fn taker(i: usize, which: usize) -> String {
    let filters = match which {
        0 => {
            r#"from = ["github"]
repos = ["acme/api"]
branches = ["main", "release/*"]
when = "'[skip ci]' not in message""#
        }
        1 => {
            r#"repos = ["acme/*", "!acme/legacy-*"]
events = ["push"]
when = "pusher != 'release-bot'""#
        }
        _ => r#"branches = ["!dependabot/**"]"#,
    };
    format!("[[routes]]\nname = \"r{i:04}-takes\"\n{filters}\nto = [\"circleci\"]\n\n")
}

/// A route the push does not take. Of every 20: 11 name another repository
/// of the same source, 2 a repository of another source, 1 pipelines of
/// another source, 2 tags and 1 branch deletions of another repository, 1 a
/// glob of repositories the push is not in, 1 acme/api's release branches,
/// and 1 a glob the push is in with a `when` that is false for it.
fn other(i: usize) -> String {
    let (to, filters) = match i % 20 {
        0..=10 => (
            "circleci",
            format!("from = [\"github\"]\nrepos = [\"acme/svc-{i:04}\"]\nbranches = [\"main\", \"release/*\"]"),
        ),
        11 => (
            "circleci",
            format!("repos = [\"acme/team{i}-*\"]\nwhen = \"'[deploy]' in message\""),
        ),
        12 | 13 => (
            "gitlab-deploy",
            format!("from = [\"gitlab\"]\nrepos = [\"platform/svc-{i:04}\"]"),
        ),
        14 => (
            "gitlab-deploy",
            format!("from = [\"gitlab\"]\nrepos = [\"platform/svc-{i:04}\"]\nevents = [\"pipeline\"]\nwhen = \"status == 'failed'\""),
        ),
        15 | 16 => (
            "circleci",
            format!("repos = [\"acme/svc-{i:04}\"]\nevents = [\"tag\"]\ntags = [\"v*\", \"!v*-rc*\"]"),
        ),
        17 => (
            "circleci",
            "repos = [\"acme/api\"]\nbranches = [\"release/*\", \"hotfix/**\"]".to_owned(),
        ),
        18 => (
            "circleci",
            "repos = [\"acme/*\"]\nbranches = [\"main\"]\nwhen = \"'[deploy]' in message and pusher != 'ada'\""
                .to_owned(),
        ),
        _ => (
            "gitlab-deploy",
            format!("repos = [\"acme/svc-{i:04}\"]\nevents = [\"branch_delete\"]"),
        ),
    };
    format!("[[routes]]\nname = \"r{i:04}\"\n{filters}\nto = [\"{to}\"]\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_has_n_routes_and_the_takers_are_spread() {
        let mock: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for n in [1, 2, 10, 100, 1000] {
            let (routes, _) = config(n, mock);
            assert_eq!(routes.matches("[[routes]]").count(), n);
            assert_eq!(routes.matches("-takes\"").count(), matching(n));
        }
        assert_eq!(taker_positions(1000), vec![0, 500, 999]);
        assert_eq!(taker_positions(2), vec![0, 1]);
    }

    #[test]
    fn every_set_is_a_config_relay_loads() {
        let mock: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for n in [1, 10, 100, 1000] {
            let (routes, extra) = config(n, mock);
            let setup = crate::relay::Setup {
                routes: Some(routes),
                extra,
                ..crate::relay::Setup::default()
            };
            let text = crate::relay::relay_config(1, "sqlite://x.db", mock, &setup);
            let loaded = relay::config::Config::from_toml(&text);
            assert_eq!(loaded.map(|c| c.routes.len()).map_err(|e| e.to_string()), Ok(n));
        }
    }
}
