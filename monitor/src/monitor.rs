//! A running monitor: probes attached, the pipeline task consuming their events, findings
//! coming out of a channel. `run` and `selftest` both drive one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    correlator,
    enrich::EnrichOptions,
    finding::Finding,
    pipeline::{Pipeline, PipelineConfig},
    probes::{ProbeOptions, Probes},
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
}

pub struct Monitor {
    telemetry: Arc<Mutex<Telemetry>>,
    findings: mpsc::UnboundedReceiver<Finding>,
    stop: oneshot::Sender<()>,
    pipeline: JoinHandle<anyhow::Result<()>>,
}

impl Monitor {
    /// Loads and attaches every probe and starts consuming events. Must run inside a tokio
    /// runtime.
    pub fn start(opts: &MonitorOptions) -> anyhow::Result<Self> {
        let mut probes = Probes::load(&ProbeOptions {
            btf_path: opts.btf_path.clone(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            max_tracked: opts.max_tracked,
        })?;
        let telemetry = Telemetry::shared(Some(probes.take_counters()?));
        let grace_ns = u64::try_from(opts.exec_grace.as_nanos()).unwrap_or(u64::MAX);
        let config = PipelineConfig {
            correlator: correlator::Config {
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
        };
        let (tx, findings) = mpsc::unbounded_channel();
        // Attach before the pipeline takes the probes; the ring buffer holds the first events
        // until the pipeline task polls it a moment later.
        probes.attach_all()?;
        let pipeline = Pipeline::new(probes, config, tx, telemetry.clone())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let pipeline = tokio::spawn(pipeline.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            telemetry,
            findings,
            stop,
            pipeline,
        })
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
            pipeline,
            ..
        } = self;
        let _ = stop.send(());
        let result = pipeline.await;
        let mut rest = Vec::new();
        while let Ok(finding) = findings.try_recv() {
            rest.push(finding);
        }
        result??;
        Ok(rest)
    }
}
