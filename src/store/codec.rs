//! How an event's body and JSON payload are packed into their columns:
//! LZ4 where that saves a quarter or more, as received otherwise; and
//! unpacked again, byte for byte.
//!
//! What this module must never do: touch the database, or guess at bytes it
//! cannot read: an unknown codec or a block that does not decompress is
//! reported as corrupt data.

use bytes::Bytes;

use crate::store::{NewEvent, StoreError};

/// How an event's `body` and `payload` columns hold the bytes, on either
/// store (each keeps the codec in a column beside them). Webhook JSON
/// compresses three to eight times. On SQLite the bytes a webhook writes
/// (to the WAL, then again at the checkpoint, and the fsync over them) were
/// a third of the store's CPU time. On PostgreSQL the server compressed
/// each body itself, after relay had sent it whole; packed here, the
/// benchmark's 7.5 KB push crosses to the server as 913 bytes (schema
/// V15). LZ4 costs a few microseconds for a 7 KB push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codec {
    Plain = 0,
    /// LZ4 block format, with the plain length in front.
    Lz4 = 1,
}

impl Codec {
    /// Bodies below this are stored as they are: nothing worth saving.
    const MIN_LEN: usize = 512;

    pub(super) fn of(stored: i64) -> Result<Codec, StoreError> {
        match stored {
            0 => Ok(Codec::Plain),
            1 => Ok(Codec::Lz4),
            other => Err(StoreError::Corrupt(format!(
                "an event body is stored with codec {other}, which this relay does not know; run a newer relay"
            ))),
        }
    }

    /// Undoes what [`pack`] did to a column.
    pub(super) fn unpack(self, stored: Vec<u8>) -> Result<Bytes, StoreError> {
        match self {
            Codec::Plain => Ok(Bytes::from(stored)),
            Codec::Lz4 => lz4_flex::block::decompress_size_prepended(&stored)
                .map(Bytes::from)
                .map_err(|e| {
                    StoreError::Corrupt(format!("a compressed event body does not decompress: {e}"))
                }),
        }
    }
}

/// An event's body and JSON payload as the columns hold them.
pub(super) struct Packed {
    pub(super) codec: Codec,
    pub(super) body: Bytes,
    pub(super) payload: Option<Bytes>,
}

/// Compresses the body (and the payload of a form post) when that saves a
/// quarter or more; otherwise stores them as received.
pub(super) fn pack(event: &NewEvent) -> Packed {
    let plain = || Packed {
        codec: Codec::Plain,
        body: event.body.clone(),
        payload: event.payload.clone(),
    };
    if event.body.len() < Codec::MIN_LEN {
        return plain();
    }
    let body = lz4_flex::block::compress_prepend_size(&event.body);
    if body.len() > event.body.len() / 4 * 3 {
        return plain();
    }
    Packed {
        codec: Codec::Lz4,
        body: Bytes::from(body),
        payload: event
            .payload
            .as_ref()
            .map(|p| Bytes::from(lz4_flex::block::compress_prepend_size(p))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;

    fn event(body: Vec<u8>, payload: Option<Vec<u8>>) -> NewEvent {
        NewEvent {
            id: Uuid::now_v7(),
            source: "github".to_owned(),
            delivery: None,
            hook: "push".to_owned(),
            content_type: "application/json".to_owned(),
            body: Bytes::from(body),
            payload: payload.map(Bytes::from),
            hop: 0,
            received_at: SystemTime::UNIX_EPOCH,
            summary: "{}".to_owned(),
            jobs: Vec::new(),
            drops: Vec::new(),
        }
    }

    #[test]
    fn compressible_bodies_are_packed_and_come_back_byte_for_byte() {
        let json = format!(
            r#"{{"commits":[{}]}}"#,
            vec![r#"{"id":"abc","message":"fix"}"#; 40].join(",")
        );
        let form = format!("payload={}", json.replace('"', "%22"));
        let packed = pack(&event(form.clone().into_bytes(), Some(json.clone().into_bytes())));
        assert_eq!(packed.codec, Codec::Lz4);
        assert!(packed.body.len() < form.len() / 4);
        let unpack = |b: &Bytes| {
            Codec::of(packed.codec as i64)
                .unwrap()
                .unpack(b.to_vec())
                .unwrap()
        };
        assert_eq!(unpack(&packed.body), form.as_bytes());
        assert_eq!(packed.payload.as_ref().map(unpack).unwrap(), json.as_bytes());
    }

    #[test]
    fn small_or_incompressible_bodies_are_stored_as_received() {
        let small = pack(&event(br#"{"ref":"refs/heads/main"}"#.to_vec(), None));
        assert_eq!(
            (small.codec, &small.body[..]),
            (Codec::Plain, &br#"{"ref":"refs/heads/main"}"#[..])
        );
        // Bytes with no repetition (xorshift): compression would not pay.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let packed = pack(&event(noise.clone(), None));
        assert_eq!(packed.codec, Codec::Plain);
        assert!(packed.body == noise, "stored as received");
    }

    #[test]
    fn unknown_codecs_and_broken_data_are_reported_not_guessed() {
        assert!(matches!(Codec::of(7), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            Codec::Lz4.unpack(vec![200, 0, 0, 0, 1, 2]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
