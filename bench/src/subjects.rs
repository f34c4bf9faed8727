//! The subjects of the load table (the hyper baselines, adnanh/webhook,
//! relay on SQLite or PostgreSQL), each started fresh per run and loaded by
//! wrk at each connection count, and the figures of those runs.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::load::{self, WrkResult};
use crate::process::{Running, free_port, start_pinned};
use crate::relay::{ServerReading, Setup, Workspace, start_relay};
use crate::{Options, SECRET};

/// The subjects, in the order of the table.
pub const SUBJECTS: [(&str, &str); 6] = [
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

pub fn webhook_hooks(path: &Path, exec: bool) -> Result<(), String> {
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

pub async fn start_subject(
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
                ws.fresh_postgres_database().await?
            } else {
                format!("sqlite://{}", ws.path(&format!("relay-{run}.db")).display())
            };
            start_relay(
                ws,
                &format!("{name}-{run}"),
                port,
                &store,
                circle,
                &Setup::default(),
            )
            .await
        }
    }
}

pub fn url(name: &str, port: u16) -> String {
    match name {
        "webhook-noexec" | "webhook-exec" => format!("http://127.0.0.1:{port}/hooks/bench"),
        _ => format!("http://127.0.0.1:{port}/hooks/github"),
    }
}

/// One load run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub wrk: WrkResult,
    pub cpu_us_per_request: f64,
    /// Bytes the subject had the kernel write to storage, per request.
    pub disk_bytes_per_request: f64,
    /// The database server's CPU time per request (relay-postgres, with
    /// the server on this machine): what bounds relay on PostgreSQL here.
    pub server_cpu_us_per_request: Option<f64>,
    /// The bytes the database server logged (its WAL) per request: what
    /// relay on PostgreSQL has written, where `disk_bytes_per_request` is
    /// relay's own (its log lines).
    pub server_wal_bytes_per_request: Option<f64>,
    /// The same figures once every webhook's trigger had reached the mock
    /// CI (relay's subjects): what a webhook costs with its send.
    pub settled: Option<Settled>,
}

/// A relay run's figures from the start of its load until the mock CI had
/// a trigger for every webhook relay accepted: the load's own window leaves
/// out the sends of the jobs still queued when it ended.
#[derive(Debug, Clone, Serialize)]
pub struct Settled {
    /// The accepted webhooks whose trigger had not reached the mock CI when
    /// the load ended, as a share of them all.
    pub unsent_at_end: f64,
    /// How long after the load the last of them arrived.
    pub after_ms: f64,
    pub cpu_us_per_request: f64,
    pub disk_bytes_per_request: f64,
    pub server_cpu_us_per_request: Option<f64>,
    pub server_wal_bytes_per_request: Option<f64>,
}

/// How long a run may take to send what its load left queued before it is
/// said to have not settled.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// Median and spread of the runs at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub connections: u32,
    pub requests_per_sec: f64,
    pub requests_per_sec_min: f64,
    pub requests_per_sec_max: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us_per_request: f64,
    pub disk_bytes_per_request: f64,
    pub server_cpu_us_per_request: Option<f64>,
    pub server_wal_bytes_per_request: Option<f64>,
    /// Medians of the runs' [`Settled`] figures, where every run settled.
    pub settled: Option<Settled>,
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub runs: Vec<RunFigures>,
}

pub fn median(mut values: Vec<f64>) -> f64 {
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

/// The medians of the runs' settled figures; `None` unless every run
/// settled.
fn summarize_settled(runs: &[RunFigures]) -> Option<Settled> {
    let settled: Vec<&Settled> = runs.iter().map(|r| r.settled.as_ref()).collect::<Option<_>>()?;
    if settled.is_empty() {
        return None;
    }
    let pick = |f: &dyn Fn(&Settled) -> f64| settled.iter().map(|s| f(s)).collect::<Vec<f64>>();
    let pick_read =
        |f: &dyn Fn(&Settled) -> Option<f64>| median_if_any(settled.iter().filter_map(|s| f(s)).collect());
    Some(Settled {
        unsent_at_end: median(pick(&|s| s.unsent_at_end)),
        after_ms: median(pick(&|s| s.after_ms)),
        cpu_us_per_request: median(pick(&|s| s.cpu_us_per_request)),
        disk_bytes_per_request: median(pick(&|s| s.disk_bytes_per_request)),
        server_cpu_us_per_request: pick_read(&|s| s.server_cpu_us_per_request),
        server_wal_bytes_per_request: pick_read(&|s| s.server_wal_bytes_per_request),
    })
}

/// The median of the figures that could be read; `None` if none could.
pub fn median_if_any(read: Vec<f64>) -> Option<f64> {
    (!read.is_empty()).then(|| median(read))
}

pub fn summarize(connections: u32, runs: Vec<RunFigures>) -> Summary {
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
        server_cpu_us_per_request: median_if_any(
            runs.iter().filter_map(|r| r.server_cpu_us_per_request).collect(),
        ),
        server_wal_bytes_per_request: median_if_any(
            runs.iter()
                .filter_map(|r| r.server_wal_bytes_per_request)
                .collect(),
        ),
        settled: summarize_settled(&runs),
        non_2xx: runs.iter().map(|r| r.wrk.non_2xx).sum(),
        socket_errors: runs.iter().map(|r| r.wrk.socket_errors).sum(),
        runs,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectResult {
    pub name: String,
    pub what: String,
    pub rss_idle_mib: f64,
    pub rss_after_mib: f64,
    pub by_connections: Vec<Summary>,
    /// webhook-exec: commands that failed with "too many open files".
    pub exec_failures: Option<u64>,
}

/// The order the table's subjects are run in: round by round, each of
/// `subjects` once a round, as (run, subject) pairs.
pub fn rounds(subjects: usize, runs: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..runs).flat_map(move |run| (0..subjects).map(move |subject| (run, subject)))
}

/// One subject's runs, gathered a run at a time ([`Runs::measure`]), so
/// that the table's subjects can be measured in rounds: each round runs
/// every subject once, and the ratios between subjects compare runs made
/// in the same minute of a machine whose speed drifts.
pub struct Runs {
    per_connections: Vec<(u32, Vec<RunFigures>)>,
    idle: Vec<f64>,
    after: Vec<f64>,
    exec_failures: u64,
}

impl Runs {
    pub fn new(connections: &[u32]) -> Runs {
        Runs {
            per_connections: connections.iter().map(|c| (*c, Vec::new())).collect(),
            idle: Vec::new(),
            after: Vec::new(),
            exec_failures: 0,
        }
    }

    /// Runs `name` once (its `run`-th run), at each connection count, in a
    /// fresh process (and, for relay, a fresh database).
    pub async fn measure(
        &mut self,
        name: &str,
        run: usize,
        ws: &Workspace,
        circle: std::net::SocketAddr,
        triggers: &AtomicUsize,
        options: &Options,
    ) -> Result<(), String> {
        let subject = start_subject(name, ws, circle, run).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.idle.push(load::rss_mib(subject.pid()).unwrap_or(0.0));
        for (connections, figures) in &mut self.per_connections {
            let script = ws.path("post.lua");
            load::write_script(
                &script,
                &ws.body,
                &format!("{name}-{run}-{connections}-{}", uuid::Uuid::new_v4()),
            )
            .map_err(|e| e.to_string())?;
            figures.push(
                load_run(
                    &subject,
                    &url(name, subject.port),
                    &script,
                    *connections,
                    options.duration,
                    (name == "relay-postgres").then_some(ws),
                    name.starts_with("relay").then_some(triggers),
                )
                .await?,
            );
        }
        self.after.push(load::rss_mib(subject.pid()).unwrap_or(0.0));
        self.exec_failures += std::fs::read_to_string(&subject.log)
            .map(|log| log.matches("too many open files").count() as u64)
            .unwrap_or(0);
        Ok(())
    }

    /// The runs' medians, as the table shows them.
    pub fn result(self, name: &str, what: &str) -> SubjectResult {
        SubjectResult {
            name: name.to_owned(),
            what: what.to_owned(),
            rss_idle_mib: median(self.idle),
            rss_after_mib: median(self.after),
            by_connections: self
                .per_connections
                .into_iter()
                .map(|(c, runs)| summarize(c, runs))
                .collect(),
            exec_failures: (name == "webhook-exec").then_some(self.exec_failures),
        }
    }
}

/// One wrk run against a running subject: wrk's figures, and the subject's
/// CPU time and disk writes over the run, per request served; with
/// `postgres` (the subject stores on that workspace's `--postgres` server),
/// the server's CPU and WAL too. With `triggers` (the mock CI's count of
/// triggers received; each accepted webhook makes one), the same figures
/// again once every webhook's trigger has arrived.
pub async fn load_run(
    subject: &Running,
    url: &str,
    script: &Path,
    connections: u32,
    duration: Duration,
    postgres: Option<&Workspace>,
    triggers: Option<&AtomicUsize>,
) -> Result<RunFigures, String> {
    let triggers_before = triggers.map(|t| t.load(Ordering::Relaxed));
    let server_before = match postgres {
        Some(ws) => Some(ServerReading::take(ws).await),
        None => None,
    };
    let before_cpu = load::cpu_time(subject.pid()).unwrap_or_default();
    let written_before = load::disk_writes(subject.pid()).unwrap_or_default();
    let wrk = tokio::task::spawn_blocking({
        let (url, script) = (url.to_owned(), script.to_owned());
        move || load::wrk(&url, connections, duration, &script)
    })
    .await
    .map_err(|e| e.to_string())??;
    // The subject's CPU time and disk writes since the load began.
    let spent = || {
        (
            load::cpu_time(subject.pid())
                .unwrap_or_default()
                .saturating_sub(before_cpu),
            load::disk_writes(subject.pid())
                .unwrap_or_default()
                .saturating_sub(written_before),
        )
    };
    let (cpu, written) = spent();
    let server_after = match postgres {
        Some(ws) => Some(ServerReading::take(ws).await),
        None => None,
    };
    // No request completed: nothing to divide by (NaN is written as null).
    let requests = if wrk.requests == 0 {
        f64::NAN
    } else {
        wrk.requests as f64
    };
    let (server_cpu, server_wal) = server_after
        .as_ref()
        .zip(server_before.as_ref())
        .map(|(after, before)| after.per(before, requests))
        .unwrap_or_default();
    let settled = match triggers.zip(triggers_before) {
        Some((triggers, before)) if wrk.requests > 0 => {
            let accepted = wrk.requests.saturating_sub(wrk.non_2xx) as usize;
            let unsent = accepted.saturating_sub(triggers.load(Ordering::Relaxed).saturating_sub(before));
            match settle(triggers, before + accepted, SETTLE_LIMIT).await {
                Some(after) => {
                    let (cpu, written) = spent();
                    let (server_cpu, server_wal) = match (postgres, server_before.as_ref()) {
                        (Some(ws), Some(before)) => ServerReading::take(ws).await.per(before, requests),
                        _ => (None, None),
                    };
                    Some(Settled {
                        unsent_at_end: unsent as f64 / accepted.max(1) as f64,
                        after_ms: after.as_secs_f64() * 1e3,
                        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests,
                        disk_bytes_per_request: written as f64 / requests,
                        server_cpu_us_per_request: server_cpu,
                        server_wal_bytes_per_request: server_wal,
                    })
                }
                None => {
                    eprintln!(
                        "  the mock CI had not received every accepted webhook's trigger {}s after the load: no settled figures",
                        SETTLE_LIMIT.as_secs()
                    );
                    None
                }
            }
        }
        _ => None,
    };
    Ok(RunFigures {
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests,
        disk_bytes_per_request: written as f64 / requests,
        server_cpu_us_per_request: server_cpu,
        server_wal_bytes_per_request: server_wal,
        settled,
        wrk,
    })
}

/// Waits until `triggers` reaches `expected`, and then until no more arrive
/// for a moment (the requests wrk had in flight when it stopped): how long
/// that took, or `None` past `limit`.
async fn settle(triggers: &AtomicUsize, expected: usize, limit: Duration) -> Option<Duration> {
    const QUIET: Duration = Duration::from_millis(200);
    let started = Instant::now();
    let mut last = triggers.load(Ordering::Relaxed);
    let mut last_change = started;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = triggers.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        if now >= expected && last_change.elapsed() >= QUIET {
            return Some(last_change.duration_since(started));
        }
        if started.elapsed() > limit {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn each_round_runs_every_subject_once_before_the_next_round() {
        let order: Vec<(usize, usize)> = rounds(3, 2).collect();
        assert_eq!(order, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
        assert_eq!(rounds(0, 3).count(), 0);
    }

    #[tokio::test]
    async fn a_run_settles_once_every_trigger_is_in_and_no_more_come() {
        let triggers = Arc::new(AtomicUsize::new(10));
        let sender = {
            let triggers = triggers.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    triggers.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let took = settle(&triggers, 14, Duration::from_secs(10)).await;
        sender.await.unwrap();
        assert_eq!(
            triggers.load(Ordering::Relaxed),
            15,
            "it waited for the straggler past the count"
        );
        assert!(took.is_some_and(|t| t >= Duration::from_millis(80)), "{took:?}");
    }

    fn settled_run(cpu: f64, server: Option<f64>) -> RunFigures {
        RunFigures {
            wrk: crate::load::WrkResult {
                requests: 1_000,
                requests_per_sec: 200.0,
                p50_ms: 1.0,
                p99_ms: 2.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu_us_per_request: cpu - 20.0,
            disk_bytes_per_request: 900.0,
            server_cpu_us_per_request: None,
            server_wal_bytes_per_request: None,
            settled: Some(Settled {
                unsent_at_end: cpu / 1_000.0,
                after_ms: cpu * 10.0,
                cpu_us_per_request: cpu,
                disk_bytes_per_request: cpu * 100.0,
                server_cpu_us_per_request: server,
                server_wal_bytes_per_request: server.map(|s| s * 2.0),
            }),
        }
    }

    #[test]
    fn the_settled_summary_is_each_figures_median_and_only_where_every_run_settled() {
        let runs = vec![
            settled_run(150.0, Some(300.0)),
            settled_run(130.0, None),
            settled_run(140.0, Some(200.0)),
        ];
        let summary = summarize(32, runs.clone()).settled.expect("every run settled");
        assert_eq!(
            (
                summary.cpu_us_per_request,
                summary.unsent_at_end,
                summary.after_ms,
                summary.disk_bytes_per_request
            ),
            (140.0, 0.14, 1_400.0, 14_000.0)
        );
        assert_eq!(
            (
                summary.server_cpu_us_per_request,
                summary.server_wal_bytes_per_request
            ),
            (Some(250.0), Some(500.0)),
            "the medians of the runs that read the server"
        );
        let mut unsettled = runs;
        unsettled[1].settled = None;
        assert!(summarize(32, unsettled).settled.is_none());
    }

    #[tokio::test]
    async fn a_run_whose_triggers_never_all_come_has_not_settled() {
        let triggers = AtomicUsize::new(3);
        assert_eq!(settle(&triggers, 4, Duration::from_millis(50)).await, None);
    }
}
