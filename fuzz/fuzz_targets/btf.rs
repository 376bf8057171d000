//! Kernel BTF is read by forkwatch's own minimal parser (monitor/src/kernel/btf_raw.rs): a truncated or
//! corrupt file (a bad `--btf` path, a damaged image) must give an error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = forkwatch::kernel::btf_offsets::offsets_from_btf(data);
});
