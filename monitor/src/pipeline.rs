//! The event loop: ring buffer → decoder → correlator → findings.
//!
//! It owns the ring buffer and the correlator, reads /proc for fork context, and hands finished
//! findings to a channel; what happens to them (sinks, metrics, a selftest's checks) is the
//! caller's business.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    clock,
    correlator::{self, Correlator},
    decode,
    enrich::{self, EnrichOptions},
    events::{BlockedWait, Event},
    finding::Finding,
    procfs::{ForkContext, ProcFs},
    telemetry::{self, Telemetry},
};

#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub correlator: correlator::Config,
    pub enrich: EnrichOptions,
}

/// How often the kernel's map of blocked threads is scanned while something is tracked. A
/// deadlock is reported at most this long after `--deadlock-after`.
const BLOCKED_SCAN_INTERVAL: Duration = Duration::from_millis(100);

pub type BlockedMap = BpfHashMap<MapData, u32, monitor_common::BlockedWait>;

pub struct Pipeline {
    events: AsyncFd<RingBuf<MapData>>,
    blocked: BlockedMap,
    correlator: Correlator<ForkContext>,
    proc: ProcFs,
    enrich: EnrichOptions,
    findings: mpsc::UnboundedSender<Finding>,
    telemetry: Arc<Mutex<Telemetry>>,
}

impl Pipeline {
    pub fn new(
        events: RingBuf<MapData>,
        blocked: BlockedMap,
        config: PipelineConfig,
        findings: mpsc::UnboundedSender<Finding>,
        telemetry: Arc<Mutex<Telemetry>>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
            // as the AsyncFd owns the ring buffer.
            events: unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            blocked,
            correlator: Correlator::new(config.correlator),
            proc: ProcFs::default(),
            enrich: config.enrich,
            findings,
            telemetry,
        })
    }

    /// Runs until `shutdown` completes, then drains what the kernel already sent, so that no
    /// event that reached the ring buffer is lost on a clean stop.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        let mut scan = tokio::time::interval(BLOCKED_SCAN_INTERVAL);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let wakeup = self
                .correlator
                .next_wakeup_ns()
                .map(|at| Duration::from_nanos(at.saturating_sub(clock::boot_ns())));
            tokio::select! {
                () = &mut shutdown => break,
                guard = self.events.readable_mut() => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    drop(guard);
                    self.drain();
                }
                () = sleep_or_forever(wakeup) => {}
                _ = scan.tick() => self.scan_blocked(),
            }
            let decisions = self.correlator.tick(clock::boot_ns());
            self.decide(decisions);
        }
        self.drain();
        Ok(())
    }

    /// Handles every record currently in the ring buffer.
    fn drain(&mut self) {
        loop {
            let decoded = {
                let Some(record) = self.events.get_mut().next() else {
                    break;
                };
                decode::decode(&record)
            };
            match decoded {
                Ok(event) => self.handle(event),
                Err(err) => {
                    tracing::warn!(%err, "malformed ring-buffer record skipped");
                    self.telemetry().metrics.decode_error();
                }
            }
        }
        self.update_gauges();
    }

    /// Feeds the correlator every tracked thread now asleep in a futex wait. Only tracked
    /// processes' threads are ever in the map, so with nothing tracked there is nothing to read
    /// (the empty scan still clears the deadlocked gauge of processes that went away).
    fn scan_blocked(&mut self) {
        let waits: Vec<BlockedWait> = if self.correlator.tracked() == 0 {
            Vec::new()
        } else {
            self.blocked
                .iter()
                .filter_map(Result::ok)
                .map(|(tid, wait)| BlockedWait::from_kernel(tid, &wait))
                .collect()
        };
        let decisions = self.correlator.on_blocked(&waits, clock::boot_ns());
        self.decide(decisions);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let (tracked, stats) = (self.correlator.tracked(), self.correlator.stats());
        let deadlocked = self.correlator.deadlocked();
        self.telemetry()
            .metrics
            .correlator(tracked, deadlocked, stats);
    }

    fn handle(&mut self, event: Event) {
        let context = match &event {
            Event::Fork(f) => self
                .proc
                .fork_context(f.parent_pid, f.parent_tid, f.child_pid),
            _ => ForkContext::default(),
        };
        self.telemetry().metrics.event(event.category());
        let decisions = self.correlator.on_event(event, context);
        self.decide(decisions);
    }

    fn decide(&mut self, decisions: Vec<correlator::Decision<ForkContext>>) {
        for decision in decisions {
            let finding = enrich::finding(decision, &self.proc, self.enrich);
            // The receiver only goes away when the daemon is shutting down.
            let _ = self.findings.send(finding);
        }
    }

    fn telemetry(&self) -> std::sync::MutexGuard<'_, Telemetry> {
        telemetry::lock(&self.telemetry)
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
