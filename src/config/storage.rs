//! `[store]`, compiled: which store relay opens (an SQLite file under the
//! state directory, or a PostgreSQL URL with its password from a secret
//! reference), and how long finished events are kept. Never connects: the
//! store opens what this describes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::compiler::Compiler;
use super::raw;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(Box<PostgresSettings>),
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreLocation::Postgres(pg) => f.write_str(&pg.shown),
        }
    }
}

/// How to reach the shared PostgreSQL store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// Parsed from `store.url`, with `store.password` applied. Its `Debug`
    /// hides the password.
    pub connect: tokio_postgres::Config,
    /// The URL with any password masked: safe for logs and `relay check`.
    pub shown: String,
    pub pool_size: usize,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub location: StoreLocation,
    pub retention: Duration,
}

pub(super) fn compile_store(raw: raw::RawStore, c: &mut Compiler) -> StoreSettings {
    let location = if let Some(path) = raw.url.strip_prefix("sqlite://") {
        if path.is_empty() {
            c.problem("store.url", "sqlite:// needs a file path, like sqlite://relay.db");
        }
        for (key, set) in [
            ("password", raw.password.is_some()),
            ("ca_file", raw.ca_file.is_some()),
        ] {
            if set {
                c.problem(format!("store.{key}"), "applies only to a postgres:// store");
            }
        }
        StoreLocation::Sqlite(state_path(Path::new(path)))
    } else if raw.url.starts_with("postgres://") || raw.url.starts_with("postgresql://") {
        StoreLocation::Postgres(Box::new(compile_postgres(&raw, c)))
    } else {
        c.problem(
            "store.url",
            "must start with sqlite:// (embedded) or postgres:// (shared)",
        );
        StoreLocation::Sqlite(PathBuf::new())
    };
    StoreSettings {
        location,
        retention: raw.retention,
    }
}

fn compile_postgres(raw: &raw::RawStore, c: &mut Compiler) -> PostgresSettings {
    let shown = mask_password(&raw.url);
    let mut connect = match raw.url.parse::<tokio_postgres::Config>() {
        Ok(connect) => connect,
        Err(e) => {
            // The parser's detail names the option, never the password.
            let detail = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            c.problem(
                "store.url",
                format!("is not a PostgreSQL URL ({detail}): {shown}"),
            );
            tokio_postgres::Config::new()
        }
    };
    if let Some(spec) = &raw.password {
        if connect.get_password().is_some() {
            c.problem(
                "store.password",
                "is set, and store.url carries a password too; keep one (the secret reference)",
            );
        }
        if let Some(secret) = c.secret("store.password", spec) {
            connect.password(secret.expose());
        }
    } else if connect.get_password().is_some() {
        c.warn(
            "store.url carries the database password; prefer store.password = { env = \"…\" } or { file = \"…\" }"
                .to_owned(),
        );
    }
    if raw.pool_size == 0 {
        c.problem("store.pool_size", "must be at least 1");
    }
    if let Some(path) = &raw.ca_file
        && let Err(e) = std::fs::metadata(path)
    {
        c.problem("store.ca_file", format!("cannot read {}: {e}", path.display()));
    }
    connect.application_name("relay");
    PostgresSettings {
        connect,
        shown,
        pool_size: raw.pool_size.max(1),
        ca_file: raw.ca_file.clone(),
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// A relative store path lives in systemd's `$STATE_DIRECTORY` when relay
/// runs with `StateDirectory=`, else in the working directory.
fn state_path(path: &Path) -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        Some(dirs) if path.is_relative() => {
            // Several StateDirectory= entries arrive colon-separated; the first is ours.
            let first = dirs
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            Path::new(&first).join(path)
        }
        _ => path.to_owned(),
    }
}
