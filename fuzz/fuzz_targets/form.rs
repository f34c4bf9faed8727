//! Form decoding: a hostile `application/x-www-form-urlencoded` body, signed
//! as its sender signs it, on the sources that take form posts (GitHub and a
//! generic source sign the form; Gitea signs its `payload` field, decoded
//! here independently, so relay's decoding must agree for the check to pass).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::{Depth, deliver, signed_headers, source};

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let name = ["github", "generic", "gitea"][usize::from(*selector) % 3];
    let source = source(name);
    let (signed_bytes, signed) = if name == "gitea" {
        match form_urlencoded::parse(body).find(|(k, _)| k == "payload") {
            Some((_, v)) => (v.into_owned().into_bytes(), true),
            None => (Vec::new(), false),
        }
    } else {
        (body.to_vec(), true)
    };
    let headers = signed_headers(source, "push", &signed_bytes, true);
    deliver(source, &headers, body, signed, Depth::Parse);
});
