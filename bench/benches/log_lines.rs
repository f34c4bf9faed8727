//! The JSON log lines relay writes for each webhook, formatted by relay's
//! own formatter (`relay::log_lines`) and by tracing-subscriber's JSON
//! format (what relay used before), in the same run:
//!
//!     cargo bench -p relay-bench --bench log_lines [-- WEBHOOKS]
//!
//! Each webhook is the two lines relay logs for it at `info`: `webhook
//! accepted`, and `delivered` inside the send's span, with the fields relay
//! gives them. The lines go to a sink, on one thread; the figure is the time
//! per webhook, best of five rounds each, the rounds alternating between
//! the two formatters, and the ratio between them. Bounded: a fixed number
//! of webhooks a round (100,000 unless WEBHOOKS says).

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use tracing::Subscriber;

const ROUNDS: usize = 5;

/// The lines of one webhook, as `accept` and `dispatch` log them.
fn log_one_webhook(n: u64) {
    let event_id = "01a247a7-61fe-7355-8400-605bb540c5b3";
    tracing::info!(
        event_id = %event_id,
        source = %"github",
        delivery = %format_args!("relay-0-1-e69c17fd-9390-4104-8831-0d4680be70bb-{n}"),
        hook = "push",
        kind = "push",
        repo = %"acme/api",
        git_ref = %"refs/heads/main",
        sha = %"0000000000000000000000000000000000000014",
        "webhook accepted"
    );
    let send = tracing::info_span!(
        "send",
        job_id = %"01a247a7-61fe-7355-8400-605cbba41fbc",
        event_id = %event_id,
        target = %"circleci",
        route = %"builds",
        attempt = 1,
    );
    let _in_send = send.enter();
    tracing::info!(
        outcome = "delivered",
        status = 201,
        duration_ms = 0,
        url = %"http://127.0.0.1:40681/api/v2/project/gh/acme/api/pipeline",
        pipeline = %"5034460f-c7c4-4c43-9457-de07e2029e7b",
        pipeline_number = n,
        pipeline_url = %format_args!("https://app.circleci.com/pipelines/github/acme/api/{n}"),
        pipeline_state = "created",
        "delivered"
    );
}

fn round(subscriber: impl Subscriber + Send + Sync, webhooks: u64) -> Duration {
    tracing::subscriber::with_default(subscriber, || {
        let started = Instant::now();
        for n in 0..webhooks {
            log_one_webhook(n);
        }
        started.elapsed()
    })
}

fn main() {
    let webhooks: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let (mut ours, mut theirs) = (Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS {
        let relays = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .fmt_fields(relay::log_lines::JsonMembers)
            .event_format(relay::log_lines::JsonLine)
            .finish();
        ours = ours.min(round(relays, webhooks));
        let librarys = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        theirs = theirs.min(round(librarys, webhooks));
    }
    let per = |d: Duration| d.as_nanos() as f64 / webhooks as f64 / 1000.0;
    println!("log lines of {webhooks} webhooks (two lines each), best of {ROUNDS} rounds:");
    println!("  relay::log_lines           {:.2} µs a webhook", per(ours));
    println!("  tracing-subscriber's JSON  {:.2} µs a webhook", per(theirs));
    println!("  ratio                      {:.2}×", per(theirs) / per(ours));
}
