//! Following a pipeline by polling its CI (PROTOCOLS.md F), for targets with
//! `follow`: the settings (whose token reads the pipeline, the backoff, the
//! deadline), and one poll's exchange: the GET, its credential, and what
//! the answer says, in three kinds ([`PollAnswer`]).
//!
//! A poll's URL is made from the target's configured base URL and the
//! pipeline id the CI's own answer gave (checked for shape), never from a
//! webhook. No redirect is followed; what the CI answered is scrubbed of
//! the token before it is kept. Nothing here decides when to poll or
//! touches the store: the follower does.

use std::time::Duration;

use bytes::Bytes;

use super::exchange::read_limited;
use super::{
    Kind, Outbound, Target, USER_AGENT, circleci, circleci_answers, gitlab, outcome, response_message,
};
use crate::config::compiler::Compiler;
use crate::config::raw::RawFollow;
use crate::pipeline::PipelineState;
use crate::secret::Secret;

/// The pace PROTOCOLS.md F suggests: 10 s doubling to 5 min, for a day.
const DEFAULT_FIRST: Duration = Duration::from_secs(10);
const DEFAULT_MAX: Duration = Duration::from_secs(5 * 60);
const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_CONCURRENCY: usize = 4;

/// `follow` on a target, compiled.
#[derive(Debug)]
pub struct Follow {
    /// The token that reads the pipeline; `None`: the trigger's own.
    token: Option<Secret>,
    /// The wait before the first poll; each next wait doubles, up to `max`.
    pub first: Duration,
    pub max: Duration,
    /// How long after the trigger polling gives up.
    pub deadline: Duration,
    /// Polls of this target in flight at once.
    pub concurrency: usize,
}

/// Whose token reads a kind's pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// The trigger's token reads them too (CircleCI's personal API token).
    TriggerToken,
    /// Only a token of its own (GitLab: a trigger token cannot read).
    OwnToken { hint: &'static str },
}

impl Follow {
    /// `follow` at `key`; `None` when it is absent, `false`, or wrong (then
    /// a problem is reported).
    pub(super) fn compile(
        key: &str,
        raw: Option<&RawFollow>,
        reader: Reader,
        c: &mut Compiler,
    ) -> Option<Follow> {
        let table = match raw? {
            RawFollow::Switch(false) => return None,
            RawFollow::Switch(true) => None,
            RawFollow::Table(table) => Some(table),
        };
        let token = match table.and_then(|t| t.token.as_ref()) {
            Some(spec) => c.secret(&format!("{key}.token"), spec),
            None => {
                if let Reader::OwnToken { hint } = reader {
                    c.problem(format!("{key}.token"), format!("is required to follow: {hint}"));
                    return None;
                }
                None
            }
        };
        let first = table.and_then(|t| t.first).unwrap_or(DEFAULT_FIRST);
        let max = table.and_then(|t| t.max).unwrap_or(DEFAULT_MAX);
        let deadline = table.and_then(|t| t.deadline).unwrap_or(DEFAULT_DEADLINE);
        let concurrency = table.and_then(|t| t.concurrency).unwrap_or(DEFAULT_CONCURRENCY);
        if first.is_zero() {
            c.problem(format!("{key}.first"), "must be longer than 0s");
        }
        if max < first {
            c.problem(format!("{key}.max"), "must be at least first");
        }
        if deadline < first {
            c.problem(format!("{key}.deadline"), "must be at least first");
        }
        if concurrency == 0 {
            c.problem(format!("{key}.concurrency"), "must be at least 1");
        }
        Some(Follow {
            token,
            first,
            max,
            deadline,
            concurrency,
        })
    }

    /// The wait after poll number `polls` (1 for the first): `first`
    /// doubled that many times, at most `max`.
    pub fn wait_after(&self, polls: u32) -> Duration {
        let factor = 2u32.saturating_pow(polls.min(30));
        self.first.saturating_mul(factor).min(self.max)
    }

    pub(super) fn token(&self) -> Option<&Secret> {
        self.token.as_ref()
    }
}

/// What one poll says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    /// The pipeline's state, in relay's words.
    State(PipelineState),
    /// No answer to go by this time (a transport error, a 5xx or 429, an
    /// answer that does not read): poll again later.
    Retry(String),
    /// The CI refused, and asking again will not help (a token that cannot
    /// read the pipeline, a pipeline it does not know): why, and what to do.
    Refused(String),
}

/// The most pages of workflows one poll reads (CircleCI pages by 20; a
/// pipeline with more workflows than this is read again next time).
const MAX_WORKFLOW_PAGES: usize = 5;

/// One GET of a poll: its URL and the header its token goes in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PollRequest {
    pub url: String,
    pub token_header: &'static str,
}

impl Target {
    /// Asks the CI how the pipeline `pipeline_id` stands; `request_url` is
    /// the trigger's URL as it was sent (where a GitLab trigger named its
    /// project).
    pub async fn poll(
        &self,
        outbound: &Outbound,
        pipeline_id: &str,
        request_url: &str,
        timeout: Duration,
    ) -> PollAnswer {
        let answer = match &self.kind {
            Kind::CircleCi(t) => self.poll_circleci(t, outbound, pipeline_id, timeout).await,
            Kind::Gitlab(t) => match t.poll_url(request_url, pipeline_id) {
                Ok(url) => {
                    let request = PollRequest {
                        url,
                        token_header: "PRIVATE-TOKEN",
                    };
                    match self.get(outbound, &request, timeout).await {
                        Ok(body) => {
                            gitlab::read_poll(&body).map_or_else(PollAnswer::Retry, PollAnswer::State)
                        }
                        Err(answer) => answer,
                    }
                }
                Err(why) => PollAnswer::Refused(why),
            },
            Kind::CircleCiV1(_) | Kind::Http(_) | Kind::Status(_) => {
                PollAnswer::Refused(format!("a {} target cannot be followed", self.kind_name()))
            }
        };
        match answer {
            PollAnswer::Retry(why) => PollAnswer::Retry(self.scrub(why)),
            PollAnswer::Refused(why) => PollAnswer::Refused(self.scrub(why)),
            state => state,
        }
    }

    /// A CircleCI pipeline's state from its workflows, page by page; with
    /// none yet, from the pipeline itself.
    async fn poll_circleci(
        &self,
        t: &circleci::CircleCi,
        outbound: &Outbound,
        pipeline_id: &str,
        timeout: Duration,
    ) -> PollAnswer {
        let mut workflows = Vec::new();
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_WORKFLOW_PAGES {
            let url = match t.workflows_url(pipeline_id, page_token.as_deref()) {
                Ok(url) => url,
                Err(why) => return PollAnswer::Refused(why),
            };
            let request = PollRequest {
                url,
                token_header: circleci::TOKEN_HEADER,
            };
            let page = match self.get(outbound, &request, timeout).await {
                Ok(body) => circleci_answers::read_workflow_page(&body),
                Err(answer) => return answer,
            };
            let (items, next) = match page {
                Ok(page) => page,
                Err(why) => return PollAnswer::Retry(why),
            };
            workflows.extend(items);
            page_token = next;
            if page_token.is_some() {
                continue;
            }
            if let Some(state) = circleci_answers::workflows_state(&workflows) {
                return PollAnswer::State(state);
            }
            let request = match t.pipeline_url(pipeline_id) {
                Ok(url) => PollRequest {
                    url,
                    token_header: circleci::TOKEN_HEADER,
                },
                Err(why) => return PollAnswer::Refused(why),
            };
            return match self.get(outbound, &request, timeout).await {
                Ok(body) => circleci_answers::read_pipeline_state(&body)
                    .map_or_else(PollAnswer::Retry, PollAnswer::State),
                Err(answer) => answer,
            };
        }
        PollAnswer::Retry(format!(
            "the pipeline has more than {MAX_WORKFLOW_PAGES} pages of workflows"
        ))
    }

    /// The follow token if there is one, else the trigger's.
    fn poll_token(&self) -> Option<&Secret> {
        self.follow
            .as_ref()
            .and_then(Follow::token)
            .or_else(|| self.credential())
    }

    /// One GET with the poll's token: the answer's body when it is a 2xx,
    /// else what that means for polling.
    async fn get(
        &self,
        outbound: &Outbound,
        request: &PollRequest,
        timeout: Duration,
    ) -> Result<Bytes, PollAnswer> {
        let Some(token) = self.poll_token() else {
            return Err(PollAnswer::Refused(format!(
                "target {} has no token to read its pipelines with",
                self.name
            )));
        };
        let sending = outbound
            .client
            .get(&request.url)
            .timeout(timeout)
            .header("Accept", "application/json")
            .header("User-Agent", USER_AGENT)
            .header(
                request.token_header,
                String::from_utf8_lossy(token.expose()).into_owned(),
            );
        let response = match sending.send().await {
            Ok(response) => response,
            Err(e) => {
                let via = outbound.proxy_for(&request.url);
                let (_, message) = outcome::of_transport_error(&e, timeout, via.as_deref());
                return Err(PollAnswer::Retry(message));
            }
        };
        let status = response.status().as_u16();
        let body = read_limited(response).await;
        match status {
            200..=299 => Ok(body),
            401 | 403 | 404 => Err(PollAnswer::Refused(format!(
                "{status}: {}; {}",
                response_message(&body),
                self.poll_advice(status)
            ))),
            429 | 500..=599 => Err(PollAnswer::Retry(format!(
                "{status}: {}",
                response_message(&body)
            ))),
            _ => Err(PollAnswer::Refused(format!(
                "{status}: {}",
                response_message(&body)
            ))),
        }
    }

    /// What a refused poll means for this kind (PROTOCOLS.md F).
    fn poll_advice(&self, status: u16) -> &'static str {
        match (&self.kind, status) {
            (Kind::Gitlab(_), 401) => "the follow token is invalid or has expired",
            (Kind::Gitlab(_), 403) => {
                "the follow token cannot read pipelines: it needs the read_api scope (a trigger token cannot read)"
            }
            (Kind::Gitlab(_), _) => {
                "GitLab shows this token no such pipeline: it needs read_api and access to the project"
            }
            (_, 404) => {
                "CircleCI shows this token no such pipeline: following needs a personal API token with access to the project (set follow = { token = … } if the trigger's cannot read)"
            }
            _ => {
                "CircleCI refused the token: following needs a personal API token (set follow = { token = … } if the trigger's cannot read)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(first: u64, max: u64) -> Follow {
        Follow {
            token: None,
            first: Duration::from_secs(first),
            max: Duration::from_secs(max),
            deadline: DEFAULT_DEADLINE,
            concurrency: 1,
        }
    }

    #[test]
    fn the_wait_doubles_from_first_up_to_max() {
        let f = follow(10, 300);
        let waits: Vec<u64> = (1..=7).map(|n| f.wait_after(n).as_secs()).collect();
        assert_eq!(waits, [20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(f.wait_after(u32::MAX), Duration::from_secs(300));
    }
}
