//! The probes attached on demand: the scheduler probes while something is tracked, the write
//! probe while a fork family has a child that went without exec. Each attach and detach is
//! decided here, from the state the event loop keeps.

use std::time::Duration;

use crate::{clock, pipeline::event_loop::Pipeline, pipeline::seed};

/// The scheduler probes stay attached this long after the last tracked process is gone: fork
/// storms of multithreaded processes come and go, and each attach rescans /proc.
const SCHEDULER_LINGER: Duration = Duration::from_secs(2);

impl Pipeline {
    /// Attaches the scheduler probes as soon as something is tracked, and detaches them once
    /// nothing has been (in the correlator nor in the kernel's map) for SCHEDULER_LINGER. A
    /// tracked child's thread that went to sleep before they were attached is never seen going
    /// to sleep again: at each attach, the tracked children's waits are read from /proc (and
    /// re-verified at every scan, like those found at start). Without that, three of the
    /// deadlock tests fail: their children block within a millisecond of the fork.
    pub(super) fn switch_scheduler_probes(&mut self) {
        let busy = self.correlator.tracked() > 0;
        let attached = self.probes.scheduler_probes_attached();
        if busy {
            self.scheduler_idle_since = None;
        }
        if busy && !attached {
            self.scheduler_attached_ns = clock::boot_ns();
            match self.probes.set_scheduler_probes(true) {
                Ok(()) => self.waits_from_proc(),
                Err(err) => tracing::warn!(%err, "attaching the scheduler probes failed"),
            }
        } else if !busy && attached {
            let since = *self
                .scheduler_idle_since
                .get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= SCHEDULER_LINGER && self.tracked_map.map().keys().next().is_none()
            {
                if let Err(err) = self.probes.set_scheduler_probes(false) {
                    tracing::warn!(%err, "detaching the scheduler probes failed");
                }
                self.scheduler_idle_since = None;
            }
        }
        let now_attached = self.probes.scheduler_probes_attached();
        // Runs at every wakeup of the loop: the gauge is only touched when the state changed.
        if now_attached != attached {
            self.telemetry().metrics.scheduler_probes(now_attached);
        }
    }

    /// The futex waits of every process the kernel tracks, from /proc, for the scan.
    fn waits_from_proc(&mut self) {
        let now = clock::boot_ns();
        let tracked: Vec<(u32, u64)> = self
            .tracked_map
            .map()
            .iter()
            .filter_map(Result::ok)
            .collect();
        for (pid, start_ns) in tracked {
            for wait in seed::waits(&self.proc, pid, start_ns, now) {
                if !self
                    .seeded_waits
                    .iter()
                    .any(|s| s.wait.tid == wait.wait.tid)
                {
                    self.seeded_waits.push(wait);
                }
            }
        }
    }

    /// Attaches the write probe while some fork family has a child that has gone without exec
    /// for the grace window (only such families can share an open file for long), and detaches
    /// it when none is left. Fork+exec children leave the map within milliseconds.
    pub(super) fn switch_write_probe(&mut self) {
        let now = clock::boot_ns();
        let lingering = self
            .children
            .iter()
            .filter_map(Result::ok)
            .find(|&(_, joined)| now.saturating_sub(joined) >= self.exec_grace_ns)
            .map(|(pid, _)| pid);
        let want = lingering.is_some();
        if want == self.probes.write_probe_attached() {
            return;
        }
        match self.probes.set_write_probe(want) {
            Ok(()) if want => tracing::info!(
                child = lingering,
                "write probe attached: a forked child has not exec'd within the grace window"
            ),
            Ok(()) => tracing::info!("write probe detached: no forked child without exec left"),
            Err(err) => tracing::warn!(%err, "switching the write probe failed"),
        }
        self.telemetry()
            .metrics
            .write_probe(self.probes.write_probe_attached());
    }
}
