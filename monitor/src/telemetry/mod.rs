//! Metrics plus the kernel counters they are refreshed from, shared by the pipeline, the daemon
//! and the HTTP server behind one lock (every critical section is a few counter updates).

pub mod http;
pub mod metrics;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{kernel::KernelCounters, telemetry::metrics::Metrics};

pub struct Telemetry {
    pub metrics: Metrics,
    kernel: Option<KernelCounters>,
}

impl Telemetry {
    pub fn shared(kernel: Option<KernelCounters>) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            metrics: Metrics::new(),
            kernel,
        }))
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
