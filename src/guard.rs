//! The loop guard: rules that keep an event (or one of its triggers) from
//! going out, each with a stable name that the logs, the ingress answer, the
//! store and the `relay_dropped_total{rule}` metric carry.
//!
//! The rules here are pure decisions over an event, its source and the
//! config; the two that need memory of earlier triggers (dedupe window,
//! burst breaker) are applied by the store inside the ingest transaction.
//! Nothing here stores, sends or logs.

use crate::config::Config;
use crate::event::{Event, EventKind, Webhook};
use crate::ingress::Source;

/// Markers in a head commit message that ask CI (and relay) to stay quiet.
pub const SKIP_MARKERS: [&str; 4] = ["[skip ci]", "[ci skip]", "[no ci]", "[skip relay]"];

/// Rule names, stable: they appear in answers, logs, the store and metrics.
pub const RULE_CI_OUTCOME: &str = "ci_outcome";
pub const RULE_HOP_LIMIT: &str = "hop_limit";
pub const RULE_SKIP_MARKER: &str = "skip_marker";
pub const RULE_IGNORED_PUSHER: &str = "ignored_pusher";
pub const RULE_DEDUPE: &str = "dedupe";
pub const RULE_BURST: &str = "burst";

pub const RULES: [&str; 6] = [
    RULE_CI_OUTCOME,
    RULE_HOP_LIMIT,
    RULE_SKIP_MARKER,
    RULE_IGNORED_PUSHER,
    RULE_DEDUPE,
    RULE_BURST,
];

/// How many relay hops led to this event: the `X-Relay-Hop` header on the
/// request, or the hop variable a relay-triggered pipeline carries back in
/// its pipeline event, whichever is higher.
pub fn hop(config: &Config, webhook: &Webhook, event: &Event) -> u32 {
    let from_pipeline = event
        .pipeline
        .as_ref()
        .and_then(|p| p.variables.get(&config.loop_guard.hop_variable))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    webhook.hop.max(from_pipeline)
}

/// Why this event must not be routed at all, if it must not: `(rule, reason)`.
pub fn screen(config: &Config, source: &Source, event: &Event, hop: u32) -> Option<(&'static str, String)> {
    let max_hops = config.loop_guard.max_hops;
    if hop >= max_hops {
        return Some((
            RULE_HOP_LIMIT,
            format!("the event is {hop} relay hops deep; loop_guard.max_hops is {max_hops}"),
        ));
    }
    if event.kind == EventKind::Pipeline
        && !config.routes.iter().any(|r| r.takes_pipelines_from(&source.name))
    {
        return Some((
            RULE_CI_OUTCOME,
            "CI outcomes are routed only by routes with events = [\"pipeline\"], and none takes this source's"
                .to_owned(),
        ));
    }
    if matches!(event.kind, EventKind::Push | EventKind::Tag) {
        let message = event.message.to_ascii_lowercase();
        if let Some(marker) = SKIP_MARKERS.iter().find(|m| message.contains(*m)) {
            return Some((
                RULE_SKIP_MARKER,
                format!("the head commit message contains {marker}"),
            ));
        }
    }
    if !event.pusher.is_empty() && source.ignore_pushers.iter().any(|p| p == &event.pusher) {
        return Some((
            RULE_IGNORED_PUSHER,
            format!(
                "pusher {:?} is in sources.{}.ignore_pushers",
                event.pusher, source.name
            ),
        ));
    }
    None
}
