//! The end-to-end tests: one test binary (aya's integration-test style), so the harness is
//! compiled once and the tests of every subject share one run, one time limit per test and one
//! lock on the host-wide state some of them need alone (see `harness`).
//!
//! Most tests drive the real `forkwatch` binary as root, with real eBPF and real processes
//! (fixtures in tests/fixtures/); `deploy` checks the deployment files with the tools that
//! consume them.

mod harness;

mod actionable;
mod cli;
mod deadlock;
mod deploy;
mod exec;
mod hostile;
mod image;
mod k8s;
mod lifecycle;
mod pid_reuse;
mod postgres;
mod prometheus;
mod scheduler_probes;
mod sharing;
mod storm;
