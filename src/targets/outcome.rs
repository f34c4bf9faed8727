//! The closed set of attempt outcomes. Each has a stable code that is stored
//! on the attempt, logged, and used as a metric label; codes never change
//! meaning once released.

use std::time::{Duration, SystemTime};

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The target answered 2xx.
    Delivered,
    /// A dry-run target: the request was logged and recorded, not sent.
    DryRun,
    /// 408, 425 or 5xx: the target failed or asked for a retry.
    RetryStatus,
    /// 429: the target is rate limiting; the retry waits at least the floor.
    RetryThrottled,
    /// The request never left: connection refused or reset, DNS failure.
    RetryConnect,
    /// Sent, then the answer never came (timeout, connection lost): a
    /// pipeline may exist, so retries are capped separately.
    MaybeDelivered,
    /// Another 4xx (or a redirect): the target refused the request.
    DeadStatus,
    /// The request cannot be sent (no credential, body gone).
    DeadRequest,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Delivered,
        Outcome::DryRun,
        Outcome::RetryStatus,
        Outcome::RetryThrottled,
        Outcome::RetryConnect,
        Outcome::MaybeDelivered,
        Outcome::DeadStatus,
        Outcome::DeadRequest,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::DryRun => "dry_run",
            Outcome::RetryStatus => "retry_status",
            Outcome::RetryThrottled => "retry_throttled",
            Outcome::RetryConnect => "retry_connect",
            Outcome::MaybeDelivered => "maybe_delivered",
            Outcome::DeadStatus => "dead_status",
            Outcome::DeadRequest => "dead_request",
        }
    }

    /// The outcome an HTTP status means.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Delivered,
            429 => Outcome::RetryThrottled,
            408 | 425 | 500..=599 => Outcome::RetryStatus,
            _ => Outcome::DeadStatus,
        }
    }

    /// Whether a retry must wait at least the throttle floor: the target
    /// said "slow down", or did not answer in time.
    pub fn throttled(self) -> bool {
        matches!(self, Outcome::RetryThrottled | Outcome::MaybeDelivered)
    }
}

/// A transport failure, classified by whether the request may have arrived.
/// `proxy` is the proxy the request went through, shown without credentials.
pub fn of_transport_error(
    error: &reqwest::Error,
    timeout: Duration,
    proxy: Option<&str>,
) -> (Outcome, String) {
    let detail = transport_detail(error);
    let via = proxy.map(|p| format!(" via proxy {p}")).unwrap_or_default();
    if error.is_connect() {
        // Refused, reset during connect, DNS, TLS handshake: nothing was sent.
        (Outcome::RetryConnect, format!("connection failed{via}: {detail}"))
    } else if error.is_timeout() {
        (
            Outcome::MaybeDelivered,
            format!("no answer within {}s after sending{via}", timeout.as_secs_f64()),
        )
    } else {
        (
            Outcome::MaybeDelivered,
            format!("connection lost after sending{via}: {detail}"),
        )
    }
}

/// The error chain, without the URL (which may carry a token).
pub fn transport_detail(error: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        parts.push(inner.to_string());
        source = inner.source();
    }
    if parts.is_empty() {
        "transport error".to_owned()
    } else {
        parts.join(": ")
    }
}

/// `Retry-After` in seconds or as an HTTP date; a date in the past is now.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    httpdate::parse_http_date(value)
        .ok()
        .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(Outcome::of_status(201), Outcome::Delivered);
        assert_eq!(Outcome::of_status(429), Outcome::RetryThrottled);
        for s in [408, 425, 500, 502, 503, 599] {
            assert_eq!(Outcome::of_status(s), Outcome::RetryStatus, "{s}");
        }
        for s in [301, 400, 401, 403, 404, 409, 422] {
            assert_eq!(Outcome::of_status(s), Outcome::DeadStatus, "{s}");
        }
    }

    #[test]
    fn codes_are_unique() {
        let mut codes: Vec<&str> = Outcome::ALL.iter().map(|o| o.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Outcome::ALL.len());
    }

    #[test]
    fn retry_after_in_both_forms() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 10:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
