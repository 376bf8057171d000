//! `forkwatch run`: the long-lived daemon.

use std::{
    io::IsTerminal,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{Format, RunArgs, UsageError},
    k8s::client::K8sClient,
    k8s::pod_names::PodNames,
    k8s::settings,
    pipeline::{Monitor, MonitorOptions},
    report::finding::Finding,
    report::fold::Folder,
    report::suppress::{IgnoreRule, Suppressor},
    report::{JsonSink, Sinks, TextSink, output_file},
    telemetry,
    telemetry::http::{self, HttpState},
};

/// How often the kernel counters are pulled into the metrics between scrapes.
const COUNTER_REFRESH: Duration = Duration::from_secs(5);

/// Runs the daemon; `ignore` are the config file's `[[ignore]]` rules.
pub async fn run(args: RunArgs, ignore: Vec<IgnoreRule>) -> anyhow::Result<()> {
    // Everything that can be wrong with the configuration fails before the probes load.
    let mut sinks = sinks(&args)?;
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
    let mut monitor = Monitor::start(&MonitorOptions {
        btf_path: args.common.btf.clone(),
        ring_buffer_bytes: args.ring_buffer_size,
        max_tracked: args.max_tracked,
        exec_grace: args.exec_grace,
        deadlock_after: args.deadlock_after,
        full_cmdline: args.full_cmdline,
    })?;
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
    let suppressor = Suppressor::new(ignore);
    let mut folder = Folder::new(args.repeat_window);
    // Suppressed findings are counted apart and go no further; the rest are all counted, then
    // folded (report/fold.rs) on their way to the sinks.
    let report = |mut finding: Finding, sinks: &mut Sinks, folder: &mut Folder| {
        if let Some(names) = &pod_names {
            names.annotate(&mut finding.attribution);
        }
        if let Some(rule) = suppressor.rule_for(&finding) {
            telemetry::lock(&telemetry).metrics.suppressed(finding.kind);
            tracing::debug!(
                kind = finding.kind.as_str(),
                pid = finding.pid,
                rule_line = rule.line,
                "finding suppressed by an [[ignore]] rule"
            );
            return;
        }
        telemetry::lock(&telemetry).metrics.finding(&finding);
        let now = std::time::Instant::now();
        for repeated in folder.due(now) {
            sinks.emit_repeated(&repeated);
        }
        if folder.offer(&finding, now) {
            sinks.emit(&finding);
        }
    };
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
        exec_grace_ms = args.exec_grace.as_millis() as u64,
        deadlock_after_ms = args.deadlock_after.as_millis() as u64,
        repeat_window_ms = args.repeat_window.as_millis() as u64,
        ignore_rules = suppressor.count(),
        config = ?args.common.config,
        "ready"
    );

    let mut refresh = tokio::time::interval(COUNTER_REFRESH);
    loop {
        tokio::select! {
            finding = monitor.next_finding() => match finding {
                Some(finding) => report(finding, &mut sinks, &mut folder),
                // The pipeline ended on its own: say why (its error comes back from stop).
                None => {
                    monitor.stop().await?;
                    anyhow::bail!("the event pipeline stopped unexpectedly");
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = refresh.tick() => telemetry::lock(&telemetry).refresh(),
            () = sleep_until(folder.next_due()) => {
                for repeated in folder.due(std::time::Instant::now()) {
                    sinks.emit_repeated(&repeated);
                }
            }
        }
    }
    tracing::info!("stopping: detaching probes");
    ready.store(false, Ordering::Release);
    for finding in monitor.stop().await? {
        report(finding, &mut sinks, &mut folder);
    }
    // What was folded and not yet said goes out now, not with the process.
    for repeated in folder.flush() {
        sinks.emit_repeated(&repeated);
    }
    if let Some(task) = refresher {
        task.abort();
    }
    let _ = http_stop.send(());
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
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

fn sinks(args: &RunArgs) -> anyhow::Result<Sinks> {
    let mut sinks = Sinks::default();
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal();
    match args.format {
        Some(Format::Json) => sinks.push(Box::new(JsonSink::new(stdout))),
        Some(Format::Text) => sinks.push(Box::new(TextSink::new(stdout, terminal))),
        None if terminal => sinks.push(Box::new(TextSink::new(stdout, true))),
        None => sinks.push(Box::new(JsonSink::new(stdout))),
    }
    if let Some(path) = &args.output {
        sinks.push(Box::new(JsonSink::new(output_file::open(path)?)));
    }
    Ok(sinks)
}
