//! /proc/PID/maps lines name files other users create: parsing any text returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| forkwatch::fuzzing::proc_maps(text));
