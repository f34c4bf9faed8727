//! Ingress: verify one request on a source's path and parse it into events.
//!
//! The shared checks live here (method, peer address, size, content type,
//! the body read within its deadline); then the provider's module verifies
//! the raw bytes, which is the only way to obtain a [`Webhook`], and parses
//! them into [`Event`]s. Ingress never touches the store, routes, or calls a
//! target: the accept path (`accept`) does the rest.

mod bitbucket;
mod budget;
mod circleci;
mod error;
mod generic;
mod gitea;
mod github;
mod gitlab;
mod webhook;

pub use budget::{BodyBudget, BodyRoom};
pub use error::{IngressError, PayloadError, SignatureError};
use webhook::Verified;
pub use webhook::{Kept, Webhook};

use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, header};
use http_body_util::BodyExt;
use ipnet::IpNet;

use crate::config::compiler::Compiler;
use crate::config::raw::RawSource;
use crate::event::{Event, Files, Provider};
use crate::secret::Secret;

/// How much a request may send, and for how long (`server.max_body`,
/// `server.request_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits<'a> {
    pub max_body: u64,
    pub timeout: Duration,
    /// Where a big body reserves its room before it is read.
    pub budget: &'a BodyBudget,
}

/// Reads a body of at most `limit` bytes into one buffer, sized up front
/// when the sender declared its length: the frames are copied once, not
/// gathered and then copied again, which halves a big body's peak memory.
async fn read_body(
    body: hyper::body::Incoming,
    declared: Option<u64>,
    limit: u64,
) -> Result<Bytes, IngressError> {
    let mut body = std::pin::pin!(body);
    let mut buffer = BytesMut::with_capacity(usize::try_from(declared.unwrap_or(0)).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| IngressError::BodyRead(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if (buffer.len() + data.len()) as u64 > limit {
                return Err(IngressError::TooLarge { limit });
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

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
    Circleci(circleci::Settings),
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
            Provider::Circleci => {
                c.only_keys(&key, &present, &["secret"], &owner);
                circleci::Settings::compile(&key, &raw, c).map(Settings::Circleci)
            }
            Provider::Generic => {
                c.only_keys(
                    &key,
                    &present,
                    &[
                        "secret",
                        "signature",
                        "event_header",
                        "delivery_header",
                        "fields",
                        "kind",
                    ],
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

    /// The proxies whose `X-Forwarded-For` this source believes.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        self.access.as_ref().map_or(&[], |a| &a.trusted_proxies)
    }

    /// A one-line description for `relay check`, naming secrets by origin only.
    pub fn describe(&self) -> String {
        let auth = match &self.settings {
            Settings::Github(s) => s.describe(),
            Settings::Gitlab(s) => s.describe(),
            Settings::Bitbucket(s) => s.describe(),
            Settings::Gitea(s) => s.describe(),
            Settings::Circleci(s) => s.describe(),
            Settings::Generic(s) => s.describe(),
        };
        format!("{} POST {} ({auth})", self.provider, self.path)
    }

    /// Reads a request on this source's path: the method, the peer, the size
    /// and content type, then room for the body in `limits.budget` and the
    /// body, both within `limits.timeout`; then verifies it (see
    /// [`Source::receive`]). `now` dates signature timestamps. The room is
    /// the caller's to hold until the webhook is committed.
    pub async fn read<'a>(
        &self,
        parts: &http::request::Parts,
        body: hyper::body::Incoming,
        peer: IpAddr,
        limits: RequestLimits<'a>,
        now: SystemTime,
    ) -> Result<(Webhook, BodyRoom<'a>), IngressError> {
        if parts.method != Method::POST {
            return Err(IngressError::MethodNotAllowed {
                method: parts.method.clone(),
            });
        }
        self.check_peer(peer, &parts.headers)?;
        let limit = limits.max_body;
        let declared =
            header_str(&parts.headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(IngressError::TooLarge { limit });
        }
        ContentKind::of(&parts.headers)?;
        let deadline = crate::clock::stopwatch() + limits.timeout;
        let room = limits.budget.reserve(declared, limit, deadline).await?;
        let body = match tokio::time::timeout_at(deadline, read_body(body, declared, limit)).await {
            Err(_) => return Err(IngressError::Timeout),
            Ok(read) => read?,
        };
        Ok((self.receive(&parts.headers, body, now)?, room))
    }

    /// Verifies the request and reads the provider's headers; the one way to
    /// obtain a [`Webhook`].
    pub fn receive(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        now: SystemTime,
    ) -> Result<Webhook, IngressError> {
        let content = ContentKind::of(headers)?;
        let received = match &self.settings {
            Settings::Github(s) => github::receive(s, &self.name, headers, &body, content)?,
            Settings::Gitlab(s) => gitlab::receive(s, &self.name, headers, &body, content, now)?,
            Settings::Bitbucket(s) => bitbucket::receive(s, &self.name, headers, &body, content)?,
            Settings::Gitea(s) => gitea::receive(s, &self.name, headers, &body, content)?,
            Settings::Circleci(s) => circleci::receive(s, &self.name, headers, &body, content)?,
            Settings::Generic(s) => generic::receive(s, &self.name, headers, &body, content)?,
        };
        let hop = header_str(headers, HOP_HEADER)
            .and_then(|h| h.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(Webhook::verified(Verified {
            source: self.name.clone(),
            provider: self.provider,
            hook: received.hook,
            delivery: received.delivery,
            content_type: content.mime().to_owned(),
            body: received.body.unwrap_or(body),
            payload: received.payload,
            hop,
        }))
    }

    /// The headers a real sender would attach to `body` (a JSON document),
    /// signed with this source's current secret: for `relay send` and
    /// `relay explain`, which then go through [`Source::receive`] like any
    /// request.
    /// A webhook of this source that relay verified when it arrived and
    /// stored, built again under a new id: its signature is not checked
    /// twice (the headers that carried it are not kept).
    pub fn restore(&self, kept: Kept) -> Webhook {
        Webhook::verified(Verified {
            source: self.name.clone(),
            provider: self.provider,
            hook: kept.hook,
            delivery: kept.delivery,
            content_type: kept.content_type,
            payload: kept.payload.unwrap_or_else(|| kept.body.clone()),
            body: kept.body,
            hop: kept.hop,
        })
    }

    pub fn sender_headers(&self, hook: &str, body: &[u8], delivery: &str, now: SystemTime) -> HeaderMap {
        let pairs: Vec<(String, String)> = match &self.settings {
            Settings::Github(s) => owned(github::sign(s, hook, body, delivery)),
            Settings::Gitlab(s) => owned(gitlab::sign(s, hook, body, delivery, now)),
            Settings::Bitbucket(s) => owned(bitbucket::sign(s, hook, body, delivery)),
            Settings::Gitea(s) => owned(gitea::sign(s, hook, body, delivery)),
            Settings::Circleci(s) => owned(circleci::sign(s, hook, body)),
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
            Settings::Github(_) => github::parse(webhook.hook(), webhook.payload(), files),
            Settings::Gitlab(_) => gitlab::parse(webhook.hook(), webhook.payload()),
            Settings::Bitbucket(_) => bitbucket::parse(webhook.hook(), webhook.payload()),
            Settings::Gitea(_) => gitea::parse(webhook.hook(), webhook.payload(), files),
            Settings::Circleci(_) => circleci::parse(webhook.hook(), webhook.payload()),
            Settings::Generic(s) => generic::parse(s, webhook.hook(), webhook.payload()),
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

/// A provider's `secret`, which it must have: `signs` says who signs with
/// it and how, in the words of the problem a missing one is.
fn required_secret(key: &str, raw: &RawSource, c: &mut Compiler, signs: &str) -> Option<Secret> {
    let key = format!("{key}.secret");
    let Some(spec) = &raw.secret else {
        c.problem(key, format!("is required: {signs}, and relay checks it"));
        return None;
    };
    c.secret(&key, spec)
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

/// `value`, cut to at most `max` bytes on a character boundary: what a
/// parser keeps of a field from a payload, which is hostile input.
fn bounded(mut value: String, max: usize) -> String {
    if value.len() > max {
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
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
    fn long_fields_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("ééé".to_owned(), 3), "é");
        assert_eq!(bounded("abc".to_owned(), 10), "abc");
    }

    #[test]
    fn form_payload_is_decoded() {
        let body = b"payload=%7B%22a%22%3A1%7D";
        assert_eq!(&form_payload(body).unwrap()[..], br#"{"a":1}"#);
        assert!(matches!(form_payload(b"x=1"), Err(PayloadError::NoFormPayload)));
    }
}
