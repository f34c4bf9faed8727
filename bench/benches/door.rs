//! Load at the door: how long a signed webhook waits while slow-loris
//! clients hold connections, and how much memory relay takes while 100
//! clients each send a 25 MiB body at once.
//!
//!     cargo build --release --bin relay
//!     cargo bench -p relay-bench --bench door -- [--relay PATH] [--seconds N] [--only NAME]
//!
//! Runs the relay binary (`target/release/relay` unless `--relay` names
//! another build, an older commit's say) on loopback, one fresh process and
//! SQLite store per scenario, with a GitHub source and a dry-run route. In
//! each slow-loris scenario the attackers open their connections, send the
//! start of a request and then one header byte a second, and reconnect a
//! second after relay closes them; meanwhile a signed push is sent every 50 ms
//! over a new connection from an address of its own, and the time to its
//! answer is recorded. Scenarios: none (the baseline), 2,000 connections
//! from one address, 1,000 and then 1,100 (past `server.max_connections`,
//! 1,024) each from an address of its own. A figure, not a test: nothing
//! here passes or fails. Bounded: fixed connection counts, a fixed time
//! per scenario, every wait under a deadline. Talks only to 127.0.0.0/8.

// A benchmark measures real time on purpose.
#![allow(clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "door-bench-secret";
/// One webhook every this often while the attackers hold on.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// A webhook unanswered after this has failed (GitHub gives up at 10 s).
const PROBE_PATIENCE: Duration = Duration::from_secs(15);
/// The size of each big body: just under GitHub's (and relay's) 25 MiB cap.
const BIG_BODY: usize = 26_000_000;
const BIG_CLIENTS: usize = 100;
/// How soon an attacker reopens a connection relay closed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
struct Cli {
    /// The relay binary to measure.
    #[arg(long, default_value = "target/release/relay")]
    relay: PathBuf,
    /// How long webhooks are sent in each slow-loris scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs only the scenarios whose name contains this ("one address",
    /// "1,100", "bodies").
    #[arg(long)]
    only: Option<String>,
    /// Cargo passes this to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One relay process on a fresh store; killed when dropped.
struct Subject {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Subject {
    async fn start(binary: &Path) -> Subject {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = ["127.0.0.1:{port}"]

[store]
url = "sqlite://{}"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "all"
to = ["t"]

[targets.t]
kind = "http"
url = "http://127.0.0.1:9/t"
dry_run = true
"#,
                dir.path().join("relay.db").display()
            ),
        )
        .expect("the config written");
        // Thousands of sockets: raise the descriptor limit for relay alone.
        let child = Command::new("bash")
            .arg("-c")
            .arg("ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" serve -c \"$1\" --log-format json")
            .arg(binary)
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "relay did not listen within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Subject {
            child,
            addr,
            _dir: dir,
        }
    }

    /// A line of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // Our own child, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(padding: usize, n: u64) -> Bytes {
    let filler: String = (0..padding)
        .map(|i| char::from(b"0123456789abcdef"[i * 7 % 16]))
        .collect();
    Bytes::from(
        serde_json::json!({
            "ref": "refs/heads/main", "before": "1".repeat(40), "after": format!("{:040x}", n + 1),
            "repository": { "full_name": "acme/api" }, "pusher": { "name": "ada" },
            "head_commit": { "message": filler }, "commits": []
        })
        .to_string(),
    )
}

fn request(body: &Bytes, delivery: &str) -> Vec<u8> {
    let signature = hex::encode(relay::signature::sign(
        relay::signature::Algorithm::Sha256,
        SECRET.as_bytes(),
        &[body],
    ));
    let mut head = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: sha256={signature}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body);
    head
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Sends one request from `from` over a new connection: the status and how
/// long the answer took, or `None` if there was none in time.
async fn send(from: IpAddr, to: SocketAddr, request: &[u8]) -> Option<(u16, Duration)> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = connect_from(from, to).await.ok()?;
        stream.write_all(request).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        String::from_utf8_lossy(&answer)
            .split(' ')
            .nth(1)?
            .parse::<u16>()
            .ok()
    };
    let status = tokio::time::timeout(PROBE_PATIENCE, exchange).await.ok()??;
    Some((status, started.elapsed()))
}

/// A slow-loris client from `from` until `stop`: it reconnects whenever
/// relay closes it, counting each time in `closed`.
async fn dribble(
    from: IpAddr,
    to: SocketAddr,
    stop: CancellationToken,
    open: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
) {
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            c = tokio::time::timeout(Duration::from_secs(3), connect_from(from, to)) => c,
            () = stop.cancelled() => return,
        };
        let Ok(Ok(mut stream)) = connected else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if stream
            .write_all(b"POST /hooks/github HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
            .await
            .is_err()
        {
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 256];
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                read = stream.read(&mut buf) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if stream.write_all(b"a").await.is_err() {
                        closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
        // A slow-loris tool reopens what was closed on its next round, not
        // in a tight loop (that would be a connection flood, another attack).
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

struct Figures {
    sent: usize,
    answered: usize,
    p50: Duration,
    p99: Duration,
    worst: Duration,
    attackers_open: u64,
    attackers_closed: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn slow_loris(binary: &Path, seconds: u64, attackers: &[IpAddr]) -> Figures {
    let subject = Subject::start(binary).await;
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for from in attackers {
        tasks.spawn(dribble(
            *from,
            subject.addr,
            stop.clone(),
            open.clone(),
            closed.clone(),
        ));
    }
    // Let them connect (those past the backlog stay in connect()).
    let deadline = Instant::now() + Duration::from_secs(10);
    while (open.load(Ordering::Relaxed) as usize) < attackers.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probe_from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut probes = tokio::task::JoinSet::new();
    let rounds = (Duration::from_secs(seconds).as_millis() / PROBE_EVERY.as_millis()) as u64;
    for n in 0..rounds {
        let request = request(&push(4_000, n), &format!("probe-{n}-{}", uuid::Uuid::new_v4()));
        let to = subject.addr;
        probes.spawn(async move { send(probe_from, to, &request).await });
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let mut latencies = Vec::new();
    while let Some(result) = probes.join_next().await {
        if let Ok(Some((202, took))) = result {
            latencies.push(took);
        }
    }
    let attackers_open = open.load(Ordering::Relaxed);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    latencies.sort();
    Figures {
        sent: rounds as usize,
        answered: latencies.len(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        worst: latencies.last().copied().unwrap_or_default(),
        attackers_open,
        attackers_closed: closed.load(Ordering::Relaxed),
    }
}

/// `count` addresses of their own, from 127.1.0.1 on.
fn many(count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect()
}

async fn big_bodies(binary: &Path) -> (usize, u64, u64, Duration) {
    let subject = Subject::start(binary).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = subject.memory_kib("VmRSS");
    let body = push(BIG_BODY - 400, 0);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..BIG_CLIENTS {
        let request = request(&body, &format!("big-{n}-{}", uuid::Uuid::new_v4()));
        let to = subject.addr;
        let from = IpAddr::V4(Ipv4Addr::new(127, 2, 0, (n + 1) as u8));
        clients.spawn(async move { send(from, to, &request).await });
    }
    let mut accepted = 0;
    while let Some(result) = clients.join_next().await {
        if let Ok(Some((202, _))) = result {
            accepted += 1;
        }
    }
    let took = started.elapsed();
    (accepted, idle, subject.memory_kib("VmHWM"), took)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    assert!(
        cli.relay.exists(),
        "{} does not exist: build it with `cargo build --release --bin relay`, or name one with --relay",
        cli.relay.display()
    );
    println!("relay: {}", cli.relay.display());
    println!(
        "| slow-loris clients | webhooks answered 202 | p50 | p99 | worst | attackers open at the end | closed by relay |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let one = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for (name, attackers) in [
        ("none", Vec::new()),
        ("2,000 from one address", vec![one; 2000]),
        ("1,000 from 1,000 addresses", many(1000)),
        ("1,100 from 1,100 addresses", many(1100)),
    ] {
        if !cli.only.as_deref().is_none_or(|only| name.contains(only)) {
            continue;
        }
        let f = slow_loris(&cli.relay, cli.seconds, &attackers).await;
        println!(
            "| {name} | {}/{} | {} | {} | {} | {} | {} |",
            f.answered,
            f.sent,
            ms(f.p50),
            ms(f.p99),
            ms(f.worst),
            f.attackers_open,
            f.attackers_closed
        );
    }
    if !cli.only.as_deref().is_none_or(|only| "bodies".contains(only)) {
        return;
    }
    let (accepted, idle, peak, took) = big_bodies(&cli.relay).await;
    println!(
        "\n{BIG_CLIENTS} concurrent {} MB bodies: {accepted} answered 202 in {:.1} s; relay's RSS {} MiB idle, peak {} MiB",
        BIG_BODY / 1_000_000,
        took.as_secs_f64(),
        idle / 1024,
        peak / 1024
    );
}
