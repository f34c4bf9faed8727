//! Template rendering with hostile event fields: a signed GitHub push (or a
//! generic source's pipeline outcome) whose every field is fuzzed, routed to
//! targets whose templates and `when` expressions read every context name.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay_fuzz::{Depth, add_header, deliver, signed_headers, source};
use serde_json::json;

#[derive(Arbitrary, Debug)]
struct Fields {
    pipeline: bool,
    repo: String,
    repo_url: String,
    git_ref: String,
    before: String,
    after: String,
    pusher: String,
    message: String,
    files: Vec<String>,
    created: bool,
    deleted: bool,
    forced: bool,
    status: String,
    id: serde_json_value::Id,
    number: u64,
    workflow: String,
    trigger: String,
    hop: String,
}

mod serde_json_value {
    /// A pipeline id: CI systems send numbers or strings.
    #[derive(arbitrary::Arbitrary, Debug)]
    pub enum Id {
        Number(i64),
        Text(String),
    }
}

fuzz_target!(|f: Fields| {
    let id = match &f.id {
        serde_json_value::Id::Number(n) => json!(n),
        serde_json_value::Id::Text(s) => json!(s),
    };
    let (name, hook, body) = if f.pipeline {
        let body = json!({
            "project": f.repo, "ref": f.git_ref, "sha": f.after, "status": f.status,
            "id": id, "number": f.number, "trigger": f.trigger, "workflow": f.workflow,
            "delivery": f.before,
        });
        ("generic-pipeline", "pipeline", body)
    } else {
        let body = json!({
            "ref": f.git_ref, "before": f.before, "after": f.after,
            "created": f.created, "deleted": f.deleted, "forced": f.forced,
            "repository": { "full_name": f.repo, "html_url": f.repo_url },
            "pusher": { "name": f.pusher },
            "head_commit": { "id": f.after, "message": f.message, "modified": f.files },
            "commits": [{ "id": f.after, "message": f.message, "added": f.files, "modified": [], "removed": [] }],
        });
        ("github", "push", body)
    };
    let body = body.to_string();
    let source = source(name);
    let mut headers = signed_headers(source, hook, body.as_bytes(), false);
    add_header(&mut headers, "x-relay-hop", f.hop.as_bytes());
    deliver(source, &headers, body.as_bytes(), true, Depth::Render);
});
