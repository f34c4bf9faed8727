//! A generic source, a push one or (high bit of the first byte) a
//! `kind = "pipeline"` one with base64 SHA-512 signatures: a correctly signed
//! body through verify, parse (JSON pointers), plan and render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let name = match data.first() {
        Some(flags) if flags & 0x80 != 0 => "generic-pipeline",
        _ => "generic",
    };
    relay_fuzz::fuzz_provider(name, &["push", "tag", "pipeline", "ping"], data);
});
