//! Prometheus metrics, through `prometheus-client`: the one place metric
//! names and labels are defined.
//!
//! Labels hold only closed sets or names from the config (source, target,
//! rule, outcome code, status): never a secret, a URL or free text.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::dispatch::Outcome;
use crate::guard;

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
struct ResultLabel {
    result: String,
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
        }
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
