//! The results of one run: the JSON written to compare across commits and
//! the tables printed. Never measures; only says what was measured.

use serde::Serialize;

use std::fmt::Write as _;

use crate::curves::{Curve, PayloadPoint, RoutesPoint};
use crate::depth::DepthPoint;
use crate::history::StoreSize;
use crate::latency::{BacklogStore, Delivery, EndToEnd};
use crate::subjects::{SubjectResult, median};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub when: String,
    pub machine: String,
    /// The measured relay's `--version` line.
    pub relay: String,
    /// The commit the harness was built from: its load and its mocks
    /// decide what is measured as much as relay does (before b18dc32 the
    /// mock CircleCI gave every trigger one pipeline id).
    pub harness: String,
    pub duration_secs: u64,
    pub runs: usize,
    pub payload_bytes: usize,
    pub subjects: Vec<SubjectResult>,
    /// relay's requests/s over each baseline's, and relay on PostgreSQL's
    /// over relay on SQLite's, round by round (see [`ratios`]).
    pub ratios: Vec<Ratio>,
    pub end_to_end: Option<EndToEnd>,
    pub delivery: Option<Delivery>,
    /// The same backlog spread over many targets.
    pub delivery_wide: Option<Delivery>,
    /// From a backlog on PostgreSQL, one target (with `--postgres`).
    pub delivery_postgres: Option<Delivery>,
    /// The same on PostgreSQL, spread over as many targets as `delivery_wide`.
    pub delivery_postgres_wide: Option<Delivery>,
    pub routes: Option<Curve<RoutesPoint>>,
    pub payload: Option<Curve<PayloadPoint>>,
    pub queue_depth: Option<Vec<DepthPoint>>,
    pub store_size: Option<StoreSize>,
    /// Curves that could not be measured, and why.
    pub errors: Vec<String>,
}

/// One subject's requests/s over another's at one connection count: each
/// round's (the subjects' runs are made in rounds, each subject once a
/// round, so the two runs of a round share a minute of the machine) and
/// the median of those.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub subject: String,
    pub against: String,
    pub connections: u32,
    pub by_round: Vec<f64>,
    pub median: f64,
}

/// The ratios the goals are judged by, at every connection count both
/// subjects were loaded at: relay against each baseline, and relay on
/// PostgreSQL against relay on SQLite.
pub fn ratios(subjects: &[SubjectResult]) -> Vec<Ratio> {
    let pairs = ["hyper-ceiling", "hyper-verify", "webhook-noexec", "webhook-exec"]
        .map(|base| ("relay", base))
        .into_iter()
        .chain([("relay-postgres", "relay")]);
    let mut out = Vec::new();
    for (subject, against) in pairs {
        let by_name = |name: &str| subjects.iter().find(|s| s.name == name);
        let (Some(a), Some(b)) = (by_name(subject), by_name(against)) else {
            continue;
        };
        for mine in &a.by_connections {
            let Some(theirs) = b
                .by_connections
                .iter()
                .find(|c| c.connections == mine.connections)
            else {
                continue;
            };
            let by_round: Vec<f64> = mine
                .runs
                .iter()
                .zip(&theirs.runs)
                .filter(|(_, t)| t.wrk.requests_per_sec > 0.0)
                .map(|(m, t)| m.wrk.requests_per_sec / t.wrk.requests_per_sec)
                .collect();
            if by_round.is_empty() {
                continue;
            }
            out.push(Ratio {
                subject: subject.to_owned(),
                against: against.to_owned(),
                connections: mine.connections,
                median: median(by_round.clone()),
                by_round,
            });
        }
    }
    out
}

fn ratio_line(r: &Ratio) -> String {
    let rounds: Vec<String> = r.by_round.iter().map(|x| format!("{x:.2}×")).collect();
    format!("{:.2}× (median of the rounds: {})", r.median, rounds.join(", "))
}

pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} · {} · harness {} · {} KB signed GitHub push · {}s per run · median of {} runs (spread: min–max req/s)\n",
        report.machine,
        report.relay,
        report.harness,
        report.payload_bytes / 1024,
        report.duration_secs,
        report.runs
    );
    if !report.subjects.is_empty() {
        let _ = writeln!(
            out,
            "| subject | conns | req/s | spread | p50 ms | p99 ms | CPU µs/req | disk KB/req | RSS idle → after (MiB) | non-2xx |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
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
    let at_32: Vec<&Ratio> = report.ratios.iter().filter(|r| r.connections == 32).collect();
    if !at_32.is_empty() {
        let _ = writeln!(
            out,
            "\nrelay at 32 connections, as a ratio of each baseline's req/s, round by round:"
        );
    }
    for r in at_32 {
        let name = if r.subject == "relay-postgres" {
            "relay-postgres vs relay (SQLite)".to_owned()
        } else {
            format!("vs {}", r.against)
        };
        let _ = writeln!(out, "  {name}: {}", ratio_line(r));
    }
    for s in report.subjects.iter().filter(|s| s.name == "relay-postgres") {
        for c in &s.by_connections {
            let spent = server_spent(c.server_cpu_us_per_request, c.server_wal_bytes_per_request);
            if !spent.is_empty() {
                let _ = writeln!(
                    out,
                    "relay-postgres at {} connections: PostgreSQL's server {spent} a webhook \
                     (relay's own CPU {:.0} µs)",
                    c.connections, c.cpu_us_per_request
                );
            }
        }
    }
    for s in report.subjects.iter().filter(|s| s.name.starts_with("relay")) {
        for c in &s.by_connections {
            if let Some(settled) = &c.settled {
                let server = settled
                    .server_cpu_us_per_request
                    .map(|cpu| format!(", the server's {cpu:.0} µs"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{} at {} connections, every trigger sent: {:.0}% of the webhooks' triggers were unsent when the load \
                     ended, the last arrived {:.2} s later; CPU {:.0} µs a webhook (during the load {:.0}){server}, \
                     disk {:.1} KB (during the load {:.1})",
                    s.name,
                    c.connections,
                    settled.unsent_at_end * 100.0,
                    settled.after_ms / 1e3,
                    settled.cpu_us_per_request,
                    c.cpu_us_per_request,
                    settled.disk_bytes_per_request / 1024.0,
                    c.disk_bytes_per_request / 1024.0,
                );
            }
        }
    }
    if let Some(e) = &report.end_to_end {
        let _ = writeln!(
            out,
            "relay end to end at {} req/s: 202 received → mock CircleCI has the trigger p50 {:.2} ms, p99 {:.2} ms \
             (0 when the trigger arrives first); webhook sent → trigger p50 {:.2} ms, p99 {:.2} ms",
            e.rate_per_sec, e.p50_ms, e.p99_ms, e.from_send_p50_ms, e.from_send_p99_ms
        );
    }
    for d in report
        .delivery
        .iter()
        .chain(&report.delivery_wide)
        .chain(&report.delivery_postgres)
        .chain(&report.delivery_postgres_wide)
    {
        let spread = (
            d.runs.iter().copied().fold(f64::INFINITY, f64::min),
            d.runs.iter().copied().fold(0.0, f64::max),
        );
        let _ = writeln!(
            out,
            "relay delivery from a backlog of {} for {} target(s){}: {:.0} triggers/s (spread {:.0}–{:.0}), \
             relay's CPU {:.1} µs per trigger{}",
            d.backlog,
            d.targets,
            if d.store == BacklogStore::Postgres {
                " on PostgreSQL"
            } else {
                ""
            },
            d.triggers_per_sec,
            spread.0,
            spread.1,
            d.cpu_us_per_trigger,
            match server_spent(d.server_cpu_us_per_trigger, d.server_wal_bytes_per_trigger) {
                spent if spent.is_empty() => spent,
                spent => format!(", PostgreSQL's server {spent}"),
            }
        );
    }
    curves(report, &mut out);
    for p in report.queue_depth.iter().flatten() {
        if let Some(e) = &p.claims.cycle_error {
            let _ = writeln!(out, "\nclaim cycle at {} queued not timed: {e}", p.queued);
        }
    }
    if let Some(size) = &report.store_size {
        store_size(size, &mut out);
    }
    for error in &report.errors {
        let _ = writeln!(out, "\nnot measured: {error}");
    }
    out
}

/// What the database server spent, as far as it was read: "CPU 312 µs and
/// WAL 4.6 KB", either alone, or nothing.
fn server_spent(cpu_us: Option<f64>, wal_bytes: Option<f64>) -> String {
    let cpu = cpu_us.map(|us| format!("CPU {us:.0} µs"));
    let wal = wal_bytes.map(|bytes| format!("WAL {:.1} KB", bytes / 1024.0));
    [cpu, wal].into_iter().flatten().collect::<Vec<_>>().join(" and ")
}

/// The curves' tables, each with its ratios to its first point.
fn curves(report: &Report, out: &mut String) {
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    if let Some(curve) = &report.routes {
        let _ = writeln!(
            out,
            "\nrelay against routes, c{} ({}):\n\n| routes | taking the push | req/s | spread | p99 ms | CPU µs/webhook | req/s vs 1 route | CPU vs 1 route |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
            curve.connections, report.relay
        );
        let first = curve.points.first().map(|p| &p.load);
        for p in &curve.points {
            let (rps, cpu) = first.map_or((1.0, 1.0), |f| {
                (
                    ratio(p.load.requests_per_sec, f.requests_per_sec),
                    ratio(p.load.cpu_us_per_request, f.cpu_us_per_request),
                )
            });
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.0} | {rps:.2}× | {cpu:.2}× |",
                p.routes,
                p.matching,
                p.load.requests_per_sec,
                p.load.requests_per_sec_min,
                p.load.requests_per_sec_max,
                p.load.p99_ms,
                p.load.cpu_us_per_request
            );
        }
    }
    if let Some(curve) = &report.payload {
        let _ = writeln!(
            out,
            "\nrelay against the push's size, c{}:\n\n| push KB | req/s | spread | p99 ms | CPU µs/webhook | disk KB/webhook | RSS after MiB | req/s vs 1 KB | CPU vs 1 KB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            curve.connections
        );
        let first = curve.points.first().map(|p| &p.load);
        for p in &curve.points {
            let (rps, cpu) = first.map_or((1.0, 1.0), |f| {
                (
                    ratio(p.load.requests_per_sec, f.requests_per_sec),
                    ratio(p.load.cpu_us_per_request, f.cpu_us_per_request),
                )
            });
            let _ = writeln!(
                out,
                "| {:.1} | {:.0} | {:.0}–{:.0} | {:.2} | {:.0} | {:.1} | {:.1} | {rps:.2}× | {cpu:.2}× |",
                p.bytes as f64 / 1024.0,
                p.load.requests_per_sec,
                p.load.requests_per_sec_min,
                p.load.requests_per_sec_max,
                p.load.p99_ms,
                p.load.cpu_us_per_request,
                p.load.disk_bytes_per_request / 1024.0,
                p.rss_after_mib
            );
        }
    }
    if let Some(points) = &report.queue_depth {
        let _ = writeln!(
            out,
            "\nrelay against jobs queued (for a CI holding its one trigger), ingest at c32; claim: answer → next trigger through relay once it is quiet (cycle), and the store's claim alone:\n\n| queued | fill s | store MiB | ingest req/s | spread | p99 ms | CPU µs/webhook | RSS after MiB | cycle p50 / p99 ms | store claim p50 / p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in points {
            let _ = writeln!(
                out,
                "| {}{} | {:.0} | {:.0} | {:.0} | {:.0}–{:.0} | {} | {} | {:.1} | {:.2} / {:.2} | {:.3} / {:.3} |",
                p.queued,
                if p.fill_cut_short { " (fill cut short)" } else { "" },
                p.fill_secs,
                p.store_mib,
                p.ingest.requests_per_sec,
                p.ingest.requests_per_sec_min,
                p.ingest.requests_per_sec_max,
                // No request completed in a run: its latency is past the
                // run's length, and its CPU per request undefined.
                if p.ingest.runs.iter().any(|r| r.wrk.requests == 0) {
                    format!("> {} s", report.duration_secs)
                } else {
                    format!("{:.2}", p.ingest.p99_ms)
                },
                if p.ingest.cpu_us_per_request.is_finite() {
                    format!("{:.0}", p.ingest.cpu_us_per_request)
                } else {
                    "–".to_owned()
                },
                p.rss_after_mib,
                p.claims.cycle_p50_ms,
                p.claims.cycle_p99_ms,
                p.claims.store_claim_p50_ms,
                p.claims.store_claim_p99_ms
            );
        }
    }
}

/// The store-size table: ingest on an empty store and on the history, and
/// the probe's answers (idle on the empty store, during the purge on the
/// full one).
fn store_size(size: &StoreSize, out: &mut String) {
    let _ = writeln!(
        out,
        "\nrelay against the store's size, ingest at c{}; the probe: {} webhooks/s, each answer timed (empty: nothing to purge; full: while the purge deleted {} events and {} of {} expired dedupe keys in {:.1} s, once relay answered, {:.1} s after it started):\n\n| finished events | store MiB | req/s | spread | p99 ms | CPU µs/webhook | RSS after MiB | probe p50 / p99 / max ms | probe accepted |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        size.empty.ingest.connections,
        crate::history::PROBE_RATE,
        size.purged,
        size.dedupe_keys_purged,
        size.expired_dedupe_keys,
        size.purge_secs,
        size.open_secs
    );
    for p in [&size.empty, &size.full] {
        let _ = writeln!(
            out,
            "| {}{} | {:.0} | {:.0} | {:.0}–{:.0} | {:.2} | {:.0} | {:.1} | {:.1} / {:.1} / {:.1} | {}/{} |",
            p.events,
            if p.fill_cut_short { " (fill cut short)" } else { "" },
            p.store_mib,
            p.ingest.requests_per_sec,
            p.ingest.requests_per_sec_min,
            p.ingest.requests_per_sec_max,
            p.ingest.p99_ms,
            p.ingest.cpu_us_per_request,
            p.rss_after_mib,
            p.probe.p50_ms,
            p.probe.p99_ms,
            p.probe.max_ms,
            p.probe.accepted,
            p.probe.sent
        );
    }
    let ratio = size.full.ingest.p99_ms / size.empty.ingest.p99_ms.max(1e-9);
    let _ = writeln!(
        out,
        "\np99 at c{}: {ratio:.2}× the empty store's",
        size.empty.ingest.connections
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drain over one target reads the server's CPU and WAL; one over
    /// 100 does not (as for a server that could not be read).
    fn drain(store: BacklogStore, targets: usize, rate: f64) -> Delivery {
        let (server, wal) = (
            (targets == 1).then_some(212.44),
            (targets == 1).then_some(5_017.6),
        );
        Delivery {
            store,
            backlog: 20_000,
            targets,
            triggers_per_sec: rate,
            runs: vec![rate - 100.0, rate, rate + 50.0],
            cpu_us_per_trigger: 49.31,
            cpu_runs: vec![49.31],
            server_cpu_us_per_trigger: server,
            server_cpu_runs: server.into_iter().collect(),
            server_wal_bytes_per_trigger: wal,
            server_wal_runs: wal.into_iter().collect(),
        }
    }

    fn report_with_postgres_drains() -> Report {
        Report {
            when: "2026-12-05T17:00:00Z".to_owned(),
            machine: "2 CPUs".to_owned(),
            relay: "relay 0.1.0".to_owned(),
            harness: "b18dc32f88c4".to_owned(),
            duration_secs: 5,
            runs: 3,
            payload_bytes: 7 * 1024,
            subjects: Vec::new(),
            ratios: Vec::new(),
            end_to_end: None,
            delivery: None,
            delivery_wide: None,
            delivery_postgres: Some(drain(BacklogStore::Postgres, 1, 4_870.0)),
            delivery_postgres_wide: Some(drain(BacklogStore::Postgres, 100, 9_782.0)),
            routes: None,
            payload: None,
            queue_depth: None,
            store_size: None,
            errors: Vec::new(),
        }
    }

    #[test]
    fn the_harness_commit_is_printed_and_written_beside_relays() {
        let report = report_with_postgres_drains();
        let printed = table(&report);
        let header = printed.lines().find(|l| !l.is_empty()).expect("a header");
        assert_eq!(
            header,
            "2 CPUs · relay 0.1.0 · harness b18dc32f88c4 · 7 KB signed GitHub push · 5s per run · \
             median of 3 runs (spread: min–max req/s)"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["harness"], "b18dc32f88c4");
        assert_eq!(json["relay"], "relay 0.1.0");
    }

    /// One load run of `name` at 32 connections; `server` is the database
    /// server's CPU a request, when it was read.
    fn loaded(name: &str, rate: f64, server: Option<f64>) -> SubjectResult {
        let run = crate::subjects::RunFigures {
            wrk: crate::load::WrkResult {
                requests: 1_000,
                requests_per_sec: rate,
                p50_ms: 1.0,
                p99_ms: 2.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu_us_per_request: 127.6,
            disk_bytes_per_request: 900.0,
            server_cpu_us_per_request: server,
            settled: None,
            server_wal_bytes_per_request: server.map(|_| 4_710.4),
        };
        SubjectResult {
            name: name.to_owned(),
            what: String::new(),
            rss_idle_mib: 15.0,
            rss_after_mib: 28.0,
            by_connections: vec![crate::subjects::summarize(32, vec![run])],
            exec_failures: None,
        }
    }

    /// `name` loaded at 32 connections in rounds, one run a round at each
    /// rate.
    fn loaded_in_rounds(name: &str, rates: &[f64]) -> SubjectResult {
        let mut subject = loaded(name, rates[0], None);
        let one = subject.by_connections[0].runs[0].clone();
        let runs = rates
            .iter()
            .map(|rate| {
                let mut run = one.clone();
                run.wrk.requests_per_sec = *rate;
                run
            })
            .collect();
        subject.by_connections = vec![crate::subjects::summarize(32, runs)];
        subject
    }

    #[test]
    fn ratios_pair_the_runs_of_a_round_and_take_their_median() {
        // Round by round 0.50, 0.70 and 0.60: a median of 0.60, where the
        // medians taken apart (6,000 and 3,600) would say 0.60 too, and a
        // slow second round for SQLite alone would not move it.
        let subjects = [
            loaded_in_rounds("relay", &[8_000.0, 4_000.0, 6_000.0]),
            loaded_in_rounds("relay-postgres", &[4_000.0, 2_800.0, 3_600.0]),
            loaded_in_rounds("webhook-noexec", &[5_000.0, 5_000.0]),
        ];
        let ratios = ratios(&subjects);
        let pg = ratios.iter().find(|r| r.subject == "relay-postgres").unwrap();
        assert_eq!((pg.against.as_str(), pg.connections), ("relay", 32));
        assert_eq!(pg.by_round, [0.5, 0.7, 0.6]);
        assert!((pg.median - 0.6).abs() < 1e-12);
        // Only the rounds both subjects ran are paired.
        let vs = ratios.iter().find(|r| r.against == "webhook-noexec").unwrap();
        assert_eq!(vs.by_round, [1.6, 0.8]);
        assert!((vs.median - 1.2).abs() < 1e-12);
        // No baseline measured, no ratio to it.
        assert!(ratios.iter().all(|r| r.against != "hyper-ceiling"));
        let mut report = report_with_postgres_drains();
        report.ratios = ratios;
        let printed = table(&report);
        assert!(printed.contains(
            "  relay-postgres vs relay (SQLite): 0.60× (median of the rounds: 0.50×, 0.70×, 0.60×)"
        ));
        assert!(printed.contains("  vs webhook-noexec: 1.20× (median of the rounds: 1.60×, 0.80×)"));
    }

    #[test]
    fn what_a_webhook_costs_with_its_trigger_is_printed_beside_the_loads_window_and_written() {
        let mut report = report_with_postgres_drains();
        let mut relay = loaded("relay", 6_647.0, None);
        let mut run = relay.by_connections[0].runs[0].clone();
        run.settled = Some(crate::subjects::Settled {
            unsent_at_end: 0.42,
            after_ms: 1_530.0,
            cpu_us_per_request: 151.2,
            disk_bytes_per_request: 17_100.8,
            server_cpu_us_per_request: None,
            server_wal_bytes_per_request: None,
        });
        relay.by_connections = vec![crate::subjects::summarize(32, vec![run])];
        report.subjects = vec![relay, loaded("relay-postgres", 3_519.0, Some(312.7))];
        let printed = table(&report);
        let lines: Vec<&str> = printed
            .lines()
            .filter(|l| l.contains("every trigger sent"))
            .collect();
        assert_eq!(
            lines,
            [
                "relay at 32 connections, every trigger sent: 42% of the webhooks' triggers were unsent when the load \
                 ended, the last arrived 1.53 s later; CPU 151 µs a webhook (during the load 128), disk 16.7 KB \
                 (during the load 0.9)"
            ],
            "relay-postgres's run did not settle, and says nothing"
        );
        let json = serde_json::to_value(&report).unwrap();
        let settled = &json["subjects"][0]["by_connections"][0]["settled"];
        assert_eq!(settled["cpu_us_per_request"], 151.2);
        assert_eq!(settled["unsent_at_end"], 0.42);
        assert_eq!(
            json["subjects"][1]["by_connections"][0]["settled"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn the_database_servers_cpu_and_wal_are_printed_beside_relays_own_and_written() {
        let mut report = report_with_postgres_drains();
        report.subjects = vec![
            loaded("relay", 6_647.0, None),
            loaded("relay-postgres", 3_519.0, Some(312.7)),
        ];
        let printed = table(&report);
        let lines: Vec<&str> = printed.lines().filter(|l| l.contains("server CPU")).collect();
        assert_eq!(
            lines[0],
            "relay-postgres at 32 connections: PostgreSQL's server CPU 313 µs and WAL 4.6 KB a webhook \
             (relay's own CPU 128 µs)"
        );
        assert_eq!(lines.len(), 2, "the load's line and one drain's: {lines:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["subjects"][1]["by_connections"][0]["server_cpu_us_per_request"],
            312.7
        );
        assert_eq!(
            json["subjects"][1]["by_connections"][0]["server_wal_bytes_per_request"],
            4_710.4
        );
        assert_eq!(
            json["subjects"][0]["by_connections"][0]["server_cpu_us_per_request"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn both_postgres_drains_are_printed_and_written() {
        let report = report_with_postgres_drains();
        let printed = table(&report);
        let lines: Vec<&str> = printed
            .lines()
            .filter(|l| l.starts_with("relay delivery"))
            .collect();
        assert_eq!(
            lines,
            [
                "relay delivery from a backlog of 20000 for 1 target(s) on PostgreSQL: 4870 triggers/s \
                 (spread 4770–4920), relay's CPU 49.3 µs per trigger, PostgreSQL's server CPU 212 µs and WAL 4.9 KB",
                "relay delivery from a backlog of 20000 for 100 target(s) on PostgreSQL: 9782 triggers/s \
                 (spread 9682–9832), relay's CPU 49.3 µs per trigger",
            ]
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["delivery_postgres"]["targets"], 1);
        assert_eq!(json["delivery_postgres_wide"]["targets"], 100);
        assert_eq!(json["delivery_postgres_wide"]["triggers_per_sec"], 9_782.0);
        assert_eq!(json["delivery_postgres"]["server_cpu_us_per_trigger"], 212.44);
        assert_eq!(json["delivery_postgres"]["server_wal_bytes_per_trigger"], 5_017.6);
        assert_eq!(
            json["delivery_postgres_wide"]["server_cpu_us_per_trigger"],
            serde_json::Value::Null
        );
        assert_eq!(json["delivery_wide"], serde_json::Value::Null);
    }
}
