//! The message a target's answer carries, for the attempt record and the
//! logs: CircleCI and GitLab answer `{"message": …}`, some APIs
//! `{"error": …}`; anything else is excerpted. What it returns is bounded
//! and is scrubbed of the credential by the caller; nothing here reads more
//! than the body it is given.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{IgnoredAny, MapAccess, Visitor};

/// The most characters of a message kept.
const LIMIT: usize = 500;

/// The answer's `message` (else its `error`): the text of a string, the
/// compact JSON of anything else; when the body is not a JSON object with
/// either, its first characters.
pub fn response_message(body: &[u8]) -> String {
    // Valid UTF-8 first, as a JSON document must be: the fields skipped
    // below are then skipped over text already checked.
    if let Ok(text) = std::str::from_utf8(body)
        && let Ok(fields) = read_fields(text)
        && let Some(message) = fields.message.or(fields.error)
    {
        return match message {
            serde_json::Value::String(s) => truncate(&s, LIMIT),
            other => truncate(&other.to_string(), LIMIT),
        };
    }
    truncate(&String::from_utf8_lossy(body), LIMIT)
}

/// The two fields a message is read from, the last of each when a key
/// repeats; every other member is checked as JSON and skipped, not built.
#[derive(Default)]
struct MessageFields {
    message: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

fn read_fields(text: &str) -> serde_json::Result<MessageFields> {
    let mut reader = serde_json::Deserializer::from_str(text);
    let fields = (&mut reader).deserialize_map(FieldsVisitor)?;
    reader.end()?;
    Ok(fields)
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = MessageFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessageFields, A::Error> {
        let mut fields = MessageFields::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "message" => fields.message = Some(map.next_value()?),
                "error" => fields.error = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `response_message` answered when it built the whole document
    /// as a `serde_json::Value`: the reading it must keep.
    fn as_a_whole_document(body: &[u8]) -> String {
        if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) {
            match doc.get("message").or_else(|| doc.get("error")) {
                Some(serde_json::Value::String(s)) => return truncate(s, LIMIT),
                Some(other) => return truncate(&other.to_string(), LIMIT),
                None => {}
            }
        }
        truncate(&String::from_utf8_lossy(body), LIMIT)
    }

    #[test]
    fn response_message_prefers_the_message_field() {
        assert_eq!(
            response_message(br#"{"message":"Project does not exist."}"#),
            "Project does not exist."
        );
        assert_eq!(
            response_message(br#"{"message":{"base":["Reference not found"]}}"#),
            r#"{"base":["Reference not found"]}"#
        );
        assert_eq!(response_message(b"Bad Gateway"), "Bad Gateway");
        let long = "x".repeat(600);
        assert_eq!(response_message(long.as_bytes()).chars().count(), 501);
    }

    #[test]
    fn the_message_is_read_as_the_whole_document_read_it() {
        let long = format!(r#"{{"message":"{}"}}"#, "é".repeat(600));
        let bodies: Vec<&[u8]> = vec![
            br#"{"id":"5034460f-c7c4-4c43-9457-de07e2029e7b","number":25,"state":"created","created_at":"2026-12-04T09:00:00Z"}"#,
            br#"{"error":"insufficient_scope","message":"The request requires higher privileges"}"#,
            br#"{"error":{"code":403,"text":"no"}}"#,
            br#"{"message":null}"#,
            br#"{"message":"first","message":"second"}"#,
            br#"{"message":"a\"quoted\" \u00e9 line"}"#,
            br#"{"nested":{"message":"not this one"},"error":"this one"}"#,
            br#"{"message":{"b":1,"a":[true,null,2.5]}}"#,
            br#"["message","an array"]"#,
            br#""message""#,
            br#"{"message":"trailing"} x"#,
            br#"{"message":"unclosed""#,
            b"{\"message\":\"ok\",\"other\":\"\xff\xfe\"}",
            b"\xff{\"message\":\"not utf-8\"}",
            b"",
            b"  {\"message\" : \"spaced\" }  \n",
            long.as_bytes(),
        ];
        for body in bodies {
            assert_eq!(
                response_message(body),
                as_a_whole_document(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
