//! Ingress: turn one HTTP request on a source's path into a committed event.
//!
//! The shared checks live here (path, method, peer address, size, content
//! type), then the provider's module verifies the raw bytes and parses them
//! into [`Event`]s. The request is answered only after the store committed the
//! event and its jobs. This module never calls a target: nothing outbound
//! happens on the request path.

mod bitbucket;
mod generic;
mod gitea;
mod github;
mod gitlab;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use ipnet::IpNet;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::config::{Compiler, RawSource};
use crate::daemon::App;
use crate::dispatch;
use crate::event::{Event, Files, Provider, Webhook};
use crate::guard::Dropped;
use crate::routing::{self, Plan};
use crate::server::{Body, json_response};
use crate::store::{ClaimedJob, HeldBack, Ingested, Lease, NewEvent, NewJob, StoreError};

/// A configured `[sources.NAME]`.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub path: String,
    pub provider: Provider,
    settings: Settings,
    /// Pushes by these users are not routed (the bot a pipeline pushes back with).
    pub ignore_pushers: Vec<String>,
    access: Option<Access>,
}

/// Each provider's own verification settings.
#[derive(Debug)]
enum Settings {
    Github(github::Settings),
    Gitlab(gitlab::Settings),
    Bitbucket(bitbucket::Settings),
    Gitea(gitea::Settings),
    Generic(generic::Settings),
}

/// `allow_ips` and the proxies whose `X-Forwarded-For` is believed.
#[derive(Debug)]
struct Access {
    allow: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

impl Source {
    pub fn compile(name: &str, raw: RawSource, c: &mut Compiler) -> Option<Source> {
        let key = format!("sources.{name}");
        let before = c.problem_count();
        if !raw.path.starts_with('/') {
            c.problem(format!("{key}.path"), "must start with '/', like /hooks/github");
        }
        let access = match (&raw.allow_ips, &raw.trusted_proxies) {
            (None, None) => None,
            (allow, proxies) => Some(Access {
                allow: parse_nets(&format!("{key}.allow_ips"), allow.as_deref(), c),
                trusted_proxies: parse_nets(&format!("{key}.trusted_proxies"), proxies.as_deref(), c),
            }),
        };
        let present = raw.present();
        let owner = format!("provider {:?}", raw.provider.as_str());
        let settings = match raw.provider {
            Provider::Github => {
                c.only_keys(&key, &present, &["secret", "allow_sha1"], &owner);
                github::Settings::compile(&key, &raw, c).map(Settings::Github)
            }
            Provider::Gitlab => {
                c.only_keys(&key, &present, &["token", "signing_token"], &owner);
                gitlab::Settings::compile(&key, &raw, c).map(Settings::Gitlab)
            }
            Provider::Bitbucket => {
                c.only_keys(&key, &present, &["secret"], &owner);
                bitbucket::Settings::compile(&key, &raw, c).map(Settings::Bitbucket)
            }
            Provider::Gitea => {
                c.only_keys(&key, &present, &["secret"], &owner);
                gitea::Settings::compile(&key, &raw, c).map(Settings::Gitea)
            }
            Provider::Generic => {
                c.only_keys(
                    &key,
                    &present,
                    &["secret", "signature", "event_header", "delivery_header", "fields"],
                    &owner,
                );
                generic::Settings::compile(&key, &raw, c).map(Settings::Generic)
            }
        };
        if c.problem_count() > before {
            return None;
        }
        Some(Source {
            name: name.to_owned(),
            path: raw.path,
            provider: raw.provider,
            settings: settings?,
            ignore_pushers: raw.ignore_pushers.unwrap_or_default(),
            access,
        })
    }

    /// A one-line description for `relay check`, naming secrets by origin only.
    pub fn describe(&self) -> String {
        let auth = match &self.settings {
            Settings::Github(s) => s.describe(),
            Settings::Gitlab(s) => s.describe(),
            Settings::Bitbucket(s) => s.describe(),
            Settings::Gitea(s) => s.describe(),
            Settings::Generic(s) => s.describe(),
        };
        format!("{} POST {} ({auth})", self.provider, self.path)
    }

    /// Verifies the request and reads the provider's headers; the one way to
    /// obtain a [`Webhook`].
    pub fn receive(&self, headers: &HeaderMap, body: Bytes) -> Result<Webhook, IngressError> {
        let content = ContentKind::of(headers)?;
        let received = match &self.settings {
            Settings::Github(s) => github::receive(s, &self.name, headers, &body, content)?,
            Settings::Gitlab(s) => gitlab::receive(s, &self.name, headers, &body, content)?,
            Settings::Bitbucket(s) => bitbucket::receive(s, &self.name, headers, &body, content)?,
            Settings::Gitea(s) => gitea::receive(s, &self.name, headers, &body, content)?,
            Settings::Generic(s) => generic::receive(s, &self.name, headers, &body, content)?,
        };
        let hop = header_str(headers, HOP_HEADER)
            .and_then(|h| h.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(Webhook {
            id: Uuid::now_v7(),
            source: self.name.clone(),
            provider: self.provider,
            hook: received.hook,
            delivery: received.delivery,
            content_type: content.mime().to_owned(),
            body: received.body.unwrap_or(body),
            payload: received.payload,
            hop,
        })
    }

    /// The headers a real sender would attach to `body` (a JSON document),
    /// signed with this source's current secret: for `relay send` and
    /// `relay explain`, which then go through [`Source::receive`] like any
    /// request.
    pub fn sender_headers(&self, hook: &str, body: &[u8], delivery: &str) -> HeaderMap {
        let pairs: Vec<(String, String)> = match &self.settings {
            Settings::Github(s) => owned(github::sign(s, hook, body, delivery)),
            Settings::Gitlab(s) => owned(gitlab::sign(s, hook, body, delivery, SystemTime::now())),
            Settings::Bitbucket(s) => owned(bitbucket::sign(s, hook, body, delivery)),
            Settings::Gitea(s) => owned(gitea::sign(s, hook, body, delivery)),
            Settings::Generic(s) => generic::sign(s, hook, body, delivery),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        headers
    }

    /// Parses a verified webhook into events (several for a Bitbucket push).
    /// `files` says whether the files each pushed commit touched are read
    /// (GitHub and Gitea; the others' file lists are small or absent).
    pub fn parse(&self, webhook: &Webhook, files: Files) -> Result<Parsed, PayloadError> {
        match &self.settings {
            Settings::Github(_) => github::parse(&webhook.hook, &webhook.payload, files),
            Settings::Gitlab(_) => gitlab::parse(&webhook.hook, &webhook.payload),
            Settings::Bitbucket(_) => bitbucket::parse(&webhook.hook, &webhook.payload),
            Settings::Gitea(_) => gitea::parse(&webhook.hook, &webhook.payload, files),
            Settings::Generic(s) => generic::parse(s, &webhook.hook, &webhook.payload),
        }
    }

    fn check_peer(&self, peer: IpAddr, headers: &HeaderMap) -> Result<(), IngressError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let client = client_address(peer, headers, &access.trusted_proxies);
        if access.allow.is_empty() || access.allow.iter().any(|net| net.contains(&client)) {
            Ok(())
        } else {
            Err(IngressError::Forbidden { client })
        }
    }
}

fn owned(pairs: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn parse_nets(key: &str, list: Option<&[String]>, c: &mut Compiler) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for (i, item) in list.unwrap_or_default().iter().enumerate() {
        let parsed = IpNet::from_str(item).or_else(|_| IpAddr::from_str(item).map(IpNet::from));
        match parsed {
            Ok(net) => nets.push(net),
            Err(_) => c.problem(
                format!("{key}[{i}]"),
                format!("{item:?} is not an address or CIDR range like 192.0.2.0/24"),
            ),
        }
    }
    nets
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| IpAddr::from_str(part.trim()).ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// The hop count a relay-triggered request carries.
pub const HOP_HEADER: &str = "x-relay-hop";
pub const HOP_HEADER_NAME: &str = "X-Relay-Hop";

/// What a provider hands back once the request is verified.
#[derive(Debug)]
struct Received {
    hook: String,
    delivery: Option<String>,
    /// Replaces the body as stored, when the provider had to remove something
    /// from it (see `gitea::strip_legacy_secret`).
    body: Option<Bytes>,
    /// The JSON document (the body, or a form post's `payload` field).
    payload: Bytes,
}

/// The result of parsing a verified webhook.
#[derive(Debug)]
pub enum Parsed {
    Ping,
    Events(Vec<Event>),
}

/// The two body encodings Git hosts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentKind {
    Json,
    Form,
}

impl ContentKind {
    fn of(headers: &HeaderMap) -> Result<ContentKind, IngressError> {
        let raw = header_str(headers, header::CONTENT_TYPE.as_str()).unwrap_or("");
        let mime = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match mime.as_str() {
            "application/json" => Ok(ContentKind::Json),
            "application/x-www-form-urlencoded" => Ok(ContentKind::Form),
            _ if mime.ends_with("+json") => Ok(ContentKind::Json),
            _ => Err(IngressError::UnsupportedMediaType {
                content_type: raw.chars().take(100).collect(),
            }),
        }
    }

    fn mime(self) -> &'static str {
        match self {
            ContentKind::Json => "application/json",
            ContentKind::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// The JSON document of a form post: its `payload` field.
fn form_payload(body: &[u8]) -> Result<Bytes, PayloadError> {
    form_urlencoded::parse(body)
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| Bytes::from(value.into_owned()))
        .ok_or(PayloadError::NoFormPayload)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header the provider always sends, as text.
fn required_header(headers: &HeaderMap, name: &'static str) -> Result<String, PayloadError> {
    match header_str(headers, name) {
        Some(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => Err(PayloadError::MissingHeader { header: name }),
    }
}

/// Parses JSON into a provider's typed payload, naming what was wrong.
fn from_json<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, PayloadError> {
    serde_json::from_slice(payload).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            PayloadError::Field(e.to_string())
        } else {
            PayloadError::NotJson(e.to_string())
        }
    })
}

/// Why a signature or token check refused a request. Messages say what to
/// fix; none carries the secret or the expected value.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "missing {header} header: the sender signed nothing; give the webhook the secret configured in sources.{config_source}"
    )]
    Missing {
        header: &'static str,
        config_source: String,
    },
    #[error(
        "{header} is empty: the webhook in the Git host has no secret; set it to the secret configured in sources.{config_source}"
    )]
    Empty {
        header: &'static str,
        config_source: String,
    },
    #[error("{header} is malformed: expected {expected}")]
    Malformed {
        header: &'static str,
        expected: &'static str,
    },
    #[error(
        "{header} does not match the body: the webhook's secret differs from sources.{config_source}, or the body was changed on the way"
    )]
    Mismatch {
        header: &'static str,
        config_source: String,
    },
    #[error("{header} does not match the token configured in sources.{config_source}")]
    TokenMismatch {
        header: &'static str,
        config_source: String,
    },
    #[error(
        "webhook-timestamp is {skew_secs}s away from relay's clock; more than 300s is refused as a possible replay"
    )]
    Stale { skew_secs: u64 },
}

impl SignatureError {
    fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing { .. } => "signature_missing",
            SignatureError::Empty { .. } => "signature_empty",
            SignatureError::Malformed { .. } => "signature_malformed",
            SignatureError::Mismatch { .. } => "signature_mismatch",
            SignatureError::TokenMismatch { .. } => "token_mismatch",
            SignatureError::Stale { .. } => "signature_stale",
        }
    }
}

/// A verified body relay cannot use.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("missing {header} header: relay reads the event name from it")]
    MissingHeader { header: &'static str },
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("the JSON body lacks a field relay needs or has one of the wrong type: {0}")]
    Field(String),
    #[error("the form-encoded body has no payload field (the JSON document is sent as payload=…)")]
    NoFormPayload,
    #[error("{0}")]
    Invalid(String),
}

/// Everything that stops a webhook from being accepted, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("no source is configured at {path}")]
    NotFound { path: String },
    #[error("{method} is not accepted here; Git hosts deliver webhooks with POST")]
    MethodNotAllowed { method: Method },
    #[error("{client} is not in this source's allow_ips")]
    Forbidden { client: IpAddr },
    #[error("the body is larger than server.max_body ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error(
        "content type {content_type:?} is not accepted; use application/json or application/x-www-form-urlencoded"
    )]
    UnsupportedMediaType { content_type: String },
    #[error("the request did not arrive within server.request_timeout")]
    Timeout,
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("the store cannot accept the webhook right now; it was not recorded, so retry later: {0}")]
    Store(#[from] StoreError),
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::NotFound { .. } => StatusCode::NOT_FOUND,
            IngressError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            IngressError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngressError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngressError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngressError::Timeout => StatusCode::REQUEST_TIMEOUT,
            IngressError::BodyRead(_) => StatusCode::BAD_REQUEST,
            IngressError::Signature(_) => StatusCode::UNAUTHORIZED,
            IngressError::Payload(_) => StatusCode::BAD_REQUEST,
            IngressError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, machine-readable code for the JSON body and the logs.
    pub fn code(&self) -> &'static str {
        match self {
            IngressError::NotFound { .. } => "not_found",
            IngressError::MethodNotAllowed { .. } => "method_not_allowed",
            IngressError::Forbidden { .. } => "forbidden",
            IngressError::TooLarge { .. } => "too_large",
            IngressError::UnsupportedMediaType { .. } => "unsupported_media_type",
            IngressError::Timeout => "timeout",
            IngressError::BodyRead(_) => "body_unreadable",
            IngressError::Signature(e) => e.code(),
            IngressError::Payload(PayloadError::MissingHeader { .. }) => "missing_header",
            IngressError::Payload(PayloadError::NotJson(_)) => "not_json",
            IngressError::Payload(_) => "bad_payload",
            IngressError::Store(_) => "store_unavailable",
        }
    }

    fn into_response(self) -> http::Response<Body> {
        let mut response = json_response(
            self.status(),
            &json!({ "error": self.code(), "message": self.to_string() }),
        );
        let headers = response.headers_mut();
        match self {
            IngressError::MethodNotAllowed { .. } => {
                headers.insert(header::ALLOW, http::HeaderValue::from_static("POST"));
            }
            IngressError::Store(_) => {
                headers.insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

/// Answers one request on the ingress listener.
pub async fn handle(
    app: &Arc<App>,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<Body> {
    let path = request.uri().path().to_owned();
    let config = app.config();
    // Unknown paths share one label value, so scanners cannot grow the series.
    let source = config.source_for_path(&path).map_or("-", |s| s.name.as_str());
    let response = match accept(app, request, peer).await {
        Ok(response) => response,
        Err(error) => {
            if matches!(error, IngressError::Store(_)) {
                warn!(path = %path, peer = %peer, error = %error, "webhook refused: store unavailable");
            } else {
                info!(path = %path, peer = %peer, code = error.code(), error = %error, "webhook refused");
            }
            error.into_response()
        }
    };
    app.metrics.request(source, response.status().as_u16());
    response
}

async fn accept(
    app: &Arc<App>,
    request: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<http::Response<Body>, IngressError> {
    let config = app.config();
    let (parts, body) = request.into_parts();
    let source = config
        .source_for_path(parts.uri.path())
        .ok_or_else(|| IngressError::NotFound {
            path: parts.uri.path().chars().take(200).collect(),
        })?;
    if parts.method != Method::POST {
        return Err(IngressError::MethodNotAllowed { method: parts.method });
    }
    source.check_peer(peer.ip(), &parts.headers)?;
    let limit = config.server.max_body;
    let declared =
        header_str(&parts.headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(IngressError::TooLarge { limit });
    }
    ContentKind::of(&parts.headers)?;
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let body = match tokio::time::timeout(config.server.request_timeout, limited.collect()).await {
        Err(_) => return Err(IngressError::Timeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(IngressError::TooLarge { limit });
        }
        Ok(Err(e)) => return Err(IngressError::BodyRead(e.to_string())),
        Ok(Ok(collected)) => collected.to_bytes(),
    };

    let webhook = source.receive(&parts.headers, body)?;
    let events = match source.parse(&webhook, config.files())? {
        Parsed::Ping => {
            info!(source = %source.name, delivery = webhook.delivery.as_deref().unwrap_or(""), "ping answered");
            return Ok(json_response(StatusCode::OK, &json!({ "pong": true })));
        }
        Parsed::Events(events) => events,
    };
    let now = app.now();
    let plan = routing::plan(&config, source, &webhook, &events, now);
    let handoffs = take_slots(app, &config, &plan, now);
    let record = record(&webhook, &events, &plan, now, &handoffs);
    let planned = record.jobs.len();
    // The commit and the hand-off of its jobs run to the end on their own
    // task: a sender that hangs up (or times out) mid-request must not leave
    // committed jobs waiting out their lease.
    let app_for_commit = app.clone();
    let committed = tokio::spawn(async move {
        let committing = tokio::time::Instant::now();
        let ingested = app_for_commit.store.ingest(record).await;
        app_for_commit.metrics.commit_took(committing.elapsed());
        if let Ok(Ingested::Accepted { leased, .. }) = &ingested {
            let queued = plan.jobs.iter().filter(|j| j.request.is_ok()).count()
                > leased.len() + held_back_count(&ingested);
            hand_over(&app_for_commit, leased.clone(), handoffs);
            // Only jobs that found no free slot wait in the queue for the dispatcher.
            if queued {
                app_for_commit.wake_dispatch();
            }
        }
        (ingested, webhook, plan)
    });
    let (ingested, webhook, plan) = tokio::time::timeout(SENDERS_DEADLINE, committed)
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
                app.metrics.event(&webhook.source, event.kind.as_str());
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
                &json!({
                    "event": webhook.id,
                    "jobs": planned - held_back.len(),
                    "routes": plan.route_names(),
                    "dropped": dropped,
                    "rejected": plan.rejected_json(),
                }),
            ))
        }
        Ingested::Duplicate(original) => {
            info!(
                source = %webhook.source,
                delivery = webhook.delivery.as_deref().unwrap_or(""),
                event_id = %original,
                "redelivery of an accepted webhook; no new jobs"
            );
            Ok(json_response(StatusCode::OK, &json!({ "duplicate": original })))
        }
    }
}

/// The longest a sender waits for the store to commit its webhook before it
/// hears 503 (and retries): well inside GitHub's and GitLab's 10-second
/// delivery timeout. The commit itself runs on; a webhook it commits after
/// the 503 is answered as a duplicate when the sender retries.
const SENDERS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(8);

/// A leased job's claim and the send slot that goes with it.
type Handoff = (Lease, OwnedSemaphorePermit);

/// Send slots for the jobs whose targets have one free now: those jobs are
/// stored leased and sent right after the commit, with no claim and no wait
/// for the dispatcher. The rest are queued for it.
fn take_slots(app: &App, config: &Config, plan: &Plan, now: SystemTime) -> HashMap<Uuid, Handoff> {
    let mut handoffs = HashMap::new();
    if app.shutdown.is_cancelled() {
        return handoffs;
    }
    let until = now + config.delivery.lease;
    for job in plan.jobs.iter().filter(|j| j.request.is_ok()) {
        if let Some(permit) = app.sends.try_slot(config, &job.target) {
            let lease = Lease {
                claim: Uuid::now_v7(),
                until,
            };
            handoffs.insert(job.id, (lease, permit));
        }
    }
    handoffs
}

/// Starts the sends of the jobs committed leased; the slots of jobs the
/// store held back are freed.
fn hand_over(app: &Arc<App>, leased: Vec<ClaimedJob>, mut handoffs: HashMap<Uuid, Handoff>) {
    for job in leased {
        if let Some((_, permit)) = handoffs.remove(&job.id) {
            dispatch::start_send(app, job, permit);
        }
    }
}

fn held_back_count(ingested: &Result<Ingested, StoreError>) -> usize {
    match ingested {
        Ok(Ingested::Accepted { held_back, .. }) => held_back.len(),
        _ => 0,
    }
}

/// The store's record of an accepted webhook.
fn record(
    webhook: &Webhook,
    events: &[Event],
    plan: &Plan,
    now: SystemTime,
    handoffs: &HashMap<Uuid, Handoff>,
) -> NewEvent {
    let summary = json!({
        "events": events
            .iter()
            .map(|e| json!({ "kind": e.kind, "repo": e.repo, "ref": e.git_ref, "sha": e.sha }))
            .collect::<Vec<_>>(),
    });
    NewEvent {
        id: webhook.id,
        source: webhook.source.clone(),
        delivery: webhook.delivery.clone(),
        hook: webhook.hook.clone(),
        content_type: webhook.content_type.clone(),
        body: webhook.body.clone(),
        payload: (!webhook.payload_is_body()).then(|| webhook.payload.clone()),
        hop: webhook.hop,
        received_at: now,
        summary: summary.to_string(),
        jobs: plan
            .jobs
            .iter()
            .map(|job| NewJob {
                id: job.id,
                route: job.route.clone(),
                target: job.target.clone(),
                request: job.request.clone(),
                limits: job.limits.clone(),
                lease: handoffs.get(&job.id).map(|(lease, _)| *lease),
            })
            .collect(),
        drops: plan.dropped.iter().map(|d| d.dropped.clone()).collect(),
    }
}

fn log_accepted(webhook: &Webhook, events: &[Event], plan: &Plan, held_back: &[HeldBack]) {
    for event in events {
        info!(
            event_id = %webhook.id,
            source = %webhook.source,
            delivery = webhook.delivery.as_deref().unwrap_or(""),
            hook = %webhook.hook,
            kind = %event.kind,
            repo = %event.repo,
            git_ref = %event.git_ref,
            sha = %event.sha,
            "webhook accepted"
        );
    }
    let queued = |id: &Uuid| !held_back.iter().any(|h| &h.job_id == id);
    for job in plan.jobs.iter().filter(|j| j.request.is_ok() && queued(&j.id)) {
        debug!(
            event_id = %webhook.id,
            source = %webhook.source,
            delivery = webhook.delivery.as_deref().unwrap_or(""),
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
            event_id = %webhook.id,
            source = %webhook.source,
            delivery = webhook.delivery.as_deref().unwrap_or(""),
            rule = %drop.rule,
            route = drop.route.as_deref().unwrap_or(""),
            target = drop.target.as_deref().unwrap_or(""),
            reason = %drop.reason,
            "loop guard dropped"
        );
    }
    for job in &plan.jobs {
        if let Err(reason) = &job.request {
            warn!(
                event_id = %webhook.id,
                source = %webhook.source,
                delivery = webhook.delivery.as_deref().unwrap_or(""),
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

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.2")]);
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            client_address(proxy, &h, &trusted),
            "198.51.100.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(stranger, &h, &trusted), stranger);
    }

    #[test]
    fn content_types() {
        assert_eq!(
            ContentKind::of(&headers(&[("content-type", "application/json; charset=utf-8")])).unwrap(),
            ContentKind::Json
        );
        assert_eq!(
            ContentKind::of(&headers(&[("content-type", "application/x-www-form-urlencoded")])).unwrap(),
            ContentKind::Form
        );
        assert!(ContentKind::of(&headers(&[("content-type", "text/plain")])).is_err());
        assert!(ContentKind::of(&HeaderMap::new()).is_err());
    }

    #[test]
    fn form_payload_is_decoded() {
        let body = b"payload=%7B%22a%22%3A1%7D";
        assert_eq!(&form_payload(body).unwrap()[..], br#"{"a":1}"#);
        assert!(matches!(form_payload(b"x=1"), Err(PayloadError::NoFormPayload)));
    }
}
