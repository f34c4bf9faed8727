//! The accept path: one request on a source's path becomes a committed event
//! whose jobs are on their way, and only then is the sender answered.
//!
//! It joins the rooms in order: ingress verifies and parses, routing plans,
//! dispatch reserves send slots, the store commits the event and its jobs
//! (those with a slot stored leased to this relay), dispatch is handed the
//! leased jobs, and the sender hears 202 with what was decided. One config
//! snapshot serves the whole request. Nothing here parses a payload, renders
//! a request or speaks SQL; no target is called before the commit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{StatusCode, header};
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::app::App;
use crate::clock::{stopwatch, wall_time};
use crate::config::Config;
use crate::dispatch::{self, Reservation};
use crate::event::{Event, EventKind, Upstream};
use crate::explain::{self, ExplainError};
use crate::guard::Dropped;
use crate::ingress::{IngressError, Parsed, RequestLimits, Source, Webhook};
use crate::pipeline::PipelineState;
use crate::routing::{self, Plan, Rejected};
use crate::shadow;
use crate::store::{HeldBack, Ingested, NewEvent, NewJob, StoreError, StoredEvent};
use crate::web::{Body, json_response};

/// The longest a sender waits for the store to commit its webhook before it
/// hears 503 (and retries): well inside GitHub's and GitLab's 10-second
/// delivery timeout, for every store alike. The commit itself runs on; a
/// webhook it commits after the 503 is answered as a duplicate when the
/// sender retries, and its jobs are sent all the same.
pub const SENDERS_DEADLINE: Duration = Duration::from_secs(8);

/// Why a webhook was not accepted, with the status the sender hears.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Ingress(#[from] IngressError),
    #[error("the store cannot accept the webhook right now; it was not recorded, so retry later: {0}")]
    Store(#[from] StoreError),
}

impl Refusal {
    /// A stable, machine-readable code for the JSON body and the logs.
    fn code(&self) -> &'static str {
        match self {
            Refusal::Ingress(e) => e.code(),
            Refusal::Store(_) => "store_unavailable",
        }
    }

    fn into_response(self) -> http::Response<Body> {
        match self {
            Refusal::Ingress(e) => e.into_response(),
            Refusal::Store(_) => {
                let mut response = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": self.code(), "message": self.to_string() }),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
                response
            }
        }
    }
}

/// Answers one webhook request on the ingress listener.
pub async fn handle(
    app: &Arc<App>,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<Body> {
    let config = app.config();
    let path = request.uri().path().to_owned();
    // Unknown paths share one label value, so scanners cannot grow the series.
    let source = config.source_for_path(&path).map_or("-", |s| s.name.as_str());
    let response = match accept(app, &config, request, peer).await {
        Ok(response) => response,
        Err(refusal) => {
            if matches!(refusal, Refusal::Store(_)) {
                warn!(path = %path, peer = %peer, error = %refusal, "webhook refused: store unavailable");
            } else {
                info!(path = %path, peer = %peer, code = refusal.code(), error = %refusal, "webhook refused");
            }
            refusal.into_response()
        }
    };
    app.metrics.request(source, response.status().as_u16());
    response
}

async fn accept(
    app: &Arc<App>,
    config: &Arc<Config>,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<http::Response<Body>, Refusal> {
    let (parts, body) = request.into_parts();
    let source = config
        .source_for_path(parts.uri.path())
        .ok_or_else(|| IngressError::NotFound {
            path: parts.uri.path().chars().take(200).collect(),
        })?;
    let limits = RequestLimits {
        max_body: config.server.max_body,
        timeout: config.server.request_timeout,
        budget: &app.body_budget,
    };
    // A signature's timestamp is the sender's wall clock: compare it with ours.
    // The body's room is held until the commit: parsing and storing it are
    // where its memory goes.
    let (webhook, _room) = source.read(&parts, body, peer.ip(), limits, wall_time()).await?;
    let events = match source
        .parse(&webhook, config.files())
        .map_err(IngressError::from)?
    {
        Parsed::Ping => {
            info!(source = %source.name, delivery = webhook.delivery().unwrap_or(""), "ping answered");
            return Ok(json_response(StatusCode::OK, &json!({ "pong": true })));
        }
        Parsed::Events(events) => events,
    };
    commit(app, config, source, webhook, events).await
}

/// Routes a stored delivery again under the config in force, as a new
/// event: the same plan, loop guard and commit as a webhook that just
/// arrived, with the hops that led to the original kept. The sender's
/// delivery id is left out, so the store takes it for a new delivery, not
/// a redelivery; the loop guard's dedupe still holds back a trigger it has
/// seen within its window.
pub async fn replay(app: &Arc<App>, stored: &StoredEvent) -> http::Response<Body> {
    let config = app.config();
    let (source, webhook, parsed) = match explain::restore(&config, stored, false) {
        Ok(restored) => restored,
        Err(e) => {
            let (status, code) = match e {
                ExplainError::SourceGone { .. } => (StatusCode::CONFLICT, "source_gone"),
                ExplainError::Unreadable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unreadable"),
            };
            return json_response(status, &json!({ "error": code, "message": e.to_string() }));
        }
    };
    let Parsed::Events(events) = parsed else {
        return json_response(StatusCode::OK, &json!({ "pong": true }));
    };
    info!(
        event_id = %webhook.id(),
        replay_of = %stored.view.id,
        source = %source.name,
        "stored delivery replayed"
    );
    match commit(app, &config, source, webhook, events).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

/// Plans a verified webhook's events, commits them with their jobs, hands
/// the leased jobs over, and says what was decided.
async fn commit(
    app: &Arc<App>,
    config: &Arc<Config>,
    source: &Source,
    webhook: Webhook,
    events: Vec<Event>,
) -> Result<http::Response<Body>, Refusal> {
    let now = app.now();
    let upstreams = correlate(app, &events, now).await?;
    let plan = routing::plan_indexed(&config.router(), source, &webhook, &events, &upstreams, now);
    let sendable = plan
        .jobs
        .iter()
        .filter(|j| j.request.is_ok())
        .map(|j| (j.id, j.target.as_str()));
    let reservation = dispatch::reserve(app, config, sendable, now);
    let record = record(&webhook, &events, &plan, now, &reservation);
    let planned = record.jobs.len();
    // The commit and the hand-over of its jobs run to the end on their own
    // task: a sender that hangs up (or is answered 503 at the deadline) must
    // not leave committed jobs waiting out their lease.
    let committing = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = stopwatch();
            let ingested = app.store.ingest(record).await;
            app.metrics.commit_took(started.elapsed());
            let (leased, queued) = match &ingested {
                Ok(Ingested::Accepted { held_back, leased }) => {
                    // Jobs that found no slot wait in the queue for the
                    // dispatcher.
                    let stored = plan
                        .jobs
                        .iter()
                        .filter(|j| j.request.is_ok() && !held_back.iter().any(|h| h.job_id == j.id))
                        .count();
                    (leased.clone(), stored > leased.len())
                }
                // Nothing leased (a duplicate, a failed commit): every
                // reserved slot is freed.
                _ => (Vec::new(), false),
            };
            dispatch::hand_over(&app, leased, reservation);
            if queued {
                app.wake_dispatch();
            }
            (ingested, webhook, plan)
        })
    };
    let (ingested, webhook, plan) = tokio::time::timeout(SENDERS_DEADLINE, committing)
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "the store did not commit within {}s",
                SENDERS_DEADLINE.as_secs()
            ))
        })?
        .map_err(|e| StoreError::Unavailable(format!("the commit task failed: {e}")))?;
    match ingested? {
        Ingested::Accepted { held_back, .. } => {
            for event in &events {
                app.metrics.event(webhook.source(), event.kind.as_str());
            }
            log_accepted(&webhook, &events, &plan, &held_back);
            let dropped: Vec<&Dropped> = plan
                .dropped
                .iter()
                .map(|d| &d.dropped)
                .chain(held_back.iter().map(|h| &h.dropped))
                .collect();
            for d in &dropped {
                app.metrics.dropped(&d.rule);
            }
            Ok(json_response(
                StatusCode::ACCEPTED,
                &Accepted {
                    dropped,
                    event: webhook.id(),
                    jobs: planned - held_back.len(),
                    rejected: plan.rejected(),
                    routes: plan.route_names(),
                },
            ))
        }
        Ingested::Duplicate(original) => {
            info!(
                source = %webhook.source(),
                delivery = webhook.delivery().unwrap_or(""),
                event_id = %original,
                "redelivery of an accepted webhook; no new jobs"
            );
            Ok(json_response(StatusCode::OK, &json!({ "duplicate": original })))
        }
    }
}

/// The 202's body: what became of an accepted webhook. Fields are declared
/// in the order the answer has always listed them (by name).
#[derive(Serialize)]
struct Accepted<'a> {
    dropped: Vec<&'a Dropped>,
    event: Uuid,
    jobs: usize,
    rejected: Vec<Rejected<'a>>,
    routes: Vec<&'a str>,
}

/// The stored summary of a webhook's events, which the events API and the
/// status page list. Written from these structs, straight to bytes: built as
/// a `json!` map and formatted through `Display`, it was 3% of the accept
/// path's instructions. Fields are declared in the order that map sorted
/// them, so the stored text is what it always was.
#[derive(Serialize)]
struct Summary<'a> {
    events: Vec<SummaryEvent<'a>>,
}

#[derive(Serialize)]
struct SummaryEvent<'a> {
    kind: EventKind,
    #[serde(rename = "ref")]
    git_ref: &'a str,
    repo: &'a str,
    sha: &'a str,
}

impl<'a> SummaryEvent<'a> {
    fn of(e: &'a Event) -> SummaryEvent<'a> {
        SummaryEvent {
            kind: e.kind,
            git_ref: &e.git_ref,
            repo: &e.repo,
            sha: &e.sha,
        }
    }
}

/// For each pipeline event, what started the pipeline it reports when relay
/// did, with the pipeline's new state recorded on that job. Bounded by the
/// senders' deadline like the commit: a store that cannot say is a 503, since
/// routing without knowing the hop count could let a loop through.
async fn correlate(
    app: &App,
    events: &[Event],
    now: SystemTime,
) -> Result<Vec<Option<Upstream>>, StoreError> {
    let mut upstreams = Vec::with_capacity(events.len());
    for event in events {
        let reported = event
            .pipeline
            .as_ref()
            .filter(|p| event.kind == EventKind::Pipeline && !p.id.is_empty());
        let upstream = match reported {
            None => None,
            Some(pipeline) => {
                let state = PipelineState::of_ci_status(&pipeline.status);
                let found = tokio::time::timeout(
                    SENDERS_DEADLINE,
                    app.store.correlate(&pipeline.id, pipeline.number, state, now),
                )
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "the store did not answer within {}s",
                        SENDERS_DEADLINE.as_secs()
                    ))
                })??;
                if found.as_ref().is_some_and(|u| u.state_changed) {
                    // A reported pipeline's change has queued its report.
                    app.wake_dispatch();
                }
                if let Some(upstream) = found.as_ref().filter(|u| u.state_changed && state.is_final()) {
                    let took = now.duration_since(upstream.triggered_at).unwrap_or_default();
                    app.metrics
                        .pipeline_finished(&upstream.target, state.as_str(), took);
                    if app.config().route_has_shadow(&upstream.route) {
                        shadow::count_if_final(
                            app.store.as_ref(),
                            &app.metrics,
                            &upstream.route,
                            &upstream.repo,
                            &upstream.sha,
                        )
                        .await;
                    }
                }
                found
            }
        };
        upstreams.push(upstream);
    }
    Ok(upstreams)
}

/// The store's record of an accepted webhook.
fn record(
    webhook: &Webhook,
    events: &[Event],
    plan: &Plan,
    now: SystemTime,
    reservation: &Reservation,
) -> NewEvent {
    let summary = Summary {
        events: events.iter().map(SummaryEvent::of).collect(),
    };
    NewEvent {
        id: webhook.id(),
        source: webhook.source().to_owned(),
        delivery: webhook.delivery().map(str::to_owned),
        hook: webhook.hook().to_owned(),
        content_type: webhook.content_type().to_owned(),
        body: webhook.body().clone(),
        payload: (!webhook.payload_is_body()).then(|| webhook.payload().clone()),
        hop: plan.hop,
        received_at: now,
        // Writing into a Vec cannot fail, and every field is a string.
        summary: serde_json::to_string(&summary).unwrap_or_default(),
        jobs: plan
            .jobs
            .iter()
            .map(|job| {
                let event = events.get(job.event_index);
                NewJob {
                    id: job.id,
                    route: job.route.clone(),
                    target: job.target.clone(),
                    request: job.request.clone(),
                    limits: job.limits.clone(),
                    lease: reservation.lease(&job.id),
                    repo: event.map(|e| e.repo.clone()).unwrap_or_default(),
                    sha: event.map(|e| e.sha.clone()).unwrap_or_default(),
                    shadow: job.shadow,
                    report: job.report.clone(),
                }
            })
            .collect(),
        drops: plan.dropped.iter().map(|d| d.dropped.clone()).collect(),
    }
}

fn log_accepted(webhook: &Webhook, events: &[Event], plan: &Plan, held_back: &[HeldBack]) {
    for event in events {
        info!(
            event_id = %webhook.id(),
            source = %webhook.source(),
            delivery = webhook.delivery().unwrap_or(""),
            hook = %webhook.hook(),
            kind = %event.kind,
            repo = %event.repo,
            git_ref = %event.git_ref,
            sha = %event.sha,
            "webhook accepted"
        );
    }
    let queued = |id: &uuid::Uuid| !held_back.iter().any(|h| &h.job_id == id);
    for job in plan.jobs.iter().filter(|j| j.request.is_ok() && queued(&j.id)) {
        debug!(
            event_id = %webhook.id(),
            source = %webhook.source(),
            delivery = webhook.delivery().unwrap_or(""),
            route = %job.route,
            target = %job.target,
            job_id = %job.id,
            "job queued"
        );
    }
    for drop in plan
        .dropped
        .iter()
        .map(|d| &d.dropped)
        .chain(held_back.iter().map(|h| &h.dropped))
    {
        info!(
            event_id = %webhook.id(),
            source = %webhook.source(),
            delivery = webhook.delivery().unwrap_or(""),
            rule = %drop.rule,
            route = drop.route.as_deref().unwrap_or(""),
            target = drop.target.as_deref().unwrap_or(""),
            reason = %drop.reason,
            "loop guard dropped"
        );
    }
    for unreported in &plan.unreported {
        warn!(
            event_id = %webhook.id(),
            source = %webhook.source(),
            route = %unreported.route,
            target = %unreported.target,
            reason = %unreported.reason,
            "the trigger goes out, but its pipeline cannot be reported on the commit"
        );
    }
    for job in &plan.jobs {
        if let Err(reason) = &job.request {
            warn!(
                event_id = %webhook.id(),
                source = %webhook.source(),
                delivery = webhook.delivery().unwrap_or(""),
                route = %job.route,
                target = %job.target,
                job_id = %job.id,
                error = %reason,
                "job is dead at once: its request cannot be built"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Senders and scripts read the 202's body; writing it from a typed
    /// struct instead of a `json!` map must not change a byte of it.
    #[test]
    fn the_accepted_answer_is_byte_for_byte_what_the_json_map_wrote() {
        let dropped = Dropped {
            reason: "hop 5 is past the limit of 4".into(),
            route: Some("builds".into()),
            rule: "hop_limit".into(),
            target: None,
        };
        let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let answer = Accepted {
            dropped: vec![&dropped],
            event: id,
            jobs: 1,
            rejected: vec![Rejected {
                reason: "{{ nope }} is undefined",
                route: "deploys",
                target: "gitlab",
            }],
            routes: vec!["builds", "deploys"],
        };
        let before = json!({
            "event": id,
            "jobs": 1,
            "routes": ["builds", "deploys"],
            "dropped": [&dropped],
            "rejected": [json!({ "route": "deploys", "target": "gitlab", "reason": "{{ nope }} is undefined" })],
        });
        let written = serde_json::to_vec(&answer).expect("the answer serializes");
        assert_eq!(String::from_utf8(written).expect("utf-8"), before.to_string());
    }

    /// The events API and the status page read the stored summary; writing
    /// it from typed structs must not change a byte of what the map wrote.
    #[test]
    fn the_stored_summary_is_byte_for_byte_what_the_json_map_wrote() {
        let push = Event {
            kind: EventKind::Push,
            repo: "acme/\"api\"".into(),
            git_ref: "refs/heads/main".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            ..Event::default()
        };
        let tag = Event {
            kind: EventKind::Tag,
            repo: "acme/api".into(),
            git_ref: "refs/tags/v1.0 ü".into(),
            ..Event::default()
        };
        for events in [vec![], vec![push.clone()], vec![push, tag]] {
            let before = json!({
                "events": events
                    .iter()
                    .map(|e| json!({ "kind": e.kind, "repo": e.repo, "ref": e.git_ref, "sha": e.sha }))
                    .collect::<Vec<_>>(),
            });
            let summary = Summary {
                events: events.iter().map(SummaryEvent::of).collect(),
            };
            let written = serde_json::to_string(&summary).expect("the summary serializes");
            assert_eq!(written, before.to_string());
        }
    }
}
