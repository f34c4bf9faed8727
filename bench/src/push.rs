//! The signed GitHub pushes the load sends. Never reads the network: the
//! bodies are built here, of the sizes asked for, and each request sends
//! one for a commit of its own ([`Push::for_commit`]; the wrk script does
//! the same at [`Push::sha_at`]).

use bytes::Bytes;

use crate::SECRET;

/// The `after` sha a push is built with, which each request sends replaced
/// by a commit of its own: relay's loop guard triggers a target once per
/// (repo, ref, sha) within its dedupe window, as for real pushes.
const AFTER: &str = "0000000000000000000000000000000000000014";

/// GitHub lists at most 20 commits in a push; a bigger push is a push of
/// commits that touch many files (a monorepo's), so size grows in the file
/// lists.
const MAX_COMMITS: usize = 20;

/// A push the load sends for a commit of its own each time: the body, and
/// where its `after` sha stands in it.
#[derive(Debug, Clone)]
pub struct Push {
    pub body: Bytes,
    /// The byte offset of the sha (40 hex digits) in `body`.
    pub sha_at: usize,
}

impl Push {
    /// `body`, if it holds the `after` sha pushes are built with.
    pub fn new(body: Bytes) -> Result<Push, String> {
        let field = format!("\"after\":\"{AFTER}\"");
        let at = body
            .windows(field.len())
            .position(|w| w == field.as_bytes())
            .ok_or_else(|| format!("the push has no {field} to give each request a commit of its own"))?;
        Ok(Push {
            sha_at: at + field.len() - AFTER.len() - 1,
            body,
        })
    }

    /// The body for commit `sha` (40 hex digits), and its signature.
    pub fn for_commit(&self, sha: &str) -> (Bytes, String) {
        let mut body = Vec::with_capacity(self.body.len());
        body.extend_from_slice(&self.body[..self.sha_at]);
        body.extend_from_slice(sha.as_bytes());
        body.extend_from_slice(&self.body[self.sha_at + AFTER.len()..]);
        let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
        (Bytes::from(body), format!("sha256={}", hex::encode(tag)))
    }
}

/// The load table's ~7 KB GitHub push of 20 commits.
pub fn payload() -> Result<Push, String> {
    Push::new(Bytes::from(document(MAX_COMMITS, 0).to_string()))
}

/// A GitHub push of about `bytes` bytes (never less than one commit's
/// worth, about 1 KB): fewer commits for a small one, each commit's
/// `modified` list longer for a big one.
pub fn sized(bytes: usize) -> Result<Push, String> {
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
    Push::new(Bytes::from(doc.to_string()))
}

/// A commit sha no other push of this run has: 40 random hex digits.
pub fn fresh_commit() -> String {
    let more = uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", uuid::Uuid::new_v4().simple(), &more[..8])
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
        let body = payload().unwrap().body;
        assert_eq!(body.len(), document(20, 0).to_string().len());
        assert!((6_500..8_000).contains(&body.len()), "{}", body.len());
    }

    #[test]
    fn a_push_for_a_commit_changes_the_after_sha_alone_and_is_signed_for_it() {
        let sha = fresh_commit();
        assert_eq!(sha.len(), 40);
        assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()), "{sha}");
        assert_ne!(fresh_commit(), sha);
        for push in [payload(), sized(1_024), sized(1_024 * 1_024)].map(Result::unwrap) {
            let (body, signature) = push.for_commit(&sha);
            assert_eq!(body.len(), push.body.len());
            let mut doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["after"], sha.as_str());
            doc["after"] = AFTER.into();
            let template: serde_json::Value = serde_json::from_slice(&push.body).unwrap();
            assert_eq!(doc, template, "only `after` changed");
            let tag =
                relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
            assert_eq!(signature, format!("sha256={}", hex::encode(tag)));
        }
        let no_sha = Push::new(Bytes::from_static(br#"{"after":"1234"}"#)).unwrap_err();
        assert!(no_sha.contains(AFTER), "{no_sha}");
    }

    #[test]
    fn sized_pushes_come_close_to_the_size_asked() {
        for want in [1_024, 7 * 1_024, 100 * 1_024, 1_024 * 1_024] {
            let body = sized(want).unwrap().body;
            let got = body.len() as f64;
            assert!((got / want as f64 - 1.0).abs() < 0.1, "{want}: {got}");
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(doc["repository"]["full_name"], "acme/api");
        }
    }
}
