//! Two builds' runs side by side, pair by pair: the figures the goals are
//! judged by, from the JSON of runs made alternately (the previous main,
//! then this build, then the previous main again, …), with each pair's
//! ratio and the median of those ratios, and which build each pair found better.
//!
//! Why pairs: the machine is shared, and its speed moves by a third within
//! minutes. Two builds measured in the same minute see the same machine, so
//! a pair's ratio says more than the two builds' medians taken apart, and
//! the median of several pairs' ratios more than any one of them.
//!
//! Reads only the JSON it is given; never measures. A figure a run did not
//! measure is left out, never taken as zero.

use std::fmt::Write as _;

use serde_json::Value;

use crate::subjects::median_if_any;

/// The connection count the goals are set at.
const CONNECTIONS: u64 = 32;

/// Which way a figure gets better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// One figure: what the table calls it, which way is better, and where a
/// run's JSON has it.
struct Figure {
    label: &'static str,
    better: Better,
    read: fn(&Value) -> Option<f64>,
}

/// A subject's figures at [`CONNECTIONS`].
fn at_c32<'a>(run: &'a Value, subject: &str) -> Option<&'a Value> {
    run["subjects"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == subject)?["by_connections"]
        .as_array()?
        .iter()
        .find(|c| c["connections"].as_u64() == Some(CONNECTIONS))
}

/// The median of `subject`'s requests/s over `against`'s at
/// [`CONNECTIONS`], round by round, as the run wrote it (`ratios`).
fn round_ratio(run: &Value, subject: &str, against: &str) -> Option<f64> {
    run["ratios"].as_array()?.iter().find(|r| {
        r["subject"] == subject && r["against"] == against && r["connections"].as_u64() == Some(CONNECTIONS)
    })?["median"]
        .as_f64()
}

const FIGURES: &[Figure] = &[
    Figure {
        label: "relay, c32: webhooks/s",
        better: Better::Higher,
        read: |r| at_c32(r, "relay")?["requests_per_sec"].as_f64(),
    },
    Figure {
        label: "relay, c32: CPU µs a webhook, every trigger sent",
        better: Better::Lower,
        read: |r| at_c32(r, "relay")?["settled"]["cpu_us_per_request"].as_f64(),
    },
    Figure {
        label: "relay, c32: disk KB a webhook, every trigger sent",
        better: Better::Lower,
        read: |r| Some(at_c32(r, "relay")?["settled"]["disk_bytes_per_request"].as_f64()? / 1024.0),
    },
    Figure {
        label: "relay ÷ webhook-noexec, c32, median of the rounds",
        better: Better::Higher,
        read: |r| round_ratio(r, "relay", "webhook-noexec"),
    },
    Figure {
        label: "relay-postgres, c32: webhooks/s",
        better: Better::Higher,
        read: |r| at_c32(r, "relay-postgres")?["requests_per_sec"].as_f64(),
    },
    Figure {
        label: "relay-postgres ÷ relay (SQLite), c32, median of the rounds",
        better: Better::Higher,
        read: |r| round_ratio(r, "relay-postgres", "relay"),
    },
    Figure {
        label: "relay-postgres, c32: relay's CPU µs a webhook",
        better: Better::Lower,
        read: |r| at_c32(r, "relay-postgres")?["cpu_us_per_request"].as_f64(),
    },
    Figure {
        label: "relay-postgres, c32: the server's CPU µs a webhook",
        better: Better::Lower,
        read: |r| at_c32(r, "relay-postgres")?["server_cpu_us_per_request"].as_f64(),
    },
    Figure {
        label: "webhook sent → trigger, p99 ms at 100/s",
        better: Better::Lower,
        read: |r| r["end_to_end"]["from_send_p99_ms"].as_f64(),
    },
    Figure {
        label: "backlog, one target: triggers/s",
        better: Better::Higher,
        read: |r| r["delivery"]["triggers_per_sec"].as_f64(),
    },
    Figure {
        label: "backlog, one target: relay's CPU µs a trigger",
        better: Better::Lower,
        read: |r| r["delivery"]["cpu_us_per_trigger"].as_f64(),
    },
    Figure {
        label: "backlog, 100 targets: triggers/s",
        better: Better::Higher,
        read: |r| r["delivery_wide"]["triggers_per_sec"].as_f64(),
    },
    Figure {
        label: "backlog, 100 targets: relay's CPU µs a trigger",
        better: Better::Lower,
        read: |r| r["delivery_wide"]["cpu_us_per_trigger"].as_f64(),
    },
    Figure {
        label: "backlog on PostgreSQL, one target: triggers/s",
        better: Better::Higher,
        read: |r| r["delivery_postgres"]["triggers_per_sec"].as_f64(),
    },
    Figure {
        label: "backlog on PostgreSQL, 100 targets: triggers/s",
        better: Better::Higher,
        read: |r| r["delivery_postgres_wide"]["triggers_per_sec"].as_f64(),
    },
];

/// A figure's value as the table shows it: ratios and small numbers with
/// two decimals, the rest whole.
fn shown(value: f64) -> String {
    if value.abs() < 20.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.0}")
    }
}

/// The table of every figure both builds measured in every pair: each
/// pair's value for the previous build and this one, each pair's ratio
/// (this ÷ previous), the median ratio, and which build was better in
/// every pair (a median alone would name one after a single lucky pair).
/// `old` and `new` are runs in pair order; they must be as many.
pub fn table(old: &[Value], new: &[Value]) -> Result<String, String> {
    if old.len() != new.len() || old.is_empty() {
        return Err(format!(
            "compare takes as many runs of each build, at least one: {} --old and {} --new",
            old.len(),
            new.len()
        ));
    }
    let name = |runs: &[Value]| runs[0]["relay"].as_str().unwrap_or("?").to_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} pair(s); previous: {}; this: {}\n",
        old.len(),
        name(old),
        name(new)
    );
    let _ = writeln!(
        out,
        "| figure | previous | this | this ÷ previous, each pair | median | better |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for figure in FIGURES {
        let pairs: Option<Vec<(f64, f64)>> = old
            .iter()
            .zip(new)
            .map(|(o, n)| Some(((figure.read)(o)?, (figure.read)(n)?)))
            .collect();
        let Some(pairs) = pairs else { continue };
        // One ratio a pair, none where the previous build measured zero,
        // so the column stays aligned with the pairs.
        let ratios: Vec<Option<f64>> = pairs.iter().map(|(o, n)| (*o > 0.0).then(|| n / o)).collect();
        let join = |values: Vec<f64>| values.into_iter().map(shown).collect::<Vec<_>>().join("; ");
        let median_ratio = median_if_any(ratios.iter().flatten().copied().collect());
        let up = figure.better == Better::Higher;
        let every = |won: bool| {
            ratios
                .iter()
                .all(|r| r.is_some_and(|r| r != 1.0 && (r > 1.0) == (up == won)))
        };
        let verdict = if median_ratio.is_none() {
            "–"
        } else if every(true) {
            "this, in every pair"
        } else if every(false) {
            "previous, in every pair"
        } else {
            "neither in every pair"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            figure.label,
            join(pairs.iter().map(|p| p.0).collect()),
            join(pairs.iter().map(|p| p.1).collect()),
            ratios
                .iter()
                .map(|r| r.map_or_else(|| "–".to_owned(), |r| format!("{r:.3}")))
                .collect::<Vec<_>>()
                .join("; "),
            median_ratio.map_or_else(|| "–".to_owned(), |m| format!("{m:.3}")),
            verdict
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(version: &str, relay_rps: f64, cpu: f64, one_target: Option<f64>) -> Value {
        let mut run = json!({
            "relay": version,
            "subjects": [
                {"name": "relay", "by_connections": [
                    {"connections": 1, "requests_per_sec": 1.0},
                    {"connections": 32, "requests_per_sec": relay_rps,
                     "settled": {"cpu_us_per_request": cpu, "disk_bytes_per_request": 14336.0}}
                ]},
                {"name": "webhook-noexec", "by_connections": [
                    {"connections": 32, "requests_per_sec": 5000.0}
                ]}
            ],
            "ratios": [
                {"subject": "relay", "against": "webhook-noexec", "connections": 1, "median": 9.0},
                {"subject": "relay", "against": "webhook-noexec", "connections": 32, "median": relay_rps / 5000.0}
            ],
            "end_to_end": null,
            "delivery": null,
        });
        if let Some(rate) = one_target {
            run["delivery"] = json!({"triggers_per_sec": rate, "cpu_us_per_trigger": 1e6 / rate});
        }
        run
    }

    fn row<'a>(table: &'a str, label: &str) -> Option<Vec<&'a str>> {
        let line = table.lines().find(|l| l.starts_with(&format!("| {label} |")))?;
        Some(line.trim_matches('|').split(" | ").map(str::trim).collect())
    }

    #[test]
    fn each_pair_is_compared_at_c32_and_the_median_ratio_decides() {
        let old = [
            run("relay old", 6000.0, 150.0, None),
            run("relay old", 4000.0, 200.0, None),
        ];
        let new = [
            run("relay new", 6600.0, 120.0, None),
            run("relay new", 4800.0, 190.0, None),
        ];
        let table = table(&old, &new).unwrap();
        assert!(table.starts_with("2 pair(s); previous: relay old; this: relay new"));
        let rps = row(&table, "relay, c32: webhooks/s").unwrap();
        assert_eq!(
            rps[1..],
            [
                "6000; 4000",
                "6600; 4800",
                "1.100; 1.200",
                "1.150",
                "this, in every pair"
            ]
        );
        let cpu = row(&table, "relay, c32: CPU µs a webhook, every trigger sent").unwrap();
        assert_eq!(
            cpu[1..],
            [
                "150; 200",
                "120; 190",
                "0.800; 0.950",
                "0.875",
                "this, in every pair"
            ]
        );
        let disk = row(&table, "relay, c32: disk KB a webhook, every trigger sent").unwrap();
        assert_eq!(
            disk[1..],
            [
                "14.00; 14.00",
                "14.00; 14.00",
                "1.000; 1.000",
                "1.000",
                "neither in every pair"
            ]
        );
        let vs = row(&table, "relay ÷ webhook-noexec, c32, median of the rounds").unwrap();
        assert_eq!(vs[1..3], ["1.20; 0.80", "1.32; 0.96"]);
    }

    #[test]
    fn a_figure_missing_from_any_run_is_left_out_not_taken_as_zero() {
        let old = [
            run("a", 6000.0, 150.0, Some(10_000.0)),
            run("a", 6000.0, 150.0, None),
        ];
        let new = [
            run("b", 6000.0, 150.0, Some(12_000.0)),
            run("b", 6000.0, 150.0, Some(9_000.0)),
        ];
        let table = table(&old, &new).unwrap();
        assert!(row(&table, "backlog, one target: triggers/s").is_none());
        assert!(row(&table, "relay-postgres, c32: webhooks/s").is_none());
        assert!(row(&table, "relay, c32: webhooks/s").is_some());
    }

    #[test]
    fn a_build_is_called_better_only_when_every_pair_says_so() {
        let old = [
            run("a", 6000.0, 100.0, Some(20_000.0)),
            run("a", 6000.0, 100.0, Some(20_000.0)),
        ];
        let new = [
            run("b", 5400.0, 120.0, Some(16_000.0)),
            run("b", 6600.0, 130.0, Some(19_000.0)),
        ];
        let table = table(&old, &new).unwrap();
        // 0.9 and 1.1: the median is 1.0, and neither build won both.
        let rps = row(&table, "relay, c32: webhooks/s").unwrap();
        assert_eq!(rps[3..], ["0.900; 1.100", "1.000", "neither in every pair"]);
        assert_eq!(
            row(&table, "backlog, one target: relay's CPU µs a trigger").unwrap()[5],
            "previous, in every pair"
        );
        assert_eq!(
            row(&table, "relay, c32: CPU µs a webhook, every trigger sent").unwrap()[5],
            "previous, in every pair"
        );
    }

    #[test]
    fn a_pair_whose_previous_figure_is_zero_has_no_ratio_and_no_winner() {
        let old = [run("a", 0.0, 150.0, None), run("a", 6000.0, 150.0, None)];
        let new = [run("b", 6600.0, 150.0, None), run("b", 6600.0, 150.0, None)];
        let table = table(&old, &new).unwrap();
        let rps = row(&table, "relay, c32: webhooks/s").unwrap();
        assert_eq!(
            rps[1..],
            [
                "0.00; 6000",
                "6600; 6600",
                "–; 1.100",
                "1.100",
                "neither in every pair"
            ]
        );
    }

    #[test]
    fn runs_must_pair_up() {
        let one = [run("a", 1.0, 1.0, None)];
        assert!(table(&one, &[]).is_err());
        assert!(table(&[], &[]).is_err());
        assert!(table(&one, &[one[0].clone(), one[0].clone()]).is_err());
    }
}
