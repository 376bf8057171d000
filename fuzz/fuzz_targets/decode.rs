//! Ring-buffer records are untrusted bytes: decoding any of them returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    let _ = forkwatch::wire::decode(record);
});
