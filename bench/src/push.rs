//! The signed GitHub pushes the load sends. Never reads the network: the
//! bodies are built here, of the sizes asked for, each for a commit of its
//! own ([`signed_commit`]; the wrk script does the same per request).

use bytes::Bytes;

use crate::SECRET;

/// The `after` sha a push is built with, which each request sends replaced
/// by a commit of its own: relay's loop guard triggers a target once per
/// (repo, ref, sha) within its dedupe window, as for real pushes.
pub const AFTER: &str = "0000000000000000000000000000000000000014";

/// Where [`AFTER`] stands in a built push.
pub const AFTER_FIELD: &str = "\"after\":\"0000000000000000000000000000000000000014\"";

/// GitHub lists at most 20 commits in a push; a bigger push is a push of
/// commits that touch many files (a monorepo's), so size grows in the file
/// lists.
const MAX_COMMITS: usize = 20;

/// The load table's ~7 KB GitHub push of 20 commits, and its signature.
pub fn payload() -> (Bytes, String) {
    signed(&document(MAX_COMMITS, 0))
}

/// A GitHub push of about `bytes` bytes (never less than one commit's
/// worth, about 1 KB), and its signature: fewer commits for a small one,
/// each commit's `modified` list longer for a big one.
pub fn sized(bytes: usize) -> (Bytes, String) {
    let one = document(1, 0).to_string().len();
    let per_commit = document(2, 0).to_string().len() - one;
    let commits = (1 + bytes.saturating_sub(one) / per_commit).min(MAX_COMMITS);
    let mut doc = document(commits, 0);
    let base = doc.to_string().len();
    if base < bytes {
        // One more file in every commit, measured.
        let per_round = (document(commits, 1).to_string().len() - base).max(1);
        doc = document(commits, (bytes - base) / per_round);
    }
    signed(&doc)
}

fn signed(doc: &serde_json::Value) -> (Bytes, String) {
    sign(Bytes::from(doc.to_string()))
}

fn sign(body: Bytes) -> (Bytes, String) {
    let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
    (body, format!("sha256={}", hex::encode(tag)))
}

/// A commit sha no other push of this run has: 40 random hex digits.
pub fn fresh_commit() -> String {
    let more = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", uuid::Uuid::new_v4().simple(), &more[..8])
}

/// `push` (built here) for commit `sha` in place of [`AFTER`], and its
/// signature. A body without [`AFTER_FIELD`] is sent as it is.
pub fn signed_commit(push: &[u8], sha: &str) -> (Bytes, String) {
    let field = AFTER_FIELD.as_bytes();
    let Some(at) = push.windows(field.len()).position(|w| w == field) else {
        return sign(Bytes::copy_from_slice(push));
    };
    let start = at + field.len() - AFTER.len() - 1;
    let mut body = Vec::with_capacity(push.len());
    body.extend_from_slice(&push[..start]);
    body.extend_from_slice(sha.as_bytes());
    body.extend_from_slice(&push[start + AFTER.len()..]);
    sign(Bytes::from(body))
}

/// A push of `commits` commits to acme/api's main, each modifying
/// `files` files besides the one every commit touches.
fn document(commits: usize, files: usize) -> serde_json::Value {
    let commits: Vec<serde_json::Value> = (0..commits)
        .map(|i| {
            let mut modified = vec!["services/api/src/import.rs".to_owned()];
            modified.extend((0..files).map(|f| format!("services/api/src/handlers/h{i:02}_{f:05}.rs")));
            serde_json::json!({
                "id": format!("{:040x}", i + 1), "tree_id": format!("{:040x}", i + 100),
                "message": format!("Change {i}: handle empty payloads in the importer"),
                "timestamp": "2026-11-20T10:12:03+01:00",
                "author": { "name": "Ada Lovelace", "email": "ada@example.com", "username": "ada" },
                "added": [], "removed": [], "modified": modified
            })
        })
        .collect();
    serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": AFTER,
        "created": false, "deleted": false, "forced": false, "base_ref": null,
        "compare": "https://github.com/acme/api/compare/1111111111...0000000014",
        "commits": commits,
        "head_commit": { "id": format!("{:040x}", 20), "message": "Change 19", "added": [], "removed": [], "modified": [] },
        "repository": { "id": 1296269, "name": "api", "full_name": "acme/api", "html_url": "https://github.com/acme/api", "private": false },
        "pusher": { "name": "ada", "email": "ada@example.com" },
        "sender": { "login": "ada", "id": 583231 }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_tables_push_is_unchanged() {
        // 20 commits of one file each: the body earlier runs measured.
        assert_eq!(payload().0.len(), document(20, 0).to_string().len());
        assert!(
            (6_500..8_000).contains(&payload().0.len()),
            "{}",
            payload().0.len()
        );
    }

    #[test]
    fn a_signed_commit_changes_the_after_sha_alone_and_is_signed_for_it() {
        let (push, _) = payload();
        let sha = fresh_commit();
        assert_eq!(sha.len(), 40);
        assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()), "{sha}");
        let (body, signature) = signed_commit(&push, &sha);
        let mut doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["after"], sha.as_str());
        doc["after"] = AFTER.into();
        let template: serde_json::Value = serde_json::from_slice(&push).unwrap();
        assert_eq!(doc, template, "only `after` changed");
        let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
        assert_eq!(signature, format!("sha256={}", hex::encode(tag)));
        assert_ne!(fresh_commit(), sha);
        for bytes in [1_024, 1_024 * 1_024] {
            let (push, _) = sized(bytes);
            let (body, _) = signed_commit(&push, &sha);
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["after"], sha.as_str(), "{bytes}");
        }
    }

    #[test]
    fn sized_pushes_come_close_to_the_size_asked() {
        for want in [1_024, 7 * 1_024, 100 * 1_024, 1_024 * 1_024] {
            let (body, signature) = sized(want);
            let got = body.len() as f64;
            assert!((got / want as f64 - 1.0).abs() < 0.1, "{want}: {got}");
            assert!(signature.starts_with("sha256="));
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["repository"]["full_name"], "acme/api");
        }
    }
}
