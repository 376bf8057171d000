//! The subcommands: `run` (the daemon), `exec` (one command's process tree, for CI), `check`
//! (can this host run it?), `selftest` (does it detect on this kernel?) and `fixture` (the
//! processes selftest re-executes the binary as). `reporting` is the findings' path to the
//! sinks that `run` and `exec` share.

pub mod check;
pub mod exec;
pub mod fixture;
mod reporting;
pub mod run;
pub mod selftest;
