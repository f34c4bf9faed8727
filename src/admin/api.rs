//! The admin API: jobs (list, one with every attempt, retry one or a
//! target's dead jobs), events (a filtered page, one with its body and
//! jobs, its explanation under the config in force, a replay), as JSON.
//!
//! Never: decides who may call it (`access` did, before), or writes to the
//! store other than through its manual retries and the accept path's replay.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

use super::error;
use crate::accept;
use crate::app::App;
use crate::catchup;
use crate::explain;
use crate::query::{self, param};
use crate::shadow;
use crate::store::{JobFilter, Requeued, StoreError, StoredEvent};
use crate::web::{Body, json_response};

fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::not_found(format!("{text:?} is not {what} id")))
}

/// The stored event `id`, or a 404.
async fn stored_event(app: &App, id: &str) -> Result<StoredEvent, ApiError> {
    let parsed = parse_id(id, "an event")?;
    app.store
        .event(parsed)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event {parsed}")))
}

/// Why an API call failed, with its status.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(super) fn not_found(message: String) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message,
        }
    }

    fn bad_request(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }

    pub(super) fn into_response(self) -> Response<Body> {
        error(self.status, self.code, self.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "store_unavailable",
            message: e.to_string(),
        }
    }
}

pub(super) async fn answer(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["events"]) => {
            let filter = query::event_filter(query, app.now(), 100).map_err(ApiError::bad_request)?;
            let limit = filter.limit;
            let events = app.store.events(filter, app.now()).await?;
            // The cursor of the next page, when this one is full.
            let next = events
                .last()
                .filter(|_| events.len() == limit)
                .map(|e| e.id.clone());
            Ok(json_response(
                StatusCode::OK,
                &json!({ "events": events, "next": next }),
            ))
        }
        (&Method::GET, ["events", id]) => {
            let stored = stored_event(app, id).await?;
            let jobs = app.store.event_jobs(parse_id(id, "an event")?).await?;
            let mut answer = json!(stored.view);
            answer["content_type"] = json!(stored.content_type);
            answer["hop"] = json!(stored.hop);
            answer["body"] = json!(String::from_utf8_lossy(&stored.body));
            answer["payload"] = json!(stored.payload.as_ref().map(|p| String::from_utf8_lossy(p)));
            answer["jobs_detail"] = json!(jobs);
            Ok(json_response(StatusCode::OK, &answer))
        }
        (&Method::GET, ["events", id, "explain"]) => {
            let stored = stored_event(app, id).await?;
            let config = app.config();
            let explanation = explain::stored(&config, &stored, app.now()).map_err(|e| ApiError {
                status: StatusCode::CONFLICT,
                code: "unexplainable",
                message: e.to_string(),
            })?;
            let mut answer = json!(explanation);
            answer["event"] = json!(stored.view.id);
            answer["text"] = json!(explanation.text());
            Ok(json_response(StatusCode::OK, &answer))
        }
        (&Method::POST, ["events", id, "replay"]) => {
            let stored = stored_event(app, id).await?;
            Ok(accept::replay(app, &stored).await)
        }
        (&Method::POST, ["catch-up"]) => {
            let source = param(query, "source")
                .ok_or_else(|| ApiError::bad_request("catching up needs ?source=NAME".to_owned()))?;
            let now = app.now();
            let since = query::time_param(query, "since", now)
                .map_err(ApiError::bad_request)?
                .unwrap_or_else(|| now.checked_sub(catchup::KEPT).unwrap_or(SystemTime::UNIX_EPOCH));
            match catchup::once(app, source, since).await {
                Ok(asked) => Ok(json_response(
                    StatusCode::OK,
                    &json!({ "source": source, "asked": asked }),
                )),
                Err(catchup::CatchUpError::NotConfigured(name)) => Err(ApiError::not_found(
                    catchup::CatchUpError::NotConfigured(name).to_string(),
                )),
                Err(catchup::CatchUpError::Store(e)) => Err(e.into()),
                Err(e @ catchup::CatchUpError::List(_)) => Err(ApiError {
                    status: StatusCode::BAD_GATEWAY,
                    code: "github_unavailable",
                    message: e.to_string(),
                }),
            }
        }
        (&Method::GET, ["shadow"]) => {
            let now = app.now();
            let since = query::time_param(query, "since", now).map_err(ApiError::bad_request)?;
            let route = param(query, "route").map(str::to_owned);
            let runs = shadow::recent(app.store.as_ref(), route, since, now).await?;
            let summary = shadow::summary(&runs);
            let limit = query::limit(query, 100).map_err(ApiError::bad_request)?;
            let runs: Vec<_> = runs.into_iter().take(limit).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({ "summary": summary, "runs": runs }),
            ))
        }
        (&Method::GET, ["jobs"]) => {
            let state = query::state_param(query).map_err(ApiError::bad_request)?;
            let event = param(query, "event")
                .map(|e| parse_id(e, "an event"))
                .transpose()?;
            let filter = JobFilter {
                state,
                target: param(query, "target").map(str::to_owned),
                event,
                limit: query::limit(query, 100).map_err(ApiError::bad_request)?,
            };
            let jobs = app.store.jobs(filter).await?;
            Ok(json_response(StatusCode::OK, &json!({ "jobs": jobs })))
        }
        (&Method::POST, ["jobs", "retry"]) => {
            let now = app.now();
            let target = param(query, "target").ok_or_else(|| {
                ApiError::bad_request("retry by target needs ?target=NAME&since=TIME".to_owned())
            })?;
            let time = |name: &str, default: Option<SystemTime>| -> Result<SystemTime, ApiError> {
                match (
                    query::time_param(query, name, now).map_err(ApiError::bad_request)?,
                    default,
                ) {
                    (Some(t), _) | (None, Some(t)) => Ok(t),
                    (None, None) => Err(ApiError::bad_request(format!(
                        "retry by target needs ?{name}=TIME"
                    ))),
                }
            };
            let since = time("since", None)?;
            let until = time("until", Some(now + Duration::from_secs(1)))?;
            let requeued = app.store.requeue_dead(target, since, until, now).await?;
            if requeued > 0 {
                app.wake_dispatch();
            }
            tracing::info!(target = %target, jobs = requeued, "dead jobs queued again by hand");
            Ok(json_response(
                StatusCode::OK,
                &json!({ "requeued": requeued, "target": target }),
            ))
        }
        (&Method::GET, ["jobs", id]) => {
            let id = parse_id(id, "a job")?;
            match app.store.job(id).await? {
                Some(detail) => Ok(json_response(StatusCode::OK, &json!(detail))),
                None => Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    code: "not_found",
                    message: format!("no job {id}"),
                }),
            }
        }
        (&Method::POST, ["jobs", id, "retry"]) => {
            let id = parse_id(id, "a job")?;
            match app.store.requeue(id, app.now()).await? {
                Requeued::Requeued => {
                    app.wake_dispatch();
                    tracing::info!(job_id = %id, "dead job queued again by hand");
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({ "job": id, "state": "queued" }),
                    ))
                }
                Requeued::NotFound => Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    code: "not_found",
                    message: format!("no job {id}"),
                }),
                Requeued::NotDead(state) => Err(ApiError {
                    status: StatusCode::CONFLICT,
                    code: "not_dead",
                    message: format!("job {id} is {state}; only dead jobs are retried by hand"),
                }),
                Requeued::NoRequest => Err(ApiError {
                    status: StatusCode::CONFLICT,
                    code: "no_request",
                    message: format!(
                        "job {id} never had a request (it could not be built; see its last_error): fix the config and have the sender redeliver"
                    ),
                }),
            }
        }
        _ => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no admin endpoint at {method} {path}"),
        }),
    }
}
