//! /proc/PID/fdinfo/FD and the /proc/PID/fd/FD link's target, which the write probe's attach
//! rule reads: parsing any bytes returns, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| forkwatch::fuzzing::proc_fdinfo(bytes));
