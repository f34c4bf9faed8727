//! The routes and payload curves: relay at 32 connections against 1 to
//! 1,000 routes, and against signed pushes of 1 KB to 1 MB. Each point is
//! `--runs` runs of `--duration`, each on a fresh relay and database, as in
//! the load table; figures are medians, with the spread.
//!
//! Before loading, one webhook is sent and its answer checked (202, one
//! job), so a curve never measures a config that refuses or drops the push.

use std::time::Duration;

use serde::Serialize;

use crate::load::{self, rss_mib};
use crate::process::free_port;
use crate::push::{self, Push};
use crate::relay::{Setup, Workspace, start_relay};
use crate::subjects::{Summary, load_run, median, summarize};
use crate::{Options, routes};

/// Every curve's load: the load table's busier concurrency.
pub const CONNECTIONS: u32 = 32;
pub const ROUTE_COUNTS: [usize; 4] = [1, 10, 100, 1_000];
pub const PAYLOAD_BYTES: [usize; 4] = [1_024, 7 * 1_024, 100 * 1_024, 1_024 * 1_024];

/// One point of the routes curve.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesPoint {
    pub routes: usize,
    /// Of which take the load's push (all to one target: one job each).
    pub matching: usize,
    #[serde(flatten)]
    pub load: Summary,
    pub rss_after_mib: f64,
}

/// One point of the payload curve.
#[derive(Debug, Clone, Serialize)]
pub struct PayloadPoint {
    /// The signed body's size as sent.
    pub bytes: usize,
    #[serde(flatten)]
    pub load: Summary,
    pub rss_after_mib: f64,
}

/// A curve: its points, all at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Curve<P> {
    pub connections: u32,
    pub points: Vec<P>,
}

pub async fn routes(ws: &Workspace, options: &Options) -> Result<Curve<RoutesPoint>, String> {
    let mut points = Vec::new();
    for n in ROUTE_COUNTS {
        eprintln!("  {n} routes …");
        let mock = crate::servers::MockCircle::default();
        let circle = mock.start(false).await.map_err(|e| e.to_string())?;
        let (routes, extra) = routes::config(n, circle);
        let setup = Setup {
            routes: Some(routes),
            extra,
            ..Setup::default()
        };
        let label = format!("routes-{n}");
        let (load, rss) = point(ws, &label, &setup, circle, &ws.body, options).await?;
        points.push(RoutesPoint {
            routes: n,
            matching: routes::matching(n),
            load,
            rss_after_mib: rss,
        });
    }
    Ok(Curve {
        connections: CONNECTIONS,
        points,
    })
}

pub async fn payload(ws: &Workspace, options: &Options) -> Result<Curve<PayloadPoint>, String> {
    let mut points = Vec::new();
    for bytes in PAYLOAD_BYTES {
        // 7 KB is the load table's own push, byte for byte.
        let push = if bytes == 7 * 1_024 {
            ws.body.clone()
        } else {
            push::sized(bytes)?
        };
        eprintln!("  a push of {} bytes …", push.body.len());
        let mock = crate::servers::MockCircle::default();
        let circle = mock.start(false).await.map_err(|e| e.to_string())?;
        let label = format!("payload-{bytes}");
        let (load, rss) = point(ws, &label, &Setup::default(), circle, &push, options).await?;
        points.push(PayloadPoint {
            bytes: push.body.len(),
            load,
            rss_after_mib: rss,
        });
    }
    Ok(Curve {
        connections: CONNECTIONS,
        points,
    })
}

/// `--runs` loads of relay on `setup`, each on a fresh relay and database,
/// with `push`.
async fn point(
    ws: &Workspace,
    label: &str,
    setup: &Setup,
    circle: std::net::SocketAddr,
    push: &Push,
    options: &Options,
) -> Result<(Summary, f64), String> {
    let mut runs = Vec::new();
    let mut rss = Vec::new();
    for run in 0..options.runs {
        let port = free_port()?;
        let store = format!("sqlite://{}", ws.path(&format!("{label}-{run}.db")).display());
        let relay = start_relay(ws, &format!("{label}-{run}"), port, &store, circle, setup).await?;
        let url = format!("http://127.0.0.1:{port}/hooks/github");
        check_one(&url, push, &format!("{label}-{run}-check")).await?;
        let script = ws.path(&format!("{label}.lua"));
        let tag = format!("{label}-{run}-{}", uuid::Uuid::new_v4());
        load::write_script(&script, push, &tag).map_err(|e| e.to_string())?;
        runs.push(load_run(&relay, &url, &script, CONNECTIONS, options.duration, None, None).await?);
        rss.push(rss_mib(relay.pid()).unwrap_or(0.0));
        drop(relay);
    }
    Ok((summarize(CONNECTIONS, runs), median(rss)))
}

/// Sends one webhook (`push` for a commit of its own) and checks that relay
/// takes it: 202 and one job.
async fn check_one(url: &str, push: &Push, delivery: &str) -> Result<(), String> {
    let (body, signature) = push.for_commit(&push::fresh_commit());
    let client = relay::sends::http_client(Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let jobs = answer["jobs"]
        .as_array()
        .map(Vec::len)
        .or_else(|| answer["jobs"].as_u64().map(|n| n as usize));
    if status != 202 || jobs != Some(1) {
        return Err(format!(
            "{url}: the load's push should be taken with one job, but relay answered {status} {answer}"
        ));
    }
    Ok(())
}
