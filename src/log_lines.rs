//! relay's JSON log lines: one object a line, in the shape of
//! tracing-subscriber's JSON format with `flatten_event` and the current
//! span (`timestamp`, `level`, the event's fields, `target`, and `span` with
//! the innermost span's fields and `name`), written straight into one
//! buffer.
//!
//! Why not the library's own: its formatter serialises through an adapter
//! that checks every fragment it writes (each key, each quote) as UTF-8, and
//! reparses the current span's fields from their stored JSON on every line.
//! At 32 connections that was 5% of relay's CPU per webhook, and 9% of a
//! trigger's when draining a backlog (two and one lines each). Here a span's
//! fields are stored once, as the `"key":value,` fragments its lines copy.
//!
//! This module only formats: it must never drop, reorder or hold back a line
//! (the writer thread in `main` does the writing), and it escapes every
//! value, since values come from payloads.

use std::fmt::{self, Debug};

use serde::Serializer as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::clock::wall_time;

/// Formats each event as one JSON object on a line of its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLine;

/// Keeps a span's fields as the JSON members its lines splice in, each
/// followed by a comma. Only [`JsonLine`] reads them.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonMembers;

impl<S> FormatEvent<S, JsonMembers> for JsonLine
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonMembers>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Vec::with_capacity(512);
        line.extend_from_slice(b"{\"timestamp\":");
        timestamp(&mut line, wall_time())?;
        line.extend_from_slice(b",\"level\":");
        string(&mut line, meta.level().as_str());
        line.push(b',');
        event.record(&mut Members(&mut line));
        line.extend_from_slice(b"\"target\":");
        string(&mut line, meta.target());
        if let Some(span) = ctx.lookup_current() {
            line.extend_from_slice(b",\"span\":{");
            if let Some(members) = span.extensions().get::<FormattedFields<JsonMembers>>() {
                line.extend_from_slice(members.fields.as_bytes());
            }
            line.extend_from_slice(b"\"name\":");
            string(&mut line, span.name());
            line.push(b'}');
        }
        line.extend_from_slice(b"}\n");
        writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
    }
}

impl<'writer> FormatFields<'writer> for JsonMembers {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut members = Vec::with_capacity(128);
        fields.record(&mut Members(&mut members));
        writer.write_str(std::str::from_utf8(&members).map_err(|_| fmt::Error)?)
    }

    /// Appends (the default puts a space between the old and the new).
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        self.format_fields(current.as_writer(), fields)
    }
}

/// Writes each field it visits as `"name":value,`.
struct Members<'a>(&'a mut Vec<u8>);

impl Members<'_> {
    /// `"name":`, then what `value` writes, then the comma.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Vec<u8>)) {
        string(self.0, field.name());
        self.0.push(b':');
        value(self.0);
        self.0.push(b',');
    }

    fn serialized(&mut self, field: &Field, value: impl serde::Serialize) {
        // Writing into a Vec cannot fail, and a number or a bool always serialises.
        self.member(field, |out| drop(serde_json::to_writer(out, &value)));
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.serialized(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.serialized(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.serialized(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.serialized(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.serialized(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        // Escaped as it is written: no string of the value is built first.
        self.member(field, |out| {
            drop(serde_json::Serializer::new(out).collect_str(&format_args!("{value:?}")));
        });
    }
}

/// `at` as a JSON string in the library's form (RFC 3339 in UTC, to the
/// microsecond: `2026-12-07T10:41:02.123456Z`). humantime writes it from
/// integers in one piece, where the library's `SystemTime` went through a
/// dozen `write!` calls: a quarter of a line's cost. A clock before 1970
/// or past 9999, which humantime does not write, gets the library's.
fn timestamp(out: &mut Vec<u8>, at: std::time::SystemTime) -> fmt::Result {
    use std::io::Write as _;
    out.push(b'"');
    let start = out.len();
    if at >= std::time::UNIX_EPOCH && write!(out, "{}", humantime::format_rfc3339_micros(at)).is_ok() {
        out.push(b'"');
        return Ok(());
    }
    out.truncate(start);
    let mut text = String::with_capacity(32);
    SystemTime.format_time(&mut Writer::new(&mut text))?;
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
    Ok(())
}

/// `text` as a JSON string, quoted and escaped.
fn string(out: &mut Vec<u8>, text: &str) {
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;

    use super::{JsonLine, JsonMembers};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Lines of every shape relay writes, with hostile values.
    fn log_some_lines() {
        tracing::info!("outside any span");
        let send = tracing::info_span!(
            "send",
            job_id = "01a247a7-61fe-7355-8400-605cbba41fbc",
            attempt = 2,
            route = %"builds",
            pipeline = tracing::field::Empty,
        );
        let _in_send = send.enter();
        tracing::info!(
            outcome = "delivered",
            status = 201u16,
            duration_ms = 0u64,
            delta = -3i64,
            huge = u128::MAX,
            ratio = 0.5,
            not_a_number = f64::NAN,
            redirected = false,
            url = %"http://127.0.0.1:1/\"quoted\"\n\u{1}\u{7f}é\u{2028}",
            names = ?["a", "b\"c"],
            "delivered {}",
            "with \"quotes\"\tand\r\nbreaks"
        );
        send.record("pipeline", "5034460f");
        let error = io::Error::other("connection reset </script>");
        tracing::warn!(error = &error as &dyn std::error::Error, "send failed");
        let inner = tracing::info_span!("inner", hop = 1);
        let _in_inner = inner.enter();
        tracing::info!(target: "relay::other", "in the innermost span");
    }

    fn parsed(lines: &[String]) -> Vec<Value> {
        lines
            .iter()
            .map(|line| {
                let mut value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                let stamp = value.as_object_mut().unwrap().remove("timestamp").unwrap();
                let stamp = stamp.as_str().unwrap();
                assert!(stamp.len() == 27 && stamp.ends_with('Z'), "{stamp}");
                value
            })
            .collect()
    }

    #[test]
    fn timestamps_are_written_as_the_library_writes_them() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            super::timestamp(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(micros * 1_000 + 999),
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(1_796_640_062, 123_456), r#""2026-12-07T10:41:02.123456Z""#);
        assert_eq!(at(1_709_251_199, 999_999), r#""2024-02-29T23:59:59.999999Z""#);
        assert_eq!(at(951_868_800, 0), r#""2000-03-01T00:00:00.000000Z""#);
        assert_eq!(at(0, 7), r#""1970-01-01T00:00:00.000007Z""#);
        // Before 1970, the library's own (of the clock as it stands).
        let mut out = Vec::new();
        super::timestamp(&mut out, UNIX_EPOCH - Duration::from_secs(1)).unwrap();
        assert_eq!(out.len(), 29, "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn lines_say_what_the_librarys_json_format_says() {
        let ours = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .fmt_fields(JsonMembers)
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, log_some_lines);
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(theirs.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(subscriber, log_some_lines);

        let (ours, theirs) = (ours.lines(), theirs.lines());
        assert_eq!(ours.len(), 4, "{ours:#?}");
        assert_eq!(parsed(&ours), parsed(&theirs), "{ours:#?}\n{theirs:#?}");
        let delivered = &parsed(&ours)[1];
        assert_eq!(delivered["message"], "delivered with \"quotes\"\tand\r\nbreaks");
        assert_eq!(
            delivered["url"],
            "http://127.0.0.1:1/\"quoted\"\n\u{1}\u{7f}é\u{2028}"
        );
        // As the library's: 128-bit integers as strings, which any reader keeps whole.
        assert_eq!(delivered["huge"], u128::MAX.to_string());
        assert_eq!(delivered["not_a_number"], Value::Null);
        assert_eq!(delivered["span"]["name"], "send");
        assert_eq!(delivered["span"]["attempt"], 2);
        assert_eq!(parsed(&ours)[2]["span"]["pipeline"], "5034460f");
        assert!(ours[0].starts_with("{\"timestamp\":\""), "{}", ours[0]);
        assert!(!ours[0].contains("\"span\":"), "{}", ours[0]);
    }
}
