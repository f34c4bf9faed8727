//! The store's contract, split by who uses it: [`Queue`] for the accept
//! path and the dispatcher, [`Inspect`] for what a person reads (the admin
//! API, the CLI, metrics) and the retries a person asks for, [`Maintain`]
//! for retention, [`Polls`] for following pipelines by polling. [`Store`]
//! is all four, so an `Arc<dyn Store>` serves
//! every caller; a caller brings into scope the role whose methods it calls.
//!
//! What this module must never do: hold a backend's code. A trait here
//! states what a backend promises; each backend keeps those promises in its
//! own folder.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use crate::event::Upstream;
use crate::pipeline::PipelineState;

use super::{
    Activity, ClaimedJob, Completion, DuePoll, EventFilter, EventView, ForgottenKeys, Ingested, JobDetail,
    JobFilter, JobView, NewEvent, PollRecord, QueueStats, Requeued, ShadowFilter, StoreError, StoredEvent,
};

/// The queue itself: what the accept path and the dispatcher need to take
/// webhooks in and send their jobs, on the delivery path's deadlines.
#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    /// Commits the event and all its jobs in one transaction, durably, or
    /// reports the delivery id as already accepted.
    async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError>;

    /// Leases up to `limit` jobs of one target that are due at `now` (queued
    /// and due, or whose lease expired) for `lease`.
    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Vec<ClaimedJob>, StoreError>;

    /// Records an attempt and moves the job on, if `claim` still holds.
    /// `Ok(false)`: the claim was lost (the lease expired and another worker
    /// took the job); nothing was written. `now` is when it is written, on
    /// the clock of the completion's times: later than `completion.at` when
    /// the store was away for a while.
    async fn complete(&self, completion: Completion, now: SystemTime) -> Result<bool, StoreError>;

    /// Extends the lease of a job being sent to `lease` from `now`, if
    /// `claim` still holds. `Ok(false)`: the claim was lost (another worker
    /// took the job); nothing was written.
    async fn renew(
        &self,
        job: Uuid,
        claim: Uuid,
        lease: Duration,
        now: SystemTime,
    ) -> Result<bool, StoreError>;

    /// Puts a leased job that was never sent back in the queue if `claim`
    /// still holds: a job still waiting in memory for a send slot when
    /// shutdown's deadline passed, which another relay on a shared store
    /// then sends without waiting out its lease (SQLite's next start puts
    /// every leased job back anyway). It keeps the time it was due (its
    /// commit's), so it is due at once and goes out in its turn among the
    /// jobs queued with it. No attempt is recorded. `Ok(false)`: the claim
    /// was lost; nothing was written.
    async fn release(&self, job: Uuid, claim: Uuid, now: SystemTime) -> Result<bool, StoreError>;

    /// The next moment a job becomes due or a lease expires, on the
    /// caller's clock (whose reading is `now`).
    async fn next_wakeup(&self, now: SystemTime) -> Result<Option<SystemTime>, StoreError>;

    /// Completes when work may have arrived from elsewhere: another relay
    /// queued a job on a shared store. A store only this process writes
    /// never completes it; the dispatcher also polls, so a missed signal
    /// costs latency, never a job.
    async fn work_arrived(&self) {
        std::future::pending::<()>().await;
    }

    /// Whether the store answers and can write.
    async fn ping(&self, now: SystemTime) -> Result<(), StoreError>;

    /// The body and content type of an event, as received (payload URLs).
    async fn event_body(&self, id: Uuid) -> Result<Option<(String, Bytes)>, StoreError>;

    /// A pipeline event names the pipeline `pipeline_id`, number
    /// `pipeline_number` (0 when the event gives none): when a job of this
    /// store started it, records the pipeline's `state` on that job (as of
    /// `now`) and answers what started it; `None` for a pipeline relay did
    /// not start. Asking twice with the same state changes nothing more.
    ///
    /// A pipeline whose id is not a plain number (CircleCI's UUIDs) is found
    /// by its id and number together, as its CI's answer named them: such
    /// ids are random, and the number is what the store's index on them
    /// grows by. A plain-number id (GitLab's, API v1.1's) is found by itself.
    async fn correlate(
        &self,
        pipeline_id: &str,
        pipeline_number: u64,
        state: PipelineState,
        now: SystemTime,
    ) -> Result<Option<Upstream>, StoreError>;
}

/// What a person reads (jobs, their attempts, events, the queue's counts)
/// and the retries a person asks for, through the admin API, the CLI or
/// metrics. Nothing here is on the delivery path: a backend may give these
/// a longer deadline than the queue's.
#[async_trait]
pub trait Inspect: Send + Sync + fmt::Debug {
    /// Jobs, most recently changed first.
    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobView>, StoreError>;

    /// One job, its stored request (JSON, no credentials) and every attempt.
    async fn job(&self, id: Uuid) -> Result<Option<JobDetail>, StoreError>;

    /// Which of `deliveries` (the sender's delivery ids) source `source`
    /// holds an event for: catching up asks again only for the others.
    async fn held_deliveries(&self, source: &str, deliveries: Vec<String>)
    -> Result<Vec<String>, StoreError>;

    /// The trigger jobs of shadow runs (see [`ShadowFilter`]), newest first.
    async fn shadow_jobs(&self, filter: ShadowFilter) -> Result<Vec<JobView>, StoreError>;

    /// Accepted webhooks, newest first, one page of those `filter` takes.
    /// `now` is the caller's clock, on which `filter`'s times are read.
    async fn events(&self, filter: EventFilter, now: SystemTime) -> Result<Vec<EventView>, StoreError>;

    /// One accepted webhook with its body, as received.
    async fn event(&self, id: Uuid) -> Result<Option<StoredEvent>, StoreError>;

    /// An event's jobs, each with its request and every attempt, in the
    /// order they were planned.
    async fn event_jobs(&self, event: Uuid) -> Result<Vec<JobDetail>, StoreError> {
        let mut views = self
            .jobs(JobFilter {
                event: Some(event),
                limit: usize::MAX,
                ..JobFilter::default()
            })
            .await?;
        // Job ids are time-ordered (v7): planned order.
        views.sort_by(|a, b| a.id.cmp(&b.id));
        let mut details = Vec::with_capacity(views.len());
        for view in views {
            if let Some(id) = Uuid::parse_str(&view.id).ok()
                && let Some(detail) = self.job(id).await?
            {
                details.push(detail);
            }
        }
        Ok(details)
    }

    /// The named sources' and targets' activity since `since` (on the
    /// caller's clock, whose reading is `now`). Each answer reads indexes
    /// only, however much history the store holds.
    async fn activity(
        &self,
        sources: Vec<String>,
        targets: Vec<String>,
        since: SystemTime,
        now: SystemTime,
    ) -> Result<Activity, StoreError>;

    /// Jobs by state and the oldest job due at `now`.
    async fn queue_stats(&self, now: SystemTime) -> Result<QueueStats, StoreError>;

    /// Queues a dead job again with a fresh attempt budget: a person's
    /// manual retry.
    async fn requeue(&self, id: Uuid, now: SystemTime) -> Result<Requeued, StoreError>;

    /// Queues again every dead job of `target` that died between `since`
    /// and `until`; returns how many. A person's manual retry, in bulk.
    async fn requeue_dead(
        &self,
        target: &str,
        since: SystemTime,
        until: SystemTime,
        now: SystemTime,
    ) -> Result<u64, StoreError>;
}

/// Keeping the store in shape over time: retention. (Migrations are not a
/// method: they run in [`super::open`], before a store exists, and
/// [`super::schema_status`] reads a schema's version without opening it.)
#[async_trait]
pub trait Maintain: Send + Sync + fmt::Debug {
    /// Deletes up to `limit` events received before `before` whose jobs are
    /// all finished, with their jobs, attempts and drops; returns how many.
    async fn purge(&self, before: SystemTime, now: SystemTime, limit: usize) -> Result<u64, StoreError>;

    /// Forgets the loop guard's dedupe keys whose window closed by `now`,
    /// at most `limit` a batch, going on from where the last batch stopped.
    /// A batch costs the same however many keys wait: on SQLite it holds
    /// the writer while it runs.
    async fn forget_dedupe_keys(&self, now: SystemTime, limit: usize) -> Result<ForgottenKeys, StoreError>;
}

/// Following pipelines by polling their CI: which polls are due, and what
/// each learned. The polls live in the store, on the jobs that started the
/// pipelines, so a restart (or another relay on a shared store) takes them
/// up where they were.
#[async_trait]
pub trait Polls: Send + Sync + fmt::Debug {
    /// Leases up to `limit` followed pipelines of `target` whose poll is due
    /// at `now`: their next poll is put off by `lease`, so a poller that dies
    /// mid-poll leaves them due again once it runs out.
    async fn due_polls(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
        now: SystemTime,
    ) -> Result<Vec<DuePoll>, StoreError>;

    /// Writes what a poll learned on its job, if the pipeline is still
    /// followed (a CI's own webhook may have ended it meanwhile: then
    /// nothing is written). `Ok(true)`: the pipeline's state changed.
    async fn record_poll(&self, poll: PollRecord, now: SystemTime) -> Result<bool, StoreError>;

    /// The next moment a poll becomes due, on the caller's clock.
    async fn next_poll(&self, now: SystemTime) -> Result<Option<SystemTime>, StoreError>;
}

/// Every role at once: what [`super::open`] hands the daemon, which gives
/// each part of relay the store it needs.
pub trait Store: Queue + Inspect + Maintain + Polls {}

impl<T: Queue + Inspect + Maintain + Polls + ?Sized> Store for T {}
