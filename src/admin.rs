//! The admin listener: liveness and readiness probes, and the jobs API that
//! operators (and `relay jobs`) use to see what happened and retry what died.
//!
//! `/api/*` requires `Authorization: Bearer <admin.token>` when a token is
//! configured. It changes jobs only through the store's own operations, and
//! never shows a secret: stored requests hold none.

use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use uuid::Uuid;

use crate::app::App;
use crate::shadow;
use crate::signature;
use crate::store::{JobFilter, JobState, Requeued, ShadowFilter, StoreError};
use crate::web::{Body, json_response};

/// The most jobs or events one listing returns.
const MAX_LIMIT: usize = 1000;

pub async fn handle<B>(app: &App, request: Request<B>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            let now = app.now();
            match app.store.queue_stats(now).await {
                Ok(stats) => {
                    let age = stats
                        .oldest_due
                        .and_then(|due| now.duration_since(due).ok())
                        .unwrap_or_default();
                    app.metrics.queue(&stats, age);
                }
                // Still serve the counters; the queue gauges keep their last values.
                Err(e) => tracing::warn!(error = %e, "cannot read the queue for /metrics"),
            }
            let mut response = Response::new(Body::from(app.metrics.encode()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => match app.store.ping(app.now()).await {
            Ok(()) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "unavailable", "message": e.to_string() }),
            ),
        },
        (_, p) if p.starts_with("/api/") => {
            if let Some(refusal) = authorize(app, &request) {
                return refusal;
            }
            api(app, &method, p, &query)
                .await
                .unwrap_or_else(ApiError::into_response)
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint at {method} {path}"),
        ),
    }
}

fn authorize<B>(app: &App, request: &Request<B>) -> Option<Response<Body>> {
    let config = app.config();
    let token = config.admin.as_ref()?.token.as_ref()?;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if signature::token_matches(token, presented.trim().as_bytes()) {
        return None;
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the admin API needs Authorization: Bearer <admin.token>".to_owned(),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    Some(response)
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    json_response(status, &json!({ "error": code, "message": message }))
}

/// Why an API call failed, with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message,
        }
    }

    fn into_response(self) -> Response<Body> {
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

fn param<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn limit(query: &[(String, String)]) -> Result<usize, ApiError> {
    match param(query, "limit") {
        None => Ok(100),
        Some(text) => text
            .parse::<usize>()
            .map(|n| n.clamp(1, MAX_LIMIT))
            .map_err(|_| ApiError::bad_request(format!("limit {text:?} is not a number"))),
    }
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("{text:?} is not a job id"),
    })
}

/// An RFC 3339 time, or a duration meaning that long ago (`2h`, `30m`).
pub fn parse_time(text: &str, now: SystemTime) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok().or_else(|| {
        humantime::parse_duration(text)
            .ok()
            .map(|ago| now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH))
    })
}

async fn api(
    app: &App,
    method: &Method,
    path: &str,
    query: &[(String, String)],
) -> Result<Response<Body>, ApiError> {
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::GET, ["events"]) => {
            let events = app.store.events(limit(query)?).await?;
            Ok(json_response(StatusCode::OK, &json!({ "events": events })))
        }
        (&Method::GET, ["shadow"]) => {
            let now = app.now();
            let since = match param(query, "since") {
                None => now
                    .checked_sub(Duration::from_secs(7 * 24 * 3600))
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                Some(text) => parse_time(text, now).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "since {text:?} is neither an RFC 3339 time nor a duration like 2h"
                    ))
                })?,
            };
            let jobs = app
                .store
                .shadow_jobs(ShadowFilter {
                    route: param(query, "route").map(str::to_owned),
                    commit: None,
                    since,
                    limit: MAX_LIMIT * 10,
                })
                .await?;
            let runs = shadow::runs(&jobs);
            let summary = shadow::summary(&runs);
            Ok(json_response(
                StatusCode::OK,
                &json!({ "summary": summary, "runs": runs.into_iter().take(limit(query)?).collect::<Vec<_>>() }),
            ))
        }
        (&Method::GET, ["jobs"]) => {
            let state = match param(query, "state") {
                None => None,
                Some(s) => Some(JobState::parse(s).ok_or_else(|| {
                    ApiError::bad_request(format!("state {s:?} is not one of queued, in_flight, done, dead"))
                })?),
            };
            let event = param(query, "event").map(parse_id).transpose()?;
            let filter = JobFilter {
                state,
                target: param(query, "target").map(str::to_owned),
                event,
                limit: limit(query)?,
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
                match (param(query, name), default) {
                    (Some(text), _) => parse_time(text, now).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{name} {text:?} is neither an RFC 3339 time nor a duration like 2h"
                        ))
                    }),
                    (None, Some(d)) => Ok(d),
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
            let id = parse_id(id)?;
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
            let id = parse_id(id)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = humantime::parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(parse_time("2h", now), Some(now - Duration::from_secs(7200)));
        assert_eq!(
            parse_time("2026-11-21T09:30:00Z", now),
            Some(humantime::parse_rfc3339("2026-11-21T09:30:00Z").unwrap())
        );
        assert_eq!(parse_time("yesterday", now), None);
    }
}
