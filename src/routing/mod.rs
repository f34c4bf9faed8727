//! Routing: the routes compiled once from `[[routes]]`, evaluated for each
//! event of a verified webhook into the jobs to queue, each with its
//! target's request rendered. The accept path asks only the routes the
//! config's `RouteIndex` names for the event; `relay explain` asks them all.
//!
//! Evaluation is pure: it reads the event and the compiled config and
//! renders each target's request, but never stores, sends or logs. Every
//! route yields a [`Verdict`] naming the first predicate that failed, which
//! `relay explain` prints and the accept path logs. The loop guard's
//! stateless rules screen each event first.

mod context;
mod index;
mod route;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;

pub use context::context;
pub use index::RouteIndex;
pub use route::{Declared, Route, Verdict};

use crate::event::{Event, Upstream};
use crate::guard::{self, Dropped, JobLimits, LoopGuard};
use crate::ingress::{Source, Webhook};
use crate::payload::PayloadUrls;
use crate::report::{ReportSpec, status_target};
use crate::request::PreparedRequest;
use crate::targets::{RenderInput, Target};
use crate::template::{Context, Templates};

/// What routing reads of the config: the routes, the targets they name, the
/// templates both compiled into, the loop guard, and payload URL settings.
#[derive(Debug, Clone, Copy)]
pub struct Router<'a> {
    pub routes: &'a [Route],
    pub targets: &'a BTreeMap<String, Target>,
    /// The status posters, by name (`status:<source>`): a route reports
    /// through its source's.
    pub reporters: &'a BTreeMap<String, Target>,
    pub templates: &'a Templates,
    pub loop_guard: &'a LoopGuard,
    pub payload_urls: Option<&'a PayloadUrls>,
    /// `routes` indexed, built with them (`Config::route_index`).
    pub index: &'a RouteIndex,
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
    /// is then dead at once, with that reason). Shared, not copied, with
    /// the job stored and the send that follows.
    pub request: Result<Arc<PreparedRequest>, String>,
    pub limits: JobLimits,
    /// Set for a route with `report` and a target that is not a shadow:
    /// where its pipeline's states are posted.
    pub report: Option<ReportSpec>,
    /// The target is a shadow: compared, never reported.
    pub shadow: bool,
}

/// A trigger whose pipeline a route would report, but cannot: why.
#[derive(Debug)]
pub struct Unreported {
    pub route: String,
    pub target: String,
    pub reason: String,
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
    /// The most relay hops that led to any of the webhook's events (at
    /// least the request's own): stored with the event, so a pipeline it
    /// triggers is known to be one hop further (`Queue::correlate`).
    pub hop: u32,
    /// Reports a route asked for that cannot be posted (a repository or sha
    /// that is not a Git host's).
    pub unreported: Vec<Unreported>,
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
    pub fn rejected(&self) -> Vec<Rejected<'_>> {
        self.jobs
            .iter()
            .filter_map(|j| {
                j.request.as_ref().err().map(|reason| Rejected {
                    reason,
                    route: &j.route,
                    target: &j.target,
                })
            })
            .collect()
    }
}

/// A job dead on arrival, as the webhook's answer lists it (fields in the
/// order the answer has always had them: by name).
#[derive(Debug, Serialize)]
pub struct Rejected<'a> {
    pub reason: &'a str,
    pub route: &'a str,
    pub target: &'a str,
}

/// Evaluates every route for every event and renders the requests to queue;
/// `trace` holds every route's verdict on every event (`relay explain`).
/// `upstreams[i]`, when present, is what started the pipeline `events[i]`
/// reports (see `Queue::correlate`). `now` dates what rendering needs dated
/// (payload URLs' expiry).
pub fn plan(
    router: &Router<'_>,
    source: &Source,
    webhook: &Webhook,
    events: &[Event],
    upstreams: &[Option<Upstream>],
    now: SystemTime,
) -> Plan {
    plan_with(router, None, source, webhook, events, upstreams, now)
}

/// [`plan`], asking only the routes `router.index` says may take each
/// event (the accept path's: its cost follows the routes that name the
/// event's source, kind and repository, not every route). Jobs, drops, hops
/// and unreported reports are exactly `plan`'s, in the same order; `trace`
/// is left empty (only `relay explain` reads it), so a route that refuses an
/// event is not asked to say why.
pub fn plan_indexed(
    router: &Router<'_>,
    source: &Source,
    webhook: &Webhook,
    events: &[Event],
    upstreams: &[Option<Upstream>],
    now: SystemTime,
) -> Plan {
    plan_with(
        router,
        Some((router.index, Trace::Skipped)),
        source,
        webhook,
        events,
        upstreams,
        now,
    )
}

/// Whether a plan keeps every asked route's verdict in words (`Plan::trace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trace {
    Kept,
    Skipped,
}

/// Plans with every route asked and the trace kept (`by_index` `None`), or
/// with only the routes the index names, the trace kept or not.
fn plan_with(
    router: &Router<'_>,
    by_index: Option<(&RouteIndex, Trace)>,
    source: &Source,
    webhook: &Webhook,
    events: &[Event],
    upstreams: &[Option<Upstream>],
    now: SystemTime,
) -> Plan {
    let mut plan = Plan {
        hop: webhook.hop(),
        ..Plan::default()
    };
    let trace = by_index.map_or(Trace::Kept, |(_, trace)| trace);
    let pipelines_routed = match by_index {
        Some((routes, _)) => routes.pipelines_routed(&source.name),
        None => router.routes.iter().any(|r| r.takes_pipelines_from(&source.name)),
    };
    let origin = guard::Origin {
        source: &source.name,
        ignore_pushers: &source.ignore_pushers,
        pipelines_routed,
        request_hop: webhook.hop(),
    };
    for (index, event) in events.iter().enumerate() {
        let upstream = upstreams.get(index).and_then(Option::as_ref);
        let hop = guard::hop(router.loop_guard, &origin, event, upstream);
        plan.hop = plan.hop.max(hop);
        if let Some(dropped) = guard::screen(router.loop_guard, &origin, event, hop) {
            plan.dropped.push(EventDrop {
                event_index: index,
                dropped,
            });
            continue;
        }
        let build = || context(event, webhook, hop, upstream);
        let ctx = Context::lazy(&build);
        // Two routes sending one event to the same target would trigger it
        // twice with the same request; the first route wins.
        let mut targeted: BTreeSet<&str> = BTreeSet::new();
        let asked: Vec<usize> = match by_index {
            Some((routes, _)) => routes.candidates(&source.name, event.kind, &event.repo),
            None => (0..router.routes.len()).collect(),
        };
        for route in asked.iter().filter_map(|&at| router.routes.get(at)) {
            let matched = match trace {
                Trace::Kept => {
                    let verdict = route.evaluate(router.templates, &source.name, event, &ctx);
                    let matched = verdict == Verdict::Match;
                    plan.trace.push((index, route.name.clone(), verdict));
                    matched
                }
                Trace::Skipped => route.takes(router.templates, &source.name, event, &ctx),
            };
            if !matched {
                continue;
            }
            for target_name in &route.to {
                if !targeted.insert(target_name.as_str()) {
                    continue;
                }
                let Some(target) = router.targets.get(target_name) else {
                    continue;
                };
                let input = RenderInput {
                    templates: router.templates,
                    payload_urls: router.payload_urls,
                    hop_variable: &router.loop_guard.hop_variable,
                    webhook,
                    event,
                    ctx: &ctx,
                    hop,
                    now,
                };
                let request = target.render(&input).map(Arc::new).map_err(|e| e.to_string());
                let report = match report_spec(router, route, target, &source.name, event, now) {
                    Ok(report) => report,
                    Err(reason) => {
                        plan.unreported.push(Unreported {
                            route: route.name.clone(),
                            target: target_name.clone(),
                            reason,
                        });
                        None
                    }
                };
                plan.jobs.push(PlannedJob {
                    report,
                    shadow: target.shadow,
                    id: Uuid::now_v7(),
                    event_index: index,
                    route: route.name.clone(),
                    target: target_name.clone(),
                    request,
                    limits: JobLimits::for_trigger(router.loop_guard, target.burst, event),
                });
            }
        }
    }
    plan
}

/// Where `target`'s pipeline is reported, for a route with `report` and a
/// target that is not a shadow, through the source's status poster.
fn report_spec(
    router: &Router<'_>,
    route: &Route,
    target: &Target,
    source: &str,
    event: &Event,
    now: SystemTime,
) -> Result<Option<ReportSpec>, String> {
    let Some(context) = route.report.as_ref() else {
        return Ok(None);
    };
    if target.shadow || !router.reporters.contains_key(&status_target(source)) {
        return Ok(None);
    }
    ReportSpec::new(
        source,
        &event.repo,
        &event.sha,
        context.render(&route.name, &target.name),
        &target.name,
        target.pipeline_label(),
        now,
    )
    .map(|spec| Some(spec.with_link(&event.repo_url)))
}

/// A push to acme/api's `main`, signed with the secret `s` for `source`:
/// the webhook the routing tests plan.
#[cfg(test)]
pub(crate) fn signed_test_push(source: &crate::ingress::Source) -> Webhook {
    let body: &'static [u8] = br#"{"ref":"refs/heads/main","repository":{"full_name":"acme/api"}}"#;
    let tag = crate::signature::sign(crate::signature::Algorithm::Sha256, b"s", &[body]);
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json".to_owned()),
        ("x-github-event", "push".to_owned()),
        ("x-github-delivery", "d-1".to_owned()),
        ("x-hub-signature-256", format!("sha256={}", hex::encode(tag))),
    ] {
        headers.insert(name, value.parse().unwrap());
    }
    let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    source
        .receive(&headers, bytes::Bytes::from_static(body), now)
        .unwrap()
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::event::Files;

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
}
