//! relay-bench: relay against adnanh/webhook and bare hyper, side by side,
//! in one run on loopback, and the figures the benchmark issue asks for.
//!
//! ```text
//! bench/run.sh [--duration 5] [--runs 3] [--out bench-results.json]
//!     [--only PART,…] [--connections 1,32] [--postgres URL] [--relay PATH]
//!     [--plot DIR [--plot-against EARLIER.json]]
//! ```
//!
//! (`bench/run.sh` builds relay and this harness with `cargo build --release
//! -p relay -p relay-bench`, then runs `target/release/relay-bench`.)
//!
//! Every subject serves on CPU 0; wrk and this harness (with its mock
//! CircleCI) run on CPU 1. Each subject gets the same ~7 KB signed GitHub
//! push, with a delivery id of its own per request, at 1 and 32 connections;
//! figures are medians of `--runs` runs, with the spread. The subjects run
//! in rounds, each once a round, and a ratio between two of them is the
//! median of the rounds' ratios. The curves
//! (`routes`, `payload`, `queue_depth`, `store_size`) load relay alone at 32 connections
//! while one thing grows. Bounded: every run has a fixed duration or a fixed
//! count, every fill a time budget. Talks only to 127.0.0.1.

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

mod backlog;
mod compare;
mod curves;
mod depth;
mod history;
mod latency;
mod load;
mod plot;
mod process;
mod push;
mod relay;
mod report;
mod routes;
mod servers;
mod subjects;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use latency::BacklogStore;
use process::{Scratch, ensure_tools, machine};
use relay::Workspace;
use report::{Report, table};
use servers::{Baseline, MockCircle};
use subjects::{Runs, SUBJECTS};

const SECRET: &str = "bench-webhook-secret";
const BACKLOG: usize = 20_000;
/// The targets the second backlog is spread over.
const WIDE_TARGETS: usize = 100;
const E2E_RATE: u32 = 100;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    version,
    about = "relay against adnanh/webhook and bare hyper, side by side, on loopback",
    long_about = LONG_ABOUT,
    after_help = "Examples (bench/run.sh builds relay and relay-bench, then runs relay-bench):\n  \
        bench/run.sh --runs 3 --duration 10 --out bench.json --only relay\n  \
        bench/run.sh --postgres postgres://relay:…@127.0.0.1/relay\n  \
        bench/run.sh --only relay --connections 32 --relay /tmp/relay-old",
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    internal: Option<Internal>,
}

const LONG_ABOUT: &str = "\
relay against adnanh/webhook and bare hyper, side by side, in one run on
loopback.

Every subject gets the same ~7 KB signed GitHub push from wrk, a delivery id
of its own per request, at each of --connections: the subject serves on CPU 0,
wrk and the harness run on CPU 1. Prints one table (req/s, p50/p99, CPU µs and
bytes written to disk per request, RSS idle and after: medians of --runs,
with the spread; the subjects run in rounds, each once a round, and relay's
ratio to each baseline is the median of the rounds'), relay's end-to-end latency at
100 webhooks/s and its delivery rate from a 20,000-job backlog (for one target,
and spread over 100; with --postgres, on PostgreSQL too) with relay's CPU per
trigger, and writes the same as JSON to compare across commits.

The curves load relay alone at 32 connections while one thing grows: routes
(1, 10, 100, 1,000 of every kind, three taking the push), the signed push's
size (1 KB, 7 KB, 100 KB, 1 MB), and jobs already queued for a CI that does
not answer (0, 100,000, 1,000,000; ingest, and claim latency), and the
store's size (empty, and --history finished events: ingest, and how long
the retention purge holds webhooks). --plot DIR
draws them as SVG (routes.svg, payload.svg, queue_depth.svg).

Measures the relay binary beside this one (target/release/relay) unless
--relay names another. Installs wrk and webhook with apt-get when they are
missing (needs root). Talks only to 127.0.0.1.";

#[derive(Debug, Subcommand)]
enum Internal {
    /// Serves a hyper baseline on 127.0.0.1:PORT until killed (the harness
    /// runs itself this way, so the baseline's CPU and memory are its own).
    #[command(hide = true)]
    ServeBaseline {
        #[arg(value_enum)]
        which: Baseline,
        port: u16,
    },
    /// Draws the curves of a run's JSON (its --out) as SVG, measuring
    /// nothing: to redraw, or to put two runs side by side later.
    Plot {
        /// The run's JSON
        json: PathBuf,
        /// Where the SVG files go
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// An earlier run's JSON, drawn beside it
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
    },
    /// Compares two builds pair by pair, measuring nothing: the runs'
    /// JSON (--out) made alternately, the previous build's and this one's,
    /// in the same order; prints each pair's figures, their ratio, and the
    /// median ratio.
    Compare {
        /// The previous build's runs, in pair order
        #[arg(long, value_name = "FILE", value_delimiter = ',', required = true)]
        old: Vec<PathBuf>,
        /// This build's runs, in the same order
        #[arg(long, value_name = "FILE", value_delimiter = ',', required = true)]
        new: Vec<PathBuf>,
    },
}

/// The subjects and parts `--only` may name.
const ONLY: [&str; 15] = [
    "hyper-ceiling",
    "hyper-verify",
    "webhook-noexec",
    "webhook-exec",
    "relay",
    "relay-postgres",
    "load",
    "e2e",
    "delivery",
    "delivery-postgres",
    "routes",
    "payload",
    "queue_depth",
    "store_size",
    "curves",
];

/// What `--only` asked for takes `part`: everything when it names nothing;
/// `load` is every subject's load, `curves` the three curves.
fn wanted(only: &[String], part: &str) -> bool {
    let group = match part {
        "routes" | "payload" | "queue_depth" | "store_size" => "curves",
        "e2e" | "delivery" | "delivery-postgres" => "",
        _ => "load",
    };
    only.is_empty() || only.iter().any(|o| o == part || o == group)
}

#[derive(Debug, Clone, Args)]
struct Options {
    /// Seconds of load per run, at each connection count
    ///
    /// The end-to-end measurement runs at least 2 s.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = seconds, verbatim_doc_comment)]
    duration: Duration,
    /// Runs per measurement; figures are their median and spread
    #[arg(long, value_name = "N", default_value = "3", value_parser = run_count)]
    runs: usize,
    /// Where to write the results as JSON
    #[arg(long, value_name = "FILE", default_value = "bench-results.json")]
    out: PathBuf,
    /// Measure these parts only, comma-separated (default: all of them)
    ///
    /// A subject's load: hyper-ceiling, hyper-verify, webhook-noexec,
    /// webhook-exec, relay, relay-postgres; every subject's load: load;
    /// relay's end-to-end latency: e2e; relay's delivery from a backlog:
    /// delivery (on SQLite), delivery-postgres; a curve: routes, payload,
    /// queue_depth, store_size; all four: curves.
    #[arg(
        long,
        value_name = "PART",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(ONLY),
        hide_possible_values = true,
        requires_if("relay-postgres", "postgres"),
        requires_if("delivery-postgres", "postgres"),
        verbatim_doc_comment
    )]
    only: Vec<String>,
    /// wrk's connection counts, comma-separated
    #[arg(long, value_name = "COUNTS", value_delimiter = ',', default_value = "1,32", value_parser = connection_count)]
    connections: Vec<u32>,
    /// Add relay on PostgreSQL (relay-postgres, delivery-postgres)
    ///
    /// URL is a server where the harness may create a fresh database per run
    /// (the role needs CREATEDB), postgres://USER:PASSWORD@HOST/DATABASE.
    #[arg(long, value_name = "URL", verbatim_doc_comment)]
    postgres: Option<String>,
    /// Measure this relay binary instead of the one beside the harness
    ///
    /// Another build (an older commit's, say) measured on the same machine
    /// in the same conditions.
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    relay: Option<PathBuf>,
    /// Finished events in the store for store_size's second point
    ///
    /// Ten million is 14 days at 8 webhooks/s, several GB on disk: the file
    /// is removed once measured.
    #[arg(long, value_name = "EVENTS", default_value_t = history::HISTORY, verbatim_doc_comment)]
    history: usize,
    /// Draw the curves measured as SVG into this directory
    ///
    /// routes.svg, payload.svg and queue_depth.svg, for the curves this run
    /// measured.
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    plot: Option<PathBuf>,
    /// Draw an earlier run's curves beside this run's (its --out JSON)
    ///
    /// Labelled with each run's relay version, e.g. the previous main
    /// measured with --relay.
    #[arg(long, value_name = "FILE", requires = "plot", verbatim_doc_comment)]
    plot_against: Option<PathBuf>,
}

fn seconds(value: &str) -> Result<Duration, String> {
    match value.trim().parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err("takes a whole number of seconds, at least 1".to_owned()),
    }
}

fn run_count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(runs) if runs > 0 => Ok(runs),
        _ => Err("takes a number, at least 1".to_owned()),
    }
}

fn connection_count(value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err("takes counts like 1,32 (each at least 1)".to_owned()),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(Internal::Plot { json, to, against }) = &cli.internal {
        let drawn = read_json(json)
            .and_then(|this| Ok((this, against.as_deref().map(read_json).transpose()?)))
            .and_then(|(this, earlier)| plot::draw(&this, earlier.as_ref(), to));
        match drawn {
            Ok(written) => written.iter().for_each(|w| eprintln!("wrote {}", w.display())),
            Err(e) => {
                eprintln!("relay-bench plot: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(Internal::Compare { old, new }) = &cli.internal {
        let read = |files: &[PathBuf]| files.iter().map(|f| read_json(f)).collect::<Result<Vec<_>, _>>();
        match read(old).and_then(|old| compare::table(&old, &read(new)?)) {
            Ok(table) => print!("{table}"),
            Err(e) => {
                eprintln!("relay-bench compare: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(Internal::ServeBaseline { which, port }) = cli.internal {
        // The harness re-runs itself as the hyper baselines.
        let served = tokio::runtime::Runtime::new().and_then(|runtime| {
            runtime.block_on(servers::serve_baseline(port, which, SECRET.as_bytes().into()))
        });
        if let Err(e) = served {
            eprintln!("relay-bench serve-baseline: {e}");
            std::process::exit(1);
        }
        return;
    }
    let options = cli.options;
    if let Err(e) = ensure_tools() {
        eprintln!("relay-bench: {e}");
        std::process::exit(1);
    }
    let machine = machine();
    // The harness (and the mock CircleCI in it) shares CPU 1 with wrk;
    // threads started from here on inherit this.
    let _ = Command::new("taskset")
        .args(["-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay-bench: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(options, machine)) {
        eprintln!("relay-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(options: Options, machine: String) -> Result<(), String> {
    let dir = Scratch::new()?;
    let body = push::payload()?;
    let relay_binary = match &options.relay {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("relay"),
    };
    if !relay_binary.exists() {
        return Err(format!(
            "{} is missing: build it first (bench/run.sh does: cargo build --release -p relay -p relay-bench)",
            relay_binary.display()
        ));
    }
    let postgres_server = match &options.postgres {
        Some(url) => relay::local_postgres_server(url).await?,
        None => None,
    };
    if options.postgres.is_some() && postgres_server.is_none() {
        eprintln!(
            "--postgres: the server does not run on this machine as far as /proc tells; its CPU is not measured"
        );
    }
    let ws = Workspace {
        dir,
        body,
        relay_binary,
        postgres: options.postgres.clone(),
        databases: Default::default(),
        postgres_server,
    };
    let mock = MockCircle::default();
    let triggers = mock.count.clone();
    let circle = mock.start(false).await.map_err(|e| e.to_string())?;
    let only = &options.only;
    let chosen: Vec<(&str, &str)> = SUBJECTS
        .into_iter()
        .filter(|(name, _)| wanted(only, name) && (*name != "relay-postgres" || ws.postgres.is_some()))
        .collect();
    // In rounds, each subject once a round: a ratio between two subjects
    // (relay ÷ webhook-noexec, PostgreSQL ÷ SQLite) then compares runs a
    // minute apart, not a whole subject's runs apart.
    let mut measured: Vec<Runs> = chosen.iter().map(|_| Runs::new(&options.connections)).collect();
    for (run, which) in subjects::rounds(chosen.len(), options.runs) {
        let (name, _) = chosen[which];
        eprintln!("measuring {name}, run {} of {} …", run + 1, options.runs);
        let result = measured[which]
            .measure(name, run, &ws, circle, &triggers, &options)
            .await;
        // A run that failed stopped its relay but left its database.
        ws.drop_databases().await?;
        result?;
    }
    let subjects: Vec<_> = chosen
        .iter()
        .zip(measured)
        .map(|((name, what), runs)| runs.result(name, what))
        .collect();
    let end_to_end = if wanted(only, "e2e") {
        eprintln!("measuring relay end to end at {E2E_RATE} req/s …");
        Some(latency::end_to_end(&ws, &options).await?)
    } else {
        None
    };
    let (delivery, delivery_wide) = if wanted(only, "delivery") {
        eprintln!("measuring relay delivery from a backlog of {BACKLOG} …");
        let one = latency::delivery(&ws, &options, 1, BacklogStore::Sqlite).await?;
        eprintln!("measuring relay delivery from a backlog of {BACKLOG} over {WIDE_TARGETS} targets …");
        let wide = latency::delivery(&ws, &options, WIDE_TARGETS, BacklogStore::Sqlite).await?;
        (Some(one), Some(wide))
    } else {
        (None, None)
    };
    // Measured whenever there is a server to measure on, as relay-postgres.
    let (delivery_postgres, delivery_postgres_wide) = if wanted(only, "delivery-postgres")
        && ws.postgres.is_some()
    {
        eprintln!("measuring relay delivery from a backlog of {BACKLOG} on PostgreSQL …");
        let one = latency::delivery(&ws, &options, 1, BacklogStore::Postgres).await?;
        eprintln!(
            "measuring relay delivery from a backlog of {BACKLOG} over {WIDE_TARGETS} targets on PostgreSQL …"
        );
        let wide = latency::delivery(&ws, &options, WIDE_TARGETS, BacklogStore::Postgres).await?;
        (Some(one), Some(wide))
    } else {
        (None, None)
    };
    // A curve that fails is said, and the others are still measured.
    let mut errors = Vec::new();
    let routes = if wanted(only, "routes") {
        eprintln!("measuring relay against routes …");
        section("routes", curves::routes(&ws, &options).await, &mut errors)
    } else {
        None
    };
    let payload = if wanted(only, "payload") {
        eprintln!("measuring relay against the push's size …");
        section("payload", curves::payload(&ws, &options).await, &mut errors)
    } else {
        None
    };
    let queue_depth = if wanted(only, "queue_depth") {
        eprintln!("measuring relay against jobs queued …");
        section(
            "queue_depth",
            depth::queue_depth(&ws, &options).await,
            &mut errors,
        )
    } else {
        None
    };
    let store_size = if wanted(only, "store_size") {
        eprintln!("measuring relay against the store's size …");
        section(
            "store_size",
            history::store_size(&ws, &options, options.history).await,
            &mut errors,
        )
    } else {
        None
    };
    let report = Report {
        when: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        machine,
        relay: relay_version(&ws.relay_binary),
        harness: ::relay::GIT_COMMIT.to_owned(),
        duration_secs: options.duration.as_secs(),
        runs: options.runs,
        payload_bytes: ws.body.body.len(),
        ratios: report::ratios(&subjects),
        subjects,
        end_to_end,
        delivery,
        delivery_wide,
        delivery_postgres,
        delivery_postgres_wide,
        routes,
        payload,
        queue_depth,
        store_size,
        errors,
    };
    print!("{}", table(&report));
    std::fs::write(
        &options.out,
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("cannot write {}: {e}", options.out.display()))?;
    eprintln!("wrote {}", options.out.display());
    if let Some(dir) = &options.plot {
        let this = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        let earlier = options.plot_against.as_deref().map(read_json).transpose()?;
        for written in plot::draw(&this, earlier.as_ref(), dir)? {
            eprintln!("wrote {}", written.display());
        }
    }
    Ok(())
}

/// A run's JSON, as the plots read it.
fn read_json(file: &std::path::Path) -> Result<serde_json::Value, String> {
    std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// A curve's figures, or its error noted (and said) instead.
fn section<T>(name: &str, measured: Result<T, String>, errors: &mut Vec<String>) -> Option<T> {
    match measured {
        Ok(figures) => Some(figures),
        Err(e) => {
            eprintln!("relay-bench: {name}: {e}");
            errors.push(format!("{name}: {e}"));
            None
        }
    }
}

/// The measured relay's `--version` line (its commit), to label its figures.
fn relay_version(binary: &std::path::Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|text| {
            // "relay 0.1.0", then "commit: 0f85e34…" on a line of its own.
            let mut lines = text.lines();
            let name = lines.next().unwrap_or("relay").to_owned();
            match lines.find_map(|l| l.strip_prefix("commit:")) {
                Some(commit) => format!("{name} (commit {})", commit.trim()),
                None => name,
            }
        })
        .unwrap_or_else(|| binary.display().to_string())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let options = Cli::try_parse_from(["relay-bench"]).unwrap().options;
        assert_eq!(options.duration, Duration::from_secs(5));
        assert_eq!(options.runs, 3);
        assert_eq!(options.out, PathBuf::from("bench-results.json"));
        assert_eq!(options.connections, vec![1, 32]);
        assert!(options.only.is_empty());
        assert_eq!(
            (options.postgres, options.relay, options.plot),
            (None, None, None)
        );
    }

    #[test]
    fn reads_the_readme_flags() {
        let cli = Cli::try_parse_from([
            "relay-bench",
            "--runs",
            "2",
            "--duration",
            "10",
            "--out",
            "bench.json",
            "--only",
            "relay",
            "--connections",
            "1, 8,32",
            "--relay",
            "/tmp/relay-old",
            "--postgres",
            "postgres://relay@127.0.0.1/relay",
        ])
        .unwrap();
        let options = cli.options;
        assert_eq!(options.duration, Duration::from_secs(10));
        assert_eq!(options.runs, 2);
        assert_eq!(options.out, PathBuf::from("bench.json"));
        assert_eq!(options.only, vec!["relay".to_owned()]);
        assert_eq!(options.connections, vec![1, 8, 32]);
        assert_eq!(options.relay, Some(PathBuf::from("/tmp/relay-old")));
        assert!(cli.internal.is_none());
    }

    #[test]
    fn refuses_what_it_cannot_measure() {
        for args in [
            &["--runs", "0"][..],
            &["--duration", "0"],
            &["--duration", "5s"],
            &["--connections", "0,32"],
            &["--connections", "one"],
            &["--only", "nginx"],
            &["--verbose"],
            &["--only", "relay-postgres"],
            &["--only", "routes,relay-postgres"],
            &["--only", "delivery-postgres"],
            &["--only", "routes,nginx"],
            &["--plot-against", "earlier.json"],
        ] {
            let argv = std::iter::once("relay-bench").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
    }

    #[test]
    fn only_takes_parts_and_groups() {
        let options =
            Cli::try_parse_from(["relay-bench", "--only", "routes,payload", "--plot", "docs/bench"])
                .unwrap()
                .options;
        assert_eq!(options.only, vec!["routes".to_owned(), "payload".to_owned()]);
        assert_eq!(options.plot, Some(PathBuf::from("docs/bench")));
        let only = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(wanted(&only(&[]), "queue_depth"));
        assert!(wanted(&only(&["curves"]), "queue_depth"));
        assert!(!wanted(&only(&["curves"]), "relay"));
        assert!(!wanted(&only(&["curves"]), "e2e"));
        assert!(wanted(&only(&["load"]), "webhook-exec"));
        assert!(!wanted(&only(&["load"]), "routes"));
        assert!(wanted(&only(&["relay", "routes"]), "relay"));
        assert!(!wanted(&only(&["relay", "routes"]), "hyper-verify"));
    }

    #[test]
    fn plots_a_run_without_measuring() {
        let cli = Cli::try_parse_from([
            "relay-bench",
            "plot",
            "after.json",
            "--to",
            "docs/bench",
            "--against",
            "before.json",
        ])
        .unwrap();
        assert!(matches!(
            cli.internal,
            Some(Internal::Plot { against: Some(_), .. })
        ));
    }

    #[test]
    fn runs_itself_as_a_baseline() {
        let cli = Cli::try_parse_from(["relay-bench", "serve-baseline", "ceiling", "8080"]).unwrap();
        assert!(matches!(
            cli.internal,
            Some(Internal::ServeBaseline {
                which: Baseline::Ceiling,
                port: 8080
            })
        ));
    }
}
