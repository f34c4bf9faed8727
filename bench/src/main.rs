//! relay-bench: relay against adnanh/webhook and bare hyper, side by side,
//! in one run on loopback, and the figures the benchmark issue asks for.
//!
//!     bench/run.sh [--duration 5] [--runs 3] [--out bench-results.json]
//!         [--only SUBJECT] [--connections 1,32] [--postgres URL] [--relay PATH]
//!
//! (`bench/run.sh` builds relay and this harness with `cargo build --release
//! -p relay -p relay-bench`, then runs `target/release/relay-bench`.)
//!
//! Every subject serves on CPU 0; wrk and this harness (with its mock
//! CircleCI) run on CPU 1. Each subject gets the same ~7 KB signed GitHub
//! push, with a delivery id of its own per request, at 1 and 32 connections;
//! figures are medians of `--runs` runs, with the spread. Bounded: every run
//! has a fixed duration or a fixed count. Talks only to 127.0.0.1.

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

mod load;
mod servers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use load::WrkResult;
use serde::Serialize;
use servers::{Baseline, MockCircle};

const SECRET: &str = "bench-webhook-secret";
const BACKLOG: usize = 20_000;
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
bytes written to disk per request, RSS idle and after, relay's ratio to each
baseline: medians of --runs, with the spread), relay's end-to-end latency at
100 webhooks/s and its delivery rate from a 20,000-job backlog, and writes the
same as JSON to compare across commits.

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
}

/// The subjects and parts `--only` may name.
const ONLY: [&str; 9] = [
    "hyper-ceiling",
    "hyper-verify",
    "webhook-noexec",
    "webhook-exec",
    "relay",
    "relay-postgres",
    "load",
    "e2e",
    "delivery",
];

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
    /// Measure one part only (default: all of them)
    ///
    /// A subject's load: hyper-ceiling, hyper-verify, webhook-noexec,
    /// webhook-exec, relay, relay-postgres; every subject's load: load;
    /// relay's end-to-end latency: e2e; relay's delivery from a backlog:
    /// delivery.
    #[arg(
        long,
        value_name = "PART",
        value_parser = clap::builder::PossibleValuesParser::new(ONLY),
        hide_possible_values = true,
        requires_if("relay-postgres", "postgres"),
        verbatim_doc_comment
    )]
    only: Option<String>,
    /// wrk's connection counts, comma-separated
    #[arg(long, value_name = "COUNTS", value_delimiter = ',', default_value = "1,32", value_parser = connection_count)]
    connections: Vec<u32>,
    /// Add relay on PostgreSQL (relay-postgres) as a subject
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

/// wrk and webhook come from Debian; installed when missing (as root).
fn ensure_tools() -> Result<(), String> {
    let missing: Vec<&str> = [("wrk", "wrk"), ("webhook", "webhook"), ("taskset", "util-linux")]
        .into_iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && apt-get install -y -qq {}",
                missing.join(" ")
            ),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot install {} (run as root, or install them)",
            missing.join(" ")
        ))
    }
}

/// A ~7 KB GitHub push of 20 commits, and its signature.
fn payload() -> (Bytes, String) {
    let commits: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "id": format!("{:040x}", i + 1), "tree_id": format!("{:040x}", i + 100),
                "message": format!("Change {i}: handle empty payloads in the importer"),
                "timestamp": "2026-11-20T10:12:03+01:00",
                "author": { "name": "Ada Lovelace", "email": "ada@example.com", "username": "ada" },
                "added": [], "removed": [], "modified": ["services/api/src/import.rs"]
            })
        })
        .collect();
    let doc = serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": format!("{:040x}", 20),
        "created": false, "deleted": false, "forced": false, "base_ref": null,
        "compare": "https://github.com/acme/api/compare/1111111111...0000000014",
        "commits": commits,
        "head_commit": { "id": format!("{:040x}", 20), "message": "Change 19", "added": [], "removed": [], "modified": [] },
        "repository": { "id": 1296269, "name": "api", "full_name": "acme/api", "html_url": "https://github.com/acme/api", "private": false },
        "pusher": { "name": "ada", "email": "ada@example.com" },
        "sender": { "login": "ada", "id": 583231 }
    });
    let body = Bytes::from(doc.to_string());
    let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
    (body, format!("sha256={}", hex::encode(tag)))
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

async fn wait_for_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("nothing listens on 127.0.0.1:{port}"))
}

/// A process this harness started; killed by its PID when dropped.
struct Running {
    child: Child,
    port: u16,
    /// Where its stderr went.
    log: PathBuf,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program args…` on CPU 0 with stderr to `log`.
async fn start_pinned(
    program: &Path,
    args: &[String],
    port: u16,
    log: PathBuf,
    env: &[(&str, &str)],
) -> Result<Running, String> {
    let err = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut command = Command::new("taskset");
    command
        .args(["-c", "0"])
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(err);
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let running = Running { child, port, log };
    wait_for_port(port).await?;
    Ok(running)
}

/// The subjects, in the order of the table.
const SUBJECTS: [(&str, &str); 6] = [
    (
        "hyper-ceiling",
        "a minimal hyper 1 server: 200 without reading the body",
    ),
    (
        "hyper-verify",
        "hyper reading the body, checking X-Hub-Signature-256, parsing the JSON (typed)",
    ),
    (
        "webhook-noexec",
        "adnanh/webhook, payload-hmac-sha256 on X-Hub-Signature-256 and a match on ref; execute-command \"\" (answers 200 once the rule matches; the exec then fails at the PATH lookup, no process started)",
    ),
    (
        "webhook-exec",
        "the same, running /bin/true and waiting for it (include-command-output-in-response)",
    ),
    (
        "relay",
        "relay: one GitHub source, one route, a circleci target at the mock; SQLite, synchronous=FULL",
    ),
    (
        "relay-postgres",
        "the same on the PostgreSQL store (--postgres URL; a fresh database per run)",
    ),
];

/// A scratch directory, removed when the harness finishes.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Workspace {
    dir: Scratch,
    body: Bytes,
    signature: String,
    relay_binary: PathBuf,
    postgres: Option<String>,
}

impl Workspace {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}

fn webhook_hooks(path: &Path, exec: bool) -> Result<(), String> {
    let hooks = serde_json::json!([{
        "id": "bench",
        "execute-command": if exec { "/bin/true" } else { "" },
        "include-command-output-in-response": exec,
        "trigger-rule": { "and": [
            { "match": { "type": "payload-hmac-sha256", "secret": SECRET,
                         "parameter": { "source": "header", "name": "X-Hub-Signature-256" } } },
            { "match": { "type": "value", "value": "refs/heads/main",
                         "parameter": { "source": "payload", "name": "ref" } } }
        ] }
    }]);
    std::fs::write(path, hooks.to_string()).map_err(|e| e.to_string())
}

fn relay_config(port: u16, store: &str, circle: std::net::SocketAddr, record: bool) -> String {
    // The load repeats one commit: the dedupe window and burst breaker would
    // hold back all but the first triggers, so they are off, and every
    // request commits an event and a job.
    let parameters = if record {
        "parameters = { delivery = \"{{ delivery }}\" }"
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]

[store]
url = "{store}"

[loop_guard]
dedupe_window = "0s"
burst = false

[delivery]
concurrency = 32

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
to = ["circleci"]

[targets.circleci]
kind = "circleci"
base_url = "http://{circle}"
project = "gh/acme/api"
token = "bench-circle-token"
{parameters}
"#
    )
}

async fn start_subject(
    name: &str,
    ws: &Workspace,
    circle: std::net::SocketAddr,
    run: usize,
) -> Result<Running, String> {
    let port = free_port()?;
    let log = ws.path(&format!("{name}-{run}.log"));
    match name {
        "hyper-ceiling" | "hyper-verify" => {
            let which = if name == "hyper-ceiling" {
                "ceiling"
            } else {
                "verify"
            };
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            start_pinned(
                &me,
                &["serve-baseline".into(), which.into(), port.to_string()],
                port,
                log,
                &[],
            )
            .await
        }
        "webhook-noexec" | "webhook-exec" => {
            let hooks = ws.path(&format!("{name}.json"));
            webhook_hooks(&hooks, name == "webhook-exec")?;
            let args = vec![
                "-hooks".into(),
                hooks.display().to_string(),
                "-ip".into(),
                "127.0.0.1".into(),
                "-port".into(),
                port.to_string(),
            ];
            start_pinned(Path::new("webhook"), &args, port, log, &[]).await
        }
        _ => {
            let store = if name == "relay-postgres" {
                let server = ws
                    .postgres
                    .as_deref()
                    .ok_or("relay-postgres needs --postgres URL")?;
                fresh_postgres_database(server).await?
            } else {
                format!("sqlite://{}", ws.path(&format!("relay-{run}.db")).display())
            };
            start_relay(ws, &format!("{name}-{run}"), port, &store, circle, false).await
        }
    }
}

/// A new, empty database on `server` for one run, as a URL. (Left in
/// place afterwards: a relay may still hold connections to it.)
async fn fresh_postgres_database(server: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("--postgres: cannot connect: {e}"))?;
    tokio::spawn(connection);
    let name = format!("relay_bench_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("--postgres: cannot create a database (the role needs CREATEDB): {e}"))?;
    let (base, _) = server
        .split('?')
        .next()
        .and_then(|s| s.rsplit_once('/'))
        .ok_or("--postgres takes a URL ending in /DATABASE")?;
    Ok(format!("{base}/{name}"))
}

/// relay on `store` at `port`, pinned like every subject; `label` names its
/// config and log in the scratch directory.
async fn start_relay(
    ws: &Workspace,
    label: &str,
    port: u16,
    store: &str,
    circle: std::net::SocketAddr,
    record: bool,
) -> Result<Running, String> {
    let config = ws.path(&format!("{label}.toml"));
    std::fs::write(&config, relay_config(port, store, circle, record)).map_err(|e| e.to_string())?;
    let args = vec![
        "serve".into(),
        "--log-format".into(),
        "json".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    let log = ws.path(&format!("{label}.log"));
    start_pinned(&ws.relay_binary, &args, port, log, &[("RELAY_LOG", "info")]).await
}

fn url(name: &str, port: u16) -> String {
    match name {
        "webhook-noexec" | "webhook-exec" => format!("http://127.0.0.1:{port}/hooks/bench"),
        _ => format!("http://127.0.0.1:{port}/hooks/github"),
    }
}

/// One load run's figures.
#[derive(Debug, Clone, Serialize)]
struct RunFigures {
    wrk: WrkResult,
    cpu_us_per_request: f64,
    /// Bytes the subject had the kernel write to storage, per request.
    disk_bytes_per_request: f64,
}

/// Median and spread of the runs at one concurrency.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    connections: u32,
    requests_per_sec: f64,
    requests_per_sec_min: f64,
    requests_per_sec_max: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    disk_bytes_per_request: f64,
    non_2xx: u64,
    socket_errors: u64,
    runs: Vec<RunFigures>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn summarize(connections: u32, runs: Vec<RunFigures>) -> Summary {
    let pick = |f: &dyn Fn(&RunFigures) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let rps = pick(&|r| r.wrk.requests_per_sec);
    Summary {
        connections,
        requests_per_sec: median(rps.clone()),
        requests_per_sec_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
        requests_per_sec_max: rps.iter().copied().fold(0.0, f64::max),
        p50_ms: median(pick(&|r| r.wrk.p50_ms)),
        p99_ms: median(pick(&|r| r.wrk.p99_ms)),
        cpu_us_per_request: median(pick(&|r| r.cpu_us_per_request)),
        disk_bytes_per_request: median(pick(&|r| r.disk_bytes_per_request)),
        non_2xx: runs.iter().map(|r| r.wrk.non_2xx).sum(),
        socket_errors: runs.iter().map(|r| r.wrk.socket_errors).sum(),
        runs,
    }
}

#[derive(Debug, Clone, Serialize)]
struct SubjectResult {
    name: String,
    what: String,
    rss_idle_mib: f64,
    rss_after_mib: f64,
    by_connections: Vec<Summary>,
    /// webhook-exec: commands that failed with "too many open files".
    exec_failures: Option<u64>,
}

async fn measure(
    name: &str,
    what: &str,
    ws: &Workspace,
    circle: std::net::SocketAddr,
    options: &Options,
) -> Result<SubjectResult, String> {
    let mut per_connections: Vec<(u32, Vec<RunFigures>)> =
        options.connections.iter().map(|c| (*c, Vec::new())).collect();
    let (mut idle, mut after) = (Vec::new(), Vec::new());
    let mut exec_failures = 0;
    for run in 0..options.runs {
        // A fresh process (and, for relay, a fresh database) per run.
        let subject = start_subject(name, ws, circle, run).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        idle.push(load::rss_mib(subject.pid()).unwrap_or(0.0));
        for (connections, figures) in &mut per_connections {
            let script = ws.path("post.lua");
            load::write_script(
                &script,
                &ws.path("body.json"),
                &ws.signature,
                &format!("{name}-{run}-{connections}-{}", uuid::Uuid::new_v4()),
            )
            .map_err(|e| e.to_string())?;
            let before = load::cpu_time(subject.pid()).unwrap_or_default();
            let written_before = load::disk_writes(subject.pid()).unwrap_or_default();
            let wrk = tokio::task::spawn_blocking({
                let (url, script, duration, c) = (
                    url(name, subject.port),
                    script.clone(),
                    options.duration,
                    *connections,
                );
                move || load::wrk(&url, c, duration, &script)
            })
            .await
            .map_err(|e| e.to_string())??;
            let cpu = load::cpu_time(subject.pid())
                .unwrap_or_default()
                .saturating_sub(before);
            let written = load::disk_writes(subject.pid())
                .unwrap_or_default()
                .saturating_sub(written_before);
            let requests = wrk.requests.max(1) as f64;
            figures.push(RunFigures {
                cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests,
                disk_bytes_per_request: written as f64 / requests,
                wrk,
            });
        }
        after.push(load::rss_mib(subject.pid()).unwrap_or(0.0));
        exec_failures += std::fs::read_to_string(&subject.log)
            .map(|log| log.matches("too many open files").count() as u64)
            .unwrap_or(0);
        drop(subject);
    }
    Ok(SubjectResult {
        name: name.to_owned(),
        what: what.to_owned(),
        rss_idle_mib: median(idle),
        rss_after_mib: median(after),
        by_connections: per_connections
            .into_iter()
            .map(|(c, runs)| summarize(c, runs))
            .collect(),
        exec_failures: (name == "webhook-exec").then_some(exec_failures),
    })
}

#[derive(Debug, Clone, Serialize)]
struct EndToEnd {
    rate_per_sec: u32,
    seconds: u64,
    /// 202 received → trigger received. Zero when the trigger arrived
    /// first: relay sends right after the commit, as the 202 goes out.
    p50_ms: f64,
    p99_ms: f64,
    /// Webhook sent → trigger received: the commit included.
    from_send_p50_ms: f64,
    from_send_p99_ms: f64,
    /// Per run: (p50, p99, from-send p50, from-send p99).
    runs: Vec<(f64, f64, f64, f64)>,
}

/// 202 received → trigger received by the mock, at a fixed request rate.
async fn end_to_end(ws: &Workspace, options: &Options) -> Result<EndToEnd, String> {
    let mut runs = Vec::new();
    let seconds = options.duration.as_secs().max(2);
    for run in 0..options.runs {
        let mock = MockCircle::default();
        let circle = mock.clone().start(true).await.map_err(|e| e.to_string())?;
        let port = free_port()?;
        let store = format!("sqlite://{}", ws.path(&format!("e2e-{run}.db")).display());
        let relay = start_relay(ws, &format!("e2e-{run}"), port, &store, circle, true).await?;
        let client = relay::sends::http_client(Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let total = E2E_RATE as u64 * seconds;
        let mut tick = tokio::time::interval(Duration::from_secs(1) / E2E_RATE);
        let mut sent = Vec::new();
        for n in 0..total {
            tick.tick().await;
            let delivery = format!("e2e-{run}-{n}");
            let request = client
                .post(format!("http://127.0.0.1:{port}/hooks/github"))
                .header("Content-Type", "application/json")
                .header("X-GitHub-Event", "push")
                .header("X-GitHub-Delivery", &delivery)
                .header("X-Hub-Signature-256", &ws.signature)
                .body(ws.body.clone());
            sent.push(tokio::spawn(async move {
                let started = Instant::now();
                let response = request.send().await.ok()?;
                (response.status().as_u16() == 202).then(|| (delivery, started, Instant::now()))
            }));
        }
        let mut answered = Vec::new();
        for task in sent {
            if let Ok(Some(pair)) = task.await {
                answered.push(pair);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while mock.count.load(Ordering::Relaxed) < answered.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let arrivals = mock.arrivals.lock().map_err(|_| "mock poisoned")?.clone();
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
        let (mut after_ack, mut after_send): (Vec<f64>, Vec<f64>) = answered
            .iter()
            .filter_map(|(d, started, acked)| arrivals.get(d).map(|at| (ms(*acked, *at), ms(*started, *at))))
            .unzip();
        if after_ack.len() < answered.len() {
            return Err(format!(
                "end to end: only {} of {} triggers arrived",
                after_ack.len(),
                answered.len()
            ));
        }
        after_ack.sort_by(f64::total_cmp);
        after_send.sort_by(f64::total_cmp);
        let at = |sorted: &[f64], q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
        runs.push((
            at(&after_ack, 0.5),
            at(&after_ack, 0.99),
            at(&after_send, 0.5),
            at(&after_send, 0.99),
        ));
        drop(relay);
    }
    Ok(EndToEnd {
        rate_per_sec: E2E_RATE,
        seconds,
        p50_ms: median(runs.iter().map(|r| r.0).collect()),
        p99_ms: median(runs.iter().map(|r| r.1).collect()),
        from_send_p50_ms: median(runs.iter().map(|r| r.2).collect()),
        from_send_p99_ms: median(runs.iter().map(|r| r.3).collect()),
        runs,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Delivery {
    backlog: usize,
    triggers_per_sec: f64,
    runs: Vec<f64>,
}

/// A backlog of queued jobs, then relay started on it: triggers per second
/// reaching the mock, first to last.
async fn delivery(ws: &Workspace, options: &Options) -> Result<Delivery, String> {
    let mut runs = Vec::new();
    for run in 0..options.runs {
        let mock = MockCircle::default();
        let circle = mock.clone().start(false).await.map_err(|e| e.to_string())?;
        let db = ws.path(&format!("backlog-{run}.db"));
        fill_backlog(&db, circle).await?;
        let port = free_port()?;
        let store = format!("sqlite://{}", db.display());
        let relay = start_relay(ws, &format!("backlog-{run}"), port, &store, circle, false).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut first = None;
        while mock.count.load(Ordering::Relaxed) < BACKLOG {
            if first.is_none() && mock.count.load(Ordering::Relaxed) > 0 {
                first = Some((Instant::now(), mock.count.load(Ordering::Relaxed)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "delivery: {} of {BACKLOG} after 120s",
                    mock.count.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (started, at_start) = first.unwrap_or((Instant::now(), 0));
        runs.push((BACKLOG - at_start) as f64 / started.elapsed().as_secs_f64().max(1e-3));
        drop(relay);
    }
    Ok(Delivery {
        backlog: BACKLOG,
        triggers_per_sec: median(runs.clone()),
        runs,
    })
}

/// Queues `BACKLOG` jobs through relay's own store, as ingest would.
async fn fill_backlog(db: &Path, circle: std::net::SocketAddr) -> Result<(), String> {
    use relay::guard::JobLimits;
    use relay::request::{Auth, PreparedRequest, RequestBody};
    use relay::store::{NewEvent, NewJob, Queue, SqliteStore};
    let store = SqliteStore::open(db).map_err(|e| e.to_string())?;
    let body = Bytes::from_static(br#"{"ref":"refs/heads/main"}"#);
    let mut pending = Vec::new();
    let store = Arc::new(store);
    for chunk in 0..(BACKLOG / 500) {
        for n in 0..500 {
            let store = store.clone();
            let event = NewEvent {
                id: uuid::Uuid::now_v7(),
                source: "github".to_owned(),
                delivery: Some(format!("backlog-{chunk}-{n}")),
                hook: "push".to_owned(),
                content_type: "application/json".to_owned(),
                body: body.clone(),
                payload: None,
                hop: 0,
                received_at: SystemTime::now(),
                summary: "{}".to_owned(),
                jobs: vec![NewJob {
                    id: uuid::Uuid::now_v7(),
                    route: "builds".to_owned(),
                    target: "circleci".to_owned(),
                    request: Ok(PreparedRequest {
                        url: format!("http://{circle}/api/v2/project/gh/acme/api/pipeline"),
                        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
                        body: RequestBody::Text(r#"{"branch":"main"}"#.to_owned()),
                        auth: Auth::Header {
                            name: "Circle-Token".to_owned(),
                        },
                    }),
                    limits: JobLimits::default(),
                    lease: None,
                    repo: "acme/api".to_owned(),
                    sha: "2222222222222222222222222222222222222222".to_owned(),
                    shadow: false,
                    report: None,
                }],
                drops: Vec::new(),
            };
            pending.push(tokio::spawn(async move { store.ingest(event).await }));
        }
        for task in pending.drain(..) {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    when: String,
    machine: String,
    duration_secs: u64,
    runs: usize,
    payload_bytes: usize,
    subjects: Vec<SubjectResult>,
    end_to_end: Option<EndToEnd>,
    delivery: Option<Delivery>,
}

async fn run(options: Options, machine: String) -> Result<(), String> {
    let dir = Scratch::new()?;
    let (body, signature) = payload();
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
    let ws = Workspace {
        dir,
        body,
        signature,
        relay_binary,
        postgres: options.postgres.clone(),
    };
    std::fs::write(ws.path("body.json"), &ws.body).map_err(|e| e.to_string())?;
    let circle = MockCircle::default()
        .start(false)
        .await
        .map_err(|e| e.to_string())?;
    let mut subjects = Vec::new();
    for (name, what) in SUBJECTS {
        if options.only.as_deref().is_some_and(|o| o != name && o != "load") {
            continue;
        }
        if name == "relay-postgres" && ws.postgres.is_none() {
            continue;
        }
        eprintln!("measuring {name} …");
        subjects.push(measure(name, what, &ws, circle, &options).await?);
    }
    let wanted = |part: &str| options.only.as_deref().is_none_or(|o| o == part);
    let end_to_end = if wanted("e2e") {
        eprintln!("measuring relay end to end at {E2E_RATE} req/s …");
        Some(end_to_end(&ws, &options).await?)
    } else {
        None
    };
    let delivery = if wanted("delivery") {
        eprintln!("measuring relay delivery from a backlog of {BACKLOG} …");
        Some(delivery(&ws, &options).await?)
    } else {
        None
    };
    let report = Report {
        when: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        machine,
        duration_secs: options.duration.as_secs(),
        runs: options.runs,
        payload_bytes: ws.body.len(),
        subjects,
        end_to_end,
        delivery,
    };
    print!("{}", table(&report));
    std::fs::write(
        &options.out,
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("cannot write {}: {e}", options.out.display()))?;
    eprintln!("wrote {}", options.out.display());
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|m| m.trim().to_owned())
            })
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}

fn find<'a>(report: &'a Report, name: &str, connections: u32) -> Option<&'a Summary> {
    report
        .subjects
        .iter()
        .find(|s| s.name == name)?
        .by_connections
        .iter()
        .find(|c| c.connections == connections)
}

fn table(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} · {} KB signed GitHub push · {}s per run · median of {} runs (spread: min–max req/s)\n",
        report.machine,
        report.payload_bytes / 1024,
        report.duration_secs,
        report.runs
    );
    let _ = writeln!(
        out,
        "| subject | conns | req/s | spread | p50 ms | p99 ms | CPU µs/req | disk KB/req | RSS idle → after (MiB) | non-2xx |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &report.subjects {
        for c in &s.by_connections {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} → {:.1} | {} |",
                s.name,
                c.connections,
                c.requests_per_sec,
                c.requests_per_sec_min,
                c.requests_per_sec_max,
                c.p50_ms,
                c.p99_ms,
                c.cpu_us_per_request,
                c.disk_bytes_per_request / 1024.0,
                s.rss_idle_mib,
                s.rss_after_mib,
                c.non_2xx + c.socket_errors
            );
        }
    }
    if let Some(failures) = report.subjects.iter().find_map(|s| s.exec_failures) {
        let _ = writeln!(
            out,
            "\nwebhook-exec: {failures} commands failed with \"too many open files\""
        );
    }
    if let Some(relay) = find(report, "relay", 32) {
        let _ = writeln!(
            out,
            "\nrelay at 32 connections, as a ratio of each baseline's req/s:"
        );
        for base in ["hyper-ceiling", "hyper-verify", "webhook-noexec", "webhook-exec"] {
            if let Some(b) = find(report, base, 32) {
                let _ = writeln!(
                    out,
                    "  vs {base}: {:.2}×",
                    relay.requests_per_sec / b.requests_per_sec.max(1e-9)
                );
            }
        }
    }
    if let (Some(pg), Some(sqlite)) = (find(report, "relay-postgres", 32), find(report, "relay", 32)) {
        let _ = writeln!(
            out,
            "  relay-postgres vs relay (SQLite): {:.2}×",
            pg.requests_per_sec / sqlite.requests_per_sec.max(1e-9)
        );
    }
    if let Some(e) = &report.end_to_end {
        let _ = writeln!(
            out,
            "relay end to end at {} req/s: 202 received → mock CircleCI has the trigger p50 {:.2} ms, p99 {:.2} ms \
             (0 when the trigger arrives first); webhook sent → trigger p50 {:.2} ms, p99 {:.2} ms",
            e.rate_per_sec, e.p50_ms, e.p99_ms, e.from_send_p50_ms, e.from_send_p99_ms
        );
    }
    if let Some(d) = &report.delivery {
        let spread = (
            d.runs.iter().copied().fold(f64::INFINITY, f64::min),
            d.runs.iter().copied().fold(0.0, f64::max),
        );
        let _ = writeln!(
            out,
            "relay delivery from a backlog of {}: {:.0} triggers/s (spread {:.0}–{:.0})",
            d.backlog, d.triggers_per_sec, spread.0, spread.1
        );
    }
    out
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
        assert_eq!(
            (options.only, options.postgres, options.relay),
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
        assert_eq!(options.only.as_deref(), Some("relay"));
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
        ] {
            let argv = std::iter::once("relay-bench").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
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
