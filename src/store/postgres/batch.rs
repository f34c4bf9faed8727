//! Gathering concurrent callers' requests into batches, each run as one
//! statement by its owner (the group commit of webhooks in `ingest`, of
//! finished sends in `finish`). Idle, a request goes at once, alone; under
//! load, what arrives while the batches in flight run forms the next.
//!
//! What this module must never do: hold a request back while a batch slot
//! is free, run more batches at once than it was given, or answer callers
//! (the batch's runner does, once its fate is known).

use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{Semaphore, mpsc};

use crate::store::StoreError;

/// The queue of requests waiting for a batch, as callers see it.
pub(super) struct Batches<W> {
    waiting: mpsc::Sender<W>,
}

impl<W> std::fmt::Debug for Batches<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field(
                "waiting",
                &(self.waiting.max_capacity() - self.waiting.capacity()),
            )
            .finish()
    }
}

impl<W: Send + 'static> Batches<W> {
    /// Starts gathering batches of at most `max_batch` requests, at most
    /// `in_flight` running at once, each handed to `run` with connections
    /// from `pool`; ends when the last handle is gone.
    pub(super) fn spawn<F, Fut>(pool: Pool, max_batch: usize, in_flight: usize, run: F) -> Batches<W>
    where
        F: Fn(Pool, Vec<W>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (waiting, queue) = mpsc::channel(4 * max_batch);
        tokio::spawn(gather(pool, queue, max_batch, in_flight, run));
        Batches { waiting }
    }

    /// Puts `request` in the next batch.
    pub(super) async fn enqueue(&self, request: W) -> Result<(), StoreError> {
        self.waiting.send(request).await.map_err(|_| StoreError::Closed)
    }
}

async fn gather<W, F, Fut>(
    pool: Pool,
    mut queue: mpsc::Receiver<W>,
    max_batch: usize,
    in_flight: usize,
    run: F,
) where
    W: Send + 'static,
    F: Fn(Pool, Vec<W>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let running = run(pool.clone(), batch);
        tokio::spawn(async move {
            running.await;
            drop(slot);
        });
    }
}
