//! The curves drawn as SVG with plotters' SVG backend: routes.svg,
//! payload.svg and queue_depth.svg, from the harness's JSON (this run's,
//! and an earlier run's beside it when asked). Reads only the JSON it is
//! given; never measures, and never needs a font on the machine (the SVG
//! names a generic font that the viewer lays out).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

const THIS: RGBColor = RGBColor(31, 119, 180);
const EARLIER: RGBColor = RGBColor(214, 96, 39);
const SECOND: RGBColor = RGBColor(148, 103, 189);
const EARLIER_SECOND: RGBColor = RGBColor(140, 86, 75);

/// A line's colour: by run (this one, the earlier) and by which of a
/// run's lines it is (the first, the second: p50 and p99), each its own.
fn color_of(run: usize, which: usize) -> RGBColor {
    [[THIS, SECOND], [EARLIER, EARLIER_SECOND]][run.min(1)][which.min(1)]
}

/// One line: its legend, colour, and points (x position, y).
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// One chart of a figure: what it plots, with the x axis shared by the
/// figure's charts.
struct Panel {
    title: &'static str,
    y_desc: &'static str,
    series: Vec<Series>,
}

/// An x axis: its description, its range in positions, and how a tick at a
/// position is labelled.
struct Axis<'a> {
    desc: &'a str,
    range: std::ops::Range<f64>,
    label: &'a dyn Fn(f64) -> String,
}

/// Draws every curve `this` holds into `dir`; returns the files written.
pub fn draw(this: &Value, earlier: Option<&Value>, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let runs = [Some(this), earlier].into_iter().flatten().collect::<Vec<_>>();
    let subtitle = format!(
        "c32 · median of {} runs × {} s · {}",
        this["runs"],
        this["duration_secs"],
        this["machine"].as_str().unwrap_or("")
    );
    let mut written = Vec::new();
    if this["routes"].is_object() {
        let file = dir.join("routes.svg");
        let x = |p: &Value| p["routes"].as_f64().map(f64::log10);
        let panels = [
            panel_of(&runs, "routes", "req/s", "webhooks per second", &x, &|p| {
                p["requests_per_sec"].as_f64()
            }),
            panel_of(
                &runs,
                "routes",
                "CPU per webhook",
                "CPU µs per webhook",
                &x,
                &|p| p["cpu_us_per_request"].as_f64(),
            ),
        ];
        let axis = Axis {
            desc: "routes (log scale)",
            range: -0.15..3.15,
            label: &|v| power_label(v, ""),
        };
        figure(
            &file,
            "relay against the number of routes",
            &subtitle,
            &axis,
            &panels,
        )?;
        written.push(file);
    }
    if this["payload"].is_object() {
        let file = dir.join("payload.svg");
        let x = |p: &Value| p["bytes"].as_f64().map(|b| (b / 1024.0).log10());
        let panels = [
            panel_of(&runs, "payload", "req/s", "webhooks per second", &x, &|p| {
                p["requests_per_sec"].as_f64()
            }),
            panel_of(
                &runs,
                "payload",
                "CPU per webhook",
                "CPU µs per webhook",
                &x,
                &|p| p["cpu_us_per_request"].as_f64(),
            ),
        ];
        let axis = Axis {
            desc: "signed push, KB (log scale)",
            range: -0.15..3.2,
            label: &|v| power_label(v, " KB"),
        };
        figure(&file, "relay against the push's size", &subtitle, &axis, &panels)?;
        written.push(file);
    }
    if let Some(points) = this["queue_depth"].as_array() {
        let file = dir.join("queue_depth.svg");
        // Evenly spaced, labelled with the depth each point reached.
        let labels: Vec<String> = points
            .iter()
            .map(|p| thousands(p["queued"].as_f64().unwrap_or(0.0)))
            .collect();
        let panels = [
            depth_panel(
                &runs,
                "ingest req/s",
                "webhooks per second",
                &|p| p["ingest"]["requests_per_sec"].as_f64(),
                &[("", 0)],
            ),
            depth_panel(
                &runs,
                "claim cycle (answer → next trigger)",
                "ms",
                &|p| p["cycle"].as_f64(),
                &[(" p50", 0), (" p99", 1)],
            ),
            depth_panel(
                &runs,
                "store claim alone",
                "ms",
                &|p| p["store"].as_f64(),
                &[(" p50", 0), (" p99", 1)],
            ),
        ];
        let label = |v: f64| {
            let at = v.round();
            if (v - at).abs() < 0.01 && at >= 0.0 {
                labels.get(at as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let axis = Axis {
            desc: "jobs queued for a CI that does not answer",
            range: -0.2..(points.len().max(1) as f64 - 0.8),
            label: &label,
        };
        figure(
            &file,
            "relay against the jobs already queued",
            &subtitle,
            &axis,
            &panels,
        )?;
        written.push(file);
    }
    Ok(written)
}

/// A queue-depth chart: for each run, one line of each of `named` (a
/// legend suffix, and 0 or 1 for [`with_which`]), its points at the
/// depths that run reached.
fn depth_panel(
    runs: &[&Value],
    title: &'static str,
    y_desc: &'static str,
    pick: &dyn Fn(&Value) -> Option<f64>,
    named: &[(&str, usize)],
) -> Panel {
    let series = runs
        .iter()
        .enumerate()
        .flat_map(|(i, run)| named.iter().map(move |(name, which)| (i, run, *name, *which)))
        .filter_map(|(i, run, name, which)| {
            let points = run["queue_depth"].as_array()?;
            Some(Series {
                label: format!("{}{name}", short(run)),
                color: color_of(i, which),
                points: points
                    .iter()
                    .enumerate()
                    .filter_map(|(at, p)| Some((at as f64, pick(&with_which(p, which))?)))
                    .collect(),
            })
        })
        .collect();
    Panel {
        title,
        y_desc,
        series,
    }
}

/// A queue-depth point with `cycle` and `store` set to its p50 (`which`
/// 0) or p99 (1) claim latencies, so one picker serves both lines.
fn with_which(point: &Value, which: usize) -> Value {
    let q = if which == 0 { "p50" } else { "p99" };
    let mut p = point.clone();
    // A latency that was not timed has no point (its figures are 0): a
    // cycle that could not run, a store claim the harness's build could
    // not make on another build's schema.
    if point["claims"]["cycles"].as_u64() != Some(0) {
        p["cycle"] = point["claims"][format!("cycle_{q}_ms")].clone();
    }
    if point["claims"]["store_claims"].as_u64() != Some(0) {
        p["store"] = point["claims"][format!("store_claim_{q}_ms")].clone();
    }
    p
}

/// A panel with one line per run that measured `curve`.
fn panel_of(
    runs: &[&Value],
    curve: &str,
    title: &'static str,
    y_desc: &'static str,
    x: &dyn Fn(&Value) -> Option<f64>,
    y: &dyn Fn(&Value) -> Option<f64>,
) -> Panel {
    let series = runs
        .iter()
        .enumerate()
        .filter_map(|(i, run)| {
            let points = run[curve]["points"].as_array()?;
            Some(Series {
                label: short(run),
                color: color_of(i, 0),
                points: points.iter().filter_map(|p| Some((x(p)?, y(p)?))).collect(),
            })
        })
        .collect();
    Panel {
        title,
        y_desc,
        series,
    }
}

/// A run's label: its relay's version line, shortened to the commit.
fn short(run: &Value) -> String {
    let version = run["relay"].as_str().unwrap_or("relay");
    // "relay 0.1.0 (abc1234, …)" → "relay abc1234"
    version
        .split(['(', ',', ')', ' '])
        .find(|w| w.len() >= 7 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map_or_else(|| version.to_owned(), |commit| format!("relay {commit}"))
}

/// 10^v as a plain number, for a tick at a whole power of ten.
fn power_label(v: f64, unit: &str) -> String {
    let at = v.round();
    if (v - at).abs() > 0.01 || at < 0.0 {
        return String::new();
    }
    format!("{}{unit}", thousands(10f64.powi(at as i32)))
}

/// 1000000 → "1,000,000".
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn figure(file: &Path, title: &str, subtitle: &str, axis: &Axis<'_>, panels: &[Panel]) -> Result<(), String> {
    let width = 480 * panels.len() as u32;
    let root = SVGBackend::new(file, (width, 400)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(|e| fail(&e))?;
    let (note, body) = root.split_vertically(22);
    note.draw_text(
        subtitle,
        &("sans-serif", 13).into_font().color(&BLACK.mix(0.7)),
        (10, 2),
    )
    .map_err(|e| fail(&e))?;
    for (area, panel) in body.split_evenly((1, panels.len())).iter().zip(panels) {
        chart(area, axis, panel).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

fn chart(area: &DrawingArea<SVGBackend<'_>, Shift>, axis: &Axis<'_>, panel: &Panel) -> Result<(), String> {
    let top = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(axis.range.clone(), 0.0..top)
        .map_err(|e| e.to_string())?;
    let label = axis.label;
    chart
        .configure_mesh()
        .x_desc(axis.desc)
        .y_desc(panel.y_desc)
        .x_labels(5)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                thousands(*v)
            } else {
                format!("{v:.2}")
            }
        })
        .light_line_style(WHITE)
        .disable_x_mesh()
        .draw()
        .map_err(|e| e.to_string())?;
    for series in &panel.series {
        let color = series.color;
        chart
            .draw_series(LineSeries::new(series.points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(series.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(series.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(thousands(1_000_000.0), "1,000,000");
        assert_eq!(thousands(100.0), "100");
        assert_eq!(power_label(3.0, " KB"), "1,000 KB");
        assert_eq!(power_label(1.5, ""), "");
        assert_eq!(
            short(&serde_json::json!({"relay": "relay 0.1.0 (0f85e34, schema 9/7)"})),
            "relay 0f85e34"
        );
    }

    #[test]
    fn draws_every_curve_of_a_report() {
        let point = |x: (&str, f64), rps: f64| serde_json::json!({ x.0: x.1, "requests_per_sec": rps, "cpu_us_per_request": 1e6 / rps });
        let depth = |queued: f64| {
            serde_json::json!({ "queued": queued, "ingest": { "requests_per_sec": 5000.0 },
                "claims": { "cycle_p50_ms": 1.0, "cycle_p99_ms": 3.0, "store_claim_p50_ms": 0.05, "store_claim_p99_ms": 0.2 } })
        };
        let routes = [1.0, 10.0, 100.0, 1000.0].map(|n| point(("routes", n), 6000.0 - n));
        let payload = [1024.0, 7168.0, 102400.0, 1048576.0].map(|b| point(("bytes", b), 6e8 / (b + 1e5)));
        let report = serde_json::json!({
            "relay": "relay 0.1.0 (abcdef1)", "runs": 3, "duration_secs": 5, "machine": "test",
            "routes": { "points": routes },
            "payload": { "points": payload },
            "queue_depth": [depth(0.0), depth(100_000.0), depth(1_000_000.0)],
        });
        let dir = tempfile::tempdir().unwrap();
        let written = draw(&report, Some(&report), dir.path()).unwrap();
        // An earlier build on another schema: its store claims were not
        // timed, and are no line at 0.
        let mut earlier = report.clone();
        for point in earlier["queue_depth"].as_array_mut().unwrap() {
            point["claims"]["store_claims"] = 0.into();
        }
        let runs = [&report, &earlier];
        let named = [(" p50", 0), (" p99", 1)];
        let store = depth_panel(&runs, "store", "ms", &|p| p["store"].as_f64(), &named);
        let points: Vec<usize> = store.series.iter().map(|s| s.points.len()).collect();
        assert_eq!(points, [3, 3, 0, 0]);
        let cycle = depth_panel(&runs, "cycle", "ms", &|p| p["cycle"].as_f64(), &named);
        let colors: std::collections::HashSet<_> = cycle.series.iter().map(|s| s.color).collect();
        assert_eq!(colors.len(), 4, "each run's p50 and p99 a colour of its own");
        assert_eq!(written.len(), 3);
        for file in written {
            let svg = std::fs::read_to_string(&file).unwrap();
            assert!(svg.starts_with("<svg"), "{}", file.display());
            assert!(svg.contains("relay abcdef1"), "{}: no legend", file.display());
        }
    }
}
