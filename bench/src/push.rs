//! The signed GitHub pushes the load sends. Never reads the network: the
//! bodies are built here, of the sizes asked for.

use bytes::Bytes;

use crate::SECRET;

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
    let body = Bytes::from(doc.to_string());
    let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
    (body, format!("sha256={}", hex::encode(tag)))
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
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": format!("{:040x}", 20),
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
