//! Several relays on one PostgreSQL store, tested with the real binary:
//! two relays behind no balancer send every job once; a relay SIGKILLed
//! mid-load leaves its leased jobs to the other; a relay stopped past its
//! lease cannot record a job another relay took over; and a database
//! restart during load costs 503s, never a webhook. Also: delivery ids, the
//! loop guard and payload URLs hold across relays.
//!
//! Every test needs a PostgreSQL server: `RELAY_TEST_POSTGRES`, or the
//! cluster the tests start themselves where PostgreSQL is installed (see
//! `support::postgres_database`); without one each says it is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay::store::JobFilter;
use tokio::sync::Mutex;

use crate::crash::{
    CONCURRENCY, SECRET, deliver_until_acknowledged, drained, free_port, post_all, push, write_config_with,
};
use crate::delivery::deliveries;
use crate::support::{Daemon, MockServer, Reply, job_states, open_store, postgres_database, sign};

const CREATED: &str = r#"{"id":"p","number":1,"state":"created"}"#;
/// Short enough that a takeover happens within a test, longer than a send.
const FAST_LEASE: &str = "timeout = \"1s\"\nlease = \"2s\"";

/// Jobs per state in the database at `url`, and every job's attempt count,
/// read through the store's own inspect operations.
async fn tally(url: &str) -> (BTreeMap<String, u64>, Vec<u32>) {
    let store = open_store(url).await;
    let states = job_states(store.as_ref()).await;
    let jobs = store
        .jobs(JobFilter {
            limit: 1000,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        jobs.len() as u64,
        states.values().sum::<u64>(),
        "more jobs than one listing holds"
    );
    (states, jobs.iter().map(|j| j.attempts).collect())
}

/// Starts `n` relays on the database at `url`, each on its own port.
fn start_relays(dir: &Path, n: usize, target: &MockServer, url: &str, delivery: &str) -> Vec<Daemon> {
    (0..n)
        .map(|i| {
            let own = dir.join(format!("relay-{i}"));
            std::fs::create_dir_all(&own).unwrap();
            let config = write_config_with(&own, free_port(), target, "5s", url, delivery);
            Daemon::start(&config, &[])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn two_relays_on_one_database_send_every_job_exactly_once() {
    let Some(db) = postgres_database("two_relays_on_one_database_send_every_job_exactly_once").await else {
        return;
    };
    const WEBHOOKS: usize = 600;
    let deadline = Instant::now() + Duration::from_secs(90);
    let target = MockServer::start(Reply::new(201, CREATED)).await;
    let dir = tempfile::tempdir().unwrap();
    let relays = start_relays(dir.path(), 2, &target, &db, "");
    let urls: Vec<String> = relays.iter().map(|r| r.url("/hooks/github")).collect();

    let acked = post_all(urls, WEBHOOKS, 16, deadline).await;
    let (delivered, duplicated) = drained(&target, WEBHOOKS, deadline).await;
    eprintln!(
        "two relays, no crash: {WEBHOOKS} webhooks, {acked} acknowledged, {delivered} delivered, {duplicated} duplicated, {} lost",
        WEBHOOKS - delivered
    );
    assert_eq!(acked, WEBHOOKS);
    assert_eq!(delivered, WEBHOOKS);
    assert_eq!(
        duplicated, 0,
        "with nothing crashing, every job is sent exactly once"
    );
    // Both relays did the work: ingress hands each job to its own relay.
    for relay in &relays {
        assert!(
            relay.logs().contains("\"outcome\":\"delivered\""),
            "{}",
            relay.logs()
        );
    }
    let (states, attempts) = tally(&db).await;
    assert_eq!(states["done"], WEBHOOKS as u64, "{states:?}");
    assert_eq!(states.values().sum::<u64>(), WEBHOOKS as u64, "{states:?}");
    assert!(
        attempts.iter().all(|n| *n == 1),
        "one attempt per job: {attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn sigkill_one_of_two_relays_mid_load_and_the_other_finishes_its_jobs() {
    let Some(db) =
        postgres_database("sigkill_one_of_two_relays_mid_load_and_the_other_finishes_its_jobs").await
    else {
        return;
    };
    const WEBHOOKS: usize = 800;
    let deadline = Instant::now() + Duration::from_secs(90);
    // Answers take a moment, so the killed relay has sends in flight.
    let target = MockServer::start(Reply::new(201, CREATED).after(Duration::from_millis(20))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relays = start_relays(dir.path(), 2, &target, &db, FAST_LEASE);
    let urls: Vec<String> = relays.iter().map(|r| r.url("/hooks/github")).collect();
    let survivor = relays.pop().unwrap();
    let victim = Arc::new(Mutex::new(relays.pop().unwrap()));

    let load = tokio::spawn(post_all(urls, WEBHOOKS, 16, deadline));
    while target.requests().len() < WEBHOOKS / 4 {
        assert!(Instant::now() < deadline, "load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = tokio::time::Instant::now();
    {
        let mut victim = victim.lock().await;
        victim.signal("KILL");
        let _ = victim.child.wait();
    }
    let dead_at = tokio::time::Instant::now();
    let acked = load.await.unwrap();
    let (delivered, duplicated) = drained(&target, WEBHOOKS, deadline).await;
    eprintln!(
        "two relays, one SIGKILLed: {WEBHOOKS} webhooks, {acked} acknowledged, {delivered} delivered, \
         {duplicated} duplicated, {} lost; drained {:.1}s after the kill",
        WEBHOOKS - delivered,
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(acked, WEBHOOKS);
    assert_eq!(delivered, WEBHOOKS, "nothing acknowledged is lost");
    assert!(
        duplicated <= CONCURRENCY,
        "{duplicated} duplicates: more than the {CONCURRENCY} sends the killed relay can have had in flight"
    );
    // Every repeated trigger was first sent before the kill: a send in
    // flight when the relay died, taken over once its lease ran out.
    let mut first_sent: std::collections::BTreeMap<String, Vec<tokio::time::Instant>> = Default::default();
    for r in target.requests() {
        let delivery = r.json()["parameters"]["delivery"].as_str().unwrap().to_owned();
        first_sent.entry(delivery).or_default().push(r.at);
    }
    for (delivery, mut times) in first_sent.into_iter().filter(|(_, t)| t.len() > 1) {
        times.sort();
        assert!(
            times[0] <= dead_at,
            "{delivery} was sent twice, the first time {:?} after the killed relay was gone",
            times[0] - dead_at
        );
        assert!(
            times[1] >= killed_at + Duration::from_secs(1),
            "{delivery} was sent again {:?} after the kill, before its 2s lease can have run out",
            times[1] - killed_at
        );
    }
    // The survivor took over what the dead relay had leased.
    let (states, _) = tally(&db).await;
    assert_eq!(
        (states["done"], states.values().sum::<u64>()),
        (WEBHOOKS as u64, WEBHOOKS as u64),
        "{states:?}; survivor's log:\n{}",
        survivor.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_relay_stopped_past_its_lease_cannot_record_the_job_another_relay_took() {
    let Some(db) =
        postgres_database("a_relay_stopped_past_its_lease_cannot_record_the_job_another_relay_took").await
    else {
        return;
    };
    let target = MockServer::start(Reply::new(201, CREATED)).await;
    // The first send is answered late: the relay is stopped meanwhile.
    target.script([Reply::new(201, CREATED).after(Duration::from_millis(1500))]);
    let dir = tempfile::tempdir().unwrap();
    let relays = start_relays(dir.path(), 2, &target, &db, "timeout = \"5s\"\nlease = \"6s\"");
    let (stale, other) = (&relays[0], &relays[1]);

    let body = push(0);
    let (status, text) = crate::support::post_to(
        &stale.url("/hooks/github"),
        &sign::github(SECRET, "push", "crash-0", &body),
        body,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    target.wait_for(1).await;
    stale.signal("STOP");
    let stopped_at = Instant::now();
    // Past the lease, the other relay takes the job and completes it.
    let requests = target.wait_for_within(2, Duration::from_secs(20)).await;
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(5),
        "taken over after {:?}, before the lease ran out",
        stopped_at.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally(&db).await.0["done"] != 1 {
        assert!(
            Instant::now() < deadline,
            "the other relay did not complete the job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stale.signal("CONT");
    stale.wait_log("another worker took it", 1);
    other.wait_log("\"outcome\":\"delivered\"", 1);
    assert_eq!(requests.len(), 2);
    let store = open_store(&db).await;
    let jobs = store
        .jobs(JobFilter {
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].attempts, 1);
    let detail = store
        .job(jobs[0].id.parse().unwrap())
        .await
        .unwrap()
        .expect("the job");
    assert_eq!(
        detail.history.len(),
        1,
        "the stale relay's completion was refused by the claim id: {:?}",
        detail.history
    );
    assert_eq!(
        (detail.history[0].status, detail.history[0].outcome.as_str()),
        (Some(201), "delivered")
    );
}

/// A PostgreSQL server of the test's own, which it may stop and start.
struct OwnCluster {
    dir: PathBuf,
    port: u16,
}

impl OwnCluster {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/postgres")
    }

    fn run(args: &[&str]) -> String {
        let out = std::process::Command::new(Self::script())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            ".ci/postgres {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Initialises and starts a cluster; returns it and its URL.
    fn start() -> (OwnCluster, String) {
        // Outside any private temp directory: the server runs as `postgres`.
        let dir = std::env::temp_dir().join(format!("relay-pg-{}", uuid::Uuid::new_v4().simple()));
        let port = free_port().port();
        let url = Self::run(&["start", dir.to_str().unwrap(), &port.to_string()]);
        (OwnCluster { dir, port }, url)
    }

    fn stop(&self) {
        Self::run(&["stop", self.dir.to_str().unwrap()]);
    }

    fn resume(&self) {
        Self::run(&["resume", self.dir.to_str().unwrap(), &self.port.to_string()]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .args(["stop", self.dir.to_str().unwrap()])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_database_restart_during_load_costs_503s_and_no_webhook() {
    // The shared test server stays up for the other tests; this one
    // restarts a server of its own.
    if postgres_database("a_database_restart_during_load_costs_503s_and_no_webhook")
        .await
        .is_none()
    {
        return;
    }
    const WEBHOOKS: usize = 400;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (cluster, db) = OwnCluster::start();
    // A target that takes its time, so sends are in flight when the
    // database goes away and their outcomes wait for it.
    let target = MockServer::start(Reply::new(201, CREATED).after(Duration::from_millis(200))).await;
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("relay");
    std::fs::create_dir_all(&own).unwrap();
    let addr = free_port();
    // The default lease (far longer than the outage): sends in flight when
    // the database went away are recorded when it is back, not repeated.
    let config = write_config_with(&own, addr, &target, "5s", &db, "timeout = \"1s\"");
    let admin = free_port();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
    std::fs::write(&config, text).unwrap();
    let relay = Daemon::start(&config, &[]);
    let url = relay.url("/hooks/github");
    let ready = format!("http://{admin}/readyz");
    let client = crate::support::test_client();
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);

    // Slow senders, so the outage falls in the middle of the load.
    let load = tokio::spawn(post_all(vec![url.clone()], WEBHOOKS, 4, deadline));
    while target.requests().len() < WEBHOOKS / 4 {
        assert!(Instant::now() < deadline, "load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.stop();
    // While the database is down: ingest answers 503 (the sender retries),
    // and readiness says so.
    let body = push(WEBHOOKS + 1);
    let (status, answer) =
        crate::support::post_to(&url, &sign::github(SECRET, "push", "outage-probe", &body), body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("retry"), "{answer}");
    let mut not_ready = false;
    for _ in 0..50 {
        if client.get(&ready).send().await.unwrap().status() == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_ready, "/readyz should report the database outage");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.resume();

    let acked = load.await.unwrap();
    let (delivered, duplicated) = drained(&target, WEBHOOKS, deadline).await;
    // Sends that finished during the outage were recorded once it was over.
    let logs = relay.logs();
    assert!(
        logs.contains("cannot record the attempt; retrying until the store answers")
            && logs.contains("attempt recorded once the store answered again"),
        "no send was in flight across the outage, or its outcome was not recorded after it:\n{logs}"
    );
    eprintln!(
        "database restart under load: {WEBHOOKS} webhooks, {acked} acknowledged, {delivered} delivered, \
         {duplicated} duplicated, {} lost",
        WEBHOOKS - delivered
    );
    assert_eq!(acked, WEBHOOKS);
    assert_eq!(delivered, WEBHOOKS);
    assert_eq!(duplicated, 0, "log:\n{}", relay.logs());
    // Recovered without a restart: ready again, and every job recorded.
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);
    let (states, _) = tally(&db).await;
    assert_eq!(
        (states["done"], states.values().sum::<u64>()),
        (WEBHOOKS as u64, WEBHOOKS as u64),
        "{states:?}; log:\n{}",
        relay.logs()
    );
}

/// A TCP forwarder to PostgreSQL that can go silent: while frozen it keeps
/// every connection open and passes nothing on, like a database host that
/// stopped answering without closing anything.
struct Silence {
    addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Silence {
    async fn start(upstream: std::net::SocketAddr) -> Silence {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(Silence::pump(ri, wo, watch.clone()));
                tokio::spawn(Silence::pump(ro, wi, watch.clone()));
            }
        });
        Silence { addr, frozen }
    }

    /// Copies `from` to `to`, holding each chunk back while frozen.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

/// A database that stops answering without closing its connections (a host
/// gone, a partition): webhooks get a 503 before the sender's 10-second
/// timeout instead of hanging, readiness says so, and once it answers again
/// relay carries on by itself and loses nothing it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_database_that_goes_silent_costs_503s_in_time_and_no_webhook() {
    let Some(db) = postgres_database("a_database_that_goes_silent_costs_503s_in_time_and_no_webhook").await
    else {
        return;
    };
    let (prefix, rest) = db.split_once('@').unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let silence = Silence::start(host.parse().unwrap()).await;
    let via = format!("{prefix}@{}/{path}", silence.addr);
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let admin = free_port();
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[admin]
listen = "{admin}"

[store]
url = "{via}"

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "all"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "t"
"#,
        circle = circle.url()
    );
    let relay = crate::support::Relay::start_with(tempfile::tempdir().unwrap(), &text).await;
    let client = crate::support::test_client();
    let ready = format!("http://{admin}/readyz");
    let post = |n: usize| {
        let body = push(n);
        let headers = sign::github(SECRET, "push", &format!("silent-{n}"), &body);
        let url = relay.url("/hooks/github");
        async move { crate::support::post_to(&url, &headers, body).await }
    };
    assert_eq!(post(1).await.0, 202);
    circle.wait_for(1).await;

    silence.set(true);
    let asked = Instant::now();
    let (status, answer) = post(2).await;
    let waited = asked.elapsed();
    assert_eq!(status, 503, "{answer}");
    // A pooled connection's query times out ("did not answer"), or a new
    // connection never completes its handshake: either way, in time.
    assert!(answer.contains(r#""error":"store_unavailable""#), "{answer}");
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}: GitHub and GitLab give up on a delivery after 10s"
    );
    let readiness = client.get(&ready).send().await.unwrap();
    assert_eq!(readiness.status(), 503);

    silence.set(false);
    // Back by itself: the next webhooks are accepted and sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut accepted = 0;
    for n in 3..13 {
        loop {
            let (status, answer) = post(n).await;
            if status == 202 {
                accepted += 1;
                break;
            }
            assert_eq!(status, 503, "{answer}");
            assert!(Instant::now() < deadline, "the store did not come back: {answer}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(accepted, 10);
    // The 503 bounded the sender's wait, not the commit: the silent
    // webhook's transaction may have gone through once the database
    // answered (its jobs are then sent), or failed with its connection. The
    // sender's redelivery settles it either way: a duplicate of the one
    // committed, or accepted now; the trigger goes out exactly once.
    let (status, answer) = post(2).await;
    match status {
        200 => assert!(answer.contains(r#""duplicate""#), "{answer}"),
        202 => {}
        other => panic!("the redelivery was answered {other}: {answer}"),
    }
    let requests = circle.wait_for(12).await;
    assert_eq!(
        requests.len(),
        12,
        "the first webhook, the one answered 503 during the silence (once), and the ten after it"
    );
    // Exactly twelve jobs, all done: nothing queued behind them to send twice.
    assert_eq!(relay.wait_jobs("", 12).await.len(), 12);
    assert_eq!(relay.wait_done(12).await.len(), 12);
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);
    relay.stop().await;
}

/// A relay (the real binary) on the database at `url`, in `dir/name`, with
/// 1 s leases and a target that takes `slots` sends at once: `crash`'s
/// config, the target's own `concurrency` appended to its table, the
/// file's last.
fn relay_with_slots(dir: &Path, name: &str, target: &MockServer, url: &str, slots: usize) -> Daemon {
    relay_with(dir, name, target, url, slots, "5s", "1s")
}

/// As [`relay_with_slots`], with its shutdown deadline and lease.
fn relay_with(
    dir: &Path,
    name: &str,
    target: &MockServer,
    url: &str,
    slots: usize,
    shutdown: &str,
    lease: &str,
) -> Daemon {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    let config = write_config_with(
        &own,
        free_port(),
        target,
        shutdown,
        url,
        &format!("timeout = \"10s\"\nlease = \"{lease}\""),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("concurrency = {slots}\n"));
    std::fs::write(&config, text).unwrap();
    Daemon::start(&config, &[])
}

/// Posts webhook `n` (delivery `crash-{n}`) to `relay`; fails unless acknowledged.
async fn post_push(relay: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let urls = [relay.url("/hooks/github")];
    assert!(
        deliver_until_acknowledged(&crate::support::test_client(), &urls, n, deadline).await,
        "webhook {n} was not acknowledged"
    );
}

/// Waits until `n` jobs in the database at `url` are done; their attempt counts.
async fn wait_done(url: &str, n: u64) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (states, attempts) = tally(url).await;
        if states.get("done") == Some(&n) {
            return attempts;
        }
        assert!(Instant::now() < deadline, "not {n} jobs done: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job waiting in memory for its relay's send slot keeps its lease: the
/// other relay, with slots free, never takes it over, though it waits three
/// times the lease for the send ahead of it.
#[tokio::test]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_job_waiting_for_its_relays_slot_is_not_taken_over_by_another_relay() {
    let Some(db) =
        postgres_database("a_job_waiting_for_its_relays_slot_is_not_taken_over_by_another_relay").await
    else {
        return;
    };
    let send = Duration::from_secs(3);
    let circle = MockServer::start(Reply::new(201, CREATED).after(send)).await;
    let dir = tempfile::tempdir().unwrap();
    let busy = relay_with_slots(dir.path(), "busy", &circle, &db, 1);
    for n in 0..2 {
        post_push(&busy, n).await;
    }
    // Started now, the other relay looks for leases to take over from the
    // start: it wakes when the waiting job's lease would run out.
    let _idle = relay_with_slots(dir.path(), "idle", &circle, &db, CONCURRENCY);
    let requests = circle.wait_for_within(2, Duration::from_secs(20)).await;
    assert_eq!(deliveries(&circle), ["crash-0", "crash-1"]);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= send - Duration::from_millis(50),
        "the second job was sent {waited:?} after the first, before its relay's slot was free: taken over"
    );
    assert_eq!(wait_done(&db, 2).await, [1, 1], "one attempt a job");
    assert_eq!(circle.requests().len(), 2, "each job sent once");
}

/// A relay that stops while a job waits for its one send slot hands the
/// job back when its shutdown deadline (1 s) passes, and the other relay,
/// woken by the release, sends it at once: it would otherwise wait out the
/// job's 60 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_stopping_relay_hands_the_job_waiting_for_its_slot_to_another_at_once() {
    let Some(db) =
        postgres_database("a_stopping_relay_hands_the_job_waiting_for_its_slot_to_another_at_once").await
    else {
        return;
    };
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    // The stopping relay's one send outlasts its deadline; every other is answered at once.
    circle.script([Reply::new(201, CREATED).after(Duration::from_secs(8))]);
    let dir = tempfile::tempdir().unwrap();
    let stopping = relay_with(dir.path(), "stopping", &circle, &db, 1, "1s", "60s");
    let _other = relay_with(dir.path(), "other", &circle, &db, CONCURRENCY, "5s", "60s");
    for n in 0..2 {
        post_push(&stopping, n).await;
    }
    circle.wait_for(1).await;
    stopping.signal("TERM");
    let (status, logs) = stopping.terminate();
    assert!(status.success(), "exit status {status}; log:\n{logs}");
    assert_eq!(
        logs.matches("it is queued again, not sent").count(),
        1,
        "log:\n{logs}"
    );
    circle.wait_for_within(2, Duration::from_secs(10)).await;
    assert_eq!(
        deliveries(&circle),
        ["crash-0", "crash-1"],
        "the send cut off by the deadline, then the job handed back, sent by the other relay"
    );
}

/// A job whose lease ran out while it waited for its relay's send slot is
/// not sent by that relay once it runs again: the relay stopped (SIGSTOP)
/// past the lease, the other took the job over and sent it, and the
/// stopped relay's renewal, its first act on waking, finds the claim gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn a_job_whose_lease_ran_out_while_it_waited_for_a_slot_is_not_sent_by_its_stale_relay() {
    let Some(db) = postgres_database(
        "a_job_whose_lease_ran_out_while_it_waited_for_a_slot_is_not_sent_by_its_stale_relay",
    )
    .await
    else {
        return;
    };
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    // The stale relay's one send is answered late; every other at once.
    circle.script([Reply::new(201, CREATED).after(Duration::from_secs(6))]);
    let dir = tempfile::tempdir().unwrap();
    let stale = relay_with_slots(dir.path(), "stale", &circle, &db, 1);
    for n in 0..2 {
        post_push(&stale, n).await;
    }
    circle.wait_for(1).await;
    stale.signal("STOP");
    // Past both leases, the other relay takes the two jobs and sends them.
    let _other = relay_with_slots(dir.path(), "other", &circle, &db, CONCURRENCY);
    assert_eq!(wait_done(&db, 2).await, [1, 1], "one attempt a job");
    stale.signal("CONT");
    stale.wait_log("while it waited for a send slot; it is not sent here", 1);
    stale.wait_log("another worker took it while this send was running", 1);
    // The stale send ends, is not recorded, and frees the slot the job
    // gave up waiting for.
    let answered = circle.requests()[0].at + Duration::from_secs(6);
    tokio::time::sleep_until(answered + Duration::from_millis(500)).await;
    // The other relay claims both jobs at once and sends them side by side:
    // which of its two arrives first is the scheduler's choice.
    let mut sent = deliveries(&circle);
    if let Some(others) = sent.get_mut(1..) {
        others.sort();
    }
    assert_eq!(
        sent,
        ["crash-0", "crash-0", "crash-1"],
        "the stale relay's first send, then the other relay's two: the job that waited went once"
    );
}

/// A relay in this process on the shared database, serving payload URLs
/// under its own address with the key every relay shares.
async fn shared_relay(db: &str, circle: &MockServer) -> crate::support::Relay {
    let addr = free_port();
    let text = format!(
        r#"
[server]
listen = ["{addr}"]
public_url = "http://{addr}/"
payload_key = "shared-payload-key-9f3a"

[store]
url = "{db}"

[loop_guard]
burst = {{ limit = 3, per = "1m" }}

[sources.gh]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "all"
to = ["circle"]

[targets.circle]
kind = "circleci"
base_url = "{circle}"
project = "gh/acme/api"
token = "t"
payload_parameter = "payload_url"
"#,
        circle = circle.url()
    );
    crate::support::Relay::start_with(tempfile::tempdir().unwrap(), &text).await
}

#[tokio::test]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn delivery_ids_the_loop_guard_and_payload_urls_hold_across_relays() {
    let Some(db) = postgres_database("delivery_ids_the_loop_guard_and_payload_urls_hold_across_relays").await
    else {
        return;
    };
    let circle = MockServer::start(Reply::new(201, CREATED)).await;
    let a = shared_relay(&db, &circle).await;
    let b = shared_relay(&db, &circle).await;

    // One delivery id, posted to both relays (a sender's retry that went
    // through the other relay): accepted once.
    let original = push(1);
    let body = original.clone();
    let (status, first) = a
        .post(
            "/hooks/github",
            &sign::github(SECRET, "push", "d-1", &body),
            body.clone(),
        )
        .await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = b
        .post(
            "/hooks/github",
            &sign::github(SECRET, "push", "d-1", &body),
            body.clone(),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], first["event"]);

    // The same commit under a new delivery id, through the other relay: the
    // dedupe window is the database's.
    let (status, held) = b
        .post(
            "/hooks/github",
            &sign::github(SECRET, "push", "d-2", &body),
            body.clone(),
        )
        .await;
    assert_eq!(status, 202, "{held}");
    assert_eq!(held["jobs"], 0, "{held}");
    assert_eq!(held["dropped"][0]["rule"], relay::guard::RULE_DEDUPE, "{held}");

    // The burst limit (3 a minute) counts both relays' triggers.
    for (i, relay) in [(2, &b), (3, &a)] {
        let body = push(i);
        let (status, answer) = relay
            .post(
                "/hooks/github",
                &sign::github(SECRET, "push", &format!("d-{}", i + 1), &body),
                body,
            )
            .await;
        assert_eq!((status, answer["jobs"].as_u64()), (202, Some(1)), "{answer}");
    }
    let body = push(4);
    let (status, answer) = b
        .post("/hooks/github", &sign::github(SECRET, "push", "d-5", &body), body)
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["dropped"][0]["rule"], relay::guard::RULE_BURST, "{answer}");

    // A payload URL minted by one relay is served by the other.
    let sent = circle.wait_for(3).await;
    let minted = sent
        .iter()
        .map(|r| r.json()["parameters"]["payload_url"].as_str().unwrap().to_owned())
        .find(|u| u.contains(first["event"].as_str().unwrap()))
        .expect("the first event's trigger carries its payload URL");
    let from_b = minted.replace(&a.addr.to_string(), &b.addr.to_string());
    assert_ne!(from_b, minted);
    let response = crate::support::test_client().get(&from_b).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), original);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(relay_postgres_tests),
    ignore = "PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/initdb) and RELAY_TEST_POSTGRES is unset"
)]
async fn tls_to_the_database_checks_its_certificate() {
    if postgres_database("tls_to_the_database_checks_its_certificate")
        .await
        .is_none()
    {
        return;
    }
    let (cluster, url) = OwnCluster::start();
    // The server gets a certificate for 127.0.0.1 and requires TLS of
    // every TCP client.
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let data = cluster.dir.join("data");
    std::fs::write(data.join("server.crt"), certified.cert.pem()).unwrap();
    std::fs::write(data.join("server.key"), certified.signing_key.serialize_pem()).unwrap();
    let ca = cluster.dir.join("ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let hba = std::fs::read_to_string(data.join("pg_hba.conf"))
        .unwrap()
        .replace("host    all", "hostssl all")
        .replace("host    replication", "hostssl replication");
    std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str("\nssl = on\n");
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    let owner = std::process::Command::new("chown")
        .args([
            "-R",
            "--reference",
            data.to_str().unwrap(),
            data.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(owner.success());
    let key_mode = std::process::Command::new("chmod")
        .args(["600", data.join("server.key").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(key_mode.success());
    cluster.stop();
    cluster.resume();

    let open = |text: String| async move {
        let config = relay::config::Config::from_toml(&text).unwrap();
        relay::store::open(&config.store, std::time::SystemTime::now())
            .await
            .map(drop)
    };
    // Trusting the CA that signed it: connected, schema created.
    open(format!(
        "[store]\nurl = \"{url}?sslmode=require\"\nca_file = \"{}\"\n",
        ca.display()
    ))
    .await
    .unwrap();
    // Without it, the certificate is refused, and the error says what to do.
    let refused = open(format!("[store]\nurl = \"{url}?sslmode=require\"\n"))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("set store.ca_file"), "{refused}");
    assert!(!refused.contains("relay-test-pw"), "{refused}");
    // The server takes no connection without TLS.
    let plain = open(format!("[store]\nurl = \"{url}?sslmode=disable\"\n"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        plain.contains("no pg_hba.conf entry for host \"127.0.0.1\"") && plain.contains("no encryption"),
        "{plain}"
    );
}
