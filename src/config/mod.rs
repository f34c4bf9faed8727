//! Configuration: `relay.toml` plus `RELAY_SECTION__KEY` environment overrides,
//! loaded with figment, then validated and compiled into a [`Config`].
//!
//! Two stages: `raw` mirrors the file; [`Config`] is built from it here by
//! resolving secrets, compiling globs and templates (in the modules that own
//! them) and checking cross-references. Every problem names its key and the
//! file. Nothing here touches the network or the store.

pub mod compiler;
pub mod raw;
mod server;
mod storage;
mod tls;

pub use server::{Server, Tls};
pub use storage::{PostgresSettings, StoreLocation, StoreSettings};

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;

use crate::secret::Secret;

use crate::event::Files;
use crate::guard::LoopGuard;
use crate::ingress::Source;
use crate::routing::{Declared, Route, RouteIndex, Router};
use crate::targets::Target;
use crate::targets::hooks::CatchUp;
use crate::template::Templates;
use compiler::{Compiler, Problem};

/// A validated, compiled configuration. Immutable once built; a reload builds
/// a new one.
#[derive(Debug)]
pub struct Config {
    /// Where it was read from, for messages.
    pub file: String,
    pub server: Server,
    pub admin: Option<Admin>,
    pub store: StoreSettings,
    pub delivery: Delivery,
    pub loop_guard: LoopGuard,
    pub sources: Vec<Source>,
    pub routes: Vec<Route>,
    /// `routes` indexed by source, event kind and literal repository, built
    /// once here so that a webhook asks only the routes that can take it.
    pub route_index: RouteIndex,
    pub targets: BTreeMap<String, Target>,
    /// The targets that post commit statuses, one per source with an `api`,
    /// by name (`status:<source>`); never named in a route's `to`.
    pub reporters: BTreeMap<String, Target>,
    /// The GitHub sources whose failed deliveries relay asks for again.
    pub catch_ups: Vec<CatchUp>,
    /// Every template and `when` of the routes and targets, compiled.
    pub templates: Templates,
    /// Things that work but deserve a look (literal secrets); logged at start.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivery {
    pub timeout: Duration,
    pub attempts: u32,
    pub backoff: Backoff,
    pub concurrency: usize,
    pub maybe_delivered_retries: u32,
    pub throttle_floor: Duration,
    /// How long a claim on a job lasts: one whole attempt and its
    /// recording, so only a relay that died (or stalled) loses its jobs.
    pub lease: Duration,
}

/// The config cannot be used. Lists every problem found, each with its key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] if one.key.is_empty() => write!(f, "{}: {}", self.file, one.message),
            [one] => write!(f, "{}: {}: {}", self.file, one.key, one.message),
            many => {
                write!(f, "{}: {} problems", self.file, many.len())?;
                for p in many {
                    if p.key.is_empty() {
                        write!(f, "\n  {}", p.message)?;
                    } else {
                        write!(f, "\n  {}: {}", p.key, p.message)?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl Config {
    /// What routing reads of this config.
    pub fn router(&self) -> Router<'_> {
        Router {
            routes: &self.routes,
            targets: &self.targets,
            reporters: &self.reporters,
            templates: &self.templates,
            loop_guard: &self.loop_guard,
            payload_urls: self.server.payload.as_ref(),
            index: &self.route_index,
        }
    }

    /// Whether parsers must read the files pushes changed (see [`Files`]).
    pub fn files(&self) -> Files {
        if self.routes.iter().any(Route::filters_paths) || self.templates.reads("paths") {
            Files::Read
        } else {
            Files::Skip
        }
    }

    /// Reads `path`, then applies `RELAY_SECTION__KEY` environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        if let Err(e) = std::fs::metadata(path) {
            return Err(ConfigError {
                file,
                problems: vec![Problem {
                    key: String::new(),
                    message: format!("cannot read the config file: {e}"),
                }],
            });
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env_overrides());
        Config::from_figment(&figment, file)
    }

    /// Builds a config from TOML text alone (no environment); for tests and tools.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_figment(&Figment::from(Toml::string(text)), "<inline config>".to_owned())
    }

    fn from_figment(figment: &Figment, file: String) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.clone(),
            problems,
        };
        figment
            .extract::<raw::Sections>()
            .map_err(|e| fail(figment_problems(e, None)))?;
        let mut c = Compiler::default();
        let server: raw::RawServer = section(figment, "server", &mut c);
        let admin: Option<raw::RawAdmin> = optional_section(figment, "admin", &mut c);
        let store: raw::RawStore = section(figment, "store", &mut c);
        let delivery: raw::RawDelivery = section(figment, "delivery", &mut c);
        let loop_guard: raw::RawLoopGuard = section(figment, "loop_guard", &mut c);
        let raw_sources = named_tables::<raw::RawSource>(figment, "sources", &mut c);
        let raw_targets = named_tables::<raw::RawTarget>(figment, "targets", &mut c);
        let raw_routes: Vec<raw::RawRoute> = section(figment, "routes", &mut c);
        if c.problem_count() > 0 {
            return Err(fail(c.problems));
        }

        let mut server = server::compile(server, &mut c);
        let admin = admin.map(|a| Admin {
            listen: a.listen,
            token: a.token.and_then(|t| c.secret("admin.token", &t)),
        });
        let store = storage::compile_store(store, &mut c);
        let delivery = compile_delivery(delivery, &mut c);
        let loop_guard = LoopGuard {
            dedupe_window: loop_guard.dedupe_window,
            max_hops: loop_guard.max_hops,
            hop_variable: loop_guard.hop_variable,
            burst: c.burst("loop_guard.burst", loop_guard.burst),
        };

        let declared = Declared {
            sources: raw_sources.iter().map(|(name, _)| name.clone()).collect(),
            targets: raw_targets.iter().map(|(name, _)| name.clone()).collect(),
            reporting: raw_sources
                .iter()
                .filter(|(_, raw)| raw.api.is_some())
                .map(|(name, _)| name.clone())
                .collect(),
        };
        let mut sources = Vec::new();
        let mut reporters = BTreeMap::new();
        let mut catch_ups = Vec::new();
        let mut paths = HashSet::new();
        for (name, mut raw) in raw_sources {
            if let Some(catch_up) = raw.catch_up.take() {
                let key = format!("sources.{name}.catch_up");
                if raw.provider != crate::event::Provider::Github {
                    c.problem(&key, "only GitHub lists and redelivers a hook's deliveries");
                } else if let Some(catch_up) =
                    CatchUp::compile(&key, &name, &catch_up, raw.api.is_some(), &mut c)
                {
                    catch_ups.push(catch_up);
                }
            }
            if let Some(api) = raw.api.take()
                && let Some(reporter) = Target::status(&name, raw.provider, &api, &mut c)
            {
                reporters.insert(reporter.name.clone(), reporter);
            }
            if !paths.insert(raw.path.clone()) {
                c.problem(
                    format!("sources.{name}.path"),
                    format!("{} is already the path of another source", raw.path),
                );
            }
            if let Some(source) = Source::compile(&name, raw, &mut c) {
                sources.push(source);
            }
        }
        server.unlimited_peers = sources
            .iter()
            .flat_map(|s| s.trusted_proxies())
            .copied()
            .collect();
        let mut targets = BTreeMap::new();
        for (name, raw) in raw_targets {
            if name.starts_with(crate::report::STATUS_TARGET_PREFIX) {
                c.problem(
                    format!("targets.{name}"),
                    "names starting with \"status:\" are relay's own: they post commit statuses",
                );
            }
            if let Some(target) = Target::compile(&name, raw, &mut c) {
                targets.insert(name, target);
            }
        }
        for (name, target) in &targets {
            if !target.uses_payload_urls() {
                continue;
            }
            match &server.payload {
                None => c.problem(
                    format!("targets.{name}.payload_parameter"),
                    "needs server.public_url (how CI jobs reach relay) and server.payload_key (which signs the URLs)",
                ),
                Some(p) if p.ttl > store.retention => c.problem(
                    "server.payload_ttl",
                    format!(
                        "is longer than store.retention ({}): the body would be purged while its URL is still valid",
                        humantime::format_duration(store.retention)
                    ),
                ),
                Some(_) => {}
            }
        }
        let mut routes: Vec<Route> = Vec::new();
        for (index, raw) in raw_routes.into_iter().enumerate() {
            if routes.iter().any(|r| r.name == raw.name) {
                c.problem(
                    format!("routes[{index}].name"),
                    format!("route name {:?} is used twice", raw.name),
                );
            }
            if let Some(route) = Route::compile(index, raw, &declared, &mut c) {
                routes.push(route);
            }
        }
        if c.problem_count() > 0 {
            return Err(fail(c.problems));
        }
        Ok(Config {
            file,
            server,
            admin,
            store,
            delivery,
            loop_guard,
            sources,
            route_index: RouteIndex::new(&routes),
            routes,
            targets,
            reporters,
            catch_ups,
            templates: c.templates,
            warnings: c.warnings,
        })
    }

    /// The source that owns an ingress path.
    pub fn source_for_path(&self, path: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.path == path)
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Whether `route` sends to a shadow target: its runs are compared.
    pub fn route_has_shadow(&self, route: &str) -> bool {
        self.routes
            .iter()
            .find(|r| r.name == route)
            .is_some_and(|r| r.to.iter().any(|t| self.targets.get(t).is_some_and(|t| t.shadow)))
    }

    /// A target jobs can name: a configured one, or a source's status poster.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.get(name).or_else(|| self.reporters.get(name))
    }

    /// Every target jobs can name, configured ones first.
    pub fn job_targets(&self) -> impl Iterator<Item = (&String, &Target)> {
        self.targets.iter().chain(self.reporters.iter())
    }
}

/// `RELAY_SERVER__LISTEN=…` overrides `server.listen`. Variables without a
/// `__` (such as a secret named `RELAY_ADMIN_TOKEN`) are not config keys.
fn env_overrides() -> Env {
    Env::prefixed("RELAY_").filter_map(|key| {
        key.as_str()
            .contains("__")
            .then(|| key.as_str().replace("__", ".").into())
    })
}

fn section<T: DeserializeOwned + Default>(figment: &Figment, key: &str, c: &mut Compiler) -> T {
    optional_section(figment, key, c).unwrap_or_default()
}

fn optional_section<T: DeserializeOwned>(figment: &Figment, key: &str, c: &mut Compiler) -> Option<T> {
    if !figment.contains(key) {
        return None;
    }
    match figment.extract_inner::<T>(key) {
        Ok(value) => Some(value),
        Err(e) => {
            c.problems.extend(figment_problems(e, Some(key)));
            None
        }
    }
}

/// Reads `[sources.*]` or `[targets.*]` one table at a time, so each error
/// carries its full key path.
fn named_tables<T: DeserializeOwned>(figment: &Figment, key: &str, c: &mut Compiler) -> Vec<(String, T)> {
    let Ok(value) = figment.find_value(key) else {
        return Vec::new();
    };
    let Some(dict) = value.into_dict() else {
        c.problem(key, "must be a table of named entries, like [sources.github]");
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in dict.keys() {
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            c.problem(
                format!("{key}.{name}"),
                "names may use letters, digits, '-' and '_' only",
            );
            continue;
        }
        if let Some(entry) = optional_section::<T>(figment, &format!("{key}.{name}"), c) {
            out.push((name.clone(), entry));
        }
    }
    out
}

/// figment's errors, one problem each, keyed the way the user wrote them
/// (`server.listen`, or `RELAY_SERVER__LISTEN` for the environment).
/// `prefix` is the key passed to `extract_inner`, which figment appends to
/// the end of the inner path; it is moved back to the front here.
fn figment_problems(error: figment::Error, prefix: Option<&str>) -> Vec<Problem> {
    let prefix: Vec<&str> = prefix.map(|p| p.split('.').collect()).unwrap_or_default();
    error
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            if !prefix.is_empty() && path.iter().rev().zip(prefix.iter().rev()).all(|(a, b)| a == b) {
                path.rotate_right(prefix.len());
            }
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|md| md.name.contains("environment"));
            let key = if from_env && !path.is_empty() {
                format!("RELAY_{}", path.join("__").to_ascii_uppercase())
            } else {
                dotted_key(&path)
            };
            Problem {
                key,
                message: e.kind.to_string(),
            }
        })
        .collect()
}

/// `["routes", "0", "to"]` → `routes[0].to`, the way relay's own messages
/// write keys.
fn dotted_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// The shortest `delivery.lease`: renewals every third of it must still
/// leave a database round trip room.
const MIN_LEASE: Duration = Duration::from_secs(1);

fn compile_delivery(raw: raw::RawDelivery, c: &mut Compiler) -> Delivery {
    if raw.attempts == 0 {
        c.problem("delivery.attempts", "must be at least 1");
    }
    if raw.concurrency == 0 {
        c.problem("delivery.concurrency", "must be at least 1");
    }
    if raw.timeout.is_zero() {
        c.problem("delivery.timeout", "must be longer than 0s");
    }
    if !(raw.backoff.factor >= 1.0 && raw.backoff.factor.is_finite()) {
        c.problem("delivery.backoff.factor", "must be a number of at least 1.0");
    }
    if raw.backoff.first > raw.backoff.max {
        c.problem(
            "delivery.backoff.first",
            "must not be longer than delivery.backoff.max",
        );
    }
    // A sending relay renews its leases every third of the lease, so the
    // lease only bounds how long a dead relay's jobs wait for another; the
    // default leaves room for a whole attempt even between renewals.
    let lease = raw.lease.unwrap_or(raw.timeout * 2 + Duration::from_secs(30));
    if lease < MIN_LEASE {
        c.problem(
            "delivery.lease",
            format!(
                "must be at least {}: a relay renews the leases of its sends every third of it",
                humantime::format_duration(MIN_LEASE)
            ),
        );
    }
    Delivery {
        lease,
        timeout: raw.timeout,
        attempts: raw.attempts,
        backoff: Backoff {
            first: raw.backoff.first,
            max: raw.backoff.max,
            factor: raw.backoff.factor,
        },
        concurrency: raw.concurrency,
        maybe_delivered_retries: raw.maybe_delivered_retries,
        throttle_floor: raw.throttle_floor,
    }
}
