//! Keyed hashes: HMAC signing, and constant-time checks of signatures and tokens.
//!
//! The only module that computes or compares them. Ingress verifies with it,
//! the `http` target and `relay send` sign with it. It never logs, and its
//! errors never carry key material or the expected value.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// The hash behind an HMAC signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The length of the digest, in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }

    /// Decodes a hex digest of this algorithm; `None` unless it is exactly
    /// that many hex digits.
    pub fn decode_hex(self, text: &str) -> Option<Vec<u8>> {
        hex::decode(text)
            .ok()
            .filter(|bytes| bytes.len() == self.digest_len())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

/// HMAC of the concatenated `parts` under `key`.
pub fn sign(algorithm: Algorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match algorithm {
        Algorithm::Sha1 => mac::<Hmac<sha1::Sha1>>(key, parts),
        Algorithm::Sha256 => mac::<Hmac<sha2::Sha256>>(key, parts),
        Algorithm::Sha512 => mac::<Hmac<sha2::Sha512>>(key, parts),
    }
}

fn mac<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this never takes the fallback; an
    // empty tag can never equal a real signature, which keeps it fail-closed.
    let Ok(mut mac) = <M as KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Whether `presented` is the HMAC of `parts` under any value of `secret`.
pub fn verify(algorithm: Algorithm, secret: &Secret, parts: &[&[u8]], presented: &[u8]) -> bool {
    secret
        .candidates()
        .any(|key| bool::from(sign(algorithm, key, parts).ct_eq(presented)))
}

/// Whether `presented` equals any value of `secret`, compared in constant time.
pub fn token_matches(secret: &Secret, presented: &[u8]) -> bool {
    secret
        .candidates()
        .any(|value| bool::from(value.ct_eq(presented)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published test vector (validating-webhook-deliveries).
    #[test]
    fn github_documented_vector() {
        let tag = sign(
            Algorithm::Sha256,
            b"It's a Secret to Everybody",
            &[b"Hello, World!"],
        );
        assert_eq!(
            hex::encode(tag),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn verify_accepts_any_rotation_value_and_rejects_flips() {
        let old = Secret::from_bytes("old", "test");
        let sig = sign(Algorithm::Sha256, b"old", &[b"body"]);
        assert!(verify(Algorithm::Sha256, &old, &[b"body"], &sig));
        assert!(!verify(Algorithm::Sha256, &old, &[b"bodY"], &sig));
        let mut flipped = sig.clone();
        flipped[0] ^= 1;
        assert!(!verify(Algorithm::Sha256, &old, &[b"body"], &flipped));
        assert!(!verify(Algorithm::Sha256, &old, &[b"body"], &[]));
    }

    #[test]
    fn parts_are_concatenated() {
        assert_eq!(
            sign(Algorithm::Sha512, b"k", &[b"a.", b"b"]),
            sign(Algorithm::Sha512, b"k", &[b"a.b"])
        );
    }

    #[test]
    fn token_comparison() {
        let s = Secret::from_bytes("tok", "test");
        assert!(token_matches(&s, b"tok"));
        assert!(!token_matches(&s, b"to"));
        assert!(!token_matches(&s, b""));
    }
}
