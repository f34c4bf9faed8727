//! The follower: polls the CI for the state of each pipeline a following
//! target's trigger started (PROTOCOLS.md F), until it ends, its CI's own
//! webhook says it ended, the CI refuses, or the deadline passes.
//!
//! The polls live in the store, on the jobs that started the pipelines:
//! this task leases the due ones of each target (at most `follow.
//! concurrency` in flight per target), asks the target, and writes the
//! answer with the next poll's due time, so a restart, or another relay on
//! a shared store, takes them up where they were. It never holds a store
//! transaction across a poll, and never polls a pipeline the store no
//! longer follows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::app::App;
use crate::shadow;
use crate::store::{DuePoll, PollRecord};
use crate::targets::{Follow, PollAnswer};

/// The longest the follower sleeps without looking at the store: polls
/// another relay on a shared store set up are found within it.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// Polls the due pipelines of every following target until `shutdown`.
/// Polls in flight then are dropped: their leases run out and they are
/// due again after a restart.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    // Per target, the slots for its polls in flight, with the concurrency
    // they were made for (a reload may change it).
    let mut slots: HashMap<String, (usize, Arc<Semaphore>)> = HashMap::new();
    while !shutdown.is_cancelled() {
        let config = app.config();
        // A poll's lease must outlast its requests: the same bound as a send's.
        let lease = config.delivery.lease;
        for (name, target) in &config.targets {
            let Some(follow) = target.follow.as_ref() else {
                continue;
            };
            let entry = slots
                .entry(name.clone())
                .or_insert_with(|| (follow.concurrency, Arc::new(Semaphore::new(follow.concurrency))));
            if entry.0 != follow.concurrency {
                *entry = (follow.concurrency, Arc::new(Semaphore::new(follow.concurrency)));
            }
            let mut permits = Vec::new();
            while let Ok(permit) = entry.1.clone().try_acquire_owned() {
                permits.push(permit);
            }
            if permits.is_empty() {
                continue;
            }
            match app.store.due_polls(name, permits.len(), lease, app.now()).await {
                Ok(polls) => {
                    for (poll, permit) in polls.into_iter().zip(permits) {
                        tokio::spawn(poll_once(app.clone(), poll, permit, shutdown.clone()));
                    }
                }
                Err(e) => warn!(target = %name, error = %e, "cannot read the due polls; will try again"),
            }
        }
        let now = app.now();
        let wait = match app.store.next_poll(now).await {
            Ok(Some(at)) => at.duration_since(now).unwrap_or(MAX_IDLE).min(MAX_IDLE),
            Ok(None) => MAX_IDLE,
            Err(e) => {
                warn!(error = %e, "cannot read when the next poll is due; will try again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = app.follower_wakeup() => {}
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// One poll of one pipeline, its answer written on the job.
async fn poll_once(app: Arc<App>, poll: DuePoll, permit: OwnedSemaphorePermit, shutdown: CancellationToken) {
    let span = info_span!(
        "poll",
        job_id = %poll.job_id,
        event_id = %poll.event_id,
        target = %poll.target,
        route = %poll.route,
        pipeline = %poll.pipeline_id,
        poll = poll.polls + 1,
    );
    async {
        let config = app.config();
        let answer = match config.target(&poll.target) {
            None => PollAnswer::Refused(format!("target {} is no longer in the config", poll.target)),
            Some(target) => match app.sends.outbound(&target.proxy) {
                Ok(outbound) => {
                    tokio::select! {
                        answer = target.poll(&outbound, &poll.pipeline_id, &poll.request_url, config.delivery.timeout) => answer,
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => PollAnswer::Retry(target.scrub(format!(
                    "cannot build the HTTP client for this target's proxy: {}",
                    crate::targets::outcome::transport_detail(&e)
                ))),
            },
        };
        let follow = config.target(&poll.target).and_then(|t| t.follow.as_ref());
        let record = decide(follow, &poll, &answer);
        app.metrics.poll(&poll.target, outcome_label(&answer));
        log_poll(&answer, &record);
        match app.store.record_poll(record.clone(), app.now()).await {
            Ok(changed) => {
                if let (true, Some(state)) = (changed, record.state) {
                    info!(pipeline_state = %state, "the pipeline's state changed");
                    // A reported pipeline's change has queued its report.
                    app.wake_dispatch();
                    if state.is_final() {
                        let took = app.now().duration_since(poll.triggered_at).unwrap_or_default();
                        app.metrics.pipeline_finished(&poll.target, state.as_str(), took);
                        if config.route_has_shadow(&poll.route) {
                            shadow::count_if_final(
                                app.store.as_ref(),
                                &app.metrics,
                                &poll.route,
                                &poll.repo,
                                &poll.sha,
                            )
                            .await;
                        }
                    }
                }
            }
            Err(e) => warn!(
                error = %e,
                "cannot record the poll; the pipeline is polled again once its lease runs out"
            ),
        }
    }
    .instrument(span)
    .await;
    drop(permit);
    // A slot is free, and another poll may be waiting for it.
    app.wake_follower();
}

/// What to write after a poll: the state it learned, and when to poll again
/// (the wait doubling from `follow.first` up to `follow.max`), or why not.
fn decide(follow: Option<&Follow>, poll: &DuePoll, answer: &PollAnswer) -> PollRecord {
    let stop = |note: String| PollRecord {
        job_id: poll.job_id,
        state: match answer {
            PollAnswer::State(state) => Some(*state),
            _ => None,
        },
        next_in: None,
        note: Some(note),
    };
    let state = match answer {
        PollAnswer::State(state) if state.is_final() => {
            return PollRecord {
                job_id: poll.job_id,
                state: Some(*state),
                next_in: None,
                note: None,
            };
        }
        PollAnswer::Refused(why) => return stop(format!("the CI refused the poll: {why}")),
        PollAnswer::State(state) => Some(*state),
        PollAnswer::Retry(_) => None,
    };
    let Some(follow) = follow else {
        return stop("follow is no longer set on this target".to_owned());
    };
    let wait = follow.wait_after(poll.polls + 1);
    if wait > poll.remaining {
        return stop(format!(
            "the pipeline had not ended {} after its trigger; relay stopped polling it",
            humantime::format_duration(follow.deadline)
        ));
    }
    PollRecord {
        job_id: poll.job_id,
        state,
        next_in: Some(wait),
        note: None,
    }
}

fn outcome_label(answer: &PollAnswer) -> &'static str {
    match answer {
        PollAnswer::State(_) => "state",
        PollAnswer::Retry(_) => "retry",
        PollAnswer::Refused(_) => "refused",
    }
}

fn log_poll(answer: &PollAnswer, record: &PollRecord) {
    let next_in_secs = record.next_in.map(|d| d.as_secs_f64());
    match (answer, &record.note) {
        (PollAnswer::Refused(_), Some(note)) => error!(note = %note, "stopped following the pipeline"),
        (_, Some(note)) => warn!(note = %note, "stopped following the pipeline"),
        (PollAnswer::Retry(why), None) => {
            warn!(message = %why, next_in_secs, "the poll got no answer to go by; will poll again")
        }
        (PollAnswer::State(state), None) => {
            debug!(pipeline_state = %state, next_in_secs, "polled")
        }
        (PollAnswer::Refused(_), None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::PipelineState;
    use std::time::UNIX_EPOCH;
    use uuid::Uuid;

    fn poll(polls: u32, remaining: u64) -> DuePoll {
        DuePoll {
            job_id: Uuid::nil(),
            event_id: Uuid::nil(),
            route: "r".into(),
            target: "t".into(),
            pipeline_id: "1".into(),
            request_url: String::new(),
            repo: String::new(),
            sha: String::new(),
            polls,
            remaining: Duration::from_secs(remaining),
            triggered_at: UNIX_EPOCH,
        }
    }

    fn config() -> crate::config::Config {
        crate::config::Config::from_toml(
            r#"
[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "s"

[[routes]]
name = "r"
to = ["t"]

[targets.t]
kind = "circleci"
project = "gh/acme/api"
token = "cci-token"
follow = { first = "10s", max = "5m", deadline = "1h" }
"#,
        )
        .expect("config")
    }

    fn follow(config: &crate::config::Config) -> &Follow {
        config
            .targets
            .get("t")
            .and_then(|t| t.follow.as_ref())
            .expect("follow")
    }

    #[test]
    fn a_running_pipeline_is_polled_again_later_and_later() {
        let config = config();
        let f = follow(&config);
        let next = |polls| {
            decide(
                Some(f),
                &poll(polls, 3600),
                &PollAnswer::State(PipelineState::Running),
            )
        };
        assert_eq!(next(0).next_in, Some(Duration::from_secs(20)));
        assert_eq!(next(3).next_in, Some(Duration::from_secs(160)));
        assert_eq!(next(9).next_in, Some(Duration::from_secs(300)));
        assert_eq!(next(0).state, Some(PipelineState::Running));
        assert_eq!(next(0).note, None);
    }

    #[test]
    fn polling_stops_at_the_end_the_deadline_or_a_refusal() {
        let config = config();
        let f = follow(&config);
        let ended = decide(Some(f), &poll(2, 3600), &PollAnswer::State(PipelineState::Failed));
        assert_eq!(
            (ended.state, ended.next_in, ended.note),
            (Some(PipelineState::Failed), None, None)
        );
        let late = decide(Some(f), &poll(2, 60), &PollAnswer::State(PipelineState::Running));
        assert_eq!(late.next_in, None);
        assert_eq!(
            late.note.as_deref(),
            Some("the pipeline had not ended 1h after its trigger; relay stopped polling it")
        );
        let refused = decide(Some(f), &poll(0, 3600), &PollAnswer::Refused("401: no".into()));
        assert_eq!(refused.next_in, None);
        assert_eq!(refused.note.as_deref(), Some("the CI refused the poll: 401: no"));
        let retry = decide(Some(f), &poll(0, 3600), &PollAnswer::Retry("502".into()));
        assert_eq!(
            (retry.state, retry.next_in),
            (None, Some(Duration::from_secs(20)))
        );
        let unfollowed = decide(None, &poll(0, 3600), &PollAnswer::State(PipelineState::Running));
        assert_eq!(unfollowed.next_in, None);
        assert!(unfollowed.note.is_some());
    }
}
