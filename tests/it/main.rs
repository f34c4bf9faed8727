//! relay's integration tests: one binary, the real daemon on loopback, mock
//! CI servers written here. See `support` for the harness.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Tests measure real time and wait on purpose.
#![allow(clippy::disallowed_methods)]

mod advice;
mod browser;
mod catch_up;
mod circleci_source;
mod cli;
mod correlation;
mod crash;
mod delivery;
mod door;
mod faulty_targets;
mod fixtures;
mod follow;
mod full_disk;
mod ingress_errors;
mod loop_guard;
mod packaging;
mod pages;
mod pipeline_run;
mod pipelines;
mod production;
mod providers;
mod proxy;
mod reporting;
mod routing;
mod secrets;
mod secrets_sweep;
mod shadow;
mod shared_store;
mod store;
mod store_faults;
mod support;
mod targets;
