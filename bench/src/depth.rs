//! The queue-depth curve: relay's ingest at 32 connections and its claim
//! latency with 0, 100,000 and 1,000,000 jobs already queued.
//!
//! The backlog is queued straight into one SQLite file, whose schema the
//! measured relay made (`backlog::fill`), in steps (0, then up to 100k, then up to 1M),
//! for a target (`paused`) whose CI holds every trigger unanswered: relay
//! may send it one at a time (`concurrency = 1`) and that one waits, so the
//! backlog stays queued while ingest is measured. Each fill step has a time
//! budget; a step cut short says so and the point is measured at the depth
//! reached. Claim latency is measured two ways (see [`Claims`]).

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::Options;
use crate::backlog::{JobTarget, fill, make_schema};
use crate::curves::CONNECTIONS;
use crate::load::{self, rss_mib};
use crate::process::{Running, free_port};
use crate::relay::{Setup, Workspace, start_relay};
use crate::servers::{MockCircle, MockPaused};
use crate::subjects::{Summary, load_run, median, summarize};

pub const DEPTHS: [usize; 3] = [0, 100_000, 1_000_000];

/// The longest one fill step may take; past it the step stops at a whole
/// chunk and the point is measured at the depth reached.
const FILL_BUDGET: Duration = Duration::from_secs(420);

/// Triggers the paused CI answers, one after another, to time relay's
/// claim cycle; queued first (with the one held when it starts) when the
/// backlog has fewer.
const PROBE: usize = 300;

/// The longest the claim cycles are timed for: past it, the cycles timed
/// so far are the figure (a slow cycle at a great depth is the finding,
/// not a reason to wait out `PROBE` of them).
const PROBE_BUDGET: Duration = Duration::from_secs(60);

/// The longest the claim cycles wait for relay to finish the ingest load's
/// tail (requests wrk left in flight, their commits and sends).
const SETTLE_BUDGET: Duration = Duration::from_secs(30);

/// Claims timed in-process against the store file.
const STORE_CLAIMS: usize = 50;

/// One point of the queue-depth curve.
#[derive(Debug, Clone, Serialize)]
pub struct DepthPoint {
    /// The depth asked for.
    pub depth: usize,
    /// Jobs queued for the paused target when ingest was measured.
    pub queued: usize,
    /// Seconds this step's fill took, and whether its budget cut it short.
    pub fill_secs: f64,
    pub fill_cut_short: bool,
    /// The SQLite file, in MiB, when ingest was measured.
    pub store_mib: f64,
    /// Ingest of the load's push, with the backlog queued.
    pub ingest: Summary,
    pub rss_after_mib: f64,
    pub claims: Claims,
}

/// Claim latency at one depth, two ways.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    /// Through the relay measured, once it is quiet after the ingest load:
    /// the paused CI answers the trigger it holds, and the next one arrives. Each gap is one cycle of relay's
    /// dispatcher at `concurrency = 1`: the answer read, the attempt
    /// committed, the dispatcher woken, the next job claimed (a committed
    /// lease) and sent. Milliseconds, over `cycles` cycles.
    pub cycle_p50_ms: f64,
    pub cycle_p99_ms: f64,
    pub cycles: usize,
    /// Seconds relay took to go quiet after the ingest load, before the
    /// cycles were timed (at most `SETTLE_BUDGET`: past it, they were
    /// timed with relay still busy).
    pub settled_secs: f64,
    /// Why the cycle could not be timed (the figures above are then 0).
    pub cycle_error: Option<String>,
    /// The store's claim alone: `Queue::claim` of one job of the paused
    /// target, timed in this harness against the same file before relay
    /// starts. This is the harness's own build of relay's store, not
    /// `--relay`'s: when the two builds' schemas differ it is not timed (0
    /// claims), as opening the file would migrate it under `--relay`.
    /// Milliseconds, over `store_claims` claims.
    pub store_claim_p50_ms: f64,
    pub store_claim_p99_ms: f64,
    pub store_claims: usize,
}

pub async fn queue_depth(ws: &Workspace, options: &Options) -> Result<Vec<DepthPoint>, String> {
    let circle = MockCircle::default()
        .start(false)
        .await
        .map_err(|e| e.to_string())?;
    // One paused CI for every step: the queued jobs' requests name its address.
    let paused = MockPaused::new();
    let paused_addr = paused.clone().start().await.map_err(|e| e.to_string())?;
    let target = JobTarget {
        name: "paused",
        addr: paused_addr,
    };
    let db = ws.path("depth.db");
    let store = format!("sqlite://{}", db.display());
    let setup = setup(paused_addr);
    make_schema(ws, &db, circle, &setup).await?;
    let mut queued = 0;
    let mut points = Vec::new();
    for depth in DEPTHS {
        eprintln!(
            "  {depth} jobs queued: queuing {} …",
            depth.saturating_sub(queued)
        );
        let filled = fill(
            &db,
            depth.saturating_sub(queued),
            target,
            &depth.to_string(),
            FILL_BUDGET,
        )
        .await?;
        queued += filled.jobs;
        if filled.cut_short {
            eprintln!(
                "  the fill's {} s budget ran out: {queued} jobs queued, measuring at that depth",
                FILL_BUDGET.as_secs()
            );
        }
        let at_ingest = queued;
        let store_claims = store_claims(&db).await?;
        eprintln!(
            "  {queued} queued in {:.0} s; the store claims one in {:.3} ms (median)",
            filled.secs,
            quantile(&store_claims, 0.5)
        );
        let store_mib = std::fs::metadata(&db)
            .map(|m| m.len() as f64 / 1_048_576.0)
            .unwrap_or(0.0);
        let label = format!("depth-{depth}");
        let port = free_port()?;
        paused.refuse(false);
        let mut relay = start_relay(ws, &label, port, &store, circle, &setup).await?;
        let url = format!("http://127.0.0.1:{port}/hooks/github");
        let script = ws.path(&format!("{label}.lua"));
        let mut runs = Vec::new();
        for run in 0..options.runs {
            let tag = format!("{label}-{run}-{}", uuid::Uuid::new_v4());
            load::write_script(&script, &ws.body, &tag).map_err(|e| e.to_string())?;
            runs.push(load_run(&relay, &url, &script, CONNECTIONS, options.duration, None, None).await?);
        }
        let rss_after_mib = rss_mib(relay.pid()).unwrap_or(0.0);
        if queued <= PROBE {
            // Too few jobs to time the claim cycle: queue the probe's, with
            // relay stopped (it holds the file).
            paused.refuse(true);
            drop(relay);
            let probe = fill(
                &db,
                PROBE + 1 - queued,
                target,
                &format!("{depth}-probe"),
                FILL_BUDGET,
            )
            .await?;
            queued += probe.jobs;
            paused.refuse(false);
            relay = start_relay(ws, &format!("{label}-probe"), port, &store, circle, &setup).await?;
        }
        let settled_secs = settle(&relay).await;
        let cycle = claim_cycles(&paused, &relay).await;
        if let Err(e) = &cycle {
            eprintln!("  {e}\n  relay's log ends:\n{}", tail(&relay.log, 8));
        }
        let (cycle_p50_ms, cycle_p99_ms, cycles) = cycle.as_ref().map_or((0.0, 0.0, 0), |c| *c);
        // Each cycle's answered trigger is done; the one held at the end
        // fails (503) and stays queued for a retry.
        queued = queued.saturating_sub(cycles);
        paused.refuse(true);
        drop(relay);
        points.push(DepthPoint {
            depth,
            queued: at_ingest,
            fill_secs: filled.secs,
            fill_cut_short: filled.cut_short,
            store_mib,
            ingest: summarize(CONNECTIONS, runs),
            rss_after_mib,
            claims: Claims {
                cycle_error: cycle.err(),
                settled_secs,
                cycle_p50_ms,
                cycle_p99_ms,
                cycles,
                store_claim_p50_ms: quantile(&store_claims, 0.5),
                store_claim_p99_ms: quantile(&store_claims, 0.99),
                store_claims: store_claims.len(),
            },
        });
    }
    Ok(points)
}

/// The load table's relay, and the paused target the backlog is for: one
/// send at a time, and a send timeout that outlasts the measurement (the
/// held trigger must not fail and free the slot meanwhile).
fn setup(paused: std::net::SocketAddr) -> Setup {
    Setup {
        delivery_timeout: Some("600s"),
        extra: format!(
            r#"
[targets.paused]
kind = "circleci"
base_url = "http://{paused}"
project = "gh/acme/api"
token = "bench-paused-token"
concurrency = 1
"#
        ),
        ..Setup::default()
    }
}

/// Times `Queue::claim` of one paused job against the store file, in
/// milliseconds, sorted. The claimed jobs stay leased for a minute, then
/// are claimable again.
async fn store_claims(db: &std::path::Path) -> Result<Vec<f64>, String> {
    use relay::store::{Queue, SQLITE_SCHEMA_VERSION, SqliteStore};
    let version: i64 = rusqlite::Connection::open(db)
        .and_then(|conn| conn.pragma_query_value(None, "user_version", |row| row.get(0)))
        .map_err(|e| e.to_string())?;
    if version != i64::from(SQLITE_SCHEMA_VERSION) {
        return Ok(Vec::new());
    }
    let store = SqliteStore::open(db, std::time::SystemTime::now()).map_err(|e| e.to_string())?;
    let mut took = Vec::with_capacity(STORE_CLAIMS);
    for _ in 0..STORE_CLAIMS {
        let started = Instant::now();
        store
            .claim("paused", 1, Duration::from_secs(60), SystemTime::now())
            .await
            .map_err(|e| e.to_string())?;
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    Ok(took)
}

/// Answers the paused CI's triggers one after another, `PROBE` of them (or
/// as many as `PROBE_BUDGET` allows), and times each gap from an answer to the next trigger's arrival: its
/// median and 99th percentile in ms, and the count timed.
async fn claim_cycles(paused: &MockPaused, relay: &Running) -> Result<(f64, f64, usize), String> {
    use std::sync::atomic::Ordering;
    // The slot's one trigger must be held before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while paused.held.load(Ordering::SeqCst) == 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "queue depth: relay sent the paused target nothing in 30 s (see {})",
                relay.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Arrivals noted before the probe are not waited for.
    let _ = tokio::time::timeout(Duration::from_millis(1), paused.arrival.notified()).await;
    let mut gaps = Vec::with_capacity(PROBE);
    let started = Instant::now();
    while gaps.len() < PROBE && started.elapsed() < PROBE_BUDGET {
        let answered = Instant::now();
        paused.release.add_permits(1);
        if tokio::time::timeout(Duration::from_secs(30), paused.arrival.notified())
            .await
            .is_err()
        {
            return Err(format!(
                "queue depth: no trigger 30 s after an answer ({} cycles timed; see {})",
                gaps.len(),
                relay.log.display()
            ));
        }
        let arrived = paused
            .arrivals
            .lock()
            .map_err(|_| "mock poisoned")?
            .last()
            .copied()
            .unwrap_or_else(Instant::now);
        gaps.push(arrived.saturating_duration_since(answered).as_secs_f64() * 1e3);
    }
    gaps.sort_by(f64::total_cmp);
    Ok((median(gaps.clone()), quantile(&gaps, 0.99), gaps.len()))
}

/// Waits until relay spends under a tenth of a CPU over half a second (the
/// ingest load's tail done), at most `SETTLE_BUDGET`; the seconds waited.
async fn settle(relay: &Running) -> f64 {
    let started = Instant::now();
    let window = Duration::from_millis(500);
    while started.elapsed() < SETTLE_BUDGET {
        let before = load::cpu_time(relay.pid()).unwrap_or_default();
        tokio::time::sleep(window).await;
        let used = load::cpu_time(relay.pid())
            .unwrap_or_default()
            .saturating_sub(before);
        if used < window / 10 {
            break;
        }
    }
    started.elapsed().as_secs_f64()
}

/// The last `n` lines of a log.
fn tail(log: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}
