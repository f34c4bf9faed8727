//! What the config in force makes of one webhook, said for a person: each
//! event's verdict from every route (the first predicate that failed), the
//! loop guard's drops, and the request each matched target would receive,
//! its credential's place marked `[redacted]`.
//!
//! `relay explain FILE` asks it of a payload on disk, the admin API and the
//! status page of a stored delivery. Pure, like routing, whose `plan` it
//! reads: it never stores, sends, logs, or asks the store which pipeline an
//! event reports on (that would record the pipeline's state).

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::Config;
use crate::guard::Dropped;
use crate::ingress::{Kept, Parsed, Source, Webhook};
use crate::routing::{self, Verdict};
use crate::store::StoredEvent;
use crate::targets::ProxySetting;

/// Every event of one webhook, explained.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// A ping: relay answers it and stores nothing.
    pub ping: bool,
    /// Whether the config has any route at all.
    pub routes_configured: bool,
    pub events: Vec<ExplainedEvent>,
}

/// One event, as routing sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainedEvent {
    pub kind: String,
    pub repo: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    /// Why the loop guard kept the event from every route.
    pub dropped: Vec<Dropped>,
    /// Every route's verdict, in config order.
    pub routes: Vec<RouteVerdict>,
}

/// One route's verdict on one event.
#[derive(Debug, Clone, Serialize)]
pub struct RouteVerdict {
    pub route: String,
    pub matched: bool,
    /// The first predicate that failed (`branches`, `when`, …), on a miss.
    pub predicate: Option<String>,
    pub reason: Option<String>,
    /// The jobs the route makes, when it matched.
    pub jobs: Vec<ExplainedJob>,
}

/// The job a matched route makes for one target.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainedJob {
    pub target: String,
    /// Logged, not sent.
    pub dry_run: bool,
    /// The proxy the config names for the target, masked.
    pub proxy: Option<String>,
    /// The request, as text, the credential's place marked `[redacted]`.
    pub request: Option<String>,
    /// Why no request can be built: the job would be dead at once.
    pub error: Option<String>,
}

/// Explains `parsed`, the events of `webhook` from `source`, under `config`,
/// as if relay had started no pipeline an event reports on.
pub fn explain(
    config: &Config,
    source: &Source,
    webhook: &Webhook,
    parsed: &Parsed,
    now: SystemTime,
) -> Explanation {
    let events = match parsed {
        Parsed::Ping => {
            return Explanation {
                ping: true,
                routes_configured: !config.routes.is_empty(),
                events: Vec::new(),
            };
        }
        Parsed::Events(events) => events,
    };
    let plan = routing::plan(&config.router(), source, webhook, events, &[], now);
    let explained = events
        .iter()
        .enumerate()
        .map(|(index, event)| ExplainedEvent {
            kind: event.kind.to_string(),
            repo: event.repo.clone(),
            git_ref: event.git_ref.clone(),
            sha: event.sha.clone(),
            dropped: plan
                .dropped
                .iter()
                .filter(|d| d.event_index == index)
                .map(|d| d.dropped.clone())
                .collect(),
            routes: plan
                .trace
                .iter()
                .filter(|(i, _, _)| *i == index)
                .map(|(_, route, verdict)| match verdict {
                    Verdict::Match => RouteVerdict {
                        route: route.clone(),
                        matched: true,
                        predicate: None,
                        reason: None,
                        jobs: plan
                            .jobs
                            .iter()
                            .filter(|j| j.event_index == index && &j.route == route)
                            .map(|job| {
                                let target = config.targets.get(&job.target);
                                ExplainedJob {
                                    target: job.target.clone(),
                                    dry_run: target.is_some_and(|t| t.dry_run),
                                    // A proxy the config names; the environment's is
                                    // left out, as it may not be the service's.
                                    proxy: target
                                        .filter(|t| !matches!(t.proxy, ProxySetting::Environment))
                                        .and_then(|t| t.proxy.describe()),
                                    request: job
                                        .request
                                        .as_ref()
                                        .ok()
                                        .map(|r| r.redacted(Some(webhook.payload()))),
                                    error: job.request.as_ref().err().cloned(),
                                }
                            })
                            .collect(),
                    },
                    Verdict::Miss { predicate, reason } => RouteVerdict {
                        route: route.clone(),
                        matched: false,
                        predicate: Some((*predicate).to_owned()),
                        reason: Some(reason.clone()),
                        jobs: Vec::new(),
                    },
                })
                .collect(),
        })
        .collect();
    Explanation {
        ping: false,
        routes_configured: !config.routes.is_empty(),
        events: explained,
    }
}

/// Why a stored delivery cannot be explained under the config in force.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("event {event} came from source {source_name:?}, which the config in force no longer has")]
    SourceGone { event: String, source_name: String },
    #[error("source {source_name:?} cannot read event {event}'s body under the config in force: {reason}")]
    Unreadable {
        event: String,
        source_name: String,
        reason: String,
    },
}

/// A delivery relay stored, built again for the config in force: its
/// source, the webhook (under a new id; with the sender's delivery id only
/// when `keep_delivery`, since a replay must not pass for a redelivery),
/// and its events as that source parses them now.
pub fn restore<'c>(
    config: &'c Config,
    stored: &StoredEvent,
    keep_delivery: bool,
) -> Result<(&'c Source, Webhook, Parsed), ExplainError> {
    let view = &stored.view;
    let source = config
        .source(&view.source)
        .ok_or_else(|| ExplainError::SourceGone {
            event: view.id.clone(),
            source_name: view.source.clone(),
        })?;
    let webhook = source.restore(Kept {
        hook: view.hook.clone(),
        delivery: view.delivery.clone().filter(|_| keep_delivery),
        content_type: stored.content_type.clone(),
        body: stored.body.clone(),
        payload: stored.payload.clone(),
        hop: stored.hop,
    });
    let parsed = source
        .parse(&webhook, config.files())
        .map_err(|e| ExplainError::Unreadable {
            event: view.id.clone(),
            source_name: view.source.clone(),
            reason: e.to_string(),
        })?;
    Ok((source, webhook, parsed))
}

/// Explains a delivery relay stored, under `config` (the config in force,
/// not the one it arrived under).
pub fn stored(config: &Config, stored: &StoredEvent, now: SystemTime) -> Result<Explanation, ExplainError> {
    let (source, webhook, parsed) = restore(config, stored, true)?;
    Ok(explain(config, source, &webhook, &parsed, now))
}

impl Explanation {
    /// The explanation as `relay explain` prints it.
    pub fn text(&self) -> String {
        if self.ping {
            return "ping: relay answers 200 {\"pong\":true} and stores nothing\n".to_owned();
        }
        let or = |text: &str, none: &'static str| {
            if text.is_empty() {
                none.to_owned()
            } else {
                text.to_owned()
            }
        };
        let mut out = String::new();
        for (index, event) in self.events.iter().enumerate() {
            let _ = writeln!(
                out,
                "event {} of {}: {} {} {} {}",
                index + 1,
                self.events.len(),
                event.kind,
                or(&event.repo, "(no repo)"),
                or(&event.git_ref, "(no ref)"),
                or(&event.sha, "(no sha)"),
            );
            for dropped in &event.dropped {
                let _ = writeln!(out, "  not routed ({}): {}", dropped.rule, dropped.reason);
            }
            for route in &event.routes {
                if !route.matched {
                    let _ = writeln!(
                        out,
                        "  route {}: no — {}: {}",
                        route.route,
                        route.predicate.as_deref().unwrap_or_default(),
                        route.reason.as_deref().unwrap_or_default()
                    );
                    continue;
                }
                let _ = writeln!(out, "  route {}: matched", route.route);
                for job in &route.jobs {
                    let _ = writeln!(
                        out,
                        "    → target {}{}{}",
                        job.target,
                        if job.dry_run {
                            " (dry run: logged, not sent)"
                        } else {
                            ""
                        },
                        job.proxy.as_ref().map(|p| format!(" ({p})")).unwrap_or_default()
                    );
                    if let Some(request) = &job.request {
                        for line in request.lines() {
                            let _ = writeln!(out, "      {line}");
                        }
                    }
                    if let Some(reason) = &job.error {
                        let _ = writeln!(out, "      dead at once: {reason}");
                    }
                }
            }
        }
        if !self.routes_configured {
            out.push_str("no routes are configured\n");
        }
        out
    }
}
