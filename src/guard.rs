//! The loop guard: rules that keep an event from being routed at all, each
//! with a stable name that the logs, the ingress answer and the store carry.
//!
//! Pure decisions over the event and its source; nothing here stores, sends
//! or logs.

use crate::event::{Event, EventKind};
use crate::ingress::Source;

/// Markers in a head commit message that ask CI (and relay) to stay quiet.
pub const SKIP_MARKERS: [&str; 4] = ["[skip ci]", "[ci skip]", "[no ci]", "[skip relay]"];

/// Rule names, stable: they appear in responses, logs and metric labels.
pub const RULE_SKIP_MARKER: &str = "skip_marker";
pub const RULE_IGNORED_PUSHER: &str = "ignored_pusher";

/// Why this event must not be routed, if it must not: `(rule, reason)`.
pub fn screen(source: &Source, event: &Event) -> Option<(&'static str, String)> {
    if matches!(event.kind, EventKind::Push | EventKind::Tag) {
        let message = event.message.to_ascii_lowercase();
        if let Some(marker) = SKIP_MARKERS.iter().find(|m| message.contains(*m)) {
            return Some((
                RULE_SKIP_MARKER,
                format!("the head commit message contains {marker}"),
            ));
        }
    }
    if !event.pusher.is_empty() && source.ignore_pushers.iter().any(|p| p == &event.pusher) {
        return Some((
            RULE_IGNORED_PUSHER,
            format!(
                "pusher {:?} is in sources.{}.ignore_pushers",
                event.pusher, source.name
            ),
        ));
    }
    None
}
