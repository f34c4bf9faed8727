//! GitHub's hook deliveries API (PROTOCOLS.md E), for catching up on what
//! failed while relay was away: a GitHub source's `catch_up = { hook, every
//! }`, listing a hook's recent deliveries, choosing those to ask for again,
//! and asking (`POST …/deliveries/{id}/attempts`).
//!
//! It goes through the source's `api` (the `status:<source>` target's URL
//! and token). A `Link` header's next page is followed only under that URL.
//! Which deliveries relay already holds is the caller's to say (the store);
//! nothing here touches the store or decides when to run.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Kind, Outbound, Target, USER_AGENT, response_message};
use crate::config::compiler::Compiler;
use crate::config::raw::RawCatchUp;

/// How often to look when `every` is not set.
const DEFAULT_EVERY: Duration = Duration::from_secs(5 * 60);

/// A delivery that still fails is asked for again at most this many times.
pub const MAX_ASKS: usize = 3;

/// The most pages of deliveries one look reads (100 each).
const MAX_PAGES: usize = 10;

/// A source's `catch_up`, compiled.
#[derive(Debug, Clone)]
pub struct CatchUp {
    pub source: String,
    /// `repos/OWNER/REPO/hooks/ID` or `orgs/ORG/hooks/ID`, checked.
    pub hook: String,
    pub every: Duration,
}

impl CatchUp {
    pub fn compile(
        key: &str,
        source: &str,
        raw: &RawCatchUp,
        has_api: bool,
        c: &mut Compiler,
    ) -> Option<CatchUp> {
        if !has_api {
            c.problem(
                key,
                "needs api = { token = … } on the source: a token with \"Webhooks: read and write\" on the repository",
            );
            return None;
        }
        let segment = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let parts: Vec<&str> = raw.hook.trim_matches('/').split('/').collect();
        let valid = match parts.as_slice() {
            ["repos", owner, repo, "hooks", id] => {
                segment(owner) && segment(repo) && id.bytes().all(|b| b.is_ascii_digit())
            }
            ["orgs", org, "hooks", id] => {
                segment(org) && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
            }
            _ => false,
        };
        if !valid {
            c.problem(
                format!("{key}.hook"),
                "must be repos/OWNER/REPO/hooks/ID or orgs/ORG/hooks/ID (the hook's id is in its settings page's URL)",
            );
            return None;
        }
        let every = raw.every.unwrap_or(DEFAULT_EVERY);
        if every < Duration::from_secs(1) {
            c.problem(format!("{key}.every"), "must be at least 1s");
        }
        Some(CatchUp {
            source: source.to_owned(),
            hook: parts.join("/"),
            every,
        })
    }
}

/// One delivery attempt, as GitHub lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Delivery {
    pub id: u64,
    pub guid: String,
    pub delivered_at: String,
    #[serde(default)]
    pub redelivery: bool,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub event: String,
}

impl Delivery {
    fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code)
    }

    fn at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.delivered_at).ok()
    }
}

/// The deliveries to ask for again, one per delivery id (`guid`), its
/// latest attempt: none of its attempts succeeded, relay holds no event for
/// it (`held`), it was first sent at or after `since`, and it was asked for
/// fewer than [`MAX_ASKS`] times.
pub fn to_ask(deliveries: &[Delivery], held: &[String], since: SystemTime) -> Vec<Delivery> {
    let mut by_guid: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in deliveries {
        by_guid.entry(d.guid.as_str()).or_default().push(d);
    }
    let mut ask: Vec<Delivery> = by_guid
        .into_iter()
        .filter(|(guid, attempts)| {
            !held.iter().any(|h| h == guid)
                && !attempts.iter().any(|d| d.succeeded())
                && attempts.iter().filter(|d| d.redelivery).count() < MAX_ASKS
                && attempts
                    .iter()
                    .filter(|d| !d.redelivery)
                    .all(|d| d.at().is_some_and(|at| at >= since))
        })
        .filter_map(|(_, attempts)| attempts.into_iter().max_by_key(|d| d.id).cloned())
        .collect();
    ask.sort_by_key(|d| d.id);
    ask
}

impl Target {
    /// A hook's deliveries since `since`, newest first, page by page.
    pub async fn deliveries(
        &self,
        outbound: &Outbound,
        hook: &str,
        since: SystemTime,
        timeout: Duration,
    ) -> Result<Vec<Delivery>, String> {
        let base = self.api_url()?;
        let mut url = format!("{base}/{hook}/deliveries?per_page=100");
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let response = self
                .api_request(outbound, reqwest::Method::GET, &url, timeout)
                .await?;
            let next = next_link(response.headers()).filter(|next| next.starts_with(&format!("{base}/")));
            let status = response.status().as_u16();
            let body = super::exchange::read_limited(response).await;
            if !(200..300).contains(&status) {
                return Err(self.scrub(format!(
                    "{status}: {}{}",
                    response_message(&body),
                    hooks_advice(status)
                )));
            }
            let page: Vec<Delivery> = serde_json::from_slice(&body)
                .map_err(|e| format!("the answer is not GitHub's delivery list: {e}"))?;
            let older = page.iter().any(|d| d.at().is_some_and(|at| at < since));
            all.extend(page);
            match next {
                Some(next) if !older => url = next,
                _ => break,
            }
        }
        Ok(all)
    }

    /// Asks GitHub to send delivery `id` of `hook` again.
    pub async fn redeliver(
        &self,
        outbound: &Outbound,
        hook: &str,
        id: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let url = format!("{}/{hook}/deliveries/{id}/attempts", self.api_url()?);
        let response = self
            .api_request(outbound, reqwest::Method::POST, &url, timeout)
            .await?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = super::exchange::read_limited(response).await;
        Err(self.scrub(format!(
            "{status}: {}{}",
            response_message(&body),
            hooks_advice(status)
        )))
    }

    fn api_url(&self) -> Result<&str, String> {
        match &self.kind {
            Kind::Status(api) => Ok(api.url()),
            _ => Err(format!("target {} is not a Git host's API", self.name)),
        }
    }

    async fn api_request(
        &self,
        outbound: &Outbound,
        method: reqwest::Method,
        url: &str,
        timeout: Duration,
    ) -> Result<reqwest::Response, String> {
        let token = self
            .credential()
            .ok_or_else(|| format!("{} has no api token", self.name))?;
        outbound
            .client
            .request(method, url)
            .timeout(timeout)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .header("User-Agent", USER_AGENT)
            .bearer_auth(String::from_utf8_lossy(token.expose()))
            .send()
            .await
            .map_err(|e| {
                let via = outbound.proxy_for(url);
                self.scrub(super::outcome::of_transport_error(&e, timeout, via.as_deref()).1)
            })
    }
}

fn hooks_advice(status: u16) -> &'static str {
    match status {
        401 | 403 | 404 => {
            "; the api token needs \"Webhooks: read and write\" on the repository (classic tokens: admin:repo_hook), or the hook is wrong"
        }
        _ => "",
    }
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.split(';').any(|p| p.trim() == "rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64, guid: &str, redelivery: bool, status_code: u16, at: &str) -> Delivery {
        Delivery {
            id,
            guid: guid.into(),
            delivered_at: at.into(),
            redelivery,
            status_code,
            event: "push".into(),
        }
    }

    #[test]
    fn only_failed_unheld_recent_deliveries_are_asked_for_and_at_most_three_times() {
        let since = humantime::parse_rfc3339("2026-12-04T00:00:00Z").unwrap();
        let t = "2026-12-04T10:00:00Z";
        let list = [
            d(1, "ok", false, 200, t),
            d(2, "failed", false, 502, t),
            d(3, "held", false, 0, t),
            d(4, "old", false, 502, "2026-12-03T10:00:00Z"),
            d(5, "retried-ok", false, 502, t),
            d(6, "retried-ok", true, 202, t),
            d(7, "thrice", false, 502, t),
            d(8, "thrice", true, 502, t),
            d(9, "thrice", true, 502, t),
            d(10, "thrice", true, 502, t),
            d(11, "twice", false, 502, t),
            d(12, "twice", true, 503, t),
            d(13, "twice", true, 503, t),
        ];
        let ask = to_ask(&list, &["held".to_owned()], since);
        let asked: Vec<(u64, &str)> = ask.iter().map(|d| (d.id, d.guid.as_str())).collect();
        assert_eq!(asked, [(2, "failed"), (13, "twice")]);
    }
}
