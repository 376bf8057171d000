//! forkwatch's daemon as a library: the binary (main.rs) is the command line around it, and
//! the fuzz targets (fuzz/) drive the parsers of untrusted input directly (`wire`, `fuzzing`).
//!
//! The folders follow the data: `kernel` (eBPF programs loaded, maps, BTF) → `wire` (ring-buffer
//! records → typed events) → `pipeline` (the event loop, on-demand probes, restart seeding) →
//! `correlate` (the pure state machine) → `enrich` (/proc, stacks, cgroups) → `report` (the
//! finding schema and its sinks) and `telemetry` (metrics, HTTP). `cli` and `commands` are the
//! command line; `k8s` the optional pod names. docs/architecture.md walks one fork through them.

pub mod cli;
mod clock;
pub mod commands;
mod correlate;
mod enrich;
#[doc(hidden)]
pub mod fuzzing;
mod k8s;
pub mod kernel;
mod pipeline;
mod report;
mod telemetry;
pub mod wire;
