//! Load at the door: the per-address connection cap (and the trusted proxies
//! it exempts), the header deadline, and shedding the connection that has
//! sent the least when the listener is full. Clients come from distinct
//! loopback addresses (127.0.0.0/8 is all local), as attackers and GitHub's
//! senders come from distinct addresses.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{Relay, sign};

const SECRET: &str = "door-secret";

fn config(dir: &std::path::Path, server: &str, source_extra: &str) -> String {
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
{server}

[admin]
listen = "127.0.0.1:0"

[store]
url = "sqlite://{}"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"
{source_extra}

[[routes]]
name = "all"
to = ["t"]

[targets.t]
kind = "http"
url = "http://127.0.0.1:9/t"
dry_run = true
"#,
        dir.join("relay.db").display()
    )
}

async fn start(server: &str, source_extra: &str) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), server, source_extra);
    Relay::start_with(dir, &text).await
}

/// A connection to relay from `from`, one of loopback's addresses.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether relay closes `stream` within `patience` (reading gives EOF or a reset).
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends a signed push from `from` over a connection of its own and returns
/// the status line's code, or `None` when relay closed the connection first.
async fn webhook_from(from: &str, relay: &Relay, n: u32) -> Option<u16> {
    let body = json!({
        "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": format!("{n:040x}"), "repository": { "full_name": "acme/api" },
        "pusher": { "name": "ada" }, "head_commit": { "message": "m" }, "commits": []
    })
    .to_string();
    let mut request = format!(
        "POST /hooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in sign::github(SECRET, "push", &format!("door-{n}"), body.as_bytes()) {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let mut stream = connect_from(from, relay.addr).await;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1)?.parse().ok()
}

/// Opens `n` connections from `from` that each send the start of a request
/// and then nothing, as a slow-loris client does.
async fn dribblers(from: &str, relay: &Relay, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut stream = connect_from(from, relay.addr).await;
        stream.write_all(first).await.unwrap();
        held.push(stream);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_while_others_are_served() {
    let relay = start("max_connections_per_ip = 4\nheader_timeout = \"10s\"", "").await;
    let mut held = dribblers("127.0.0.2", &relay, 4, b"POST /hooks/github HTTP/1.1\r\n").await;
    let mut fifth = connect_from("127.0.0.2", relay.addr).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(5)).await,
        "the fifth connection from one address is closed"
    );
    assert_eq!(
        webhook_from("127.0.0.3", &relay, 1).await,
        Some(202),
        "another address is served"
    );
    assert_eq!(
        relay
            .metric("relay_connections_turned_away_total{listener=\"ingress\",reason=\"per_ip\"}")
            .await,
        1.0
    );
    // The four are still open: the cap refused the fifth, it shed nothing.
    for stream in &mut held {
        assert!(!closed_within(stream, Duration::from_millis(50)).await);
    }
    // A slot freed is a slot usable by the same address.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(webhook_from("127.0.0.2", &relay, 2).await, Some(202));
    drop(held);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_not_capped() {
    let relay = start(
        "max_connections_per_ip = 2\nheader_timeout = \"10s\"",
        "trusted_proxies = [\"127.0.0.4/32\"]",
    )
    .await;
    let held = dribblers("127.0.0.4", &relay, 5, b"POST /hooks/github HTTP/1.1\r\n").await;
    assert_eq!(
        webhook_from("127.0.0.4", &relay, 1).await,
        Some(202),
        "the sixth connection from the proxy is served"
    );
    drop(held);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_must_arrive_within_the_header_timeout() {
    let relay = start("header_timeout = \"1s\"\nrequest_timeout = \"30s\"", "").await;
    let mut stream = connect_from("127.0.0.5", relay.addr).await;
    stream
        .write_all(b"POST /hooks/github HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut stream, Duration::from_secs(15)).await,
        "closed long before the 30s request timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_sheds_the_connection_that_has_sent_the_least() {
    let relay = start(
        "max_connections = 6\nmax_connections_per_ip = 100\nheader_timeout = \"30s\"\nrequest_timeout = \"30s\"",
        "",
    )
    .await;
    // Five slow clients that sent a request line and a header, and one that
    // sent only "P": the least.
    let header = b"POST /hooks/github HTTP/1.1\r\nHost: relay\r\n";
    let mut fuller = dribblers("127.0.0.6", &relay, 5, header).await;
    let mut least = dribblers("127.0.0.7", &relay, 1, b"P").await;
    // Past the grace a new connection has to be safe from being shed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        webhook_from("127.0.0.8", &relay, 1).await,
        Some(202),
        "a webhook is served at once, not after the slow clients' timeout"
    );
    assert!(
        closed_within(&mut least[0], Duration::from_secs(5)).await,
        "the one that sent the least was closed to make room"
    );
    for stream in &mut fuller {
        assert!(
            !closed_within(stream, Duration::from_millis(50)).await,
            "the others stay open"
        );
    }
    assert_eq!(
        relay
            .metric("relay_connections_turned_away_total{listener=\"ingress\",reason=\"shed\"}")
            .await,
        1.0
    );
    drop((fuller, least));
    relay.stop().await;
}

#[test]
fn door_limits_are_checked_at_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (server, key, says) in [
        (
            "max_connections_per_ip = 0",
            "server.max_connections_per_ip",
            "at least 1",
        ),
        (
            "body_memory = \"10MiB\"",
            "server.body_memory",
            "smaller than server.max_body",
        ),
        (
            "header_timeout = \"0s\"",
            "server.header_timeout",
            "longer than 0s",
        ),
        (
            "header_timeout = \"20s\"\nrequest_timeout = \"10s\"",
            "server.header_timeout",
            "longer than server.request_timeout (10s)",
        ),
    ] {
        let error = relay::config::Config::from_toml(&config(dir.path(), server, ""))
            .unwrap_err()
            .to_string();
        assert!(error.contains(key) && error.contains(says), "{server}: {error}");
    }
    let short =
        relay::config::Config::from_toml(&config(dir.path(), "request_timeout = \"2s\"", "")).unwrap();
    assert_eq!(
        short.server.header_timeout,
        Duration::from_secs(2),
        "unset, the header deadline is never longer than the request timeout"
    );
    let defaults = relay::config::Config::from_toml(&config(dir.path(), "", "")).unwrap();
    assert_eq!(
        (
            defaults.server.header_timeout,
            defaults.server.max_connections_per_ip
        ),
        (Duration::from_secs(3), 128)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bodies_wait_for_memory_and_small_webhooks_do_not() {
    let relay = start(
        "max_body = \"1MiB\"\nbody_memory = \"1MiB\"\nrequest_timeout = \"2s\"",
        "",
    )
    .await;
    let big = |n: u32| {
        let body = json!({
            "ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
            "after": format!("{n:040x}"), "repository": { "full_name": "acme/api" },
            "pusher": { "name": "ada" }, "head_commit": { "message": "x".repeat(900_000) }, "commits": []
        })
        .to_string();
        let mut head = format!(
            "POST /hooks/github HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (name, value) in sign::github(SECRET, "push", &format!("big-{n}"), body.as_bytes()) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        (head, body)
    };
    // The first big body holds the whole budget while it is still arriving.
    let (head, body) = big(1);
    let mut first = connect_from("127.0.0.9", relay.addr).await;
    first.write_all(head.as_bytes()).await.unwrap();
    first.write_all(&body.as_bytes()[..1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (head, body) = big(2);
    let mut second = connect_from("127.0.0.10", relay.addr).await;
    second.write_all(head.as_bytes()).await.unwrap();
    second.write_all(body.as_bytes()).await.unwrap();
    assert_eq!(
        webhook_from("127.0.0.11", &relay, 3).await,
        Some(202),
        "an ordinary webhook does not queue behind big bodies"
    );
    // The second waits for the first's room: it is answered only once the
    // first has given up (its body never came; 408 at request_timeout).
    let first_done = tokio::spawn(async move {
        let mut answer = String::new();
        first.read_to_string(&mut answer).await.unwrap();
        (answer, Instant::now())
    });
    let mut answer = String::new();
    second.read_to_string(&mut answer).await.unwrap();
    let second_at = Instant::now();
    let (first_answer, first_at) = first_done.await.unwrap();
    assert!(first_answer.starts_with("HTTP/1.1 408"), "{first_answer}");
    assert!(answer.starts_with("HTTP/1.1 202"), "room is given back: {answer}");
    assert!(second_at >= first_at, "the second waited for the first's room");
    relay.stop().await;
}
