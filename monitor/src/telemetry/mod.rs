//! Metrics plus the kernel counters they are refreshed from, shared by the pipeline, the daemon
//! and the HTTP server behind one lock (every critical section is a few counter updates).

pub mod http;
pub mod metrics;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{kernel::KernelCounters, telemetry::metrics::Metrics};

pub struct Telemetry {
    pub metrics: Metrics,
    kernel: Option<KernelCounters>,
    /// When the event loop last went round (it does at least every 100 ms while it runs).
    pipeline_beat: Option<Instant>,
    /// With a watched tree: the start of the latest round of the event loop after which
    /// nothing about the tree was pending (see `Pipeline::note_tree_settled`).
    tree_settled: Option<Instant>,
}

/// The event loop is stalled, and /healthz says so, once it has not gone round for this long:
/// a hundred times its slowest tick, and far beyond any one finding's work.
pub const PIPELINE_STALLED_AFTER: Duration = Duration::from_secs(10);

impl Telemetry {
    pub fn shared(kernel: Option<KernelCounters>) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            metrics: Metrics::new(),
            kernel,
            pipeline_beat: None,
            tree_settled: None,
        }))
    }

    /// The event loop went round.
    pub fn pipeline_beat(&mut self) {
        self.pipeline_beat = Some(Instant::now());
    }

    /// Nothing about the watched tree was pending after a round that began at `round`.
    pub fn tree_settled(&mut self, round: Instant) {
        self.tree_settled = Some(round);
    }

    /// Whether every record the kernel sent about the watched tree until `at` has been decided
    /// and its findings sent: a round that began after `at` left nothing pending.
    pub fn tree_settled_since(&self, at: Instant) -> bool {
        self.tree_settled.is_some_and(|round| round > at)
    }

    /// How long the event loop has been stuck, once that is longer than PIPELINE_STALLED_AFTER.
    pub fn pipeline_stalled(&self) -> Option<Duration> {
        self.pipeline_beat
            .map(|at| at.elapsed())
            .filter(|stalled| *stalled >= PIPELINE_STALLED_AFTER)
    }

    /// Pulls the in-kernel counters into the metrics.
    pub fn refresh(&mut self) {
        if let Some(kernel) = &self.kernel {
            self.metrics.kernel(kernel.read());
        }
    }
}

/// Locks the telemetry; a poisoned lock (a panic elsewhere) still holds usable metrics.
pub fn lock(telemetry: &Mutex<Telemetry>) -> MutexGuard<'_, Telemetry> {
    telemetry.lock().unwrap_or_else(|e| e.into_inner())
}
