//! relay as the harness runs it: the workspace every measurement shares
//! (scratch directory, the load's body, the relay binary), relay's config
//! for a measurement, and relay started on it. Only loopback addresses go
//! into a config.

use std::path::PathBuf;

use bytes::Bytes;

use crate::SECRET;
use crate::process::{Running, Scratch, start_pinned};

pub struct Workspace {
    pub dir: Scratch,
    pub body: Bytes,
    pub signature: String,
    pub relay_binary: PathBuf,
    pub postgres: Option<String>,
}

impl Workspace {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}

pub fn relay_config(port: u16, store: &str, circle: std::net::SocketAddr, record: bool) -> String {
    // The load repeats one commit: the dedupe window and burst breaker would
    // hold back all but the first triggers, so they are off, and every
    // request commits an event and a job.
    let parameters = if record {
        "parameters = { delivery = \"{{ delivery }}\" }"
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]

[store]
url = "{store}"

[loop_guard]
dedupe_window = "0s"
burst = false

[delivery]
concurrency = 32

[sources.github]
provider = "github"
path = "/hooks/github"
secret = "{SECRET}"

[[routes]]
name = "builds"
to = ["circleci"]

[targets.circleci]
kind = "circleci"
base_url = "http://{circle}"
project = "gh/acme/api"
token = "bench-circle-token"
{parameters}
"#
    )
}

/// A new, empty database on `server` for one run, as a URL. (Left in
/// place afterwards: a relay may still hold connections to it.)
pub async fn fresh_postgres_database(server: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("--postgres: cannot connect: {e}"))?;
    tokio::spawn(connection);
    let name = format!("relay_bench_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("--postgres: cannot create a database (the role needs CREATEDB): {e}"))?;
    let (base, _) = server
        .split('?')
        .next()
        .and_then(|s| s.rsplit_once('/'))
        .ok_or("--postgres takes a URL ending in /DATABASE")?;
    Ok(format!("{base}/{name}"))
}

/// relay on `store` at `port`, pinned like every subject; `label` names its
/// config and log in the scratch directory.
pub async fn start_relay(
    ws: &Workspace,
    label: &str,
    port: u16,
    store: &str,
    circle: std::net::SocketAddr,
    record: bool,
) -> Result<Running, String> {
    let config = ws.path(&format!("{label}.toml"));
    std::fs::write(&config, relay_config(port, store, circle, record)).map_err(|e| e.to_string())?;
    let args = vec![
        "serve".into(),
        "--log-format".into(),
        "json".into(),
        "-c".into(),
        config.display().to_string(),
    ];
    let log = ws.path(&format!("{label}.log"));
    start_pinned(&ws.relay_binary, &args, port, log, &[("RELAY_LOG", "info")]).await
}
