//! The commands that talk to a running relay through its admin API: `relay
//! jobs`, `relay events`, `relay shadow` and `relay catch-up`. Each builds its request from
//! the arguments and prints the answer as a table (or, with `--json`, as
//! is); the library's `cli` module formats and calls.

use std::process::ExitCode;

use clap::Subcommand;
use relay::cli::{encode, query_of};
use relay::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum JobsAction {
    /// List jobs, most recently changed first.
    List {
        /// queued, in_flight, done or dead.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One job, its request and every attempt.
    Show { id: String },
    /// Queue a dead job again, or every dead job of a target that died in a time range.
    Retry {
        /// The job to retry.
        #[arg(conflicts_with_all = ["target", "since"], required_unless_present = "target")]
        id: Option<String>,
        #[arg(long, requires = "since")]
        target: Option<String>,
        /// An RFC 3339 time, or a duration meaning that long ago (2h, 1d).
        #[arg(long, requires = "target")]
        since: Option<String>,
        #[arg(long, requires = "target")]
        until: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsAction {
    /// List stored deliveries, newest first.
    List {
        #[arg(long)]
        source: Option<String>,
        /// owner/name (GitLab: group/sub/name).
        #[arg(long)]
        repo: Option<String>,
        /// push, tag, branch_delete, tag_delete, pipeline, other.
        #[arg(long)]
        kind: Option<String>,
        /// Deliveries with a job in this state: queued, in_flight, done or dead.
        #[arg(long)]
        state: Option<String>,
        /// An RFC 3339 time, or a duration meaning that long ago (2h, 1d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// The page after this event id (the last one listed before).
        #[arg(long)]
        before: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One delivery: what relay kept of the request, its body and its jobs.
    Show { id: String },
    /// Route a stored delivery again under the config in force (loop guard applied, hop kept).
    Replay { id: String },
}

pub(crate) async fn catch_up(
    config: &Config,
    admin: Option<String>,
    source: &str,
    since: Option<&str>,
    json: bool,
) -> ExitCode {
    let query = query_of(&[("source", Some(source)), ("since", since)]);
    let path = format!("/api/catch-up?{query}");
    admin_command(
        config,
        admin,
        json,
        reqwest::Method::POST,
        &path,
        relay::cli::format_catch_up,
    )
    .await
}

pub(crate) async fn shadow(
    config: &Config,
    admin: Option<String>,
    route: Option<String>,
    since: &str,
    json: bool,
) -> ExitCode {
    let query = query_of(&[("since", Some(since)), ("route", route.as_deref())]);
    let path = format!("/api/shadow?{query}");
    admin_command(
        config,
        admin,
        json,
        reqwest::Method::GET,
        &path,
        relay::cli::format_shadow,
    )
    .await
}

pub(crate) async fn jobs(config: &Config, admin: Option<String>, json: bool, action: JobsAction) -> ExitCode {
    let (method, path) = match &action {
        JobsAction::List { state, target, limit } => {
            let limit = limit.to_string();
            let query = query_of(&[
                ("limit", Some(&limit)),
                ("state", state.as_deref()),
                ("target", target.as_deref()),
            ]);
            (reqwest::Method::GET, format!("/api/jobs?{query}"))
        }
        JobsAction::Show { id } => (reqwest::Method::GET, format!("/api/jobs/{}", encode(id))),
        JobsAction::Retry { id: Some(id), .. } => {
            (reqwest::Method::POST, format!("/api/jobs/{}/retry", encode(id)))
        }
        JobsAction::Retry {
            target, since, until, ..
        } => {
            let query = query_of(&[
                ("target", Some(target.as_deref().unwrap_or_default())),
                ("since", Some(since.as_deref().unwrap_or_default())),
                ("until", until.as_deref()),
            ]);
            (reqwest::Method::POST, format!("/api/jobs/retry?{query}"))
        }
    };
    admin_command(config, admin, json, method, &path, |body| match &action {
        JobsAction::List { .. } => relay::cli::format_jobs(body),
        JobsAction::Show { .. } => relay::cli::format_job(body),
        JobsAction::Retry { id: Some(_), .. } => format!("queued {}\n", body["job"].as_str().unwrap_or("")),
        JobsAction::Retry { .. } => format!(
            "queued {} dead job(s) of {}\n",
            body["requeued"],
            body["target"].as_str().unwrap_or("")
        ),
    })
    .await
}

pub(crate) async fn events(
    config: &Config,
    admin: Option<String>,
    json: bool,
    action: EventsAction,
) -> ExitCode {
    let (method, path) = match &action {
        EventsAction::List {
            source,
            repo,
            kind,
            state,
            since,
            until,
            before,
            limit,
        } => {
            let limit = limit.to_string();
            let query = query_of(&[
                ("source", source.as_deref()),
                ("repo", repo.as_deref()),
                ("kind", kind.as_deref()),
                ("state", state.as_deref()),
                ("since", since.as_deref()),
                ("until", until.as_deref()),
                ("before", before.as_deref()),
                ("limit", Some(&limit)),
            ]);
            (reqwest::Method::GET, format!("/api/events?{query}"))
        }
        EventsAction::Show { id } => (reqwest::Method::GET, format!("/api/events/{}", encode(id))),
        EventsAction::Replay { id } => (
            reqwest::Method::POST,
            format!("/api/events/{}/replay", encode(id)),
        ),
    };
    admin_command(config, admin, json, method, &path, |body| match &action {
        EventsAction::List { .. } => relay::cli::format_events(body),
        EventsAction::Show { .. } => relay::cli::format_event(body),
        EventsAction::Replay { .. } => relay::cli::format_replay(body),
    })
    .await
}

/// One call to a running relay's admin API; prints its JSON (`json`) or
/// what `render` makes of it.
pub(crate) async fn admin_command(
    config: &Config,
    admin: Option<String>,
    json: bool,
    method: reqwest::Method,
    path: &str,
    render: impl FnOnce(&serde_json::Value) -> String,
) -> ExitCode {
    match relay::cli::admin_request(config, admin, method, path).await {
        Ok(body) if json => println!("{body}"),
        Ok(body) => print!("{}", render(&body)),
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
