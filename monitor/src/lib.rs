//! forkwatch's daemon as a library: the binary (main.rs) is the command line around it, and
//! the fuzz targets (fuzz/) drive the parsers of untrusted input directly.
//!
//! Pipeline: probes (kernel programs, loader) → decode (ring-buffer records → events) →
//! correlator (pure state machine) → enrich (/proc) → sinks (JSON, text) and metrics.

pub mod btf_offsets;
pub mod btf_raw;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod correlator;
pub mod daemon;
pub mod decode;
pub mod enrich;
pub mod events;
pub mod finding;
pub mod fixture;
pub mod http;
pub mod k8s_client;
pub mod k8s_settings;
pub mod metrics;
pub mod monitor;
pub mod namespace_labels;
pub mod pipeline;
pub mod pod_list;
pub mod pod_names;
pub mod probes;
pub mod procfs;
pub mod seed;
pub mod selftest;
pub mod sinks;
pub mod stack;
pub mod telemetry;
