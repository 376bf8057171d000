//! `forkwatch run`: the long-lived daemon.

use std::{
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{RunArgs, UsageError, WatchArgs},
    commands::reporting::{self, Reporter, sleep_until},
    k8s::client::K8sClient,
    k8s::pod_names::PodNames,
    k8s::settings,
    pipeline::{Monitor, MonitorOptions},
    report::suppress::IgnoreRule,
    telemetry,
    telemetry::http::{self, HttpState},
};

/// How often the kernel counters are pulled into the metrics between scrapes.
const COUNTER_REFRESH: Duration = Duration::from_secs(5);

/// Runs the daemon; `ignore` are the config file's `[[ignore]]` rules.
pub async fn run(args: RunArgs, ignore: Vec<IgnoreRule>) -> anyhow::Result<()> {
    // Everything that can be wrong with the configuration fails before the probes load.
    let watch = &args.watch;
    let sinks = reporting::sinks(std::io::stdout(), watch.format, watch.output.as_deref())?;
    let k8s = k8s_client(&args)?;
    let listener = http::bind(args.metrics_addr).await?;
    let metrics_addr = listener.local_addr()?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // Held for the daemon's lifetime: the kernel counts program run time while the fd is open.
    let _bpf_stats = if args.bpf_stats {
        Some(crate::kernel::enable_bpf_stats().context(
            "--bpf-stats: the kernel refused to enable BPF run-time statistics (needs \
             CAP_SYS_ADMIN or root); drop the flag, or run `sysctl kernel.bpf_stats_enabled=1`",
        )?)
    } else {
        None
    };
    let mut monitor = Monitor::start(&MonitorOptions::of(watch))?;
    let telemetry = monitor.telemetry();
    // The refresher runs beside the pipeline; findings only ever read its cache.
    let (pod_names, refresher) = match k8s {
        Some(client) => {
            telemetry::lock(&telemetry).metrics.enable_pod_names();
            tracing::info!(
                api = client.settings().authority,
                node = client.settings().node_name,
                "pod names on: listing this node's pods every 30 s"
            );
            let (names, task) = PodNames::start(client, telemetry.clone());
            (Some(names), Some(task))
        }
        None => (None, None),
    };
    let mut reporter = Reporter::new(
        sinks,
        ignore,
        watch.repeat_window,
        telemetry.clone(),
        pod_names,
    );
    let ready = Arc::new(AtomicBool::new(false));
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        HttpState {
            telemetry: monitor.telemetry(),
            ready: ready.clone(),
        },
        async {
            let _ = http_stopped.await;
        },
    ));
    ready.store(true, Ordering::Release);
    tracing::info!(
        %metrics_addr,
        exec_grace_ms = watch.exec_grace.as_millis() as u64,
        deadlock_after_ms = watch.deadlock_after.as_millis() as u64,
        repeat_window_ms = watch.repeat_window.as_millis() as u64,
        ignore_rules = reporter.ignore_rules(),
        config = ?watch.common.config,
        "ready"
    );

    let mut refresh = tokio::time::interval(COUNTER_REFRESH);
    loop {
        tokio::select! {
            finding = monitor.next_finding() => match finding {
                Some(finding) => {
                    reporter.report(finding);
                }
                // The pipeline ended on its own: say why (its error comes back from stop).
                None => {
                    monitor.stop().await?;
                    anyhow::bail!("the event pipeline stopped unexpectedly");
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = refresh.tick() => telemetry::lock(&telemetry).refresh(),
            () = sleep_until(reporter.next_due()) => reporter.due(std::time::Instant::now()),
        }
    }
    tracing::info!("stopping: detaching probes");
    ready.store(false, Ordering::Release);
    for finding in monitor.stop().await? {
        reporter.report(finding);
    }
    reporter.flush();
    if let Some(task) = refresher {
        task.abort();
    }
    let _ = http_stop.send(());
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// With `--k8s-pod-names`, the API client; a missing or wrong setting is a usage error (exit
/// 2) found before the probes load. Without the flag nothing of it is built.
fn k8s_client(args: &RunArgs) -> anyhow::Result<Option<K8sClient>> {
    if !args.k8s.k8s_pod_names {
        return Ok(None);
    }
    let settings =
        settings::resolve(&args.k8s, |name| std::env::var(name).ok()).map_err(UsageError)?;
    Ok(Some(K8sClient::new(settings).map_err(UsageError)?))
}

impl MonitorOptions {
    /// The monitor the watch flags ask for.
    pub fn of(watch: &WatchArgs) -> Self {
        Self {
            btf_path: watch.common.btf.clone(),
            ring_buffer_bytes: watch.ring_buffer_size,
            max_tracked: watch.max_tracked,
            exec_grace: watch.exec_grace,
            deadlock_after: watch.deadlock_after,
            full_cmdline: watch.full_cmdline,
            tree_root: None,
        }
    }
}
