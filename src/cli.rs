//! What the `relay check`, `relay explain` and `relay send` commands do,
//! as functions that return text, so tests see exactly what a person sees.
//!
//! Output names secrets only by where they come from, and shows requests
//! with the credential's place marked `[redacted]`.

use std::fmt::Write as _;

use bytes::Bytes;
use uuid::Uuid;

use crate::clock::wall_time;
use crate::config::Config;
use crate::ingress::IngressError;
use crate::store::{SchemaStatus, StoreError};

/// `relay check`: the config, as relay understood it.
/// `schema` is what the store said about its schema, if it could be asked.
pub fn check_report(config: &Config, schema: &Result<SchemaStatus, StoreError>) -> String {
    let mut out = format!("{}: ok\n", config.file);
    let _ = writeln!(out, "\nsources:");
    for source in &config.sources {
        let _ = writeln!(out, "  {:<20} {}", source.name, source.describe());
    }
    let _ = writeln!(out, "\nroutes:");
    for route in &config.routes {
        let _ = writeln!(out, "  {:<20} {}", route.name, route.describe());
    }
    let _ = writeln!(out, "\ntargets:");
    for (name, target) in config.job_targets() {
        let _ = writeln!(out, "  {:<20} {}", name, target.describe());
    }
    let (graph, cycles) = crate::loops::report(config);
    let _ = writeln!(out, "\ngraph (route → target builds repository):");
    out.push_str(&graph);
    let _ = writeln!(out, "\nstore: {}", config.store.location);
    let mut warnings = config.warnings.clone();
    match schema {
        Ok(SchemaStatus { version: 0, latest }) => {
            let _ = writeln!(
                out,
                "  schema: none yet (relay creates version {latest} when it starts)"
            );
        }
        Ok(SchemaStatus { version, latest }) if version < latest => {
            let _ = writeln!(
                out,
                "  schema: version {version} (relay migrates it to {latest} when it starts)"
            );
        }
        Ok(SchemaStatus { version, latest }) if version > latest => {
            let _ = writeln!(out, "  schema: version {version}");
            warnings.push(format!(
                "the store's schema (version {version}) is newer than this relay's ({latest}): run a newer relay"
            ));
        }
        Ok(SchemaStatus { version, .. }) => {
            let _ = writeln!(out, "  schema: version {version} (current)");
        }
        Err(e) => {
            let _ = writeln!(out, "  schema: unknown");
            warnings.push(format!("cannot read the store's schema version: {e}"));
        }
    }
    for cycle in &cycles {
        warnings.push(format!(
            "routes {} form a cycle; loop_guard stops it at {} hops (and dedupe_window {})",
            cycle.join(", "),
            config.loop_guard.max_hops,
            humantime::format_duration(config.loop_guard.dedupe_window)
        ));
    }
    if !warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for warning in &warnings {
            let _ = writeln!(out, "  {warning}");
        }
    }
    out
}

/// Why `relay explain` or `relay send` could not run.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no source is named {name:?} (sources: {known})")]
    UnknownSource { name: String, known: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("relay would refuse this webhook ({status}): {error}")]
    Refused { status: u16, error: IngressError },
    #[error("{0}")]
    Usage(String),
    #[error("the admin API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("cannot reach {what} at {url}: {detail}")]
    Unreachable {
        what: &'static str,
        url: String,
        detail: String,
    },
}

fn find_source<'c>(config: &'c Config, name: &str) -> Result<&'c crate::ingress::Source, CliError> {
    config.source(name).ok_or_else(|| CliError::UnknownSource {
        name: name.to_owned(),
        known: config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `relay explain`: which routes take the payload and the exact requests
/// each target would receive. It signs the payload with the source's own
/// secret and takes the path a real webhook takes, without storing anything.
pub fn explain(config: &Config, source_name: &str, hook: &str, payload: Bytes) -> Result<String, CliError> {
    let source = find_source(config, source_name)?;
    let delivery = Uuid::new_v4().to_string();
    let now = wall_time();
    let headers = source.sender_headers(hook, &payload, &delivery, now);
    let refused = |error: IngressError| CliError::Refused {
        status: error.status().as_u16(),
        error,
    };
    let webhook = source.receive(&headers, payload, now).map_err(refused)?;
    let parsed = source
        .parse(&webhook, config.files())
        .map_err(|e| refused(e.into()))?;
    // No store here: an event is explained as if relay had started no
    // pipeline it reports on.
    Ok(crate::explain::explain(config, source, &webhook, &parsed, now).text())
}

/// `relay send`: signs the payload as the source's sender would and posts it.
/// Returns the status and the body relay answered with.
pub async fn send(
    config: &Config,
    source_name: &str,
    hook: &str,
    payload: Bytes,
    url: Option<String>,
) -> Result<(u16, String), CliError> {
    let source = find_source(config, source_name)?;
    let url = match url {
        Some(url) => url,
        None => {
            let addr = config
                .server
                .listen
                .first()
                .ok_or_else(|| CliError::Usage("server.listen is empty; pass --url".to_owned()))?;
            format!("http://{addr}{}", source.path)
        }
    };
    let delivery = Uuid::new_v4().to_string();
    let headers = source.sender_headers(hook, &payload, &delivery, wall_time());
    let client = crate::sends::http_client(std::time::Duration::from_secs(30))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let response = client
        .post(&url)
        .headers(headers)
        .body(payload)
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            what: "relay",
            url: url.clone(),
            detail: crate::targets::outcome::transport_detail(&e),
        })?;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Ok((status, body))
}

/// The admin API's base URL: `--admin`, else `admin.listen` from the config.
pub fn admin_url(config: &Config, explicit: Option<String>) -> Result<String, CliError> {
    if let Some(url) = explicit {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let admin = config.admin.as_ref().ok_or_else(|| {
        CliError::Usage("the config has no [admin] listener; set admin.listen or pass --admin".to_owned())
    })?;
    let mut addr = admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    Ok(format!("http://{addr}"))
}

/// One call to the admin API, with the admin token from the config.
pub async fn admin_call(
    config: &Config,
    base: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<(u16, serde_json::Value), CliError> {
    let client = crate::sends::http_client(std::time::Duration::from_secs(30))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_ref()) {
        request = request.bearer_auth(String::from_utf8_lossy(token.expose()));
    }
    let response = request.send().await.map_err(|e| CliError::Unreachable {
        what: "the admin API",
        url: base.to_owned(),
        detail: crate::targets::outcome::transport_detail(&e),
    })?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, body))
}

/// One call to the admin API at `--admin` (else `admin.listen`): its JSON
/// answer when it is a 2xx, else the API's message.
pub async fn admin_request(
    config: &Config,
    admin: Option<String>,
    method: reqwest::Method,
    path: &str,
) -> Result<serde_json::Value, CliError> {
    let base = admin_url(config, admin)?;
    let (status, body) = admin_call(config, &base, method, path).await?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = body["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    Err(CliError::Api { status, message })
}

/// A path segment or query value, percent-encoded.
pub fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A query string of the options given (`None`s left out).
pub fn query_of(pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if let Some(value) = value {
            out.append_pair(name, value);
        }
    }
    out.finish()
}

/// The first of an event summary's events (`kind`, `repo`, `ref`, `sha`),
/// and how many more there are.
fn first_event(event: &serde_json::Value) -> (&serde_json::Value, usize) {
    let events = event["summary"]["events"].as_array();
    let more = events.map_or(0, |e| e.len().saturating_sub(1));
    (
        events.and_then(|e| e.first()).unwrap_or(&serde_json::Value::Null),
        more,
    )
}

/// `relay events list`: one line per stored delivery, and the command for
/// the next page when there is one.
pub fn format_events(answer: &serde_json::Value) -> String {
    let events = answer["events"].as_array().cloned().unwrap_or_default();
    if events.is_empty() {
        return "no events\n".to_owned();
    }
    let mut out = format!(
        "{:<36}  {:<24}  {:<12}  {:<8}  {:<24}  {:<24}  {:<10}  {}\n",
        "EVENT", "RECEIVED", "SOURCE", "KIND", "REPO", "REF", "SHA", "JOBS"
    );
    for event in &events {
        let (first, more) = first_event(event);
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let sha: String = text(&first["sha"]).chars().take(10).collect();
        let _ = writeln!(
            out,
            "{:<36}  {:<24}  {:<12}  {:<8}  {:<24}  {:<24}  {:<10}  {} ({} done, {} dead){}",
            text(&event["id"]),
            text(&event["received_at"]),
            text(&event["source"]),
            text(&first["kind"]),
            text(&first["repo"]),
            text(&first["ref"]),
            sha,
            event["jobs"],
            event["done"],
            event["dead"],
            if more > 0 {
                format!(" +{more} more event(s)")
            } else {
                String::new()
            },
        );
    }
    if let Some(next) = answer["next"].as_str() {
        let _ = writeln!(out, "more: relay events list --before {next}");
    }
    out
}

/// `relay events show`: what relay kept of the request, its jobs, the body.
pub fn format_event(event: &serde_json::Value) -> String {
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    for key in [
        "id",
        "source",
        "received_at",
        "hook",
        "delivery",
        "content_type",
        "hop",
    ] {
        let _ = writeln!(out, "{key:<13} {}", text(&event[key]));
    }
    for e in event["summary"]["events"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<13} {} {} {} {}",
            "event",
            text(&e["kind"]),
            text(&e["repo"]),
            text(&e["ref"]),
            text(&e["sha"])
        );
    }
    for d in event["dropped"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<13} {}: {}",
            "dropped",
            text(&d["rule"]),
            text(&d["reason"])
        );
    }
    let jobs = event["jobs_detail"].as_array().cloned().unwrap_or_default();
    if !jobs.is_empty() {
        out.push_str("\njobs:\n");
        out.push_str(&format_jobs(&serde_json::json!({ "jobs": jobs })));
    }
    let _ = write!(out, "\nbody:\n{}\n", event["body"].as_str().unwrap_or(""));
    out
}

/// `relay events replay`: the new event and what routing made of it.
pub fn format_replay(answer: &serde_json::Value) -> String {
    let routes: Vec<&str> = answer["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
        .collect();
    let mut out = format!(
        "replayed as event {}: {} job(s){}\n",
        answer["event"].as_str().unwrap_or(""),
        answer["jobs"],
        if routes.is_empty() {
            String::new()
        } else {
            format!(" (routes {})", routes.join(", "))
        }
    );
    for d in answer["dropped"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  dropped ({}): {}",
            d["rule"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("")
        );
    }
    out
}

/// `relay jobs list`: one line per job.
pub fn format_jobs(answer: &serde_json::Value) -> String {
    let jobs = answer["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let mut out = format!(
        "{:<36}  {:<9}  {:<20}  {:<20}  {:>8}  {:<24}  {}\n",
        "JOB", "STATE", "TARGET", "ROUTE", "ATTEMPTS", "UPDATED", "LAST ERROR"
    );
    for job in jobs {
        let error: String = job["last_error"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        let _ = writeln!(
            out,
            "{:<36}  {:<9}  {:<20}  {:<20}  {:>8}  {:<24}  {}",
            job["id"].as_str().unwrap_or(""),
            job["state"].as_str().unwrap_or(""),
            job["target"].as_str().unwrap_or(""),
            job["route"].as_str().unwrap_or(""),
            job["attempts"],
            job["updated_at"].as_str().unwrap_or(""),
            error.replace('\n', " "),
        );
    }
    out
}

/// `relay catch-up`: each delivery relay asked GitHub to send again.
pub fn format_catch_up(answer: &serde_json::Value) -> String {
    let asked = answer["asked"].as_array().cloned().unwrap_or_default();
    let source = answer["source"].as_str().unwrap_or("");
    if asked.is_empty() {
        return format!("{source}: nothing to ask for: every failed delivery is in relay, or none failed\n");
    }
    let mut out = format!("{source}: asked GitHub to redeliver {}:\n", asked.len());
    for a in &asked {
        let outcome = match a["error"].as_str() {
            Some(e) => format!("refused: {e}"),
            None => "asked".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {}  {:<12} {}  (answered {})  {outcome}",
            a["guid"].as_str().unwrap_or(""),
            a["event"].as_str().unwrap_or(""),
            a["delivered_at"].as_str().unwrap_or(""),
            a["status_code"]
        );
    }
    out
}

/// `relay shadow`: per route, the count of each verdict; then the latest
/// runs where the shadow disagreed, with both sides' pages.
pub fn format_shadow(answer: &serde_json::Value) -> String {
    let runs = answer["runs"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        return "no shadow runs\n".to_owned();
    }
    let mut counts: std::collections::BTreeMap<String, [u64; 4]> = Default::default();
    const VERDICTS: [&str; 4] = ["agree", "shadow_failed", "shadow_passed", "pending"];
    for run in &runs {
        let route = run["route"].as_str().unwrap_or("").to_owned();
        if let Some(i) = VERDICTS.iter().position(|v| run["verdict"] == *v) {
            counts.entry(route).or_default()[i] += 1;
        }
    }
    let mut out = format!(
        "{:<24}  {:>6}  {:>13}  {:>13}  {:>7}\n",
        "ROUTE", "AGREE", "SHADOW_FAILED", "SHADOW_PASSED", "PENDING"
    );
    for (route, [agree, failed, passed, pending]) in &counts {
        let _ = writeln!(
            out,
            "{route:<24}  {agree:>6}  {failed:>13}  {passed:>13}  {pending:>7}"
        );
    }
    let side = |sides: &serde_json::Value| -> Vec<String> {
        sides
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let url = s["url"].as_str().map(|u| format!(" {u}")).unwrap_or_default();
                format!(
                    "{} {}{url}",
                    s["target"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let disagreements: Vec<&serde_json::Value> = runs
        .iter()
        .filter(|r| r["verdict"] == "shadow_failed" || r["verdict"] == "shadow_passed")
        .take(10)
        .collect();
    if !disagreements.is_empty() {
        out.push_str("\nlatest disagreements:\n");
    }
    for run in disagreements {
        let sha: String = run["sha"].as_str().unwrap_or("").chars().take(12).collect();
        let _ = writeln!(
            out,
            "  {} {} {sha}: {}",
            run["route"].as_str().unwrap_or(""),
            run["repo"].as_str().unwrap_or(""),
            run["verdict"].as_str().unwrap_or("")
        );
        for (label, sides) in [("primary", &run["primary"]), ("shadow", &run["shadow"])] {
            for line in side(sides) {
                let _ = writeln!(out, "    {label:<8} {line}");
            }
        }
    }
    out
}

/// `relay jobs show`: the job, its request and every attempt.
pub fn format_job(job: &serde_json::Value) -> String {
    let mut out = String::new();
    for key in [
        "id",
        "event_id",
        "route",
        "target",
        "state",
        "attempts",
        "created_at",
        "updated_at",
        "due_at",
    ] {
        let value = match &job[key] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(out, "{key:<11} {value}");
    }
    if let Some(error) = job["last_error"].as_str() {
        let _ = writeln!(out, "{:<11} {error}", "last_error");
    }
    if let Some(request) = job.get("request").filter(|r| !r.is_null()) {
        let _ = writeln!(
            out,
            "{:<11} POST {}",
            "request",
            request["url"].as_str().unwrap_or("")
        );
    }
    let pipeline = &job["pipeline"];
    if pipeline.is_object() {
        let number = pipeline["number"]
            .as_u64()
            .map_or_else(String::new, |n| format!(" #{n}"));
        let _ = writeln!(
            out,
            "{:<11} {}{number} {} (as of {}){}",
            "pipeline",
            pipeline["id"].as_str().unwrap_or(""),
            pipeline["state"].as_str().unwrap_or(""),
            pipeline["updated_at"].as_str().unwrap_or(""),
            pipeline["url"]
                .as_str()
                .map_or_else(String::new, |url| format!("\n{:<11} {url}", "")),
        );
        let follow = &pipeline["follow"];
        if follow.is_object() {
            let polls = follow["polls"].as_u64().unwrap_or(0);
            let standing = match (follow["next_poll_at"].as_str(), follow["stopped"].as_str()) {
                (Some(next), _) => format!("next poll at {next}"),
                (None, Some(why)) => format!("stopped: {why}"),
                (None, None) => "done".to_owned(),
            };
            let _ = writeln!(out, "{:<11} {polls} poll(s), {standing}", "following");
        }
    }
    let history = job["history"].as_array().cloned().unwrap_or_default();
    if !history.is_empty() {
        out.push_str("\nattempts:\n");
    }
    for a in history {
        let _ = writeln!(
            out,
            "  #{:<3} {}  {:>6} ms  {:<16} {}  {}",
            a["number"],
            a["started_at"].as_str().unwrap_or(""),
            a["duration_ms"],
            a["outcome"].as_str().unwrap_or(""),
            a["status"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            a["excerpt"].as_str().unwrap_or("").lines().next().unwrap_or(""),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_show_names_the_pipeline_and_its_page() {
        let job = serde_json::json!({
            "id": "j1", "event_id": "e1", "route": "ci", "target": "circle", "state": "done",
            "attempts": 1, "created_at": "t0", "updated_at": "t1", "due_at": "t0",
            "pipeline": {
                "id": "5034460f-c7c4-4c43-9457-de07e2029e7b", "number": 42,
                "url": "https://app.circleci.com/pipelines/github/acme/api/42",
                "state": "created", "updated_at": "2026-12-04T09:00:00.000Z"
            },
            "history": []
        });
        let text = format_job(&job);
        assert!(
            text.contains(
                "pipeline    5034460f-c7c4-4c43-9457-de07e2029e7b #42 created (as of 2026-12-04T09:00:00.000Z)\n            https://app.circleci.com/pipelines/github/acme/api/42\n"
            ),
            "{text}"
        );
        let followed = serde_json::json!({
            "id": "j3", "history": [],
            "pipeline": {
                "id": "101", "number": 7, "url": null, "state": "running", "updated_at": "t2",
                "follow": { "polls": 3, "next_poll_at": "2026-12-04T09:01:20.000Z", "stopped": null }
            }
        });
        assert!(
            format_job(&followed).contains("following   3 poll(s), next poll at 2026-12-04T09:01:20.000Z\n"),
            "{}",
            format_job(&followed)
        );
        let without = serde_json::json!({ "id": "j2", "pipeline": null, "history": [] });
        assert!(!format_job(&without).contains("pipeline"));
    }
}
