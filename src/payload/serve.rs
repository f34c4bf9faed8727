//! `GET /payloads/{event}` on the ingress listener: a CI job holding a
//! signed URL fetches the webhook's body, exactly as received. Reads the
//! store, never writes it; the signature is checked before the store is asked.

use http::{Method, Request, Response, StatusCode, header};
use serde_json::json;

use super::{PATH_PREFIX, UrlError, verify_uri};
use crate::app::App;
use crate::web::{Body, json_response};

/// Answers `GET /payloads/{event}`.
pub async fn handle<B>(app: &App, request: &Request<B>) -> Response<Body> {
    let refuse = |status: StatusCode, code: &str, message: String| {
        json_response(status, &json!({ "error": code, "message": message }))
    };
    if request.method() != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "payload URLs answer GET".to_owned(),
        );
    }
    let config = app.config();
    let Some(settings) = &config.server.payload else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "payload URLs are not enabled (server.public_url and server.payload_key)".to_owned(),
        );
    };
    let event = request.uri().path().trim_start_matches(PATH_PREFIX);
    let id = match verify_uri(settings, request.uri(), app.now()) {
        Ok(id) => id,
        Err(UrlError::NotFound) => {
            return refuse(StatusCode::NOT_FOUND, "not_found", format!("no event {event}"));
        }
        Err(e) => return refuse(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
    };
    match app.store.event_body(id).await {
        Ok(Some((content_type, body))) => {
            let mut response = Response::new(Body::from(body));
            if let Ok(value) = http::HeaderValue::from_str(&content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        }
        Ok(None) => refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("event {id} is not in the store (older than store.retention?)"),
        ),
        Err(e) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        ),
    }
}
