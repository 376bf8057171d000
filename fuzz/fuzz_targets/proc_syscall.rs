//! /proc/PID/task/TID/syscall lines: parsing any text returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| forkwatch::fuzzing::proc_syscall(line));
