//! Payload URLs: how a CI job that cannot be handed a whole webhook (CircleCI
//! parameters hold 512 characters) fetches it from relay.
//!
//! `GET {public_url}/payloads/{event}?exp=<unix seconds>&sig=<hex>`, where
//! `sig` is the HMAC-SHA256 of `"{event}.{exp}"` under `server.payload_key`.
//! A wrong or expired signature is 403, an unknown or purged event 404, and
//! a good one returns the body exactly as received, with its content type.
//! The URL is a capability: it carries no secret, only proof of the key.
//! This module makes and checks URLs; [`serve`] answers them.

use std::time::{SystemTime, UNIX_EPOCH};

use std::time::Duration;

use uuid::Uuid;

use crate::secret::Secret;
use crate::signature::{self, Algorithm};

pub mod serve;

/// How payload URLs are made and checked (`server.public_url`,
/// `server.payload_key`, `server.payload_ttl`).
#[derive(Debug, Clone)]
pub struct PayloadUrls {
    /// `server.public_url`, without a trailing slash.
    pub public_url: String,
    pub key: Secret,
    pub ttl: Duration,
}

/// The path prefix payload URLs are served under, on the ingress listener.
pub const PATH_PREFIX: &str = "/payloads/";

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn message(event: Uuid, exp: u64) -> String {
    format!("{event}.{exp}")
}

/// A URL valid for at least `ttl` (the expiry is rounded up to a second).
pub fn signed_url(settings: &PayloadUrls, event: Uuid, now: SystemTime) -> String {
    let until = now + settings.ttl;
    let whole = unix_seconds(until);
    let exp = if until == UNIX_EPOCH + Duration::from_secs(whole) {
        whole
    } else {
        whole + 1
    };
    let sig = signature::sign(
        Algorithm::Sha256,
        settings.key.expose(),
        &[message(event, exp).as_bytes()],
    );
    format!(
        "{}{PATH_PREFIX}{event}?exp={exp}&sig={}",
        settings.public_url,
        hex::encode(sig)
    )
}

/// Why a payload URL is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("the URL's signature does not match")]
    BadSignature,
    #[error("the URL expired")]
    Expired,
    #[error("no such event")]
    NotFound,
}

/// Checks a presented URL's parts; the signature first, so an unsigned
/// request learns nothing, not even whether the event exists.
pub fn verify(
    settings: &PayloadUrls,
    event: &str,
    exp: &str,
    sig: &str,
    now: SystemTime,
) -> Result<Uuid, UrlError> {
    let presented = Algorithm::Sha256.decode_hex(sig).ok_or(UrlError::BadSignature)?;
    if !signature::verify(
        Algorithm::Sha256,
        &settings.key,
        &[format!("{event}.{exp}").as_bytes()],
        &presented,
    ) {
        return Err(UrlError::BadSignature);
    }
    let exp: u64 = exp.parse().map_err(|_| UrlError::BadSignature)?;
    if unix_seconds(now) >= exp {
        return Err(UrlError::Expired);
    }
    Uuid::parse_str(event).map_err(|_| UrlError::NotFound)
}

/// Checks a payload URL as it arrives (`/payloads/{event}?exp=…&sig=…`):
/// the event from the path, `exp` and `sig` from the query (a missing one
/// is empty, so the signature fails), then [`verify`].
pub fn verify_uri(settings: &PayloadUrls, uri: &http::Uri, now: SystemTime) -> Result<Uuid, UrlError> {
    let event = uri.path().trim_start_matches(PATH_PREFIX);
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    verify(settings, event, param("exp"), param("sig"), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PayloadUrls {
        PayloadUrls {
            public_url: "https://relay.example.com".to_owned(),
            key: Secret::from_bytes("k", "test"),
            ttl: Duration::from_secs(3600),
        }
    }

    fn parts(url: &str) -> (String, String, String) {
        let rest = url.strip_prefix("https://relay.example.com/payloads/").unwrap();
        let (event, query) = rest.split_once('?').unwrap();
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        (event.to_owned(), pairs[0].1.clone(), pairs[1].1.clone())
    }

    #[test]
    fn signed_urls_verify_until_they_expire() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = Uuid::now_v7();
        let (event, exp, sig) = parts(&signed_url(&settings(), id, now));
        assert_eq!(exp, "1800003600");
        assert_eq!(verify(&settings(), &event, &exp, &sig, now), Ok(id));
        let later = now + Duration::from_secs(3600);
        assert_eq!(
            verify(&settings(), &event, &exp, &sig, later),
            Err(UrlError::Expired)
        );
        assert_eq!(
            verify(&settings(), &event, "1800009999", &sig, now),
            Err(UrlError::BadSignature)
        );
        let other = Uuid::now_v7().to_string();
        assert_eq!(
            verify(&settings(), &other, &exp, &sig, now),
            Err(UrlError::BadSignature)
        );
        assert_eq!(
            verify(&settings(), &event, &exp, "00", now),
            Err(UrlError::BadSignature)
        );
    }

    #[test]
    fn a_url_is_checked_as_it_arrives() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = Uuid::now_v7();
        let url = signed_url(&settings(), id, now);
        let target = url.strip_prefix("https://relay.example.com").unwrap();
        let uri: http::Uri = target.parse().unwrap();
        assert_eq!(verify_uri(&settings(), &uri, now), Ok(id));
        // The query's order does not matter; a missing part is a bad signature.
        let (path, query) = target.split_once('?').unwrap();
        let (exp, sig) = query.split_once('&').unwrap();
        let swapped: http::Uri = format!("{path}?{sig}&{exp}").parse().unwrap();
        assert_eq!(verify_uri(&settings(), &swapped, now), Ok(id));
        for cut in [path.to_owned(), format!("{path}?{exp}"), format!("{path}?{sig}")] {
            let uri: http::Uri = cut.parse().unwrap();
            assert_eq!(
                verify_uri(&settings(), &uri, now),
                Err(UrlError::BadSignature),
                "{cut}"
            );
        }
    }
}
