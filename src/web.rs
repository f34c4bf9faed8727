//! What every HTTP handler of relay's listeners answers with: a small,
//! complete body, and JSON built one way. Knows nothing of webhooks, the
//! store or the config.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

/// Every response body relay sends is small and complete.
pub type Body = Full<Bytes>;

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
