//! Catching up (DESIGN.md "Catching up"): GitHub never redelivers a failed
//! delivery, so for each source with `catch_up`, at start and every
//! `every`, relay lists the hook's recent deliveries and asks GitHub to send
//! again each one that failed and that relay holds no event for (by delivery
//! id). A redelivery carries the same `X-GitHub-Delivery`, so one that
//! arrives twice is a duplicate like any other.
//!
//! What this module must never do: decide which deliveries to ask for
//! (`targets::hooks::to_ask` does, from what GitHub lists and the store
//! holds), or stop relay: a failure is logged and tried again next time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::App;
use crate::report::status_target;
use crate::targets::hooks;

/// GitHub keeps a hook's deliveries for three days: the periodic look goes
/// that far back.
pub const KEPT: Duration = Duration::from_secs(3 * 24 * 3600);

/// One delivery relay asked GitHub to send again.
#[derive(Debug, Clone, Serialize)]
pub struct Asked {
    pub guid: String,
    /// The attempt asked for again.
    pub id: u64,
    pub event: String,
    pub delivered_at: String,
    /// What the failed attempt was answered (0: no answer).
    pub status_code: u16,
    /// Why GitHub refused to send it again, if it did.
    pub error: Option<String>,
}

/// Why catching up could not run.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(
        "source {0} has no catch_up (set sources.{0}.catch_up = {{ hook = \"repos/OWNER/REPO/hooks/ID\" }})"
    )]
    NotConfigured(String),
    #[error("listing the hook's deliveries failed: {0}")]
    List(String),
    #[error("the store cannot say which deliveries it holds: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Looks once for source `source`'s failed deliveries since `since`, and
/// asks for each again.
pub async fn once(app: &App, source: &str, since: SystemTime) -> Result<Vec<Asked>, CatchUpError> {
    let config = app.config();
    let catch_up = config
        .catch_ups
        .iter()
        .find(|c| c.source == source)
        .ok_or_else(|| CatchUpError::NotConfigured(source.to_owned()))?;
    let target = config
        .reporters
        .get(&status_target(source))
        .ok_or_else(|| CatchUpError::NotConfigured(source.to_owned()))?;
    let outbound = app
        .sends
        .outbound(&target.proxy)
        .map_err(|e| CatchUpError::List(crate::targets::outcome::transport_detail(&e)))?;
    let timeout = config.delivery.timeout;
    let deliveries = target
        .deliveries(&outbound, &catch_up.hook, since, timeout)
        .await
        .map_err(CatchUpError::List)?;
    let mut guids: Vec<String> = deliveries.iter().map(|d| d.guid.clone()).collect();
    guids.sort();
    guids.dedup();
    let held = app.store.held_deliveries(source, guids).await?;
    let mut asked = Vec::new();
    for delivery in hooks::to_ask(&deliveries, &held, since) {
        let error = target
            .redeliver(&outbound, &catch_up.hook, delivery.id, timeout)
            .await
            .err();
        match &error {
            None => info!(
                source,
                delivery = %delivery.guid,
                attempt = delivery.id,
                event = %delivery.event,
                status = delivery.status_code,
                "asked GitHub to redeliver a delivery relay never received"
            ),
            Some(e) => warn!(source, delivery = %delivery.guid, error = %e, "GitHub refused to redeliver"),
        }
        asked.push(Asked {
            guid: delivery.guid,
            id: delivery.id,
            event: delivery.event,
            delivered_at: delivery.delivered_at,
            status_code: delivery.status_code,
            error,
        });
    }
    Ok(asked)
}

/// Catches up for every source with `catch_up`: at start, then each every
/// its `every`, until `shutdown`.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut next: HashMap<String, SystemTime> = HashMap::new();
    while !shutdown.is_cancelled() {
        let config = app.config();
        let now = app.now();
        let mut wait = Duration::from_secs(60);
        for catch_up in &config.catch_ups {
            let due = *next.entry(catch_up.source.clone()).or_insert(now);
            if due <= now {
                let since = now.checked_sub(KEPT).unwrap_or(SystemTime::UNIX_EPOCH);
                match once(&app, &catch_up.source, since).await {
                    Ok(asked) if !asked.is_empty() => {
                        info!(source = %catch_up.source, asked = asked.len(), "caught up on failed deliveries")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(source = %catch_up.source, error = %e, "cannot catch up; will try again"),
                }
                next.insert(catch_up.source.clone(), app.now() + catch_up.every);
                wait = wait.min(catch_up.every);
            } else {
                wait = wait.min(due.duration_since(now).unwrap_or_default());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }
}
