//! The loop guard: rules that keep an event (or one of its triggers) from
//! going out, each with a stable name that the logs, the ingress answer, the
//! store and the `relay_dropped_total{rule}` metric carry.
//!
//! Every rule is decided here: the stateless ones over an event and its
//! source, and, for the two that need memory of earlier triggers (the burst
//! breaker, then the dedupe window), their order, keys and wording. A store
//! answers only the two questions those need (how many recent triggers,
//! whether a key was free) inside its ingest transaction. Nothing here
//! stores, sends or logs.

use std::time::Duration;

use serde::Serialize;

use crate::event::{Event, EventKind, Upstream};

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

/// `[loop_guard]`, compiled.
#[derive(Debug, Clone)]
pub struct LoopGuard {
    pub dedupe_window: Duration,
    pub max_hops: u32,
    pub hop_variable: String,
    /// The default for targets that set no `burst` of their own.
    pub burst: BurstSetting,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub limit: u32,
    pub per: Duration,
}

/// The burst breaker for a target: off, or at most `limit` per `per`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BurstSetting {
    Off,
    Limit(Burst),
}

/// Where an event comes from, as the stateless rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The configured source name (`[sources.NAME]`).
    pub source: &'a str,
    /// Pushes by these users are not routed.
    pub ignore_pushers: &'a [String],
    /// Whether some route takes this source's pipeline events.
    pub pipelines_routed: bool,
    /// Relay hops recorded on the request (`X-Relay-Hop`).
    pub request_hop: u32,
}

/// How many relay hops led to this event: the `X-Relay-Hop` header on the
/// request, the hop variable a relay-triggered pipeline carries back in its
/// pipeline event, or one more than the event whose trigger started the
/// pipeline (`upstream`, for CIs that carry no variables back), whichever is
/// highest.
pub fn hop(guard: &LoopGuard, origin: &Origin<'_>, event: &Event, upstream: Option<&Upstream>) -> u32 {
    let from_pipeline = event
        .pipeline
        .as_ref()
        .and_then(|p| p.variables.get(&guard.hop_variable))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let from_upstream = upstream.map_or(0, |u| u.hop.saturating_add(1));
    origin.request_hop.max(from_pipeline).max(from_upstream)
}

/// Why this event must not be routed at all, if it must not.
pub fn screen(guard: &LoopGuard, origin: &Origin<'_>, event: &Event, hop: u32) -> Option<Dropped> {
    let drop = |rule: &str, reason: String| {
        Some(Dropped {
            route: None,
            target: None,
            rule: rule.to_owned(),
            reason,
        })
    };
    let max_hops = guard.max_hops;
    if hop >= max_hops {
        return drop(
            RULE_HOP_LIMIT,
            format!("the event is {hop} relay hops deep; loop_guard.max_hops is {max_hops}"),
        );
    }
    if event.kind == EventKind::Pipeline && !origin.pipelines_routed {
        return drop(
            RULE_CI_OUTCOME,
            "CI outcomes are routed only by routes with events = [\"pipeline\"], and none takes this source's"
                .to_owned(),
        );
    }
    if matches!(event.kind, EventKind::Push | EventKind::Tag) {
        let message = event.message.to_ascii_lowercase();
        if let Some(marker) = SKIP_MARKERS.iter().find(|m| message.contains(*m)) {
            return drop(
                RULE_SKIP_MARKER,
                format!("the head commit message contains {marker}"),
            );
        }
    }
    if !event.pusher.is_empty() && origin.ignore_pushers.iter().any(|p| p == &event.pusher) {
        return drop(
            RULE_IGNORED_PUSHER,
            format!(
                "pusher {:?} is in sources.{}.ignore_pushers",
                event.pusher, origin.source
            ),
        );
    }
    None
}

/// Something the loop guard held back, and why. Stored with the event,
/// answered to the sender and counted by rule. Its fields are declared in
/// the order the answer has always listed them (by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub reason: String,
    pub route: Option<String>,
    /// The rule's stable name (`RULE_*`).
    pub rule: String,
    pub target: Option<String>,
}

/// The rules a store applies to one job when committing it, because they
/// need its memory of earlier triggers (across restarts and relays).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobLimits {
    /// `(key, window)`: a job with the same target and key (repo, ref, sha)
    /// queued within the window is held back.
    pub dedupe: Option<(String, Duration)>,
    /// At most `limit` jobs for the target per `per`; the excess is held back.
    pub burst: Option<(u32, Duration)>,
}

impl JobLimits {
    /// The limits for a trigger of a target whose own `burst` is `target_burst`.
    pub fn for_trigger(guard: &LoopGuard, target_burst: Option<BurstSetting>, event: &Event) -> JobLimits {
        let dedupe = (!guard.dedupe_window.is_zero() && !event.sha.is_empty()).then(|| {
            (
                format!("{}\n{}\n{}", event.repo, event.git_ref, event.sha),
                guard.dedupe_window,
            )
        });
        let burst = match target_burst.unwrap_or(guard.burst) {
            BurstSetting::Off => None,
            BurstSetting::Limit(b) => Some((b.limit, b.per)),
        };
        JobLimits { dedupe, burst }
    }

    /// The questions a store must answer for this job, in the order it asks
    /// them: the burst breaker first, so a job it holds back leaves no dedupe
    /// key behind (it never went out).
    pub fn checks(&self) -> impl Iterator<Item = Check<'_>> {
        let burst = self.burst.map(|(limit, per)| Check::Burst { limit, per });
        let dedupe = self
            .dedupe
            .as_ref()
            .map(|(key, window)| Check::Dedupe { key, window: *window });
        burst.into_iter().chain(dedupe)
    }
}

/// One question a store answers while committing a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check<'a> {
    /// How many jobs of the target were created in the last `per`? The
    /// store may stop counting at `limit`: the answer is only "reached or not".
    Burst { limit: u32, per: Duration },
    /// Take `key` for the target until `window` from now, unless someone
    /// holds it unexpired: was it free?
    Dedupe { key: &'a str, window: Duration },
}

/// The job a check is about, for the drop's wording.
#[derive(Debug, Clone, Copy)]
pub struct Trigger<'a> {
    pub route: &'a str,
    pub target: &'a str,
}

impl Trigger<'_> {
    /// The burst breaker's verdict, given how many `recent` triggers the store counted.
    pub fn burst(&self, recent: i64, limit: u32, per: Duration) -> Option<Dropped> {
        (recent >= i64::from(limit)).then(|| {
            self.dropped(
                RULE_BURST,
                format!(
                    "target {} already has {recent} triggers in the last {}; the burst limit is {limit}",
                    self.target,
                    humantime::format_duration(per)
                ),
            )
        })
    }

    /// The dedupe window's verdict, given whether the store could take the key.
    pub fn dedupe(&self, key_was_free: bool, window: Duration) -> Option<Dropped> {
        (!key_was_free).then(|| {
            self.dropped(
                RULE_DEDUPE,
                format!(
                    "target {} was already triggered for this repo, ref and sha within loop_guard.dedupe_window ({})",
                    self.target,
                    humantime::format_duration(window)
                ),
            )
        })
    }

    fn dropped(&self, rule: &str, reason: String) -> Dropped {
        Dropped {
            route: Some(self.route.to_owned()),
            target: Some(self.target.to_owned()),
            rule: rule.to_owned(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_is_asked_before_the_dedupe_window() {
        let limits = JobLimits {
            dedupe: Some(("k".to_owned(), Duration::from_secs(600))),
            burst: Some((30, Duration::from_secs(60))),
        };
        let checks: Vec<Check<'_>> = limits.checks().collect();
        assert_eq!(
            checks,
            vec![
                Check::Burst {
                    limit: 30,
                    per: Duration::from_secs(60)
                },
                Check::Dedupe {
                    key: "k",
                    window: Duration::from_secs(600)
                },
            ]
        );
        assert_eq!(JobLimits::default().checks().count(), 0);
    }

    #[test]
    fn verdicts_name_the_rule_and_the_target() {
        let trigger = Trigger {
            route: "r",
            target: "ci",
        };
        assert_eq!(trigger.burst(29, 30, Duration::from_secs(60)), None);
        let held = trigger.burst(30, 30, Duration::from_secs(60)).unwrap();
        assert_eq!(held.rule, RULE_BURST);
        assert_eq!(
            held.reason,
            "target ci already has 30 triggers in the last 1m; the burst limit is 30"
        );
        assert_eq!(trigger.dedupe(true, Duration::from_secs(600)), None);
        let held = trigger.dedupe(false, Duration::from_secs(600)).unwrap();
        assert_eq!(
            (held.rule.as_str(), held.route.as_deref()),
            (RULE_DEDUPE, Some("r"))
        );
    }
}
