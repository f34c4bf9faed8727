//! Stage one of the config: serde types that mirror `relay.toml` key for key.
//!
//! No logic lives here beyond defaults. Unknown keys are rejected by serde;
//! keys that exist but belong to another provider or target kind are rejected
//! in stage two (`super::Config`), which names the kind that does take them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::event::Provider;
use crate::secret::SecretSpec;
use crate::signature::Algorithm;

/// The top level, only to reject unknown sections before reading each one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Sections {
    server: Option<IgnoredAny>,
    admin: Option<IgnoredAny>,
    store: Option<IgnoredAny>,
    delivery: Option<IgnoredAny>,
    loop_guard: Option<IgnoredAny>,
    sources: Option<IgnoredAny>,
    routes: Option<IgnoredAny>,
    targets: Option<IgnoredAny>,
}

/// One value or a list, so `listen = "127.0.0.1:8080"` works as well as a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "an address or a list of addresses")]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: OneOrMany<SocketAddr>,
    pub max_body: ByteSize,
    /// Bytes of big request bodies held in memory at once, across all
    /// connections; see `ingress::budget`.
    pub body_memory: ByteSize,
    pub public_url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Signs payload URLs (`GET {public_url}/payloads/{event}?exp=…&sig=…`).
    pub payload_key: Option<SecretSpec>,
    /// How long a payload URL stays valid; at most `store.retention`.
    #[serde(with = "humantime_serde")]
    pub payload_ttl: Duration,
    /// Connections served at once per listener; at the cap, the one that
    /// has sent the least makes room (see `server::door`).
    pub max_connections: usize,
    /// Connections one peer address may hold open on a listener; a source's
    /// `trusted_proxies` are exempt (every client arrives through them).
    pub max_connections_per_ip: usize,
    /// How long a request's headers, and a TLS handshake, may take to
    /// arrive; unset, the shorter of 3s and `request_timeout`.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    /// How long in-flight requests and sends may take to finish on SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: OneOrMany::One(SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_body: ByteSize::mib(25),
            body_memory: ByteSize::mib(128),
            public_url: None,
            payload_key: None,
            payload_ttl: Duration::from_secs(24 * 3600),
            max_connections: 1024,
            max_connections_per_ip: 128,
            header_timeout: None,
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(20),
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: SocketAddr,
    pub token: Option<SecretSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// PostgreSQL only: the password, when the URL carries none.
    pub password: Option<SecretSpec>,
    /// PostgreSQL only: connections kept open to the database.
    pub pool_size: usize,
    /// PostgreSQL only: a PEM file of CA certificates trusted for the
    /// database's TLS certificate, in place of the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            url: "sqlite://relay.db".to_owned(),
            retention: Duration::from_secs(14 * 24 * 3600),
            password: None,
            pool_size: 16,
            ca_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDelivery {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub attempts: u32,
    pub backoff: RawBackoff,
    pub concurrency: usize,
    /// Retries allowed after an attempt whose fate is unknown (timed out after sending).
    pub maybe_delivered_retries: u32,
    /// The least a retry waits after a 429 or a timeout.
    #[serde(with = "humantime_serde")]
    pub throttle_floor: Duration,
    /// How long a relay owns a job it is sending; a job whose relay died is
    /// taken over once this runs out. Default: twice `timeout`, plus 30s.
    #[serde(with = "humantime_serde")]
    pub lease: Option<Duration>,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            timeout: Duration::from_secs(10),
            attempts: 12,
            backoff: RawBackoff::default(),
            concurrency: 8,
            maybe_delivered_retries: 1,
            throttle_floor: Duration::from_secs(30),
            lease: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackoff {
    #[serde(with = "humantime_serde")]
    pub first: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    pub factor: f64,
}

impl Default for RawBackoff {
    fn default() -> Self {
        RawBackoff {
            first: Duration::from_secs(2),
            max: Duration::from_secs(30 * 60),
            factor: 2.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLoopGuard {
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    pub max_hops: u32,
    pub hop_variable: String,
    pub burst: RawBurstSetting,
}

impl Default for RawLoopGuard {
    fn default() -> Self {
        RawLoopGuard {
            dedupe_window: Duration::from_secs(600),
            max_hops: 3,
            hop_variable: "RELAY_HOP".to_owned(),
            burst: RawBurstSetting::Limit(RawBurst {
                limit: 30,
                per: Duration::from_secs(60),
            }),
        }
    }
}

/// `burst = false` turns the breaker off; a table sets it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged, expecting = "false, or a limit like { limit = 30, per = \"1m\" }")]
pub enum RawBurstSetting {
    Switch(bool),
    Limit(RawBurst),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBurst {
    pub limit: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

/// A target's `proxy`: `false` (direct), a URL, or a table whose password
/// is a secret reference. Absent means the environment's proxy settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "false, a proxy URL like \"http://proxy:3128\", or { url = \"http://proxy:3128\", username = \"…\", password = { env = \"…\" } }"
)]
pub enum RawProxy {
    Switch(bool),
    Url(String),
    Table(RawProxyTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyTable {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<SecretSpec>,
}

/// `[sources.NAME]`. One shape for every provider; stage two rejects keys the
/// provider does not use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub provider: Provider,
    pub path: String,
    pub secret: Option<SecretSpec>,
    pub token: Option<SecretSpec>,
    pub signing_token: Option<SecretSpec>,
    pub allow_sha1: Option<bool>,
    pub ignore_pushers: Option<Vec<String>>,
    pub allow_ips: Option<Vec<String>>,
    pub trusted_proxies: Option<Vec<String>>,
    pub signature: Option<RawSignature>,
    pub event_header: Option<String>,
    pub delivery_header: Option<String>,
    pub fields: Option<BTreeMap<String, String>>,
    /// `generic` only: what its deliveries are (default `push`).
    pub kind: Option<GenericKind>,
    /// The Git host's API, for commit statuses (`report` on a route) and
    /// catching up on deliveries.
    pub api: Option<RawApi>,
    /// GitHub: redeliver what failed while relay was away.
    pub catch_up: Option<RawCatchUp>,
}

/// A GitHub source's `catch_up = { hook, every }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCatchUp {
    /// `repos/OWNER/REPO/hooks/ID` or `orgs/ORG/hooks/ID`.
    pub hook: String,
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
}

/// A source's `api = { token, url }`: the host's REST API and a token for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub token: SecretSpec,
    pub url: Option<String>,
}

impl RawSource {
    /// The optional keys that are set, for the "not used by this provider" check.
    pub fn present(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut note = |set: bool, key| {
            if set {
                keys.push(key)
            }
        };
        note(self.secret.is_some(), "secret");
        note(self.token.is_some(), "token");
        note(self.signing_token.is_some(), "signing_token");
        note(self.allow_sha1.is_some(), "allow_sha1");
        note(self.signature.is_some(), "signature");
        note(self.event_header.is_some(), "event_header");
        note(self.delivery_header.is_some(), "delivery_header");
        note(self.fields.is_some(), "fields");
        note(self.kind.is_some(), "kind");
        keys
    }
}

/// How a `generic` source's sender signs: `{ header, algorithm, prefix, encoding }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSignature {
    pub header: String,
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub encoding: Encoding,
}

/// What a `generic` source's deliveries are: pushes, or CI outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenericKind {
    #[default]
    Push,
    Pipeline,
}

fn default_algorithm() -> Algorithm {
    Algorithm::Sha256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub from: Option<Vec<String>>,
    pub repos: Option<Vec<String>>,
    pub events: Option<Vec<String>>,
    pub branches: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub when: Option<String>,
    pub to: Vec<String>,
    /// Post each target's pipeline state on the pushed commit.
    pub report: Option<RawReport>,
}

/// A route's `report`: `true` (context `relay/<target>`), or the context as
/// a template of `target` and `route`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "true, false, or a context like \"ci/{{ target }}\"")]
pub enum RawReport {
    Switch(bool),
    Context(String),
}

/// The target kinds relay can trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKindName {
    Circleci,
    CircleciV1,
    Gitlab,
    Http,
}

impl TargetKindName {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKindName::Circleci => "circleci",
            TargetKindName::CircleciV1 => "circleci_v1",
            TargetKindName::Gitlab => "gitlab",
            TargetKindName::Http => "http",
        }
    }
}

/// A typed parameter value: CircleCI pipeline parameters and GitLab inputs are
/// typed, so `release = true` must stay a boolean.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a string, boolean or number")]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// `[targets.NAME]`. One shape for every kind; stage two rejects keys the kind
/// does not use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub kind: TargetKindName,
    pub dry_run: Option<bool>,
    pub concurrency: Option<usize>,
    pub burst: Option<RawBurstSetting>,
    pub proxy: Option<RawProxy>,
    pub base_url: Option<String>,
    pub project: Option<String>,
    pub token: Option<SecretSpec>,
    pub branch: Option<String>,
    pub tag: Option<String>,
    pub parameters: Option<BTreeMap<String, ParamValue>>,
    pub payload_parameter: Option<String>,
    pub hop_parameter: Option<String>,
    pub job: Option<String>,
    pub build_parameters: Option<BTreeMap<String, String>>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub variables: Option<BTreeMap<String, String>>,
    pub inputs: Option<BTreeMap<String, ParamValue>>,
    pub forward_payload: Option<bool>,
    pub url: Option<String>,
    pub sign: Option<RawSign>,
    /// A `circleci` target's pipeline definition: present, relay posts to
    /// `pipeline/run` (the only endpoint GitHub App projects accept).
    pub definition_id: Option<String>,
    /// With `definition_id`: the ref CircleCI reads its config from.
    pub config: Option<RawRef>,
    /// Poll the CI for the pipeline's state (`circleci`, `gitlab`).
    pub follow: Option<RawFollow>,
    /// Triggered and followed for real, never reported on its route's
    /// commit; compared with the route's other targets instead.
    pub shadow: Option<bool>,
}

/// A target's `follow`: `true`, or a table with a token of its own (GitLab
/// needs one: a trigger token cannot read pipelines) and the polling's pace.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "true, false, or a table like { token = { env = \"GITLAB_API_TOKEN\" }, first = \"10s\", max = \"5m\", deadline = \"24h\" }"
)]
pub enum RawFollow {
    Switch(bool),
    Table(RawFollowTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFollowTable {
    pub token: Option<SecretSpec>,
    /// The wait before the first poll; each next wait doubles, up to `max`.
    #[serde(default, with = "humantime_serde")]
    pub first: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max: Option<Duration>,
    /// How long after the trigger polling gives up.
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// Polls of this target in flight at once.
    pub concurrency: Option<usize>,
}

impl RawTarget {
    /// The kind-specific keys that are set.
    pub fn present(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut note = |set: bool, key| {
            if set {
                keys.push(key)
            }
        };
        note(self.base_url.is_some(), "base_url");
        note(self.project.is_some(), "project");
        note(self.token.is_some(), "token");
        note(self.branch.is_some(), "branch");
        note(self.tag.is_some(), "tag");
        note(self.parameters.is_some(), "parameters");
        note(self.payload_parameter.is_some(), "payload_parameter");
        note(self.hop_parameter.is_some(), "hop_parameter");
        note(self.job.is_some(), "job");
        note(self.build_parameters.is_some(), "build_parameters");
        note(self.git_ref.is_some(), "ref");
        note(self.variables.is_some(), "variables");
        note(self.inputs.is_some(), "inputs");
        note(self.forward_payload.is_some(), "forward_payload");
        note(self.url.is_some(), "url");
        note(self.sign.is_some(), "sign");
        note(self.definition_id.is_some(), "definition_id");
        note(self.config.is_some(), "config");
        note(self.follow.is_some(), "follow");
        keys
    }
}

/// `config = { branch = "…" }` or `{ tag = "…" }`: a ref, one or the other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRef {
    pub branch: Option<String>,
    pub tag: Option<String>,
}

/// `sign = { secret, header, algorithm, prefix }` on an `http` target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSign {
    pub secret: SecretSpec,
    #[serde(default = "default_sign_header")]
    pub header: String,
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    pub prefix: Option<String>,
}

fn default_sign_header() -> String {
    "X-Hub-Signature-256".to_owned()
}
