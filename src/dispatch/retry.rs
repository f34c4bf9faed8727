//! When to try again: one pure policy, so its bounds can be tested exactly.
//!
//! Exponential from `backoff.first` by `backoff.factor`, capped at
//! `backoff.max`. Jitter only ever adds (a retry never comes early), a
//! `Retry-After` can only push a retry later, and 429s and timeouts wait at
//! least `throttle_floor`; nothing waits beyond `backoff.max`.

use std::time::{Duration, SystemTime};

use crate::config::{Backoff, Delivery};
use crate::store::NextState;
use crate::targets::{AttemptResult, Outcome};

/// At most this fraction of the delay is added as jitter.
pub const JITTER_SPAN: f64 = 0.2;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    backoff: Backoff,
    attempts: u32,
    maybe_delivered_retries: u32,
    throttle_floor: Duration,
}

impl RetryPolicy {
    pub fn new(delivery: &Delivery) -> RetryPolicy {
        RetryPolicy {
            backoff: delivery.backoff,
            attempts: delivery.attempts,
            maybe_delivered_retries: delivery.maybe_delivered_retries,
            throttle_floor: delivery.throttle_floor,
        }
    }

    /// The wait before the next attempt, after `attempt` attempts (1-based)
    /// have failed with `outcome`. `jitter` is a number in `[0, 1)`.
    pub fn next_delay(
        &self,
        attempt: u32,
        outcome: Outcome,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Duration {
        let max = self.backoff.max;
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self
            .backoff
            .first
            .mul_f64(self.backoff.factor.powi(exponent).min(1e9))
            .min(max);
        let mut delay = base + base.mul_f64(JITTER_SPAN * jitter.clamp(0.0, 1.0));
        if outcome.throttled() {
            delay = delay.max(self.throttle_floor);
        }
        if let Some(asked) = retry_after {
            delay = delay.max(asked);
        }
        delay.min(max)
    }

    /// Where a job goes after `result`. `attempts_before` and `maybe_before`
    /// count the job's earlier attempts.
    pub fn decide(
        &self,
        attempts_before: u32,
        maybe_before: u32,
        result: &AttemptResult,
        jitter: f64,
        now: SystemTime,
    ) -> NextState {
        let made = attempts_before + 1;
        let (outcome, message) = (result.outcome, result.message.as_str());
        match outcome {
            Outcome::Delivered | Outcome::DryRun => NextState::Done,
            Outcome::DeadStatus | Outcome::DeadRequest => NextState::Dead {
                reason: message.to_owned(),
            },
            Outcome::MaybeDelivered if maybe_before + 1 > self.maybe_delivered_retries => NextState::Dead {
                reason: format!(
                    "{message}; the target may have started a pipeline, and {} such attempt(s) is the limit (delivery.maybe_delivered_retries) — check the target before retrying by hand",
                    maybe_before + 1
                ),
            },
            _ if made >= self.attempts => NextState::Dead {
                reason: format!("gave up after {made} attempts (delivery.attempts); last: {message}"),
            },
            _ => NextState::Retry {
                due_at: now + self.next_delay(made, outcome, result.retry_after, jitter),
                maybe_delivered: outcome == Outcome::MaybeDelivered,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff {
                first: Duration::from_secs(2),
                max: Duration::from_secs(1800),
                factor: 2.0,
            },
            attempts: 12,
            maybe_delivered_retries: 1,
            throttle_floor: Duration::from_secs(30),
        }
    }

    #[test]
    fn exponential_without_jitter() {
        let p = policy();
        let delays: Vec<u64> = (1..=5)
            .map(|a| p.next_delay(a, Outcome::RetryStatus, None, 0.0).as_secs())
            .collect();
        assert_eq!(delays, vec![2, 4, 8, 16, 32]);
    }

    #[test]
    fn jitter_only_delays_and_stays_within_its_span() {
        let p = policy();
        for attempt in 1..=8 {
            let base = p.next_delay(attempt, Outcome::RetryConnect, None, 0.0);
            for j in [0.0, 0.1, 0.5, 0.999_999] {
                let d = p.next_delay(attempt, Outcome::RetryConnect, None, j);
                assert!(d >= base, "attempt {attempt} jitter {j}: {d:?} < {base:?}");
                assert!(d <= base.mul_f64(1.0 + JITTER_SPAN), "{d:?}");
            }
        }
    }

    #[test]
    fn capped_at_max_even_with_jitter_and_huge_attempts() {
        let p = policy();
        assert_eq!(
            p.next_delay(40, Outcome::RetryStatus, None, 0.99),
            Duration::from_secs(1800)
        );
        assert_eq!(
            p.next_delay(u32::MAX, Outcome::RetryStatus, None, 0.5),
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn retry_after_only_pushes_later_and_is_capped() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Outcome::RetryStatus, Some(Duration::from_secs(7)), 0.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.next_delay(5, Outcome::RetryStatus, Some(Duration::from_secs(1)), 0.0),
            Duration::from_secs(32)
        );
        assert_eq!(
            p.next_delay(1, Outcome::RetryStatus, Some(Duration::from_secs(86_400)), 0.0),
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn throttling_and_timeouts_wait_at_least_the_floor() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Outcome::RetryThrottled, None, 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            p.next_delay(1, Outcome::MaybeDelivered, None, 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(
            p.next_delay(1, Outcome::RetryStatus, None, 0.0),
            Duration::from_secs(2)
        );
    }

    fn result(outcome: Outcome, message: &str) -> AttemptResult {
        AttemptResult::without_answer(outcome, message.to_owned())
    }

    #[test]
    fn decisions() {
        let p = policy();
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            p.decide(0, 0, &result(Outcome::Delivered, ""), 0.0, now),
            NextState::Done
        );
        assert_eq!(
            p.decide(
                0,
                0,
                &result(Outcome::DeadStatus, "404: Project does not exist."),
                0.0,
                now
            ),
            NextState::Dead {
                reason: "404: Project does not exist.".into()
            }
        );
        assert_eq!(
            p.decide(0, 0, &result(Outcome::RetryStatus, "503"), 0.0, now),
            NextState::Retry {
                due_at: now + Duration::from_secs(2),
                maybe_delivered: false
            }
        );
        assert!(matches!(
            p.decide(11, 0, &result(Outcome::RetryStatus, "503"), 0.0, now),
            NextState::Dead { .. }
        ));
        assert!(matches!(
            p.decide(0, 0, &result(Outcome::MaybeDelivered, "timeout"), 0.0, now),
            NextState::Retry {
                maybe_delivered: true,
                ..
            }
        ));
        assert!(matches!(
            p.decide(1, 1, &result(Outcome::MaybeDelivered, "timeout"), 0.0, now),
            NextState::Dead { .. }
        ));
    }
}
