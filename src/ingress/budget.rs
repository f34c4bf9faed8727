//! The memory budget for request bodies: how many bytes of bodies relay
//! holds at once, across every connection (`server.body_memory`).
//!
//! A body is held whole (its signature covers every byte) and then parsed,
//! so a hundred senders of 25 MiB bodies at once would take gigabytes. A
//! body larger than [`SMALL_BODY`] reserves its declared length (or
//! `server.max_body` when the sender does not declare one) before it is
//! read, and keeps the reservation until the webhook is committed; when the
//! budget is spent, it waits its turn within `server.request_timeout`, and
//! past that the sender hears 503 with `Retry-After`. Bodies up to
//! [`SMALL_BODY`] (every ordinary webhook) never wait here: their memory is
//! bounded by `server.max_connections` already, and a webhook must not queue
//! behind a flood of big ones. This module never reads a body itself.

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::IngressError;

/// Bodies up to this size are not counted against the budget.
pub const SMALL_BODY: u64 = 64 * 1024;

/// The budget is counted in KiB, so that any `u64` of bytes fits the
/// semaphore's `u32` permits.
const UNIT: u64 = 1024;

/// See the module docs.
#[derive(Debug)]
pub struct BodyBudget {
    units: Semaphore,
    total_units: u32,
}

/// Room reserved for one body; returned to the budget when dropped.
#[derive(Debug)]
pub struct BodyRoom<'a> {
    _permit: Option<SemaphorePermit<'a>>,
}

impl BodyBudget {
    pub fn new(bytes: u64) -> BodyBudget {
        let total_units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).max(1);
        BodyBudget {
            units: Semaphore::new(total_units as usize),
            total_units,
        }
    }

    /// Reserves room for a body of `declared` bytes (its `Content-Length`),
    /// or of `max_body` when undeclared, waiting until `deadline` at most.
    pub async fn reserve(
        &self,
        declared: Option<u64>,
        max_body: u64,
        deadline: Instant,
    ) -> Result<BodyRoom<'_>, IngressError> {
        let size = declared.unwrap_or(max_body).min(max_body);
        if size <= SMALL_BODY {
            return Ok(BodyRoom { _permit: None });
        }
        let units = u32::try_from(size.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.total_units);
        match tokio::time::timeout_at(deadline, self.units.acquire_many(units)).await {
            Ok(Ok(permit)) => Ok(BodyRoom {
                _permit: Some(permit),
            }),
            // Closed never happens (nothing closes it); both mean "not now".
            Ok(Err(_)) | Err(_) => Err(IngressError::Busy),
        }
    }

    /// Bytes reserved right now.
    #[cfg(test)]
    fn reserved(&self) -> u64 {
        u64::from(self.total_units - self.units.available_permits() as u32) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn big_bodies_wait_their_turn_and_small_ones_never_do() {
        let budget = BodyBudget::new(60 * 1024 * 1024);
        let soon = || crate::clock::stopwatch() + Duration::from_secs(1);
        let max = 25 * 1024 * 1024;
        let a = budget.reserve(Some(25 * 1024 * 1024), max, soon()).await.unwrap();
        let _b = budget.reserve(None, max, soon()).await.unwrap();
        assert_eq!(budget.reserved(), 50 * 1024 * 1024);
        assert!(matches!(
            budget.reserve(Some(20 * 1024 * 1024), max, soon()).await,
            Err(IngressError::Busy)
        ));
        let _small = budget.reserve(Some(7_000), max, soon()).await.unwrap();
        assert_eq!(budget.reserved(), 50 * 1024 * 1024, "a small body takes nothing");
        drop(a);
        assert!(budget.reserve(Some(20 * 1024 * 1024), max, soon()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_budget_still_gets_all_of_it() {
        let budget = BodyBudget::new(1024 * 1024);
        let room = budget
            .reserve(Some(5 * 1024 * 1024), 25 * 1024 * 1024, crate::clock::stopwatch())
            .await;
        assert!(room.is_ok());
        assert_eq!(budget.reserved(), 1024 * 1024);
    }
}
