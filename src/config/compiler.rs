//! What compiling one part of `relay.toml` needs: where problems (each at
//! its key) and warnings go, and the one template set every route and target
//! compiles into. Each domain module compiles its own section with this and
//! the raw values in [`super::raw`]; nothing here knows the whole config.

use crate::guard::{Burst, BurstSetting};
use crate::secret::{MIN_SCRUBBED_SECRET, Secret, SecretSpec};
use crate::template::Templates;

use super::raw;

/// One thing wrong with the config, at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// What compiling one part of the config needs: where to put problems and
/// warnings, and the shared template set.
#[derive(Debug, Default)]
pub struct Compiler {
    pub(super) problems: Vec<Problem>,
    pub(super) warnings: Vec<String>,
    pub templates: Templates,
}

impl Compiler {
    pub fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    /// `false` (off) or `{ limit, per }`; `true` says nothing, so it is an error.
    pub fn burst(&mut self, key: &str, raw: raw::RawBurstSetting) -> BurstSetting {
        match raw {
            raw::RawBurstSetting::Switch(false) => BurstSetting::Off,
            raw::RawBurstSetting::Switch(true) => {
                self.problem(
                    key,
                    "true sets no limit; write { limit = 30, per = \"1m\" } or false",
                );
                BurstSetting::Off
            }
            raw::RawBurstSetting::Limit(b) if b.limit == 0 || b.per.is_zero() => {
                self.problem(
                    key,
                    "limit and per must be more than 0 (write false to turn the breaker off)",
                );
                BurstSetting::Off
            }
            raw::RawBurstSetting::Limit(b) => BurstSetting::Limit(Burst {
                limit: b.limit,
                per: b.per,
            }),
        }
    }

    /// The problems found so far, in the order found.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The warnings so far, in the order given.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn problem_count(&self) -> usize {
        self.problems.len()
    }

    /// Resolves a required secret, warning about literals.
    pub fn secret(&mut self, key: &str, spec: &SecretSpec) -> Option<Secret> {
        if spec.has_literal() {
            self.warn(format!(
                "{key} is written into the config file; prefer {{ env = \"…\" }}, {{ file = \"…\" }} or {{ credential = \"…\" }}"
            ));
        }
        match spec.resolve() {
            Ok(secret) => {
                if secret.expose().len() < MIN_SCRUBBED_SECRET {
                    self.warn(format!(
                        "{key} is shorter than {} characters: guessable, and too short to be kept out of target answers",
                        MIN_SCRUBBED_SECRET
                    ));
                }
                Some(secret)
            }
            Err(e) => {
                self.problem(key, e.to_string());
                None
            }
        }
    }

    /// Rejects keys that exist in the schema but mean nothing for this
    /// provider or kind, so a misplaced key is never silently ignored.
    pub fn only_keys(&mut self, prefix: &str, present: &[&str], allowed: &[&str], owner: &str) {
        for key in present {
            if !allowed.contains(key) {
                self.problem(
                    format!("{prefix}.{key}"),
                    format!(
                        "not a setting of {owner} (it takes: {})",
                        if allowed.is_empty() {
                            "nothing more".to_owned()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                );
            }
        }
    }
}
