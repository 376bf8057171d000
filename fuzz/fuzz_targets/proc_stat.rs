//! /proc/PID/stat holds a comm its process chose, and cmdline its argv[0]: parsing any text
//! returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| forkwatch::fuzzing::proc_stat(text));
