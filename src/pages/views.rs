//! What each page shows, read from the store and the config in force and
//! handed to its template. Every listing is a page of bounded size.
//!
//! Never: writes, or builds HTML by hand (the templates escape; this only
//! gathers values).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use minijinja::value::{Serde, Value};
use serde_json::json;
use uuid::Uuid;

use super::render;
use crate::app::App;
use crate::explain;
use crate::query::{self, Query, param};
use crate::shadow;
use crate::store::{EventFilter, JobFilter, JobState, StoreError};

/// The overview's "lately": sources' rates and targets' success.
const WINDOW: Duration = Duration::from_secs(3600);
/// Events the overview lists.
const OVERVIEW_EVENTS: usize = 15;
/// Events a page of `/events` lists, unless `?limit=` says otherwise.
const EVENTS_PAGE: usize = 50;
/// Dead jobs `/dead` lists (the most recent; about 100 KB of page).
const DEAD_PAGE: usize = 200;
/// The most of a body an event's page shows (the API has it whole).
const BODY_SHOWN: usize = 256 * 1024;

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
pub(super) enum PageError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the store cannot answer right now: {0}")]
    Store(#[from] StoreError),
    #[error("the page could not be rendered: {0}")]
    Render(#[from] minijinja::Error),
}

impl PageError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            PageError::NotFound(_) => StatusCode::NOT_FOUND,
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            PageError::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What every page's frame needs: whether changes need the token, and when.
fn frame(app: &App, nav: &str) -> serde_json::Value {
    let auth = app.config().admin.as_ref().is_some_and(|a| a.token.is_some());
    json!({ "auth": auth, "nav": nav, "now": rfc3339(app.now()) })
}

fn page(name: &str, mut context: serde_json::Value, frame: serde_json::Value) -> Result<String, PageError> {
    if let (Some(context), serde_json::Value::Object(frame)) = (context.as_object_mut(), frame) {
        context.extend(frame);
    }
    Ok(render(name, Value::from(Serde(context)))?)
}

pub(super) async fn overview(app: &App) -> Result<String, PageError> {
    let config = app.config();
    let now = app.now();
    let sources = config.sources.iter().map(|s| s.name.clone()).collect();
    let targets = config.targets.keys().cloned().collect();
    let since = now.checked_sub(WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
    let activity = app.store.activity(sources, targets, since, now).await?;
    let stats = app.store.queue_stats(now).await?;
    let events = app
        .store
        .events(
            EventFilter {
                limit: OVERVIEW_EVENTS,
                ..EventFilter::default()
            },
            now,
        )
        .await?;
    // The last week of shadow runs, when any route compares one.
    let shadow = if config.routes.iter().any(|r| config.route_has_shadow(&r.name)) {
        let runs = shadow::recent(app.store.as_ref(), None, None, now).await?;
        Some(shadow::summary(&runs))
    } else {
        None
    };
    let jobs: BTreeMap<&str, u64> = stats.jobs.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let minutes = WINDOW.as_secs_f64() / 60.0;
    let sources: Vec<_> = activity
        .sources
        .iter()
        .map(|s| {
            json!({
                "source": s.source,
                "last_received": s.last_received.map(rfc3339),
                "recent": s.recent,
                "rate": format!("{:.1}", s.recent as f64 / minutes),
            })
        })
        .collect();
    let targets: Vec<_> = activity
        .targets
        .iter()
        .map(|t| {
            let finished = t.done + t.dead;
            let mut row = json!(t);
            row["success"] = json!(if finished == 0 {
                "—".to_owned()
            } else {
                format!("{:.0}%", t.done as f64 * 100.0 / finished as f64)
            });
            row["last_error_at"] = json!(t.last_error_at.map(rfc3339));
            row
        })
        .collect();
    let context = json!({
        "window": humantime::format_duration(WINDOW).to_string(),
        "sources": sources,
        "targets": targets,
        "jobs": jobs,
        "dead_count": jobs.get("dead"),
        "events": events,
        "shadow": shadow,
    });
    page("overview.html", context, frame(app, "overview"))
}

pub(super) async fn events(app: &App, query: &Query) -> Result<String, PageError> {
    let now = app.now();
    let filter = query::event_filter(query, now, EVENTS_PAGE).map_err(PageError::BadRequest)?;
    let limit = filter.limit;
    let before = filter.before;
    let events = app.store.events(filter, now).await?;
    // The same filters, without the cursor (the first page), and with the
    // last event shown as the cursor (the next page, when this one is full).
    let kept: Vec<(&str, &str)> = ["source", "repo", "kind", "state", "since", "until", "limit"]
        .into_iter()
        .filter_map(|name| param(query, name).map(|v| (name, v)))
        .collect();
    let encode = |extra: Option<&str>| {
        let mut out = form_urlencoded::Serializer::new(String::new());
        out.extend_pairs(&kept);
        if let Some(cursor) = extra {
            out.append_pair("before", cursor);
        }
        out.finish()
    };
    let next = events
        .last()
        .filter(|_| events.len() == limit)
        .map(|e| encode(Some(&e.id)));
    let shown: BTreeMap<&str, &str> = kept.iter().copied().collect();
    let mut filter_shown = json!(shown);
    filter_shown["before"] = json!(before.map(|b| b.to_string()));
    let context = json!({
        "events": events,
        "filter": filter_shown,
        "kinds": ["push", "tag", "branch_delete", "tag_delete", "pipeline", "ping", "other"],
        "states": [JobState::Queued, JobState::InFlight, JobState::Done, JobState::Dead],
        "first_query": encode(None),
        "next_query": next,
    });
    page("events.html", context, frame(app, "events"))
}

pub(super) async fn event(app: &App, id: &str) -> Result<String, PageError> {
    let not_found = || PageError::NotFound(format!("no event {id}"));
    let parsed = Uuid::parse_str(id).map_err(|_| not_found())?;
    let stored = app.store.event(parsed).await?.ok_or_else(not_found)?;
    let jobs = app.store.event_jobs(parsed).await?;
    let config = app.config();
    let (explanation, explain_error) = match explain::stored(&config, &stored, app.now()) {
        Ok(explanation) => (Some(explanation), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let context = json!({
        "event": stored.view,
        "content_type": stored.content_type,
        "hop": stored.hop,
        "body": shown_body(&stored.body),
        "explanation": explanation,
        "explain_error": explain_error,
        "jobs": jobs,
    });
    page("event.html", context, frame(app, "events"))
}

/// A body as a person reads it: JSON indented, anything else as text,
/// cut at [`BODY_SHOWN`].
fn shown_body(body: &[u8]) -> String {
    let mut text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    if text.len() > BODY_SHOWN {
        let mut cut = BODY_SHOWN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n… (cut here; GET /api/events/{id} has the whole body)");
    }
    text
}

pub(super) async fn dead(app: &App) -> Result<String, PageError> {
    let jobs = app
        .store
        .jobs(JobFilter {
            state: Some(JobState::Dead),
            limit: DEAD_PAGE,
            ..JobFilter::default()
        })
        .await?;
    let mut by_target: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for job in &jobs {
        by_target.entry(job.target.as_str()).or_default().push(job);
    }
    let targets: Vec<_> = by_target
        .into_iter()
        .map(|(target, jobs)| json!({ "target": target, "jobs": jobs }))
        .collect();
    let context = json!({ "targets": targets, "dead_count": jobs.len() });
    page("dead.html", context, frame(app, "dead"))
}
