//! /proc/PID/cgroup and the cgroup paths in it: parsing any text returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| forkwatch::fuzzing::cgroup(text));
