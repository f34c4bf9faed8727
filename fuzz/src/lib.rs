//! The harness every fuzz target shares: one config with a source per
//! provider and a target of each kind whose templates read every event field,
//! and `deliver`, which takes a request the way the accept path does
//! (`Source::receive`, `Source::parse`, then for the template target
//! `routing::plan` and the redacted request) through relay's public API only.
//! Nothing here touches a store or a socket; its own clock is fixed ([`now`]).
//!
//! Beyond "never panics", it checks what must hold for any input: no
//! configured secret appears in an error message or a rendered request, and
//! a request signed with the right secret is never refused for its signature.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use relay::config::Config;
use relay::event::Files;
use relay::ingress::{IngressError, Parsed, Source};
use relay::routing;

/// Every secret the config holds; none may ever be shown.
pub const SECRETS: &[&str] = &[
    "fuzz-github-secret-51x",
    "fuzz-gitlab-token-52x",
    "fuzz-signing-key-53x",
    "fuzz-bitbucket-secret-54x",
    "fuzz-gitea-secret-55x",
    "fuzz-circleci-secret-56x",
    "fuzz-generic-secret-57x",
    "fuzz-pipeline-secret-58x",
    "fuzz-circle-token-59x",
    "fuzz-v1-token-60x",
    "fuzz-trigger-token-61x",
    "fuzz-http-sign-62x",
    "fuzz-payload-key-63x",
];

/// The GitLab signing token: `whsec_` and base64 of `fuzz-signing-key-53x`.
const SIGNING_TOKEN: &str = "whsec_ZnV6ei1zaWduaW5nLWtleS01M3g=";

/// A fixed clock, so a failing input fails again when replayed.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The config every target runs against.
pub static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
public_url = "https://relay.example.com"
payload_key = "{payload_key}"

[store]
url = "sqlite:///nonexistent/relay-fuzz.db"

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{github}"
allow_sha1 = true

[sources.gitlab]
provider = "gitlab"
path = "/hooks/gitlab"
token = "{gitlab}"
signing_token = "{SIGNING_TOKEN}"

[sources.bitbucket]
provider = "bitbucket"
path = "/hooks/bitbucket"
secret = "{bitbucket}"

[sources.gitea]
provider = "gitea"
path = "/hooks/gitea"
secret = "{gitea}"

[sources.circleci]
provider = "circleci"
path = "/hooks/circleci"
secret = "{circleci}"

[sources.generic]
provider = "generic"
path = "/hooks/generic"
secret = "{generic}"
signature = {{ header = "X-Signature", algorithm = "sha256", prefix = "sha256=" }}
event_header = "X-Event"
delivery_header = "X-Delivery"

[sources.generic-pipeline]
provider = "generic"
path = "/hooks/generic-pipeline"
secret = "{pipeline}"
kind = "pipeline"
signature = {{ header = "X-Signature", algorithm = "sha512", prefix = "", encoding = "base64" }}
fields = {{ repo = "/project", ref = "/ref", sha = "/sha", status = "/status", pipeline_id = "/id", pipeline_number = "/number", pipeline_source = "/trigger", workflow = "/workflow", delivery = "/delivery" }}

[[routes]]
name = "everything"
events = ["push", "tag"]
paths = ["**"]
when = "repo != '' and (message is string) and pusher not in ['ignored-bot']"
to = ["http", "circle", "circle-v1", "trigger", "trigger-payload"]

[[routes]]
name = "outcomes"
events = ["pipeline"]
when = "status in ['success', 'failed'] or variables | length > 0 or pipeline_id"
to = ["http", "circle"]

[targets.http]
kind = "http"
url = "https://ci.example.com/{{{{ repo | urlencode }}}}/{{{{ ref | urlencode }}}}?sha={{{{ sha }}}}&m={{{{ message | urlencode }}}}&p={{{{ pusher }}}}"
sign = {{ secret = "{http}" }}

[targets.circle]
kind = "circleci"
project = "gh/{{{{ repo | replace('/', '-') }}}}"
branch = "{{{{ branch or 'main' }}}}"
token = "{circle}"
payload_parameter = "payload_url"
parameters = {{ sha = "{{{{ sha }}}}", before = "{{{{ before }}}}", message = "{{{{ message }}}}", pusher = "{{{{ pusher | upper }}}}", paths = "{{{{ paths | join(',') }}}}", tag = "{{{{ tag }}}}", status = "{{{{ status }}}}", id = "{{{{ pipeline_id }}}}", number = "{{{{ pipeline_number }}}}", workflow = "{{{{ workflow }}}}", variables = "{{{{ variables | tojson }}}}", delivery = "{{{{ delivery }}}}", hook = "{{{{ hook }}}}", upstream = "{{{{ upstream.event_id }}}}", head = "{{{{ payload.head_commit.message }}}}", repo_url = "{{{{ repo_url }}}}", created = "{{{{ created }}}}{{{{ deleted }}}}{{{{ forced }}}}", hop = "{{{{ hop }}}}" }}

[targets.circle-v1]
kind = "circleci_v1"
project = "gh/acme/legacy"
job = "build"
branch = "{{{{ branch or 'main' }}}}"
token = "{v1}"
build_parameters = {{ SHA = "{{{{ sha }}}}", MESSAGE = "{{{{ message | trim }}}}" }}

[targets.trigger]
kind = "gitlab"
base_url = "https://gitlab.example.com"
project = "acme/{{{{ repo | lower }}}}"
token = "{trigger}"
ref = "main"
variables = {{ UPSTREAM_SHA = "{{{{ sha }}}}", UPSTREAM_REF = "{{{{ ref }}}}", MESSAGE = "{{{{ message }}}}" }}

[targets.trigger-payload]
kind = "gitlab"
base_url = "https://gitlab.example.com"
project = "acme/deploy"
token = "{trigger}"
forward_payload = true
"#,
        payload_key = SECRETS[12],
        github = SECRETS[0],
        gitlab = SECRETS[1],
        bitbucket = SECRETS[3],
        gitea = SECRETS[4],
        circleci = SECRETS[5],
        generic = SECRETS[6],
        pipeline = SECRETS[7],
        circle = SECRETS[8],
        v1 = SECRETS[9],
        trigger = SECRETS[10],
        http = SECRETS[11],
    );
    match Config::from_toml(&text) {
        Ok(config) => config,
        Err(e) => panic!("the fuzz harness's config does not compile: {e}"),
    }
});

/// The named source of [`CONFIG`].
pub fn source(name: &str) -> &'static Source {
    match CONFIG.source(name) {
        Some(s) => s,
        None => panic!("the fuzz config has no source {name}"),
    }
}

/// Panics when `text` holds a configured secret.
pub fn assert_no_secret(place: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{place} shows the secret {secret}: {text}"
        );
    }
}

/// The headers the source's sender would send with `body`, signed with the
/// right secret; `form` turns the content type into a form post's.
pub fn signed_headers(source: &Source, hook: &str, body: &[u8], form: bool) -> HeaderMap {
    let mut headers = source.sender_headers(hook, body, "fuzz-delivery-1", now());
    if form {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
    }
    headers
}

/// Adds `name: value` when both are valid HTTP; hostile bytes that could
/// not travel in a header are dropped, as hyper would refuse them.
pub fn add_header(headers: &mut HeaderMap, name: &str, value: &[u8]) {
    if let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_bytes(value),
    ) {
        headers.append(name, value);
    }
}

/// What [`deliver`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    Refused(u16),
    Ping,
    Events {
        events: usize,
        jobs: usize,
        dropped: usize,
    },
}

/// How far [`deliver`] takes a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Verify and parse: the provider, signature and form targets, whose
    /// executions go to the parsers (rendering is the template target's).
    Parse,
    /// On through `routing::plan` and the redacted request.
    Render,
}

/// One request through the accept path's pure steps: verify, parse, and
/// with [`Depth::Render`] plan (routes, guard, rendering) and the redacted
/// request as `relay explain` and the logs show it. `signed` says the
/// headers carry the right signature over `body`, so a signature refusal is
/// a bug.
pub fn deliver(source: &Source, headers: &HeaderMap, body: &[u8], signed: bool, depth: Depth) -> Delivered {
    let outcome = deliver_inner(source, headers, body, signed, depth);
    if *TRACE {
        eprintln!("{}: {outcome:?}", source.name);
    }
    outcome
}

/// `RELAY_FUZZ_TRACE=1` prints what became of each input (to check that
/// the seeds reach the parsers and the planner, not just the signature check).
static TRACE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("RELAY_FUZZ_TRACE").is_some());

fn deliver_inner(source: &Source, headers: &HeaderMap, body: &[u8], signed: bool, depth: Depth) -> Delivered {
    let webhook = match source.receive(headers, Bytes::copy_from_slice(body), now()) {
        Ok(w) => w,
        Err(e) => return refused(e, signed),
    };
    let events = match source.parse(&webhook, Files::Read) {
        Ok(Parsed::Ping) => return Delivered::Ping,
        Ok(Parsed::Events(events)) => events,
        Err(e) => return refused(e.into(), signed),
    };
    if depth == Depth::Parse {
        return Delivered::Events {
            events: events.len(),
            jobs: 0,
            dropped: 0,
        };
    }
    let plan = routing::plan(&CONFIG.router(), source, &webhook, &events, &[], now());
    for job in &plan.jobs {
        match &job.request {
            Ok(request) => assert_no_secret("a rendered request", &request.redacted(Some(webhook.payload()))),
            Err(reason) => assert_no_secret("a render failure", reason),
        }
    }
    for dropped in &plan.dropped {
        assert_no_secret("a drop", &dropped.dropped.reason);
    }
    let rejections = serde_json::to_string(&plan.rejected()).expect("the rejections serialize");
    assert_no_secret("the rejections", &rejections);
    Delivered::Events {
        events: events.len(),
        jobs: plan.jobs.len(),
        dropped: plan.dropped.len(),
    }
}

fn refused(error: IngressError, signed: bool) -> Delivered {
    assert!(
        !(signed && matches!(error, IngressError::Signature(_))),
        "a correctly signed request was refused: {error}"
    );
    assert_no_secret("an error message", &error.to_string());
    let status = error.status().as_u16();
    assert!((400..500).contains(&status), "{error} answers {status}");
    Delivered::Refused(status)
}

/// The provider targets' input: the first byte picks options, the rest is
/// the body. `seed.sh` writes fixtures in this shape.
pub fn split(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(flags, body)| (*flags, body))
}

/// Runs a provider's body through `deliver`, correctly signed, as JSON or a
/// form post, under one of `hooks` picked by `flags`.
pub fn fuzz_provider(name: &str, hooks: &[&str], data: &[u8]) {
    let Some((flags, body)) = split(data) else {
        return;
    };
    let source = source(name);
    let hook = hooks[usize::from(flags >> 1) % hooks.len()];
    let form = flags & 1 == 1;
    // A form post's JSON document is its `payload` field, escaped.
    let body: Vec<u8> = if form {
        let mut out = b"payload=".to_vec();
        out.extend(form_escape(body));
        out
    } else {
        body.to_vec()
    };
    // Gitea signs the JSON document of a form post, not the form: the
    // `payload` field as text (a form field is text; bytes that are not
    // UTF-8 decode to U+FFFD, and no JSON document has them).
    let document;
    let signed_bytes: &[u8] = if form && name == "gitea" {
        document = String::from_utf8_lossy(data_body(data)).into_owned();
        document.as_bytes()
    } else {
        &body
    };
    let headers = signed_headers(source, hook, signed_bytes, form);
    deliver(source, &headers, &body, true, Depth::Parse);
}

fn data_body(data: &[u8]) -> &[u8] {
    data.get(1..).unwrap_or_default()
}

fn form_escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.*".contains(&b) {
            out.push(b);
        } else {
            out.extend(format!("%{b:02X}").into_bytes());
        }
    }
    out
}
