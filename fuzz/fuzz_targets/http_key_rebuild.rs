//! Coverage-guided fuzzing of the HTTP key and response-rebuild path:
//! `cargo fuzz run -s none -O http_key_rebuild` (stable; nightly may drop `-s none` to add
//! AddressSanitizer). The `replay` binary runs the same check without libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tower_coalesce_fuzz::check(data);
});
