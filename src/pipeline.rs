//! What a trigger started: the pipeline a CI's answer names, in relay's own
//! words. Each target kind reads its answer into a [`Pipeline`] (its id,
//! number, the page a person opens, and its state in one closed set); the
//! store keeps it on the job, the API and the CLI show it.
//!
//! Everything here comes from a target's answer: it is bounded in length and
//! shown, never followed or sent anywhere. Nothing here does I/O.

use std::fmt;

use serde::Serialize;

/// A pipeline's state, whatever the CI calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    /// Created, queued or waiting: not running yet.
    Created,
    Running,
    Success,
    Failed,
    Canceled,
    /// The CI could not run it (a config error, an unauthorized pipeline).
    Error,
}

impl PipelineState {
    pub const ALL: [PipelineState; 6] = [
        PipelineState::Created,
        PipelineState::Running,
        PipelineState::Success,
        PipelineState::Failed,
        PipelineState::Canceled,
        PipelineState::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Created => "created",
            PipelineState::Running => "running",
            PipelineState::Success => "success",
            PipelineState::Failed => "failed",
            PipelineState::Canceled => "canceled",
            PipelineState::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<PipelineState> {
        PipelineState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the pipeline has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PipelineState::Success | PipelineState::Failed | PipelineState::Canceled | PipelineState::Error
        )
    }

    /// The state a CI's pipeline event reports, in relay's words: GitLab's
    /// pipeline statuses and CircleCI's workflow statuses.
    pub fn of_ci_status(status: &str) -> PipelineState {
        match status {
            "success" => PipelineState::Success,
            "failed" => PipelineState::Failed,
            "canceled" | "canceling" | "skipped" => PipelineState::Canceled,
            "error" | "unauthorized" => PipelineState::Error,
            "running" => PipelineState::Running,
            _ => PipelineState::Created,
        }
    }
}

impl fmt::Display for PipelineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pipeline one trigger created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pipeline {
    /// The CI's id for it (CircleCI's UUID, GitLab's number, v1.1's build number).
    pub id: String,
    /// The number a person sees (CircleCI's pipeline number, GitLab's `iid`).
    pub number: Option<u64>,
    /// The page a person opens.
    pub url: Option<String>,
    pub state: PipelineState,
}

/// The longest id and URL kept from an answer; a longer one is not a real
/// CI's and is dropped rather than stored.
const MAX_ID: usize = 100;
const MAX_URL: usize = 500;

impl Pipeline {
    /// A pipeline from what an answer said, or why it cannot be one.
    pub fn new(
        id: Option<String>,
        number: Option<u64>,
        url: Option<String>,
        state: PipelineState,
    ) -> Result<Pipeline, String> {
        let id = id.filter(|id| !id.is_empty()).ok_or_else(|| {
            "the answer names no pipeline id, so relay cannot tell which pipeline it started".to_owned()
        })?;
        if id.chars().count() > MAX_ID {
            return Err(format!(
                "the answer's pipeline id is longer than {MAX_ID} characters"
            ));
        }
        let url = url.filter(|u| {
            u.chars().count() <= MAX_URL && (u.starts_with("https://") || u.starts_with("http://"))
        });
        Ok(Pipeline {
            id,
            number,
            url,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_are_unique() {
        for state in PipelineState::ALL {
            assert_eq!(PipelineState::parse(state.as_str()), Some(state));
        }
        assert_eq!(PipelineState::parse("pending"), None);
        assert_eq!(PipelineState::of_ci_status("success"), PipelineState::Success);
        assert_eq!(PipelineState::of_ci_status("unauthorized"), PipelineState::Error);
        assert_eq!(PipelineState::of_ci_status("skipped"), PipelineState::Canceled);
        assert_eq!(PipelineState::of_ci_status("pending"), PipelineState::Created);
    }

    #[test]
    fn an_answer_without_an_id_is_no_pipeline_and_odd_urls_are_dropped() {
        let none = Pipeline::new(None, Some(1), None, PipelineState::Created).unwrap_err();
        assert!(none.starts_with("the answer names no pipeline id"), "{none}");
        assert!(Pipeline::new(Some(String::new()), None, None, PipelineState::Created).is_err());
        assert!(Pipeline::new(Some("x".repeat(101)), None, None, PipelineState::Created).is_err());
        let kept = Pipeline::new(
            Some("7".into()),
            Some(7),
            Some("javascript:alert(1)".into()),
            PipelineState::Running,
        )
        .unwrap();
        assert_eq!(kept.url, None);
        let long = format!("https://ci.example/{}", "p".repeat(600));
        let kept = Pipeline::new(Some("7".into()), None, Some(long), PipelineState::Running).unwrap();
        assert_eq!(kept.url, None);
    }
}
