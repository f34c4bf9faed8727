//! What a stored row means, written once for both backends: a job, an
//! attempt, an event and its drops, a claimed job, the queue's statistics
//! and why a manual retry was refused are assembled here from columns, and
//! each backend only says how it reads a column of each kind ([`Columns`]).
//!
//! What this module must never do: run a query or know a backend's types
//! (SQLite's integers for times, PostgreSQL's uuids). The column order it
//! reads is the order the backends' SELECTs list, so a change to one of
//! those lists changes its assembly here in the same commit.

use std::sync::Arc;
use std::time::SystemTime;

use uuid::Uuid;

use super::{
    AttemptView, ClaimedJob, DuePoll, EventView, FollowView, JobDetail, JobState, JobView, PipelineView,
    QueueStats, Requeued, StoreError, Work,
};
use crate::event::Upstream;
use crate::guard::Dropped;
use crate::pipeline::PipelineState;
use crate::report::{ReportSpec, StatusReport};
use crate::request::PreparedRequest;

/// One result row, read column by column by kind. Each backend converts
/// (and reports a surprise) as it always has; only the assembly is shared.
pub(super) trait Columns {
    /// An id column (SQLite's text, PostgreSQL's uuid), as an id.
    fn uuid(&self, index: usize) -> Result<Uuid, StoreError>;
    /// An id column, as text.
    fn id(&self, index: usize) -> Result<String, StoreError>;
    /// A nullable id column, as text.
    fn maybe_id(&self, index: usize) -> Result<Option<String>, StoreError>;
    fn text(&self, index: usize) -> Result<String, StoreError>;
    fn maybe_text(&self, index: usize) -> Result<Option<String>, StoreError>;
    /// A stored integer column (`attempts`, an attempt's `number`).
    fn number(&self, index: usize) -> Result<u32, StoreError>;
    /// A count the query computed (`COUNT`, `SUM`).
    fn count(&self, index: usize) -> Result<u32, StoreError>;
    /// A stored length of time, in milliseconds.
    fn millis(&self, index: usize) -> Result<u64, StoreError>;
    /// An HTTP status column.
    fn status(&self, index: usize) -> Result<Option<u16>, StoreError>;
    /// A time column.
    fn time(&self, index: usize) -> Result<SystemTime, StoreError>;
    fn flag(&self, index: usize) -> Result<bool, StoreError>;
    /// A nullable stored integer (a pipeline's number).
    fn maybe_int(&self, index: usize) -> Result<Option<i64>, StoreError>;
    /// A nullable time column.
    fn maybe_time(&self, index: usize) -> Result<Option<SystemTime>, StoreError>;
}

/// The job columns both backends select, in the order [`job_view`] reads them.
pub(super) const JOB_COLUMNS: &str = "id, event_id, route, target, state, attempts, last_error, created_at, updated_at, \
     due_at, (request IS NOT NULL OR report_of IS NOT NULL), pipeline_id, pipeline_number, pipeline_url, pipeline_state, pipeline_updated_at, \
     follow_until IS NOT NULL, follow_polls, follow_due, follow_note, repo, sha, shadow, report_of";

/// How many columns [`JOB_COLUMNS`] lists: what a query selects after them starts here.
pub(super) const JOB_COLUMN_COUNT: usize = 24;

/// A job from [`JOB_COLUMNS`].
pub(super) fn job_view(row: &impl Columns) -> Result<JobView, StoreError> {
    Ok(JobView {
        id: row.id(0)?,
        event_id: row.id(1)?,
        route: row.text(2)?,
        target: row.text(3)?,
        state: JobState::parse(&row.text(4)?).unwrap_or(JobState::Dead),
        attempts: row.number(5)?,
        last_error: row.maybe_text(6)?,
        created_at: row.time(7)?,
        updated_at: row.time(8)?,
        due_at: row.time(9)?,
        retryable: row.flag(10)?,
        pipeline: pipeline_view(row, 11)?,
        repo: row.maybe_text(20)?.unwrap_or_default(),
        sha: row.maybe_text(21)?.unwrap_or_default(),
        shadow: row.flag(22)?,
        report_of: row.maybe_id(23)?,
    })
}

/// A job's pipeline from the columns `pipeline_id, pipeline_number,
/// pipeline_url, pipeline_state, pipeline_updated_at, follow_until IS NOT
/// NULL, follow_polls, follow_due, follow_note`, from `first` on; none until
/// an answer named one.
fn pipeline_view(row: &impl Columns, first: usize) -> Result<Option<PipelineView>, StoreError> {
    let Some(id) = row.maybe_text(first)? else {
        return Ok(None);
    };
    let state = row.maybe_text(first + 3)?;
    Ok(Some(PipelineView {
        id,
        number: row.maybe_int(first + 1)?.and_then(|n| u64::try_from(n).ok()),
        url: row.maybe_text(first + 2)?,
        state: state
            .as_deref()
            .and_then(PipelineState::parse)
            .unwrap_or(PipelineState::Created),
        updated_at: row.maybe_time(first + 4)?.unwrap_or(std::time::UNIX_EPOCH),
        follow: if row.flag(first + 5)? {
            Some(FollowView {
                polls: row.number(first + 6)?,
                next_poll_at: row.maybe_time(first + 7)?,
                stopped: row.maybe_text(first + 8)?,
            })
        } else {
            None
        },
    }))
}

/// A trigger's report spec as the `report` column keeps it.
pub(super) fn report_json(spec: Option<&ReportSpec>) -> Option<String> {
    spec.and_then(|s| serde_json::to_string(s).ok())
}

/// The columns both backends select for a due poll, after the remaining
/// time to the deadline (in milliseconds), which each computes on its own
/// clock: see [`due_poll`].
pub(super) const POLL_COLUMNS: &str =
    "id, event_id, route, target, pipeline_id, request, follow_polls, created_at, repo, sha";

/// A due poll from the remaining milliseconds, then [`POLL_COLUMNS`].
pub(super) fn due_poll(row: &impl Columns) -> Result<DuePoll, StoreError> {
    let job_id = row.uuid(1)?;
    let request: PreparedRequest = row
        .maybe_text(6)?
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("job {job_id}: {e}")))?
        .ok_or_else(|| StoreError::Corrupt(format!("job {job_id} is followed without a request")))?;
    Ok(DuePoll {
        job_id,
        event_id: row.uuid(2)?,
        route: row.text(3)?,
        target: row.text(4)?,
        pipeline_id: row.maybe_text(5)?.unwrap_or_default(),
        request_url: request.url,
        polls: row.number(7)?,
        remaining: std::time::Duration::from_millis(row.millis(0)?),
        triggered_at: row.time(8)?,
        repo: row.maybe_text(9)?.unwrap_or_default(),
        sha: row.maybe_text(10)?.unwrap_or_default(),
    })
}

/// A job with its stored request (JSON; unreadable JSON shows as none) and
/// its attempts.
pub(super) fn job_detail(job: JobView, request: Option<String>, history: Vec<AttemptView>) -> JobDetail {
    JobDetail {
        job,
        request: request.and_then(|r| serde_json::from_str(&r).ok()),
        history,
    }
}

/// An attempt from the columns `number, started_at, duration_ms, status,
/// outcome, excerpt`.
pub(super) fn attempt_view(row: &impl Columns) -> Result<AttemptView, StoreError> {
    Ok(AttemptView {
        number: row.number(0)?,
        started_at: row.time(1)?,
        duration_ms: row.millis(2)?,
        status: row.status(3)?,
        outcome: row.text(4)?,
        excerpt: row.text(5)?,
    })
}

/// An event from the columns `id, source, delivery, hook, received_at,
/// summary, jobs, pending, done, dead`, its drops still to be read.
pub(super) fn event_view(row: &impl Columns) -> Result<EventView, StoreError> {
    Ok(EventView {
        id: row.id(0)?,
        source: row.text(1)?,
        delivery: row.maybe_text(2)?,
        hook: row.text(3)?,
        received_at: row.time(4)?,
        summary: serde_json::from_str(&row.text(5)?).unwrap_or_default(),
        jobs: row.count(6)?,
        pending: row.count(7)?,
        done: row.count(8)?,
        dead: row.count(9)?,
        dropped: Vec::new(),
    })
}

/// What started a pipeline, from the columns `event_id, route, target,
/// hop, summary, created_at` of the job that triggered it and its event, and
/// whether the report changed the job's pipeline state.
pub(super) fn upstream(row: &impl Columns, state_changed: bool) -> Result<Upstream, StoreError> {
    let summary: serde_json::Value = serde_json::from_str(&row.text(4)?).unwrap_or_default();
    let first = &summary["events"][0];
    let text = |field: &str| first[field].as_str().unwrap_or_default().to_owned();
    Ok(Upstream {
        event_id: row.id(0)?,
        route: row.text(1)?,
        target: row.text(2)?,
        hop: row.number(3)?,
        repo: text("repo"),
        sha: text("sha"),
        triggered_at: row.time(5)?,
        state_changed,
    })
}

/// A drop from the columns `route, target, rule, reason`, from `first` on.
pub(super) fn dropped(row: &impl Columns, first: usize) -> Result<Dropped, StoreError> {
    Ok(Dropped {
        route: row.maybe_text(first)?,
        target: row.maybe_text(first + 1)?,
        rule: row.text(first + 2)?,
        reason: row.text(first + 3)?,
    })
}

/// A job just leased under `claim`, from the columns `id, event_id, route,
/// target, attempts, maybe_attempts, request`; its payload is the
/// backend's to add.
pub(super) fn claimed_job(row: &impl Columns, claim: Uuid) -> Result<ClaimedJob, StoreError> {
    let id = row.uuid(0)?;
    let report = row.maybe_text(8)?;
    let work = if row.flag(9)? {
        let snapshot = report.ok_or_else(|| StoreError::Corrupt(format!("report job {id} says nothing")))?;
        Work::Report(Box::new(
            status_report(&snapshot, row.time(10)?)
                .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?,
        ))
    } else {
        let request: PreparedRequest = row
            .maybe_text(6)?
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?
            .ok_or_else(|| StoreError::Corrupt(format!("job {id} is queued without a request")))?;
        Work::Trigger(Arc::new(request))
    };
    Ok(ClaimedJob {
        reported: row.flag(11)?,
        id,
        event_id: row.uuid(1)?,
        route: row.text(2)?,
        target: row.text(3)?,
        attempts: row.number(4)?,
        maybe_attempts: row.number(5)?,
        claim,
        work,
        payload: None,
    })
}

/// The columns a claim returns, in the order [`claimed_job`] reads them.
pub(super) const CLAIM_COLUMNS: &str = "id, event_id, route, target, attempts, maybe_attempts, request, \
     needs_payload, report, report_of IS NOT NULL, created_at, report IS NOT NULL AND report_of IS NULL";

/// A report job's snapshot (its `report` column), as the store writes it
/// when it queues one: the trigger's spec and its pipeline as it stood.
#[derive(serde::Deserialize)]
struct Snapshot {
    spec: ReportSpec,
    state: Option<String>,
    number: Option<i64>,
    url: Option<String>,
    error: Option<String>,
}

/// A report job's snapshot, queued at `at`, as the report it sends.
fn status_report(snapshot: &str, at: SystemTime) -> Result<StatusReport, serde_json::Error> {
    let s: Snapshot = serde_json::from_str(snapshot)?;
    Ok(StatusReport {
        spec: s.spec,
        state: s.state.as_deref().and_then(PipelineState::parse),
        number: s.number.and_then(|n| u64::try_from(n).ok()),
        url: s.url,
        trigger_error: s.error,
        at,
    })
}

/// The queue's statistics from the job count of each stored state (every
/// state is listed, zero included) and the oldest due time.
pub(super) fn queue_stats(counts: Vec<(String, i64)>, oldest_due: Option<SystemTime>) -> QueueStats {
    let mut jobs: Vec<(JobState, u64)> = [
        JobState::Queued,
        JobState::InFlight,
        JobState::Done,
        JobState::Dead,
    ]
    .into_iter()
    .map(|s| (s, 0))
    .collect();
    for (state, n) in counts {
        if let Some(slot) = jobs.iter_mut().find(|(s, _)| s.as_str() == state) {
            slot.1 = u64::try_from(n).unwrap_or(0);
        }
    }
    QueueStats { jobs, oldest_due }
}

/// Why a manual retry of a job stored in `state` queued nothing: it is not
/// dead, or it is dead without a request to send.
pub(super) fn not_requeued(state: &str) -> Requeued {
    if state == JobState::Dead.as_str() {
        Requeued::NoRequest
    } else {
        Requeued::NotDead(JobState::parse(state).unwrap_or(JobState::Done))
    }
}
