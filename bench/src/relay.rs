//! relay as the harness runs it: the workspace every measurement shares
//! (scratch directory, the load's body, the relay binary), relay's config
//! for a measurement, and relay started on it. Only loopback addresses go
//! into a config.

use std::path::PathBuf;
use std::time::Duration;

use crate::SECRET;
use crate::process::{Running, Scratch, start_pinned, wait_for_answer};
use crate::push::{Push, fresh_commit};

/// What every measurement of one harness run shares.
pub struct Workspace {
    /// Configs, logs, databases and bodies; removed at the end.
    pub dir: Scratch,
    /// The load table's 7 KB push; each request sends it for a commit of
    /// its own.
    pub body: Push,
    /// The relay measured: the one beside the harness, or `--relay`.
    pub relay_binary: PathBuf,
    /// `--postgres`: a server where a fresh database is made per run.
    pub postgres: Option<String>,
    /// The databases made on it, dropped once their relay has stopped.
    pub databases: std::sync::Mutex<Vec<String>>,
    /// The `--postgres` server's main process (the postmaster), when it
    /// runs on this machine where the harness can read its CPU time.
    pub postgres_server: Option<u32>,
}

impl Workspace {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// The load's push to relay on `port`, for a commit of its own and
    /// signed for it, as delivery `delivery`.
    pub fn push(&self, client: &reqwest::Client, port: u16, delivery: &str) -> reqwest::RequestBuilder {
        let (body, signature) = self.body.for_commit(&fresh_commit());
        client
            .post(format!("http://127.0.0.1:{port}/hooks/github"))
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", "push")
            .header("X-GitHub-Delivery", delivery)
            .header("X-Hub-Signature-256", signature)
            .body(body)
    }
}

/// What a measurement changes in relay's config. The default is the load
/// table's relay: one GitHub source, one route taking every push, one
/// CircleCI target at the mock.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// The delivery id goes into a pipeline parameter, so the mock can time
    /// each trigger (end to end).
    pub record: bool,
    /// `[[routes]]` (and any sources and targets they name beyond the
    /// default ones) instead of the one route.
    pub routes: Option<String>,
    /// Appended as it is: more sources and targets.
    pub extra: String,
    /// `delivery.timeout`, when relay's default will not do (a paused
    /// target's send must outlast the measurement).
    pub delivery_timeout: Option<&'static str>,
    /// `store.retention`, when relay's default will not do.
    pub retention: Option<String>,
}

pub fn relay_config(port: u16, store: &str, circle: std::net::SocketAddr, setup: &Setup) -> String {
    // Each request is a push of a commit of its own, so the dedupe window
    // (relay's default, 10 minutes) holds none back but stores a key for
    // each, as in production. The burst breaker would hold back all but 30
    // a minute, so it is off, and every request commits an event and a job.
    let parameters = if setup.record {
        "parameters = { delivery = \"{{ delivery }}\" }"
    } else {
        ""
    };
    let routes = setup
        .routes
        .as_deref()
        .unwrap_or("[[routes]]\nname = \"builds\"\nto = [\"circleci\"]\n");
    let timeout = setup
        .delivery_timeout
        .map(|t| format!("timeout = \"{t}\""))
        .unwrap_or_default();
    let extra = &setup.extra;
    let retention = setup
        .retention
        .as_deref()
        .map(|r| format!("retention = \"{r}\""))
        .unwrap_or_default();
    format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]

[store]
url = "{store}"
{retention}

[loop_guard]
burst = false

[delivery]
concurrency = 32
{timeout}

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

{routes}

[targets.circleci]
kind = "circleci"
base_url = "http://{circle}"
project = "gh/acme/api"
token = "bench-circle-token"
{parameters}

{extra}
"#
    )
}

impl Workspace {
    /// A new, empty database on the `--postgres` server for one run, as a
    /// URL; [`Workspace::drop_databases`] removes it.
    pub async fn fresh_postgres_database(&self) -> Result<String, String> {
        let server = self
            .postgres
            .as_deref()
            .ok_or("relay-postgres needs --postgres URL")?;
        let client = connect_postgres(server).await?;
        let name = format!("relay_bench_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| {
                format!(
                    "--postgres: cannot create a database (the role needs CREATEDB): {}",
                    postgres_error(&e)
                )
            })?;
        self.databases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(name.clone());
        let (base, _) = server
            .split('?')
            .next()
            .and_then(|s| s.rsplit_once('/'))
            .ok_or("--postgres takes a URL ending in /DATABASE")?;
        Ok(format!("{base}/{name}"))
    }

    /// Drops the databases made so far. Called once the relays using them
    /// have stopped: each run's holds about 20 MB per second of load, and
    /// left in place they filled the server's disk run after run.
    pub async fn drop_databases(&self) -> Result<(), String> {
        let names = std::mem::take(
            &mut *self
                .databases
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let Some(server) = self.postgres.as_deref() else {
            return Ok(());
        };
        if names.is_empty() {
            return Ok(());
        }
        let client = connect_postgres(server).await?;
        for name in names {
            // `FORCE` ends the relay's sessions but not an autovacuum
            // worker's, which the fill can set off: a role that is not a
            // superuser is refused until it ends, so a refusal is tried
            // again for a few seconds (a lost connection is not).
            let mut tries = 0;
            while let Err(e) = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
            {
                tries += 1;
                if tries == 40 || e.as_db_error().is_none() {
                    return Err(format!(
                        "--postgres: cannot drop the run's database {name}: {}",
                        postgres_error(&e)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }
}

/// The postmaster of the server at `url`, when it runs on this machine:
/// the parent of the harness's own backend there, if that is a `postgres`
/// process here. `None` for a server elsewhere (another host, a container's
/// own process numbers), whose CPU the harness cannot read.
pub async fn local_postgres_server(url: &str) -> Result<Option<u32>, String> {
    let client = connect_postgres(url).await?;
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| format!("--postgres: {}", postgres_error(&e)))?
        .get(0);
    let is_postgres = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
    };
    Ok(u32::try_from(backend)
        .ok()
        .filter(|pid| is_postgres(*pid))
        .and_then(crate::load::parent_of)
        .filter(|pid| is_postgres(*pid)))
}

/// What the `--postgres` server has spent so far, read before and after a
/// measurement: its CPU time (when it runs on this machine) and its
/// write-ahead log's position, the bytes it has logged (every database's:
/// the harness's runs are the server's only writers).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerReading {
    cpu: Option<Duration>,
    wal: Option<u64>,
}

impl ServerReading {
    /// The server's figures now; each `None` where it cannot be read.
    pub async fn take(ws: &Workspace) -> ServerReading {
        let wal = match ws.postgres.as_deref() {
            Some(url) => wal_position(url).await,
            None => None,
        };
        ServerReading {
            cpu: ws.postgres_server.and_then(crate::load::server_cpu_time),
            wal,
        }
    }

    /// What the server spent between `earlier` and this reading, per `n`
    /// (requests or triggers): CPU in µs and WAL in bytes.
    pub fn per(&self, earlier: &ServerReading, n: f64) -> (Option<f64>, Option<f64>) {
        let cpu = self
            .cpu
            .zip(earlier.cpu)
            .map(|(now, then)| now.saturating_sub(then).as_secs_f64() * 1e6 / n);
        let wal = self
            .wal
            .zip(earlier.wal)
            .map(|(now, then)| now.saturating_sub(then) as f64 / n);
        (cpu, wal)
    }
}

/// The server's write-ahead log position in bytes, which any role may read.
async fn wal_position(url: &str) -> Option<u64> {
    let client = connect_postgres(url).await.ok()?;
    let row = client
        .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8", &[])
        .await
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// What the server said, where the driver's own text is only "db error".
pub fn postgres_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

async fn connect_postgres(server: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("--postgres: cannot connect: {}", postgres_error(&e)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// relay on `store` at `port`, pinned like every subject; `label` names its
/// config and log in the scratch directory.
pub async fn start_relay(
    ws: &Workspace,
    label: &str,
    port: u16,
    store: &str,
    circle: std::net::SocketAddr,
    setup: &Setup,
) -> Result<Running, String> {
    let config = ws.path(&format!("{label}.toml"));
    std::fs::write(&config, relay_config(port, store, circle, setup)).map_err(|e| e.to_string())?;
    let args = vec![
        "serve".into(),
        "--log-format".into(),
        "json".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    let log = ws.path(&format!("{label}.log"));
    let running = start_pinned(&ws.relay_binary, &args, port, log, &[("RELAY_LOG", "info")]).await?;
    wait_for_answer(port, "/hooks/github").await?;
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server spent between two readings, per request: each
    /// figure only where both readings have it.
    #[test]
    fn a_servers_spending_is_the_difference_of_two_readings_per_request() {
        let before = ServerReading {
            cpu: Some(Duration::from_millis(1_000)),
            wal: Some(10_000_000),
        };
        let after = ServerReading {
            cpu: Some(Duration::from_millis(4_130)),
            wal: Some(26_000_000),
        };
        let (cpu, wal) = after.per(&before, 10_000.0);
        assert!((cpu.unwrap() - 313.0).abs() < 1e-6, "{cpu:?}");
        assert_eq!(wal, Some(1_600.0));
        let elsewhere = ServerReading { cpu: None, ..after };
        assert_eq!(elsewhere.per(&before, 10_000.0), (None, Some(1_600.0)));
        assert_eq!(after.per(&ServerReading::default(), 10_000.0), (None, None));
    }
}
