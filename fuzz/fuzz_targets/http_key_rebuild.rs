//! Coverage-guided fuzzing of the HTTP key and response-rebuild path:
//! `cargo fuzz run http_key_rebuild` (nightly). On stable, `replay` runs the same check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_coalesce_fuzz::check(data);
});
