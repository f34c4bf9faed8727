//! What following a pipeline by polling stores and reads: how it begins
//! (with a trigger's completion), a poll that is due, and what a poll
//! learned. The role that uses them is `Polls` (`roles.rs`).

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::pipeline::PipelineState;

/// How following a pipeline by polling begins: the first poll is due
/// `first_in` after the completion is written, and polling stops `deadline`
/// after it at the latest. Lengths, not times, so each backend dates them
/// on its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowFrom {
    pub first_in: Duration,
    pub deadline: Duration,
}

/// A followed pipeline whose poll is due, leased to the poller that took it
/// (its next poll is put off by the lease, so no other poller takes it).
#[derive(Debug, Clone)]
pub struct DuePoll {
    pub job_id: Uuid,
    pub event_id: Uuid,
    pub route: String,
    pub target: String,
    pub pipeline_id: String,
    /// The trigger's URL as it was sent (no credential): where a GitLab
    /// trigger named its project.
    pub request_url: String,
    /// The repository and commit of the event that started it.
    pub repo: String,
    pub sha: String,
    /// Polls made so far: the backoff grows with them.
    pub polls: u32,
    /// Time left before the deadline; zero once it has passed.
    pub remaining: Duration,
    /// When the job was created, for the time from trigger to final state.
    pub triggered_at: SystemTime,
}

/// What one poll learned, to be written on its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRecord {
    pub job_id: Uuid,
    /// The pipeline's state, when the CI said it.
    pub state: Option<PipelineState>,
    /// When to poll again, from the moment of writing; `None` stops polling.
    pub next_in: Option<Duration>,
    /// Why polling stopped, for a person (`None` when the pipeline ended or
    /// polling goes on).
    pub note: Option<String>,
}
