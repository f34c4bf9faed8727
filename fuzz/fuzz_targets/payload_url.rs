//! Payload-URL verification: a hostile request target on `/payloads/` is
//! refused (never a panic), and a URL relay signed for any event verifies
//! to that event until it expires, and not once a byte of it changes.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use relay::payload::{UrlError, signed_url, verify_uri};
use relay_fuzz::{CONFIG, now};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    event: [u8; 16],
    /// Seconds after `now` the URL is presented.
    later: u32,
    /// Where the signed URL is changed, and to what.
    flip: Option<(u16, u8)>,
    /// A request target of its own.
    target: &'a str,
}

fuzz_target!(|input: Input<'_>| {
    let Some(settings) = CONFIG.server.payload.as_ref() else {
        panic!("the fuzz config enables payload URLs");
    };
    let at = now() + Duration::from_secs(u64::from(input.later));
    if let Ok(uri) = format!("/payloads/{}", input.target).parse::<http::Uri>() {
        if let Ok(id) = verify_uri(settings, &uri, at) {
            panic!("an unsigned URL verified as {id}: {uri}");
        }
    }
    let event = uuid::Uuid::from_bytes(input.event);
    let url = signed_url(settings, event, now());
    let Some(target) = url.strip_prefix(&settings.public_url) else {
        panic!("{url} does not start with the public URL");
    };
    let Ok(uri) = target.parse::<http::Uri>() else {
        panic!("relay signed a URL that is not one: {url}");
    };
    let expected = if at < now() + settings.ttl {
        Ok(event)
    } else {
        Err(UrlError::Expired)
    };
    assert_eq!(verify_uri(settings, &uri, at), expected, "{url}");
    if let Some((at_byte, xor)) = input.flip {
        let mut bytes = target.as_bytes().to_vec();
        let i = usize::from(at_byte) % bytes.len();
        bytes[i] ^= xor;
        if xor != 0 {
            if let Ok(uri) = std::str::from_utf8(&bytes).unwrap_or("").parse::<http::Uri>() {
                let answer = verify_uri(settings, &uri, now());
                // Case changes in the hex signature or the UUID still name
                // the same bytes; anything else must be refused.
                let same = std::str::from_utf8(&bytes)
                    .unwrap_or("")
                    .eq_ignore_ascii_case(target);
                assert!(
                    same || answer.is_err(),
                    "a changed URL {uri} verified: {answer:?}"
                );
            }
        }
    }
});
