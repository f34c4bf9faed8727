//! The signature-header readers: hostile `X-Hub-Signature-256`,
//! `X-Hub-Signature`, `X-Gitea-Signature`/`X-Forgejo-Signature`,
//! `X-Gitlab-Token`, `webhook-signature` (with `webhook-id` and
//! `webhook-timestamp`), `Circleci-Signature` and a generic source's header.
//!
//! Input: a selector byte, then up to three header values each ended by a
//! newline, then the body. Every other header is the sender's own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::{Depth, add_header, deliver, signed_headers, source};

/// (source, hook, the headers the fuzzed values replace, in order).
const CASES: &[(&str, &str, &[&str])] = &[
    ("github", "push", &["x-hub-signature-256"]),
    ("github", "push", &["x-hub-signature"]),
    ("bitbucket", "repo:push", &["x-hub-signature"]),
    ("gitea", "push", &["x-gitea-signature"]),
    ("gitea", "push", &["x-forgejo-signature"]),
    (
        "gitlab",
        "Push Hook",
        &["webhook-signature", "webhook-id", "webhook-timestamp"],
    ),
    ("gitlab", "Push Hook", &["x-gitlab-token"]),
    ("circleci", "workflow-completed", &["circleci-signature"]),
    ("generic", "push", &["x-signature"]),
    ("generic-pipeline", "pipeline", &["x-signature"]),
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, mut rest)) = data.split_first() else {
        return;
    };
    let (name, hook, replaced) = CASES[usize::from(*selector) % CASES.len()];
    let mut values = Vec::new();
    for _ in replaced {
        match rest.iter().position(|b| *b == b'\n') {
            Some(end) => {
                values.push(&rest[..end]);
                rest = &rest[end + 1..];
            }
            None => break,
        }
    }
    let body = rest;
    let source = source(name);
    let mut headers = signed_headers(source, hook, body, false);
    // GitHub prefers the SHA-256 header; the SHA-1 case must not have it.
    if replaced[0] == "x-hub-signature" {
        headers.remove("x-hub-signature-256");
    }
    for (header, value) in replaced.iter().zip(&values) {
        headers.remove(*header);
        add_header(&mut headers, header, value);
    }
    deliver(source, &headers, body, false, Depth::Parse);
});
