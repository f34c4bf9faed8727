//! The results of one run: the JSON written to compare across commits and
//! the tables printed. Never measures; only says what was measured.

use serde::Serialize;

use crate::latency::{Delivery, EndToEnd};
use crate::subjects::{SubjectResult, Summary};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub when: String,
    pub machine: String,
    pub duration_secs: u64,
    pub runs: usize,
    pub payload_bytes: usize,
    pub subjects: Vec<SubjectResult>,
    pub end_to_end: Option<EndToEnd>,
    pub delivery: Option<Delivery>,
}

pub fn find<'a>(report: &'a Report, name: &str, connections: u32) -> Option<&'a Summary> {
    report
        .subjects
        .iter()
        .find(|s| s.name == name)?
        .by_connections
        .iter()
        .find(|c| c.connections == connections)
}

pub fn table(report: &Report) -> String {
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
