//! Shadow runs: for every (route, repo, sha) that triggered a shadow target,
//! the primary targets' outcomes set beside the shadow's, and whether they
//! agree: `agree`, `shadow_failed` (the primaries passed, the shadow did
//! not), `shadow_passed` (the primaries failed, the shadow passed), or
//! `pending` (something has not ended).
//!
//! Everything here reads jobs the store gives it (`Inspect::shadow_jobs`);
//! nothing here writes, sends or reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metrics::Metrics;
use crate::store::{JobState, JobView, ShadowFilter, Store, StoreError};

/// Whether a shadow run's targets agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowVerdict {
    Agree,
    ShadowFailed,
    ShadowPassed,
    Pending,
}

impl ShadowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowVerdict::Agree => "agree",
            ShadowVerdict::ShadowFailed => "shadow_failed",
            ShadowVerdict::ShadowPassed => "shadow_passed",
            ShadowVerdict::Pending => "pending",
        }
    }
}

/// One target's side of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    pub target: String,
    /// The pipeline's final state; `pending` until it has one; `dead` when
    /// the trigger never went out; `delivered` for a target that starts no
    /// pipeline it can name.
    pub state: String,
    /// The pipeline's page.
    pub url: Option<String>,
}

impl Side {
    fn of(job: &JobView) -> Side {
        let state = match (&job.pipeline, job.state) {
            (_, JobState::Dead) => "dead".to_owned(),
            (Some(p), _) if p.state.is_final() => p.state.as_str().to_owned(),
            (None, JobState::Done) => "delivered".to_owned(),
            _ => "pending".to_owned(),
        };
        Side {
            target: job.target.clone(),
            state,
            url: job.pipeline.as_ref().and_then(|p| p.url.clone()),
        }
    }

    fn ended(&self) -> bool {
        self.state != "pending"
    }

    fn passed(&self) -> bool {
        self.state == "success" || self.state == "delivered"
    }
}

/// One shadow run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    pub route: String,
    pub repo: String,
    pub sha: String,
    pub primary: Vec<Side>,
    pub shadow: Vec<Side>,
    pub verdict: ShadowVerdict,
}

/// How many runs came to each verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub agree: u64,
    pub shadow_failed: u64,
    pub shadow_passed: u64,
    pub pending: u64,
}

/// The verdict of primaries against shadows.
pub fn verdict(primary: &[Side], shadow: &[Side]) -> ShadowVerdict {
    if primary.iter().chain(shadow).any(|s| !s.ended()) {
        return ShadowVerdict::Pending;
    }
    let primary_passed = primary.iter().all(Side::passed);
    let shadow_passed = shadow.iter().all(Side::passed);
    match (primary_passed, shadow_passed) {
        (true, false) => ShadowVerdict::ShadowFailed,
        (false, true) => ShadowVerdict::ShadowPassed,
        _ => ShadowVerdict::Agree,
    }
}

/// Jobs (newest first) grouped into runs, newest run first; a target
/// triggered twice for one commit counts by its latest job.
pub fn runs(jobs: &[JobView]) -> Vec<Run> {
    let mut order: Vec<(String, String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String, String), BTreeMap<String, &JobView>> = BTreeMap::new();
    for job in jobs {
        let key = (job.route.clone(), job.repo.clone(), job.sha.clone());
        let group = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            BTreeMap::new()
        });
        // Newest first: the first job of a target is its latest.
        group.entry(job.target.clone()).or_insert(job);
    }
    order
        .into_iter()
        .filter_map(|key| {
            let group = groups.remove(&key)?;
            let (shadow, primary): (Vec<&JobView>, Vec<&JobView>) =
                group.into_values().partition(|j| j.shadow);
            let primary: Vec<Side> = primary.into_iter().map(Side::of).collect();
            let shadow: Vec<Side> = shadow.into_iter().map(Side::of).collect();
            let verdict = verdict(&primary, &shadow);
            Some(Run {
                route: key.0,
                repo: key.1,
                sha: key.2,
                primary,
                shadow,
                verdict,
            })
        })
        .collect()
}

/// The count of each verdict among `runs`.
pub fn summary(runs: &[Run]) -> Summary {
    let mut summary = Summary::default();
    for run in runs {
        *match run.verdict {
            ShadowVerdict::Agree => &mut summary.agree,
            ShadowVerdict::ShadowFailed => &mut summary.shadow_failed,
            ShadowVerdict::ShadowPassed => &mut summary.shadow_passed,
            ShadowVerdict::Pending => &mut summary.pending,
        } += 1;
    }
    summary
}

/// How far back the shadow runs go when no `since` is given.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most jobs one look at shadow runs reads.
const MAX_JOBS: usize = 10_000;

/// The shadow runs of `route` (all routes: `None`) since `since` (default:
/// [`DEFAULT_WINDOW`] before `now`), newest first.
pub async fn recent(
    store: &dyn Store,
    route: Option<String>,
    since: Option<SystemTime>,
    now: SystemTime,
) -> Result<Vec<Run>, StoreError> {
    let since = since.unwrap_or_else(|| now.checked_sub(DEFAULT_WINDOW).unwrap_or(SystemTime::UNIX_EPOCH));
    let jobs = store
        .shadow_jobs(ShadowFilter {
            route,
            commit: None,
            since,
            limit: MAX_JOBS,
        })
        .await?;
    Ok(runs(&jobs))
}

/// The verdict of the run of `route` on `repo` at `sha`, once every target
/// of it has ended; `None` while one has not (or it is no shadow run).
pub async fn final_verdict(
    store: &dyn Store,
    route: &str,
    repo: &str,
    sha: &str,
    since: SystemTime,
) -> Result<Option<ShadowVerdict>, StoreError> {
    let jobs = store
        .shadow_jobs(ShadowFilter {
            route: Some(route.to_owned()),
            commit: Some((repo.to_owned(), sha.to_owned())),
            since,
            limit: 100,
        })
        .await?;
    Ok(runs(&jobs)
        .first()
        .map(|run| run.verdict)
        .filter(|v| *v != ShadowVerdict::Pending))
}

/// Counts the verdict of the run of `route` on `repo` at `sha` if a
/// pipeline's end just completed it. Best effort: a store that cannot say
/// leaves it uncounted, with a warning.
pub async fn count_if_final(store: &dyn Store, metrics: &Metrics, route: &str, repo: &str, sha: &str) {
    match final_verdict(store, route, repo, sha, SystemTime::UNIX_EPOCH).await {
        Ok(Some(verdict)) => metrics.shadow_verdict(route, verdict.as_str()),
        Ok(None) => {}
        Err(e) => tracing::warn!(route, error = %e, "cannot read the shadow run to count its verdict"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(state: &str) -> Side {
        Side {
            target: "t".into(),
            state: state.into(),
            url: None,
        }
    }

    #[test]
    fn the_four_combinations_and_pending() {
        let v = |p: &str, s: &str| verdict(&[side(p)], &[side(s)]);
        assert_eq!(v("success", "success"), ShadowVerdict::Agree);
        assert_eq!(v("failed", "failed"), ShadowVerdict::Agree);
        assert_eq!(v("success", "failed"), ShadowVerdict::ShadowFailed);
        assert_eq!(v("failed", "success"), ShadowVerdict::ShadowPassed);
        assert_eq!(v("success", "pending"), ShadowVerdict::Pending);
        assert_eq!(v("dead", "success"), ShadowVerdict::ShadowPassed);
        assert_eq!(v("success", "canceled"), ShadowVerdict::ShadowFailed);
    }
}
