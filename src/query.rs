//! What a listing's query string asks for, parsed one way for the admin
//! API and the status pages: filters, times (RFC 3339, or a duration ago),
//! the page cursor and the page size.
//!
//! Never: reads the store or answers a request; a refusal is a message a
//! person can act on, which the caller answers as a 400.

use std::time::SystemTime;

use uuid::Uuid;

use crate::store::{EventFilter, JobState};

/// The most jobs or events one listing returns.
pub const MAX_LIMIT: usize = 1000;

/// A query string's parameters, as sent.
pub type Query = [(String, String)];

/// The value of `name` in a query, when given and not empty (an empty
/// field of the pages' filter form means "any").
pub fn param<'q>(query: &'q Query, name: &str) -> Option<&'q str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

/// `?limit=`, 100 by default, at most [`MAX_LIMIT`].
pub fn limit(query: &Query, default: usize) -> Result<usize, String> {
    match param(query, "limit") {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .map(|n| n.clamp(1, MAX_LIMIT))
            .map_err(|_| format!("limit {text:?} is not a number")),
    }
}

/// An RFC 3339 time, or a duration meaning that long ago (`2h`, `30m`).
pub fn parse_time(text: &str, now: SystemTime) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok().or_else(|| {
        humantime::parse_duration(text)
            .ok()
            .map(|ago| now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH))
    })
}

/// `?name=TIME`, when given.
pub fn time_param(query: &Query, name: &str, now: SystemTime) -> Result<Option<SystemTime>, String> {
    param(query, name)
        .map(|text| {
            parse_time(text.trim(), now)
                .ok_or_else(|| format!("{name} {text:?} is neither an RFC 3339 time nor a duration like 2h"))
        })
        .transpose()
}

/// `?state=`, when given.
pub fn state_param(query: &Query) -> Result<Option<JobState>, String> {
    param(query, "state")
        .map(|s| {
            JobState::parse(s)
                .ok_or_else(|| format!("state {s:?} is not one of queued, in_flight, done, dead"))
        })
        .transpose()
}

/// The events a listing asks for: `source`, `repo`, `kind`, `state`,
/// `since`, `until` (RFC 3339 or a duration ago), `before` (the cursor: the
/// last event of the page before) and `limit`.
pub fn event_filter(query: &Query, now: SystemTime, default_limit: usize) -> Result<EventFilter, String> {
    let text = |name: &str| param(query, name).map(|v| v.trim().to_owned());
    Ok(EventFilter {
        source: text("source"),
        repo: text("repo"),
        kind: text("kind"),
        state: state_param(query)?,
        since: time_param(query, "since", now)?,
        until: time_param(query, "until", now)?,
        before: param(query, "before")
            .map(|b| Uuid::parse_str(b.trim()).map_err(|_| format!("before {b:?} is not an event id")))
            .transpose()?,
        limit: limit(query, default_limit)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = humantime::parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(parse_time("2h", now), Some(now - Duration::from_secs(7200)));
        assert_eq!(
            parse_time("2026-11-21T09:30:00Z", now),
            Some(humantime::parse_rfc3339("2026-11-21T09:30:00Z").unwrap())
        );
        assert_eq!(parse_time("yesterday", now), None);
    }
}
