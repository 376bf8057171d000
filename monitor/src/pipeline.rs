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

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    clock,
    correlator::{self, Correlator},
    decode,
    enrich::{self, EnrichOptions},
    events::Event,
    finding::Finding,
    procfs::{ForkContext, ProcFs},
    telemetry::{self, Telemetry},
};

#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub correlator: correlator::Config,
    pub enrich: EnrichOptions,
}

pub struct Pipeline {
    events: AsyncFd<RingBuf<MapData>>,
    correlator: Correlator<ForkContext>,
    proc: ProcFs,
    enrich: EnrichOptions,
    findings: mpsc::UnboundedSender<Finding>,
    telemetry: Arc<Mutex<Telemetry>>,
}

impl Pipeline {
    pub fn new(
        events: RingBuf<MapData>,
        config: PipelineConfig,
        findings: mpsc::UnboundedSender<Finding>,
        telemetry: Arc<Mutex<Telemetry>>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
            // as the AsyncFd owns the ring buffer.
            events: unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
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
        let (tracked, stats) = (self.correlator.tracked(), self.correlator.stats());
        self.telemetry().metrics.correlator(tracked, stats);
    }

    fn handle(&mut self, event: Event) {
        let (category, context) = match &event {
            Event::Fork(f) => (
                "fork",
                self.proc
                    .fork_context(f.parent_pid, f.parent_tid, f.child_pid),
            ),
            Event::Exec(_) => ("exec", ForkContext::default()),
            Event::Exit(_) => ("exit", ForkContext::default()),
        };
        self.telemetry().metrics.event(category);
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
