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
    probes: Probes,
    telemetry: Arc<Mutex<Telemetry>>,
    findings: mpsc::UnboundedReceiver<Finding>,
    stop: oneshot::Sender<()>,
    pipeline: JoinHandle<std::io::Result<()>>,
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
        let events = probes.take_events()?;
        let blocked = probes.take_blocked()?;
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
        let pipeline = Pipeline::new(events, blocked, config, tx, telemetry.clone())?;
        // Attach only once the consumer exists, so the first events are not lost to a full
        // buffer; the pipeline starts polling as soon as the task runs.
        probes.attach_all()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let pipeline = tokio::spawn(pipeline.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            probes,
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

    /// Stops the pipeline (after it drained the ring buffer), detaches every probe, and returns
    /// the findings not yet taken.
    pub async fn stop(self) -> anyhow::Result<Vec<Finding>> {
        let Self {
            probes,
            mut findings,
            stop,
            pipeline,
            ..
        } = self;
        let _ = stop.send(());
        let result = pipeline.await;
        // Dropping the programs and maps detaches everything: nothing is pinned.
        drop(probes);
        let mut rest = Vec::new();
        while let Ok(finding) = findings.try_recv() {
            rest.push(finding);
        }
        result??;
        Ok(rest)
    }
}
