//! relay receives push and tag webhooks from Git hosts, verifies them, routes
//! them, and triggers CI pipelines, durably.
//!
//! The data flow, module by module (ARCHITECTURE.md has the whole map):
//!
//! - [`server`]: listeners and HTTP serving; hands each request to the service the daemon gives it.
//! - `accept`: the webhook's use case: verify, plan, reserve, commit, hand over, answer.
//! - [`ingress`]: per provider, verify the raw bytes, then parse into events.
//! - [`event`]: the normalized [`event::Event`].
//! - [`guard`]: the loop guard's rules, which keep an event or a trigger from going out;
//!   `loops`: the static trigger graph and its cycles, for `relay check`.
//! - [`routing`]: routes compiled once, evaluated per event into jobs; the template context.
//! - [`template`]: the one template and expression engine.
//! - [`report`]: what relay says on a commit about the pipeline it started.
//! - [`targets`]: per CI kind, the request a job sends and the exchange that sends it;
//!   [`request`]: that request as stored, without credentials.
//! - [`explain`]: what the config in force makes of one webhook, for a person.
//! - [`store`]: the durable queue; an event and its jobs commit before the answer.
//! - `dispatch`: workers that claim, send, classify, retry and dead-letter; [`sends`]: slots and client.
//! - `shadow`: shadow runs grouped and judged, for the API and metrics.
//! - `catchup`: asks GitHub to redeliver what failed while relay was away.
//! - `follower`: polls the CIs of following targets for their pipelines' states.
//! - [`payload`]: signed, expiring URLs from which CI jobs fetch a webhook body.
//! - `admin`: health, readiness, metrics (`metrics`), the jobs and events API; `pages`: the status
//!   pages a person reads in a browser; `query`: what a listing's query string asks for.
//! - [`config`]: `relay.toml`, validated and compiled; [`secret`]: secrets; [`signature`]: keyed hashes.
//! - `app`: the running relay's shared state; [`daemon`]: `run`, which ties it together;
//!   `clock`: the one clock; `web`: response bodies; [`cli`]: what the commands print;
//!   [`log_lines`]: the JSON log line.

pub(crate) mod accept;
pub(crate) mod admin;
pub(crate) mod app;
pub(crate) mod catchup;
/// The commit relay was built from (`build.rs`: 12 hex digits, `-dirty` for
/// uncommitted changes, or `unknown` outside a Git checkout).
pub const GIT_COMMIT: &str = env!("RELAY_GIT_COMMIT");

pub mod cli;
pub(crate) mod clock;
pub mod config;
pub mod daemon;
pub(crate) mod dispatch;
pub mod event;
pub mod explain;
pub(crate) mod follower;
pub mod guard;
pub mod ingress;
pub mod log_lines;
pub(crate) mod loops;
pub(crate) mod metrics;
pub(crate) mod pages;
pub mod payload;
pub mod pipeline;
pub(crate) mod query;
pub mod report;
pub mod request;
pub mod routing;
pub mod secret;
pub mod sends;
pub mod server;
pub(crate) mod shadow;
pub mod signature;
pub mod store;
pub mod targets;
pub mod template;
pub(crate) mod web;
