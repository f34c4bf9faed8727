//! The admin listener: liveness and readiness probes, `/metrics`, the JSON
//! API that operators (and `relay jobs`, `relay events`) use to see what
//! happened, retry what died and replay what came in (`api.rs`), and the
//! status pages a person reads in a browser (`crate::pages`).
//!
//! Who may read and who may change is `access.rs`'s to say, for the API and
//! the pages alike. Every answer carries the same security headers (a
//! Content-Security-Policy that runs no inline script, `nosniff`, no
//! framing). It changes jobs only through the store's own operations and
//! the accept path's replay, and never shows a secret: stored requests hold
//! none.

mod access;
mod api;

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;

use crate::app::App;
use crate::pages;
use crate::web::{Body, json_response};

use access::Intent;

/// What the pages and the API may load and run: relay's own stylesheet and
/// script, nothing inline, nothing from elsewhere, and no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub async fn handle<B>(app: &Arc<App>, request: Request<B>) -> Response<Body> {
    let mut response = route(app, request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn route<B>(app: &Arc<App>, request: Request<B>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => metrics(app).await,
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => match app.store.ping(app.now()).await {
            Ok(()) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "unavailable", "message": e.to_string() }),
            ),
        },
        // The stylesheet and the script hold nothing of relay's state.
        (&Method::GET, p) if p.starts_with(pages::ASSETS) => pages::asset(p),
        (_, p) if p.starts_with("/api/") => {
            let intent = if method == Method::GET {
                Intent::Read
            } else {
                Intent::Change
            };
            if let Err(refused) = check(app, &request, intent) {
                let mut response = error(refused.status(), refused.code(), refused.to_string());
                if refused.status() == StatusCode::UNAUTHORIZED {
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                return response;
            }
            api::answer(app, &method, p, &query)
                .await
                .unwrap_or_else(api::ApiError::into_response)
        }
        (&Method::GET, p) if pages::serves(p) => {
            if let Err(refused) = check(app, &request, Intent::Read) {
                return pages::refused(refused.status(), &refused.to_string());
            }
            pages::page(app, p, &query).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint at {method} {path}"),
        ),
    }
}

fn check<B>(app: &App, request: &Request<B>, intent: Intent) -> Result<(), access::Refused> {
    let config = app.config();
    let token = config.admin.as_ref().and_then(|a| a.token.as_ref());
    access::check(token, request.headers(), intent)
}

async fn metrics(app: &App) -> Response<Body> {
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
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    json_response(status, &json!({ "error": code, "message": message }))
}
