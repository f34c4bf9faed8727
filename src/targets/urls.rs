//! The URLs a target's jobs go to, parsed once each: a job stores its URL
//! as text, and parsing it again for every send (reqwest takes text, and
//! the host goes through IDNA) was 4.2% of a trigger's CPU when relay
//! drained a backlog.
//!
//! Only the stored text is ever a key, and it never holds a credential: a
//! query-string token is added to a copy of the parsed URL for each send.
//! So nothing here outlives a token's rotation, and a reload, which builds
//! new targets, starts with none.

use std::collections::HashMap;
use std::sync::Mutex;

use url::Url;

/// How many distinct URLs a target keeps parsed. Most targets have one; a
/// templated `http` URL may have one per repository, say. Past this many
/// the whole set is dropped and refilled, which costs a parse each.
const MAX_KEPT: usize = 256;

#[derive(Default)]
pub struct ParsedUrls(Mutex<HashMap<String, Url>>);

impl ParsedUrls {
    /// `text` parsed, from the set when it was parsed before.
    pub fn parse(&self, text: &str) -> Result<Url, url::ParseError> {
        let mut kept = match self.0.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(url) = kept.get(text) {
            return Ok(url.clone());
        }
        let url = Url::parse(text)?;
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(text.to_owned(), url.clone());
        Ok(url)
    }
}

impl std::fmt::Debug for ParsedUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock().map_or(0, |k| k.len());
        write!(f, "ParsedUrls({kept} kept)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_parsed_once_and_an_invalid_one_is_an_error() {
        let urls = ParsedUrls::default();
        let first = urls
            .parse("https://CircleCI.com/api/v2/project/gh/acme/api/pipeline")
            .unwrap();
        assert_eq!(
            first.as_str(),
            "https://circleci.com/api/v2/project/gh/acme/api/pipeline"
        );
        assert_eq!(
            urls.parse("https://CircleCI.com/api/v2/project/gh/acme/api/pipeline")
                .unwrap(),
            first
        );
        assert!(urls.parse("not a url").is_err());
        assert_eq!(format!("{urls:?}"), "ParsedUrls(1 kept)");
    }

    #[test]
    fn past_the_limit_the_set_starts_again() {
        let urls = ParsedUrls::default();
        for n in 0..=MAX_KEPT {
            urls.parse(&format!("https://ci.example.com/{n}")).unwrap();
        }
        assert_eq!(format!("{urls:?}"), "ParsedUrls(1 kept)");
    }
}
