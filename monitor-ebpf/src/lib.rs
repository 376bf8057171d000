#![no_std]
// This file exists so that monitor/build.rs can declare a dependency on this crate (cargo then
// rebuilds the daemon when it changes); the programs themselves are the `forkwatch` binary.
