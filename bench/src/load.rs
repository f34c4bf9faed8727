//! Load and measurement: wrk runs with a commit and a delivery id of their
//! own per request, its output parsed, and a process's CPU time and resident memory read
//! from /proc.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::push::Push;

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

/// The wrk script at `script`, with `push`'s body beside it (`.json`):
/// each request the push for a commit of its own, signed for it, with a
/// delivery id of its own, as GitHub sends them. relay triggers a target
/// once per (repo, ref, sha) within its dedupe window, and answers a
/// repeated delivery id as a redelivery; the dedupe key each new commit
/// stores is part of what a webhook costs.
///
/// The signature is computed in wrk itself, with OpenSSL's `HMAC` (wrk
/// links libcrypto; LuaJIT's FFI calls it): a few microseconds a request
/// on wrk's own core.
pub fn write_script(script: &Path, push: &Push, run_tag: &str) -> std::io::Result<()> {
    let body_path = script.with_extension("json");
    std::fs::write(&body_path, &push.body)?;
    // Each run draws other shas: wrk's Lua starts every run from one seed.
    let seed = uuid::Uuid::new_v4().as_u128() as u32;
    let text = format!(
        r#"local ffi = require("ffi")
ffi.cdef[[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len,
                    const unsigned char *data, size_t data_len,
                    unsigned char *md, unsigned int *md_len);
]]
local f = io.open("{body}", "rb")
local push = f:read("*a")
f:close()
local head = push:sub(1, {sha_at})
local tail = push:sub({sha_at} + 41)
local key = "{secret}"
local md = ffi.new("unsigned char[32]")
local md_len = ffi.new("unsigned int[1]")
local hex = {{}}
for i = 0, 255 do hex[i] = string.format("%02x", i) end
local digest = {{}}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-GitHub-Event"] = "push"
math.randomseed({seed})
local counter = 0
local thread_tag = math.random(1, 1000000000)
-- A commit's sha is random: 32 random hex digits, then 8 of the request's
-- number so that no two requests of a run share one. (Counted shas would
-- all land at one end of relay's index of dedupe keys.)
local function random_hex()
  return string.format("%08x", math.random(0, 0x7fffffff) * 2 + math.random(0, 1))
end
request = function()
  counter = counter + 1
  local sha = random_hex() .. random_hex() .. random_hex() .. random_hex() .. string.format("%08x", counter)
  local body = head .. sha .. tail
  ffi.C.HMAC(ffi.C.EVP_sha256(), key, #key, body, #body, md, md_len)
  for i = 0, 31 do digest[i + 1] = hex[md[i]] end
  wrk.headers["X-Hub-Signature-256"] = "sha256=" .. table.concat(digest)
  wrk.headers["X-GitHub-Delivery"] = "{run_tag}-" .. thread_tag .. "-" .. counter
  return wrk.format(nil, nil, nil, body)
end
"#,
        body = body_path.display(),
        sha_at = push.sha_at,
        secret = crate::SECRET,
    );
    std::fs::write(script, text)
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
    let (own, _) = stat_times(pid)?;
    Some(Duration::from_secs_f64(own as f64 / clock_ticks() as f64))
}

/// User plus system CPU time of a server and everything it started: the
/// process itself, its children alive now, and those it has reaped (their
/// times are added to its own `cutime` and `cstime` as they end). For
/// PostgreSQL's postmaster: every backend, the WAL writer, the
/// checkpointer, autovacuum. Differences between two readings are the
/// server's CPU over that time, connections that came and went included.
pub fn server_cpu_time(server: u32) -> Option<Duration> {
    let (own, reaped) = stat_times(server)?;
    let children: u64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(server))
        .filter_map(|pid| stat_times(pid).map(|(own, _)| own))
        .sum();
    Some(Duration::from_secs_f64(
        (own + reaped + children) as f64 / clock_ticks() as f64,
    ))
}

/// The parent of a process, from /proc/PID/stat.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// A process's own CPU ticks (user + system) and those of its children it
/// has reaped.
fn stat_times(pid: u32) -> Option<(u64, u64)> {
    let fields = stat_fields(pid)?;
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((tick(11)? + tick(12)?, tick(13)? + tick(14)?))
}

/// The fields of /proc/PID/stat after the command name (which may hold
/// spaces): the state is the first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
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
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// What the recording server saw of one request.
    struct Seen {
        sha: String,
        delivery: String,
        signed: bool,
        rest_unchanged: bool,
    }

    /// Serves 202 on 127.0.0.1 and notes every push it is sent.
    async fn recorder(template: serde_json::Value) -> (std::net::SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let noted = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (noted, template) = (noted.clone(), template.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (noted, template) = (noted.clone(), template.clone());
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (signature, delivery) =
                                (header("x-hub-signature-256"), header("x-github-delivery"));
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let tag = relay::signature::sign(
                                relay::signature::Algorithm::Sha256,
                                crate::SECRET.as_bytes(),
                                &[&body],
                            );
                            let mut doc: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            let sha = doc["after"].as_str().unwrap_or("").to_owned();
                            doc["after"] = template["after"].clone();
                            noted.lock().unwrap().push(Seen {
                                sha,
                                delivery,
                                signed: signature == format!("sha256={}", hex::encode(tag)),
                                rest_unchanged: doc == template,
                            });
                            let mut answer = http::Response::new(Full::new(Bytes::new()));
                            *answer.status_mut() = http::StatusCode::ACCEPTED;
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    /// wrk runs the load's script (it needs wrk: `apt-get install wrk`):
    /// each request is the push for a random commit of its own, signed for
    /// it, as a delivery of its own; nothing else in the body changes, and
    /// a second run draws other commits.
    #[test]
    fn each_request_of_the_load_is_a_commit_of_its_own_signed_for_it() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let push = crate::push::payload().unwrap();
        let template: serde_json::Value = serde_json::from_slice(&push.body).unwrap();
        let (addr, seen) = runtime.block_on(recorder(template));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("post.lua");
        let url = format!("http://{addr}/hooks/github");
        let run = |tag: &str| {
            write_script(&script, &push, tag).unwrap();
            let result = wrk(&url, 2, Duration::from_secs(1), &script)
                .unwrap_or_else(|e| panic!("the load needs wrk (apt-get install wrk): {e}"));
            assert!(result.requests >= 10, "{result:?}");
            assert_eq!(result.non_2xx, 0);
            std::mem::take(&mut *seen.lock().unwrap())
        };
        let first = run("first");
        assert!(
            first.iter().all(|s| s.signed),
            "a request's signature is not its body's"
        );
        assert!(
            first.iter().all(|s| s.rest_unchanged),
            "a request changed more than `after`"
        );
        assert!(
            first
                .iter()
                .all(|s| s.sha.len() == 40 && s.sha.bytes().all(|b| b.is_ascii_hexdigit())),
            "{}",
            first[0].sha
        );
        let shas: HashSet<&str> = first.iter().map(|s| s.sha.as_str()).collect();
        let deliveries: HashSet<&str> = first.iter().map(|s| s.delivery.as_str()).collect();
        assert_eq!((shas.len(), deliveries.len()), (first.len(), first.len()));
        // Random, not counted: the first hex digit takes many values.
        let leading: HashSet<u8> = first.iter().map(|s| s.sha.as_bytes()[0]).collect();
        assert!(leading.len() >= 8, "{leading:?}");
        let second = run("second");
        let repeated = second.iter().filter(|s| shas.contains(s.sha.as_str())).count();
        assert_eq!(repeated, 0, "a second run sent the first one's commits again");
    }

    /// A server's CPU counts its children alive now and those it reaped,
    /// so a connection's backend that ends takes nothing away with it.
    /// This test process plays the server: its child burns CPU, is read
    /// while alive, then ends and is reaped.
    #[test]
    fn a_servers_cpu_counts_its_children_alive_and_ended() {
        use std::io::Write;
        let me = std::process::id();
        let before = server_cpu_time(me).unwrap();
        let mut child = Command::new("awk")
            .arg("BEGIN { for (i = 0; i < 20000000; i++) s += i; getline line < \"-\" }")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert_eq!(parent_of(child.id()), Some(me));
        let burned = Duration::from_millis(100);
        let mut waited = 0;
        while cpu_time(child.id()).unwrap() < burned {
            waited += 1;
            assert!(waited < 1_000, "the child never used {burned:?} of CPU");
            std::thread::sleep(Duration::from_millis(20));
        }
        let alive = server_cpu_time(me).unwrap();
        assert!(alive.saturating_sub(before) >= burned, "{before:?} → {alive:?}");
        child.stdin.take().unwrap().write_all(b"done\n").unwrap();
        child.wait().unwrap();
        let ended = server_cpu_time(me).unwrap();
        assert!(ended >= alive, "reaping lost time: {alive:?} → {ended:?}");
    }

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
