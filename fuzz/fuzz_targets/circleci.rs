//! CircleCI: a correctly signed body (JSON or a form post, as the first byte
//! says) through verify, parse, plan and render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relay_fuzz::fuzz_provider("circleci", &["workflow-completed", "job-completed", "ping"], data);
});
