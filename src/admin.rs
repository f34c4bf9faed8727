//! The admin listener: liveness and readiness probes for operators and
//! process supervisors.
//!
//! Read-only toward the queue; it never changes a job except through the
//! store's own operations, and never shows a secret.

use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::daemon::App;
use crate::server::{Body, json_response};

pub async fn handle<B>(app: &App, request: Request<B>) -> Response<Body> {
    if request.method() != Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method_not_allowed", "message": "the admin endpoints answer GET" }),
        );
    }
    match request.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &json!({ "status": "ok" })),
        "/readyz" => match app.store.ping(app.now()).await {
            Ok(()) => json_response(StatusCode::OK, &json!({ "status": "ready" })),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "unavailable", "message": e.to_string() }),
            ),
        },
        path => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": "not_found", "message": format!("no admin endpoint at {path}") }),
        ),
    }
}
