//! The API server's pod list: parsing any bytes gives names or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| forkwatch::fuzzing::pod_list(body));
