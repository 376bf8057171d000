//! A running monitor: probes attached, the pipeline task consuming their events, findings
//! coming out of a channel. `run` and `selftest` both drive one.

mod event_loop;
mod fork_context;
mod fork_stacks;
mod lost;
mod open_files;
mod probe_switch;
mod seed;
pub(crate) mod write_candidate;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    correlate,
    enrich::EnrichOptions,
    kernel::{DetectorStatus, ProbeOptions, Probes},
    pipeline::event_loop::{Pipeline, PipelineConfig},
    report::finding::Finding,
    telemetry::Telemetry,
};

/// How long the correlator waits past a deadline for in-flight events (ring-buffer latency is
/// microseconds; this is the margin for a busy host).
const REORDER_SLACK: Duration = Duration::from_millis(25);

#[derive(Clone, Debug)]
pub struct MonitorOptions {
    pub btf_path: PathBuf,
    pub ring_buffer_bytes: u32,
    pub max_tracked: u32,
    pub exec_grace: Duration,
    pub deadlock_after: Duration,
    pub full_cmdline: bool,
    /// Mark the descendants of this host tgid in every record about them (`forkwatch exec`).
    pub tree_root: Option<u32>,
}

pub struct Monitor {
    telemetry: Arc<Mutex<Telemetry>>,
    findings: mpsc::UnboundedReceiver<Finding>,
    stop: oneshot::Sender<()>,
    /// The pipeline thread's result, sent as it ends.
    stopped: oneshot::Receiver<anyhow::Result<()>>,
    /// Which detectors this kernel runs, and why not the others.
    detectors: Vec<DetectorStatus>,
}

impl Monitor {
    /// Loads and attaches every probe and starts consuming events. Must run inside a tokio
    /// runtime.
    pub fn start(opts: &MonitorOptions) -> anyhow::Result<Self> {
        crate::enrich::procfs::require_host_pid_namespace().map_err(anyhow::Error::msg)?;
        let mut probes = Probes::load(&ProbeOptions {
            btf_path: opts.btf_path.clone(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            max_tracked: opts.max_tracked,
            tree_root: opts.tree_root,
        })?;
        let telemetry = Telemetry::shared(Some(probes.take_counters()?));
        let grace_ns = u64::try_from(opts.exec_grace.as_nanos()).unwrap_or(u64::MAX);
        let config = PipelineConfig {
            correlator: correlate::Config {
                exec_grace_ns: grace_ns,
                reorder_slack_ns: REORDER_SLACK.as_nanos() as u64,
                max_tracked: opts.max_tracked as usize,
                deadlock_after_ns: u64::try_from(opts.deadlock_after.as_nanos())
                    .unwrap_or(u64::MAX),
            },
            enrich: EnrichOptions {
                full_cmdline: opts.full_cmdline,
                exec_grace_ms: grace_ns / 1_000_000,
            },
            watch_tree: opts.tree_root.is_some(),
        };
        let (tx, findings) = mpsc::unbounded_channel();
        // Attach before the pipeline takes the probes; the ring buffer holds the first events
        // until the pipeline polls it a moment later.
        probes.attach_all()?;
        let detectors = probes.detectors().to_vec();
        telemetry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .metrics
            .detectors(&detectors);
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = spawn_pipeline(probes, config, tx, telemetry.clone(), stopped)?;
        Ok(Self {
            telemetry,
            findings,
            stop,
            stopped,
            detectors,
        })
    }

    /// Which detectors this kernel runs, and why not the others.
    pub fn detectors(&self) -> &[DetectorStatus] {
        &self.detectors
    }

    pub fn telemetry(&self) -> Arc<Mutex<Telemetry>> {
        self.telemetry.clone()
    }

    /// The next finding; `None` only once the pipeline has stopped.
    pub async fn next_finding(&mut self) -> Option<Finding> {
        self.findings.recv().await
    }

    /// Stops the pipeline (after it drained the ring buffer), which detaches every probe as it
    /// drops them (nothing is pinned), and returns the findings not yet taken.
    pub async fn stop(self) -> anyhow::Result<Vec<Finding>> {
        let Self {
            mut findings,
            stop,
            stopped,
            ..
        } = self;
        // An unwind in progress (a deadlock finding's stack) is not waited for.
        crate::enrich::stack::cancel();
        let _ = stop.send(());
        let result = stopped
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the pipeline thread panicked")));
        let mut rest = Vec::new();
        while let Ok(finding) = findings.try_recv() {
            rest.push(finding);
        }
        result?;
        Ok(rest)
    }
}

/// Starts the pipeline on a thread of its own, with a single-threaded runtime: its work blocks
/// (/proc reads, stack unwinding) without holding up /metrics, and a ring-buffer wakeup wakes
/// one thread, not a runtime's worth. Returns once the pipeline has seeded its state from /proc
/// (the daemon is not ready before), with the receiver of its final result.
fn spawn_pipeline(
    probes: Probes,
    config: PipelineConfig,
    findings: mpsc::UnboundedSender<Finding>,
    telemetry: Arc<Mutex<Telemetry>>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<oneshot::Receiver<anyhow::Result<()>>> {
    let (started_tx, started) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("fw-pipeline".into())
        .spawn(move || {
            let run = || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started_tx.send(Err(err.into()));
                        return Ok(());
                    }
                };
                // The AsyncFd of the ring buffer registers with the runtime that creates it.
                let _guard = runtime.enter();
                let pipeline = Pipeline::new(probes, config, findings, telemetry);
                let pipeline = match pipeline {
                    Ok(pipeline) => {
                        let _ = started_tx.send(Ok(()));
                        pipeline
                    }
                    Err(err) => {
                        let _ = started_tx.send(Err(err));
                        return Ok(());
                    }
                };
                runtime.block_on(pipeline.run(async {
                    let _ = stop.await;
                }))
            };
            let _ = done_tx.send(run());
        })?;
    started
        .recv()
        .map_err(|_| anyhow::anyhow!("the pipeline thread ended before it started"))??;
    Ok(done)
}
