//! The durable queue: events as received, the jobs they produced, and every
//! attempt to send them, behind four role traits (`roles.rs`: the queue,
//! what a person inspects, maintenance, polls of followed pipelines) and
//! two backends, each a folder of its own (`sqlite/`, `postgres/`: schema,
//! writer or connections, queue SQL, polls, read views). What a stored row means is written once (`rows.rs`),
//! and how an event's body is packed into its column, for both (`codec.rs`).
//!
//! The only module that touches the database. The accept path commits an
//! event and its jobs in one transaction before answering (jobs with a send
//! slot stored leased to this relay, and handed back); dispatch claims due jobs
//! with a lease and a claim id, and completes them only where that claim id
//! still holds. No credential is ever written: jobs hold prepared requests.

mod codec;
mod follow;
mod postgres;
mod roles;
mod rows;
mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use uuid::Uuid;

pub use follow::{DuePoll, FollowFrom, PollRecord};
pub use postgres::PostgresStore;
pub use roles::{Inspect, Maintain, Polls, Queue, Store};
#[cfg(feature = "bench")]
pub use sqlite::MAX_BATCH;
pub use sqlite::SqliteStore;

/// The SQLite schema version this build migrates to (`PRAGMA user_version`).
pub const SQLITE_SCHEMA_VERSION: u32 = sqlite::SCHEMA_VERSION;
/// The PostgreSQL schema version this build migrates to (`relay_schema`).
pub const POSTGRES_SCHEMA_VERSION: u32 = postgres::SCHEMA_VERSION;

use crate::config::{StoreLocation, StoreSettings};
use crate::guard::{Dropped, JobLimits, Trigger};
use crate::pipeline::{Pipeline, PipelineState};
use crate::report::{ReportSpec, StatusReport};
use crate::request::PreparedRequest;

/// One accepted webhook and everything routing made of it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub source: String,
    pub delivery: Option<String>,
    pub hook: String,
    pub content_type: String,
    /// The body exactly as received.
    pub body: Bytes,
    /// The JSON document when it differs from the body (form posts).
    pub payload: Option<Bytes>,
    /// The relay hops that led to it (`routing::Plan::hop`).
    pub hop: u32,
    pub received_at: SystemTime,
    /// The normalized events, as JSON, for people reading the store.
    pub summary: String,
    pub jobs: Vec<NewJob>,
    /// What the loop guard kept from routing, by rule.
    pub drops: Vec<Dropped>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub route: String,
    pub target: String,
    /// The request to send, or why none can be built (the job is then dead).
    pub request: Result<Arc<PreparedRequest>, String>,
    /// Rules the store applies atomically, across restarts and relays.
    pub limits: JobLimits,
    /// Set when the caller will send the job itself right after the commit
    /// (a free send slot): the job is stored leased, with this claim, rather
    /// than queued, so no claim is needed. A crash leaves it to be claimed
    /// again like any leased job.
    pub lease: Option<Lease>,
    /// The repository and commit the event is about (shadow runs compare by
    /// them; a person filters by them).
    pub repo: String,
    pub sha: String,
    /// The target is a shadow of its route's others.
    pub shadow: bool,
    /// Where this trigger's pipeline states are reported: each change, and
    /// a dead trigger, queue a report job (see `report`).
    pub report: Option<ReportSpec>,
}

impl NewJob {
    /// The job as first written: leased to the caller, queued, or dead at
    /// once when no request could be built.
    fn row(&self) -> Result<JobRow<'_>, StoreError> {
        Ok(match &self.request {
            Ok(request) => JobRow {
                state: if self.lease.is_some() {
                    JobState::InFlight
                } else {
                    JobState::Queued
                },
                request: Some(
                    serde_json::to_string(&**request).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ),
                needs_payload: request.needs_payload(),
                error: None,
            },
            Err(reason) => JobRow {
                state: JobState::Dead,
                request: None,
                needs_payload: false,
                error: Some(reason),
            },
        })
    }

    /// The loop guard's view of this job, for the wording of a drop.
    fn trigger(&self) -> Trigger<'_> {
        Trigger {
            route: &self.route,
            target: &self.target,
        }
    }

    /// The job as the caller will send it, when it is stored leased to the
    /// caller (see [`NewJob::lease`]).
    fn leased(&self, event: &NewEvent) -> Option<ClaimedJob> {
        let (Some(lease), Ok(request)) = (self.lease, &self.request) else {
            return None;
        };
        Some(ClaimedJob {
            id: self.id,
            event_id: event.id,
            route: self.route.clone(),
            target: self.target.clone(),
            attempts: 0,
            maybe_attempts: 0,
            claim: lease.claim,
            payload: request
                .needs_payload()
                .then(|| event.payload.clone().unwrap_or_else(|| event.body.clone())),
            work: Work::Trigger(Arc::clone(request)),
            reported: self.report.is_some(),
        })
    }
}

/// A new job's columns, as both stores write them.
struct JobRow<'a> {
    state: JobState,
    /// The prepared request as JSON (no credentials).
    request: Option<String>,
    needs_payload: bool,
    /// Why the job is dead from the start.
    error: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub claim: Uuid,
    pub until: SystemTime,
}

/// What committing a webhook came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Committed. The jobs the store held back (dedupe, burst) were
    /// recorded as drops and not queued; the jobs that came with a lease
    /// and were not held back are stored leased to the caller, who sends
    /// them now.
    Accepted {
        held_back: Vec<HeldBack>,
        leased: Vec<ClaimedJob>,
    },
    /// The sender redelivered a webhook already accepted under this event id.
    Duplicate(Uuid),
}

/// A planned job the store did not queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBack {
    pub job_id: Uuid,
    pub dropped: Dropped,
}

/// A job leased to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub event_id: Uuid,
    pub route: String,
    pub target: String,
    /// Attempts recorded before this one.
    pub attempts: u32,
    /// Of those, attempts whose fate was unknown (sent, then timed out).
    pub maybe_attempts: u32,
    /// The fencing token: completion succeeds only while this still holds.
    pub claim: Uuid,
    pub work: Work,
    /// The webhook's JSON document, when the request forwards it.
    pub payload: Option<Bytes>,
    /// The trigger's pipeline is reported on its commit: completing it
    /// queues a report job.
    pub reported: bool,
}

/// What a claimed job sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A trigger: the request as it was rendered when the webhook came.
    Trigger(Arc<PreparedRequest>),
    /// A commit status: rendered when it is sent, from what it reports.
    Report(Box<StatusReport>),
}

/// The outcome of one attempt, as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: SystemTime,
    pub duration: Duration,
    pub status: Option<u16>,
    /// A stable outcome code (`dispatch::Outcome::code`).
    pub outcome: &'static str,
    /// The target's message or the transport error, shortened.
    pub excerpt: String,
}

/// Where the job goes after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextState {
    Done,
    Retry {
        due_at: SystemTime,
        maybe_delivered: bool,
    },
    Dead {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub job_id: Uuid,
    pub claim: Uuid,
    pub attempt: AttemptRecord,
    /// The pipeline the attempt's answer named; kept on the job (a later
    /// answer that names one replaces it, one that names none leaves it).
    pub pipeline: Option<Pipeline>,
    pub next: NextState,
    /// When the attempt ended, by the dispatcher's clock.
    pub at: SystemTime,
    /// Set when the pipeline is to be followed by polling: the attempt named
    /// one that has not ended, and its target follows.
    pub follow: Option<FollowFrom>,
    /// The job is a trigger whose route reports it (its claim said so):
    /// only then can completing it queue a report or supersede one, so only
    /// then does the store look. A wrong `false` would lose the report.
    pub reported: bool,
}

/// The store cannot do what was asked right now. Ingress answers 503, so
/// the sender retries; dispatch tries again later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the database cannot be written: {0}")]
    Unavailable(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    /// `url` is masked: it never carries the password.
    #[error("cannot open the PostgreSQL store at {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// The state of a job, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    InFlight,
    Done,
    Dead,
}

impl JobState {
    pub(crate) fn parse(text: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::InFlight,
            JobState::Done,
            JobState::Dead,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::InFlight => "in_flight",
            JobState::Done => "done",
            JobState::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub target: Option<String>,
    pub event: Option<Uuid>,
    pub limit: usize,
}

/// Which jobs of shadow runs to read: those of routes with a shadow target,
/// on commits a shadow target was triggered for.
#[derive(Debug, Clone)]
pub struct ShadowFilter {
    pub route: Option<String>,
    /// One commit only: `(repo, sha)`.
    pub commit: Option<(String, String)>,
    /// Jobs created at or after this.
    pub since: SystemTime,
    pub limit: usize,
}

/// A job as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub event_id: String,
    pub route: String,
    pub target: String,
    pub state: JobState,
    /// Attempts since the job was queued (or last retried by hand).
    pub attempts: u32,
    pub last_error: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub due_at: SystemTime,
    /// False for a job whose request could not be built: retrying cannot help.
    pub retryable: bool,
    /// The pipeline the trigger started; `null` until an answer names one.
    pub pipeline: Option<PipelineView>,
    /// The repository and commit the event is about (empty when it names none).
    pub repo: String,
    pub sha: String,
    /// The target is a shadow: compared with its route's others, never reported.
    pub shadow: bool,
    /// For a report job (target `status:<source>`): the trigger job whose
    /// pipeline it reports on.
    pub report_of: Option<String>,
}

/// A job's pipeline, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineView {
    pub id: String,
    pub number: Option<u64>,
    /// The page a person opens.
    pub url: Option<String>,
    pub state: PipelineState,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
    /// Polling for its state (`follow` on the target); `null` when the
    /// pipeline was never followed.
    pub follow: Option<FollowView>,
}

/// How following a pipeline by polling stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FollowView {
    pub polls: u32,
    /// When the next poll is due; `null` once polling has stopped.
    #[serde(serialize_with = "maybe_rfc3339")]
    pub next_poll_at: Option<SystemTime>,
    /// Why polling stopped before the pipeline ended (refused, or the
    /// deadline passed); `null` otherwise.
    pub stopped: Option<String>,
}

/// One recorded attempt.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub number: u32,
    #[serde(serialize_with = "rfc3339")]
    pub started_at: SystemTime,
    pub duration_ms: u64,
    pub status: Option<u16>,
    pub outcome: String,
    pub excerpt: String,
}

/// A job with its stored request and every attempt.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    /// The request as stored: what is sent, minus the credential.
    pub request: Option<serde_json::Value>,
    /// Every attempt ever made, across manual retries, oldest first.
    pub history: Vec<AttemptView>,
}

/// An accepted webhook and how its jobs stand.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub id: String,
    pub source: String,
    pub delivery: Option<String>,
    pub hook: String,
    #[serde(serialize_with = "rfc3339")]
    pub received_at: SystemTime,
    pub summary: serde_json::Value,
    pub jobs: u32,
    pub pending: u32,
    pub done: u32,
    pub dead: u32,
    /// What the loop guard held back, with the rule and the reason.
    pub dropped: Vec<Dropped>,
}

/// Which events to list, newest first: every filter given must hold.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub source: Option<String>,
    /// One of the webhook's events is in this repository (`owner/name`).
    pub repo: Option<String>,
    /// One of the webhook's events is of this kind (`push`, `tag`, …).
    pub kind: Option<String>,
    /// At least one of the event's jobs is in this state.
    pub state: Option<JobState>,
    /// Received at or after this time.
    pub since: Option<SystemTime>,
    /// Received before this time.
    pub until: Option<SystemTime>,
    /// The page after this event: the last one of the page before.
    pub before: Option<Uuid>,
    pub limit: usize,
}

/// An event with what the store kept of its request: enough to explain it
/// again, or to route it again (`Source::restore`).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub view: EventView,
    pub content_type: String,
    /// The relay hops that led to it, as routing counted them.
    pub hop: u32,
    /// The body exactly as received.
    pub body: Bytes,
    /// The JSON document when it differs from the body (form posts).
    pub payload: Option<Bytes>,
}

/// What happened lately, per configured source and target, for the status
/// page. "Lately" is the window the caller names.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activity {
    pub sources: Vec<SourceActivity>,
    pub targets: Vec<TargetActivity>,
}

/// One source's deliveries.
#[derive(Debug, Clone, Serialize)]
pub struct SourceActivity {
    pub source: String,
    /// The newest stored delivery, however old.
    #[serde(serialize_with = "maybe_rfc3339")]
    pub last_received: Option<SystemTime>,
    /// Deliveries in the window.
    pub recent: u64,
}

/// One target's queue and how its recent jobs went.
#[derive(Debug, Clone, Serialize)]
pub struct TargetActivity {
    pub target: String,
    /// Waiting to be sent, now.
    pub queued: u64,
    pub in_flight: u64,
    /// Jobs created in the window that ended done, or dead.
    pub done: u64,
    pub dead: u64,
    /// The newest error of a job created in the window.
    pub last_error: Option<String>,
    #[serde(serialize_with = "maybe_rfc3339")]
    pub last_error_at: Option<SystemTime>,
    /// The mean duration of the window's attempts, in milliseconds.
    pub mean_send_ms: Option<u64>,
}

/// How the queue stands, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs per state (every state, zero included).
    pub jobs: Vec<(JobState, u64)>,
    /// When the longest-waiting due job became due.
    pub oldest_due: Option<SystemTime>,
}

/// What one batch of forgetting the loop guard's expired dedupe keys did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForgottenKeys {
    /// Keys whose window had closed, forgotten: on SQLite, the rows of
    /// its log of keys taken, one a window (a key taken again after its
    /// window closed is counted once a window).
    pub forgotten: u64,
    /// The batch stopped at its bound before it had seen every key that
    /// may have expired: the next one goes on from there.
    pub more: bool,
}

/// What a manual retry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    Requeued,
    NotFound,
    /// Only dead jobs are retried by hand.
    NotDead(JobState),
    /// The request could not be built when the job was queued.
    NoRequest,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

fn maybe_rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// Opens the store the config names, bringing its schema up to date; `now`
/// is the caller's clock as it opens it (see [`SqliteStore::open`]).
pub async fn open(settings: &StoreSettings, now: SystemTime) -> Result<Arc<dyn Store>, StoreError> {
    match &settings.location {
        StoreLocation::Sqlite(path) => Ok(Arc::new(SqliteStore::open(path, now)?)),
        StoreLocation::Postgres(pg) => Ok(Arc::new(PostgresStore::open(pg).await?)),
    }
}

/// How far a store's schema has come, for `relay check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaStatus {
    /// 0: the store is empty; relay creates the schema when it starts.
    pub version: u32,
    /// The version this build migrates to.
    pub latest: u32,
}

/// Reads the schema version without migrating or taking any lock a running
/// relay holds.
pub async fn schema_status(settings: &StoreSettings) -> Result<SchemaStatus, StoreError> {
    match &settings.location {
        StoreLocation::Sqlite(path) => sqlite::schema_status(path),
        StoreLocation::Postgres(pg) => postgres::schema_status(pg).await,
    }
}
