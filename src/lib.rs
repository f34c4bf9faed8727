//! relay receives push and tag webhooks from Git hosts, verifies them, routes
//! them, and triggers CI pipelines, durably.
//!
//! The data flow, module by module:
//!
//! - [`server`]: listeners and HTTP serving; hands each request to ingress or admin.
//! - [`ingress`]: per provider, verify the raw bytes, then parse into events.
//! - [`event`]: the normalized [`event::Event`] and its template context.
//! - [`guard`]: the loop guard's rules, which keep an event from routing;
//!   [`loops`]: the static trigger graph and its cycles, for `relay check`.
//! - [`routing`]: routes compiled once, evaluated per event into jobs.
//! - [`template`]: the one template and expression engine.
//! - [`targets`]: per CI kind, the request a job sends, minus credentials.
//! - [`store`]: the durable queue; an event and its jobs commit before the answer.
//! - [`payload`]: signed, expiring URLs from which CI jobs fetch a webhook body.
//! - [`dispatch`]: workers that claim, send, classify, retry and dead-letter.
//! - [`admin`]: health, readiness, metrics ([`metrics`]) and the jobs API.
//! - [`config`]: `relay.toml`, validated and compiled; [`signature`]: keyed hashes.
//! - [`daemon`]: the running relay that ties these together; [`cli`]: what the commands print.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod event;
pub mod guard;
pub mod ingress;
pub mod loops;
pub mod metrics;
pub mod payload;
pub mod request;
pub mod routing;
pub mod secret;
pub mod server;
pub mod signature;
pub mod store;
pub mod targets;
pub mod template;
