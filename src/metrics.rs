//! Prometheus metrics, through `prometheus-client`: the one place metric
//! names and labels are defined.
//!
//! Labels hold only closed sets or names from the config (source, target,
//! rule, outcome code, status): never a secret, a URL or free text.

use prometheus_client::encoding::EncodeLabelSet;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::guard;
use crate::store::QueueStats;
use crate::targets::Outcome;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    source: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    source: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    target: String,
    state: String,
}

/// 10 s to about 45 h, doubling: how long CI pipelines take.
fn pipeline_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10.0, 2.0, 15))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    target: String,
    outcome: String,
}

/// Every metric relay exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dropped: Family<RuleLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    reloads: Family<ResultLabel, Counter>,
    events: Family<EventLabels, Counter>,
    jobs: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    oldest_due_age: Gauge<f64, AtomicU64>,
    send_latency: HistogramFamily<TargetLabel>,
    commit_latency: Histogram,
    pipelines_finished: Family<PipelineLabels, Counter>,
    pipeline_duration: HistogramFamily<TargetLabel>,
    polls: Family<AttemptLabels, Counter>,
    shadow_verdicts: Family<VerdictLabels, Counter>,
    connections_closed: Family<ListenerReason, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReason {
    listener: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    route: String,
    verdict: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("relay");
        let dropped = Family::<RuleLabel, Counter>::default();
        registry.register(
            "dropped",
            "Events or triggers the loop guard kept back, by rule",
            dropped.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "ingress_requests",
            "Webhook requests answered, by source and status",
            requests.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "attempts",
            "Attempts to send a trigger, by target and outcome code",
            attempts.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP), by result: applied or refused",
            reloads.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register("events", "Events accepted, by source and kind", events.clone());
        let jobs = Family::<StateLabel, Gauge>::default();
        registry.register("jobs", "Jobs in the store, by state", jobs.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting to be sent or being sent",
            queue_depth.clone(),
        );
        let oldest_due_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "oldest_due_job_age",
            "How long the longest-waiting due job has waited",
            Unit::Seconds,
            oldest_due_age.clone(),
        );
        let send_latency: HistogramFamily<TargetLabel> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "send_duration",
            "How long one attempt to send a trigger took, by target",
            Unit::Seconds,
            send_latency.clone(),
        );
        let commit_latency = latency_histogram();
        registry.register_with_unit(
            "store_commit_duration",
            "How long committing a webhook took, as its sender waited",
            Unit::Seconds,
            commit_latency.clone(),
        );
        let pipelines_finished = Family::<PipelineLabels, Counter>::default();
        registry.register(
            "pipelines_finished",
            "Pipelines relay triggered that reached a final state, by target and state",
            pipelines_finished.clone(),
        );
        let pipeline_duration: HistogramFamily<TargetLabel> =
            Family::new_with_constructor(pipeline_histogram);
        registry.register_with_unit(
            "pipeline_duration",
            "From a trigger's job to its pipeline's final state, by target",
            Unit::Seconds,
            pipeline_duration.clone(),
        );
        let polls = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "pipeline_polls",
            "Polls of followed pipelines, by target and outcome: state (the CI said), retry (no answer to go by), refused",
            polls.clone(),
        );
        let shadow_verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "shadow_verdicts",
            "Shadow runs whose every target ended, by route and verdict: agree, shadow_failed, shadow_passed",
            shadow_verdicts.clone(),
        );
        let connections_closed = Family::<ListenerReason, Counter>::default();
        registry.register(
            "connections_turned_away",
            "Connections closed at the door, by listener and reason: per_ip (its address held server.max_connections_per_ip), shed (the least-sent at server.max_connections, to make room)",
            connections_closed.clone(),
        );
        // Every rule appears from the start, at 0, so a rate() has a baseline.
        for rule in guard::RULES {
            let _ = dropped.get_or_create(&RuleLabel {
                rule: rule.to_owned(),
            });
        }
        Metrics {
            registry,
            dropped,
            requests,
            attempts,
            reloads,
            events,
            jobs,
            queue_depth,
            oldest_due_age,
            send_latency,
            commit_latency,
            pipelines_finished,
            pipeline_duration,
            polls,
            shadow_verdicts,
            connections_closed,
        }
    }

    /// A connection on `listener` was closed at the door, for `reason`.
    pub fn turned_away(&self, listener: &str, reason: &str) {
        self.connections_closed
            .get_or_create(&ListenerReason {
                listener: listener.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A shadow run of `route` came to `verdict`.
    pub fn shadow_verdict(&self, route: &str, verdict: &str) {
        self.shadow_verdicts
            .get_or_create(&VerdictLabels {
                route: route.to_owned(),
                verdict: verdict.to_owned(),
            })
            .inc();
    }

    /// A poll of a pipeline a trigger of `target` started, by what it said.
    pub fn poll(&self, target: &str, outcome: &str) {
        self.polls
            .get_or_create(&AttemptLabels {
                target: target.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A pipeline a trigger of `target` started ended in `state`, `took`
    /// after the trigger's job was created.
    pub fn pipeline_finished(&self, target: &str, state: &str, took: Duration) {
        self.pipelines_finished
            .get_or_create(&PipelineLabels {
                target: target.to_owned(),
                state: state.to_owned(),
            })
            .inc();
        self.pipeline_duration
            .get_or_create(&TargetLabel {
                target: target.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn event(&self, source: &str, kind: &str) {
        self.events
            .get_or_create(&EventLabels {
                source: source.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn send_took(&self, target: &str, took: Duration) {
        self.send_latency
            .get_or_create(&TargetLabel {
                target: target.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn commit_took(&self, took: Duration) {
        self.commit_latency.observe(took.as_secs_f64());
    }

    /// The queue gauges, read from the store when scraped.
    pub fn queue(&self, stats: &QueueStats, oldest_age: Duration) {
        let mut pending = 0;
        for (state, n) in &stats.jobs {
            let n = i64::try_from(*n).unwrap_or(i64::MAX);
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n);
            if matches!(
                state,
                crate::store::JobState::Queued | crate::store::JobState::InFlight
            ) {
                pending += n;
            }
        }
        self.queue_depth.set(pending);
        self.oldest_due_age.set(oldest_age.as_secs_f64());
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn dropped(&self, rule: &str) {
        self.dropped
            .get_or_create(&RuleLabel {
                rule: rule.to_owned(),
            })
            .inc();
    }

    pub fn request(&self, source: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                source: source.to_owned(),
                status,
            })
            .inc();
    }

    pub fn attempt(&self, target: &str, outcome: Outcome) {
        self.attempts
            .get_or_create(&AttemptLabels {
                target: target.to_owned(),
                outcome: outcome.code().to_owned(),
            })
            .inc();
    }

    /// The exposition text (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
