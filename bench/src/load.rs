//! Load and measurement: wrk runs with a unique delivery id per request,
//! its output parsed, and a process's CPU time and resident memory read
//! from /proc.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// The wrk script: the same signed body every time, a delivery id of its
/// own per request (relay answers a repeated id as a redelivery).
pub fn write_script(path: &Path, body_path: &Path, signature: &str, run_tag: &str) -> std::io::Result<()> {
    let script = format!(
        r#"local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-GitHub-Event"] = "push"
wrk.headers["X-Hub-Signature-256"] = "{signature}"
local counter = 0
local thread_tag = tostring(math.random(1, 1000000000))
request = function()
  counter = counter + 1
  wrk.headers["X-GitHub-Delivery"] = "{run_tag}-" .. thread_tag .. "-" .. counter
  return wrk.format()
end
"#,
        body = body_path.display()
    );
    std::fs::write(path, script)
}

/// Runs wrk on CPU 1 against `url`.
pub fn wrk(url: &str, connections: u32, duration: Duration, script: &Path) -> Result<WrkResult, String> {
    let output = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--latency", "--timeout", "10s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut result = WrkResult::default();
    // A run may complete no request at all (a subject too slow to answer
    // within it): that is a figure, 0 req/s, as long as wrk said so.
    let mut counted = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("50%") {
            result.p50_ms = latency_ms(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            result.p99_ms = latency_ms(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            result.requests_per_sec = rest.trim().parse().ok()?;
        } else if line.contains(" requests in ") {
            result.requests = line.split_whitespace().next()?.parse().ok()?;
            counted = true;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            result.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    counted.then_some(result)
}

fn latency_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|n| n * factor)
}

/// User plus system CPU time of a process so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it are fixed.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Bytes a process has caused to be written to storage so far
/// (`write_bytes` in /proc/PID/io: what reaches the disk, not the page cache).
pub fn disk_writes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// Resident memory, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_completed_nothing_is_zero() {
        let text = "  0 requests in 5.01s, 0.00B read
Requests/sec:      0.00
";
        let r = parse_wrk(text).unwrap();
        assert_eq!((r.requests, r.requests_per_sec), (0, 0.0));
        assert!(parse_wrk("wrk: cannot connect").is_none());
    }

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:1/x
  1 threads and 32 connections
  Latency Distribution
     50%  987.00us
     75%    1.10ms
     90%    1.35ms
     99%    2.48ms
  150321 requests in 5.00s, 14.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:  30063.10
Transfer/sec:      2.87MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 150_321);
        assert!((r.p50_ms - 0.987).abs() < 1e-9);
        assert!((r.p99_ms - 2.48).abs() < 1e-9);
        assert_eq!((r.non_2xx, r.socket_errors), (12, 3));
        assert!((r.requests_per_sec - 30063.10).abs() < 1e-6);
    }
}
