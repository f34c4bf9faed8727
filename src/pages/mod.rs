//! The status pages a person reads in a browser, on the admin listener:
//! the overview (`/`), events with filters (`/events`), one event with its
//! verdicts, jobs and body (`/events/{id}`), and the dead jobs (`/dead`).
//!
//! Rendered on the server by a minijinja environment of their own, with
//! HTML auto-escaping on for every template: branch names, commit messages,
//! pusher names and bodies come from whoever can push, and reach the page
//! only as escaped text. The stylesheet and the one script (`assets/`) are
//! in the binary; the pages work without the script (it adds refreshing and
//! the retry and replay buttons, which call the admin API).
//!
//! Never: decides who may read (the admin listener asked `access` before),
//! changes anything (the buttons' script calls the API), shows a secret, or
//! loads anything from elsewhere.

mod views;

use std::sync::OnceLock;

use http::{HeaderValue, Response, StatusCode, header};
use minijinja::{AutoEscape, Environment, Value};

use crate::app::App;
use crate::query::Query;
use crate::web::Body;

/// Where the stylesheet and the script are served.
pub const ASSETS: &str = "/assets/";

/// The pages' templates, compiled into the binary.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("macros.html", include_str!("templates/macros.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("events.html", include_str!("templates/events.html")),
    ("event.html", include_str!("templates/event.html")),
    ("dead.html", include_str!("templates/dead.html")),
    ("error.html", include_str!("templates/error.html")),
];

/// Whether `path` is one of the pages.
pub fn serves(path: &str) -> bool {
    matches!(path, "/" | "/events" | "/dead") || path.starts_with("/events/")
}

/// Answers one page.
pub async fn page(app: &App, path: &str, query: &Query) -> Response<Body> {
    let rendered = match path {
        "/" => views::overview(app).await,
        "/events" => views::events(app, query).await,
        "/dead" => views::dead(app).await,
        _ => match path.strip_prefix("/events/") {
            Some(id) => views::event(app, id).await,
            None => Err(views::PageError::NotFound(format!("no page at {path}"))),
        },
    };
    match rendered {
        Ok(html) => html_response(StatusCode::OK, html),
        Err(e) => {
            let status = e.status();
            html_response(status, error_page(status, &e.to_string()))
        }
    }
}

/// The page a refused reader sees; it asks the browser for the token
/// (HTTP Basic: any user name, the token as the password).
pub fn refused(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = html_response(status, error_page(status, message));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"relay admin\", charset=\"UTF-8\""),
        );
    }
    response
}

/// The stylesheet or the script.
pub fn asset(path: &str) -> Response<Body> {
    let (body, content_type) = match path.strip_prefix(ASSETS) {
        Some("relay.css") => (include_str!("assets/relay.css"), "text/css; charset=utf-8"),
        Some("relay.js") => (include_str!("assets/relay.js"), "text/javascript; charset=utf-8"),
        _ => {
            return html_response(
                StatusCode::NOT_FOUND,
                error_page(StatusCode::NOT_FOUND, "no such asset"),
            );
        }
    };
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn html_response(status: StatusCode, html: String) -> Response<Body> {
    let mut response = Response::new(Body::from(html));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // What a page shows is the store's state now, and may be sensitive.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error_page(status: StatusCode, message: &str) -> String {
    let context = minijinja::context! {
        status => status.to_string(),
        message => message,
    };
    render("error.html", context).unwrap_or_else(|_| {
        // The error page itself failed: plain text, escaped by hand.
        format!("{status}: {}", message.replace('&', "&amp;").replace('<', "&lt;"))
    })
}

/// The pages' environment: every template escaped as HTML, and two helpers
/// (`safe_link`, which tells a URL a person may follow from one that could
/// run script).
fn environment() -> &'static Environment<'static> {
    static PAGES: OnceLock<Environment<'static>> = OnceLock::new();
    PAGES.get_or_init(|| {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.add_test("safe_link", |url: Option<&str>| {
            url.is_some_and(|u| u.starts_with("https://") || u.starts_with("http://"))
        });
        for (name, source) in TEMPLATES {
            if let Err(e) = env.add_template(name, source) {
                // A template that does not compile is a bug of this build:
                // the unit test below catches it before a release does.
                tracing::error!(template = name, error = %e, "a status page template does not compile");
            }
        }
        env
    })
}

/// Renders `name` with `context`, plus what every page shows.
fn render(name: &str, context: Value) -> Result<String, minijinja::Error> {
    let common = minijinja::context! {
        version => env!("CARGO_PKG_VERSION"),
    };
    environment()
        .get_template(name)?
        .render(minijinja::context! { ..context, ..common })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_escapes() {
        for (name, _) in TEMPLATES {
            environment().get_template(name).unwrap();
        }
        let html = error_page(StatusCode::NOT_FOUND, "<script>alert(1)</script>");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>alert"), "{html}");
    }
}
