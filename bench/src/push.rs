//! The signed GitHub pushes the load sends. Never reads the network: the
//! bodies are built here, of the sizes asked for.

use bytes::Bytes;

use crate::SECRET;

/// A ~7 KB GitHub push of 20 commits, and its signature.
pub fn payload() -> (Bytes, String) {
    let commits: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "id": format!("{:040x}", i + 1), "tree_id": format!("{:040x}", i + 100),
                "message": format!("Change {i}: handle empty payloads in the importer"),
                "timestamp": "2026-11-20T10:12:03+01:00",
                "author": { "name": "Ada Lovelace", "email": "ada@example.com", "username": "ada" },
                "added": [], "removed": [], "modified": ["services/api/src/import.rs"]
            })
        })
        .collect();
    let doc = serde_json::json!({
        "ref": "refs/heads/main", "before": "1".repeat(40), "after": format!("{:040x}", 20),
        "created": false, "deleted": false, "forced": false, "base_ref": null,
        "compare": "https://github.com/acme/api/compare/1111111111...0000000014",
        "commits": commits,
        "head_commit": { "id": format!("{:040x}", 20), "message": "Change 19", "added": [], "removed": [], "modified": [] },
        "repository": { "id": 1296269, "name": "api", "full_name": "acme/api", "html_url": "https://github.com/acme/api", "private": false },
        "pusher": { "name": "ada", "email": "ada@example.com" },
        "sender": { "login": "ada", "id": 583231 }
    });
    let body = Bytes::from(doc.to_string());
    let tag = relay::signature::sign(relay::signature::Algorithm::Sha256, SECRET.as_bytes(), &[&body]);
    (body, format!("sha256={}", hex::encode(tag)))
}
