//! Who may read and who may change what the admin listener serves.
//!
//! With `[admin] token`, reads (the pages, `GET /api/*`) take the token as
//! `Authorization: Bearer` or as HTTP Basic (any user name, the token as the
//! password), so a person can open the pages in a browser. Changes (retry,
//! replay) take Bearer alone: a browser adds saved Basic credentials to any
//! request, a form on another site's page included, but never a Bearer
//! header, which only a script of relay's own origin or a client like
//! `relay jobs` sets. No cookie is ever set or read. Changes that a browser
//! marks as coming from another site are refused with or without a token.
//!
//! Tokens are compared only by `signature::token_matches` (constant time).
//! Never: echo a presented credential, or accept one from a query string.

use base64::Engine as _;
use http::{HeaderMap, StatusCode, header};

use crate::secret::Secret;
use crate::signature;

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intent {
    /// Pages and `GET /api/*`.
    Read,
    /// A change: retry, replay.
    Change,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refused {
    #[error(
        "the admin listener needs Authorization: Bearer <admin.token> (or, for reading pages, HTTP Basic with the token as the password)"
    )]
    Missing,
    #[error("the presented credential is not admin.token")]
    Wrong,
    #[error(
        "retry and replay need Authorization: Bearer <admin.token>; a browser's saved Basic credentials are not enough, so another site's form cannot use them"
    )]
    BasicForChange,
    #[error(
        "a change from another site's page is refused: retry and replay come from relay's own pages or an API client"
    )]
    CrossSite,
}

impl Refused {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Refused::CrossSite => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub(super) fn code(&self) -> &'static str {
        match self {
            Refused::CrossSite => "cross_site",
            _ => "unauthorized",
        }
    }
}

/// Whether a request may do what it asks, given the token in force.
pub(super) fn check(token: Option<&Secret>, headers: &HeaderMap, intent: Intent) -> Result<(), Refused> {
    if intent == Intent::Change && cross_site(headers) {
        return Err(Refused::CrossSite);
    }
    let Some(token) = token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if let Some(bearer) = presented.strip_prefix("Bearer ") {
        return if signature::token_matches(token, bearer.trim().as_bytes()) {
            Ok(())
        } else {
            Err(Refused::Wrong)
        };
    }
    if let Some(basic) = presented.strip_prefix("Basic ") {
        let password = basic_password(basic.trim()).ok_or(Refused::Wrong)?;
        if !signature::token_matches(token, &password) {
            return Err(Refused::Wrong);
        }
        return match intent {
            Intent::Read => Ok(()),
            Intent::Change => Err(Refused::BasicForChange),
        };
    }
    Err(Refused::Missing)
}

/// The password of an HTTP Basic credential (`user:password`, base64).
fn basic_password(encoded: &str) -> Option<Vec<u8>> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Whether the browser says the request comes from another site's page
/// (`Sec-Fetch-Site`), or names an origin other than the host it was sent
/// to. Clients that are not browsers send neither header.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            origin_host != host
        }
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn reads_take_bearer_or_basic_changes_bearer_alone() {
        let token = Secret::from_bytes("tok", "test");
        let t = Some(&token);
        let bearer = headers(&[("authorization", "Bearer tok")]);
        let good_basic = headers(&[("authorization", &basic("anyone", "tok"))]);
        let bad_basic = headers(&[("authorization", &basic("tok", "nope"))]);
        assert_eq!(check(t, &bearer, Intent::Read), Ok(()));
        assert_eq!(check(t, &bearer, Intent::Change), Ok(()));
        assert_eq!(check(t, &good_basic, Intent::Read), Ok(()));
        assert_eq!(
            check(t, &good_basic, Intent::Change),
            Err(Refused::BasicForChange)
        );
        assert_eq!(check(t, &bad_basic, Intent::Read), Err(Refused::Wrong));
        assert_eq!(check(t, &HeaderMap::new(), Intent::Read), Err(Refused::Missing));
        assert_eq!(
            check(t, &headers(&[("authorization", "Bearer tok2")]), Intent::Read),
            Err(Refused::Wrong)
        );
    }

    #[test]
    fn changes_from_another_site_are_refused_even_without_a_token() {
        let cross = headers(&[("sec-fetch-site", "cross-site"), ("authorization", "Bearer tok")]);
        let token = Secret::from_bytes("tok", "test");
        assert_eq!(
            check(Some(&token), &cross, Intent::Change),
            Err(Refused::CrossSite)
        );
        assert_eq!(check(None, &cross, Intent::Change), Err(Refused::CrossSite));
        assert_eq!(check(None, &cross, Intent::Read), Ok(()));
        let origin = headers(&[("origin", "https://evil.example"), ("host", "127.0.0.1:9")]);
        assert_eq!(check(None, &origin, Intent::Change), Err(Refused::CrossSite));
        let same = headers(&[("origin", "http://127.0.0.1:9"), ("host", "127.0.0.1:9")]);
        assert_eq!(check(None, &same, Intent::Change), Ok(()));
        assert_eq!(check(None, &HeaderMap::new(), Intent::Change), Ok(()));
    }
}
