//! Config loading: any text gives a `Config` or a `ConfigError`, never a
//! panic; and when the text is TOML, every problem names the key it is at.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Err(error) = Config::from_toml(text) else {
        return;
    };
    assert!(!error.problems.is_empty(), "an error with no problem in it");
    if toml::from_str::<toml::Table>(text).is_ok() {
        for problem in &error.problems {
            assert!(!problem.key.is_empty(), "a problem without its key: {error}");
        }
    }
});
