//! The subcommands: `run` (the daemon), `check` (can this host run it?), `selftest` (does it
//! detect on this kernel?) and `fixture` (the processes selftest re-executes the binary as).

pub mod check;
pub mod fixture;
pub mod run;
pub mod selftest;
