//! relay's latencies through the whole path: webhook → trigger at a fixed
//! rate (end to end), and the rate at which a backlog drains (delivery).
//! Bounded: a fixed count of requests, a deadline on every wait.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backlog::{JobTarget, fill, fill_postgres, make_schema, make_schema_at};
use crate::load::cpu_time;
use crate::process::free_port;
use crate::relay::{ServerReading, Setup, Workspace, start_relay};
use crate::servers::MockCircle;
use crate::subjects::{median, median_if_any};
use crate::{BACKLOG, E2E_RATE, Options};

#[derive(Debug, Clone, Serialize)]
pub struct EndToEnd {
    pub rate_per_sec: u32,
    pub seconds: u64,
    /// 202 received → trigger received. Zero when the trigger arrived
    /// first: relay sends right after the commit, as the 202 goes out.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Webhook sent → trigger received: the commit included.
    pub from_send_p50_ms: f64,
    pub from_send_p99_ms: f64,
    /// Per run: (p50, p99, from-send p50, from-send p99).
    pub runs: Vec<(f64, f64, f64, f64)>,
}

/// 202 received → trigger received by the mock, at a fixed request rate.
pub async fn end_to_end(ws: &Workspace, options: &Options) -> Result<EndToEnd, String> {
    let mut runs = Vec::new();
    let seconds = options.duration.as_secs().max(2);
    for run in 0..options.runs {
        let mock = MockCircle::default();
        let circle = mock.clone().start(true).await.map_err(|e| e.to_string())?;
        let port = free_port()?;
        let store = format!("sqlite://{}", ws.path(&format!("e2e-{run}.db")).display());
        let relay = start_relay(
            ws,
            &format!("e2e-{run}"),
            port,
            &store,
            circle,
            &Setup {
                record: true,
                ..Setup::default()
            },
        )
        .await?;
        let client = relay::sends::http_client(Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let total = E2E_RATE as u64 * seconds;
        let mut tick = tokio::time::interval(Duration::from_secs(1) / E2E_RATE);
        let mut sent = Vec::new();
        for n in 0..total {
            tick.tick().await;
            let delivery = format!("e2e-{run}-{n}");
            let request = ws.push(&client, port, &delivery);
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

/// Where a measured backlog is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BacklogStore {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub store: BacklogStore,
    pub backlog: usize,
    /// The targets the backlog is spread over, evenly.
    pub targets: usize,
    pub triggers_per_sec: f64,
    pub runs: Vec<f64>,
    /// relay's CPU time (user and system) per trigger, first to last: less
    /// swayed than the rate by what else the machine runs.
    pub cpu_us_per_trigger: f64,
    pub cpu_runs: Vec<f64>,
    /// On PostgreSQL with the server on this machine, the server's CPU
    /// time per trigger over the same span: what bounds the drain there.
    pub server_cpu_us_per_trigger: Option<f64>,
    pub server_cpu_runs: Vec<f64>,
    /// On PostgreSQL, the bytes the server logged (its WAL) per trigger.
    pub server_wal_bytes_per_trigger: Option<f64>,
    pub server_wal_runs: Vec<f64>,
}

/// A backlog of queued jobs spread evenly over `targets` (all at one mock
/// CI) in `store`, then relay started on it: triggers per second reaching
/// the mock, first to last.
pub async fn delivery(
    ws: &Workspace,
    options: &Options,
    targets: usize,
    store: BacklogStore,
) -> Result<Delivery, String> {
    let mut runs = Vec::new();
    let mut cpu_runs = Vec::new();
    let mut server_cpu_runs = Vec::new();
    let mut server_wal_runs = Vec::new();
    let on_postgres = store == BacklogStore::Postgres;
    for run in 0..options.runs {
        let mock = MockCircle::default();
        let circle = mock.clone().start(false).await.map_err(|e| e.to_string())?;
        let names: Vec<String> = if targets == 1 {
            vec!["circleci".to_owned()]
        } else {
            (0..targets).map(|n| format!("t{n}")).collect()
        };
        let setup = Setup {
            extra: names
                .iter()
                .filter(|name| *name != "circleci")
                .map(|name| {
                    format!(
                        "[targets.{name}]\nkind = \"circleci\"\nbase_url = \"http://{circle}\"\n\
                         project = \"gh/acme/api\"\ntoken = \"bench-circle-token\"\n\n"
                    )
                })
                .collect(),
            ..Setup::default()
        };
        let each = BACKLOG / targets;
        let label = format!("backlog-{store:?}-{targets}-{run}");
        let url = match store {
            BacklogStore::Sqlite => {
                let db = ws.path(&format!("backlog-{targets}-{run}.db"));
                make_schema(ws, &db, circle, &setup).await?;
                for name in &names {
                    let target = JobTarget { name, addr: circle };
                    let filled = fill(
                        &db,
                        each,
                        target,
                        &format!("{run}-{name}"),
                        Duration::from_secs(600),
                    )
                    .await?;
                    if filled.cut_short {
                        return Err(format!(
                            "delivery: only {} of {each} jobs queued for {name} in 600 s",
                            filled.jobs
                        ));
                    }
                }
                format!("sqlite://{}", db.display())
            }
            BacklogStore::Postgres => {
                let url = ws.fresh_postgres_database().await?;
                make_schema_at(ws, &url, &format!("schema-{label}"), circle, &setup).await?;
                for name in &names {
                    let target = JobTarget { name, addr: circle };
                    fill_postgres(&url, each, target, &format!("{run}-{name}")).await?;
                }
                url
            }
        };
        let backlog = each * targets;
        let port = free_port()?;
        let relay = start_relay(ws, &label, port, &url, circle, &setup).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut first = None;
        while mock.count.load(Ordering::Relaxed) < backlog {
            if first.is_none() && mock.count.load(Ordering::Relaxed) > 0 {
                let server = if on_postgres {
                    Some(ServerReading::take(ws).await)
                } else {
                    None
                };
                let cpu = cpu_time(relay.pid()).unwrap_or_default();
                first = Some((Instant::now(), mock.count.load(Ordering::Relaxed), cpu, server));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "delivery: {} of {backlog} after 120s",
                    mock.count.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (started, at_start, cpu_at_start, server_at_start) =
            first.unwrap_or((Instant::now(), 0, Duration::ZERO, None));
        let sent = (backlog - at_start) as f64;
        runs.push(sent / started.elapsed().as_secs_f64().max(1e-3));
        let cpu = cpu_time(relay.pid())
            .unwrap_or_default()
            .saturating_sub(cpu_at_start);
        cpu_runs.push(cpu.as_secs_f64() * 1e6 / sent.max(1.0));
        if let Some(then) = server_at_start {
            let (server_cpu, server_wal) = ServerReading::take(ws).await.per(&then, sent.max(1.0));
            server_cpu_runs.extend(server_cpu);
            server_wal_runs.extend(server_wal);
        }
        drop(relay);
        if store == BacklogStore::Postgres {
            ws.drop_databases().await?;
        }
    }
    Ok(Delivery {
        store,
        backlog: BACKLOG / targets * targets,
        targets,
        triggers_per_sec: median(runs.clone()),
        runs,
        cpu_us_per_trigger: median(cpu_runs.clone()),
        cpu_runs,
        server_cpu_us_per_trigger: median_if_any(server_cpu_runs.clone()),
        server_cpu_runs,
        server_wal_bytes_per_trigger: median_if_any(server_wal_runs.clone()),
        server_wal_runs,
    })
}
