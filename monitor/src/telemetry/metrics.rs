//! Prometheus metrics. Labels are bounded sets (finding kinds, severities, fork kinds, event
//! categories): never a pid, comm, path or command line.

use monitor_common::{fork_counter, lost_category, map_full};
use std::{collections::HashMap, time::Duration};

use prometheus::{
    CounterVec, Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::{
    correlate::Stats,
    k8s::namespace_labels::NamespaceLabels,
    kernel::{DetectorStatus, KernelCounts},
    report::finding::{Finding, Kind},
};

pub struct Metrics {
    registry: Registry,
    findings: IntCounterVec,
    suppressed: IntCounterVec,
    forks: IntCounterVec,
    lost: IntCounterVec,
    map_full: IntCounterVec,
    events: IntCounterVec,
    decode_errors: IntCounter,
    tracked: IntGauge,
    deadlocked: IntGauge,
    write_probe: IntGauge,
    write_probe_checks: IntCounter,
    detector_active: IntGaugeVec,
    scheduler_probes: IntGauge,
    correlator: IntCounterVec,
    program_runs: IntCounterVec,
    program_seconds: CounterVec,
    /// Only with `--k8s-pod-names` (see [`Metrics::enable_pod_names`]).
    pod_names: Option<PodNameMetrics>,
    /// Per program: runs and run time as of the last refresh.
    last_programs: HashMap<String, (u64, Duration)>,
    /// The kernel counts as of the last refresh, to turn absolute values into increments.
    last_kernel: KernelCounts,
    last_stats: Stats,
}

/// `forkwatch_findings_by_namespace_total` and `forkwatch_pod_lookup_errors_total`.
struct PodNameMetrics {
    by_namespace: IntCounterVec,
    namespaces: NamespaceLabels,
    lookup_errors: IntCounter,
}

/// Fork kinds as exported: `process` is every new process that does not share the parent's
/// memory (single- and multithreaded parents), `vfork` the CLONE_VM ones (vfork, posix_spawn).
const FORK_KINDS: [(&str, &[u32]); 3] = [
    (
        "process",
        &[fork_counter::SINGLE_THREADED, fork_counter::MULTI_THREADED],
    ),
    ("thread", &[fork_counter::THREAD]),
    ("vfork", &[fork_counter::SHARED_VM]),
];

/// Registers a metric and hands it back (metric handles are cheap clones of one shared value).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let findings = counter_vec(
            "forkwatch_findings_total",
            "Findings reported, by kind and severity.",
            &["kind", "severity"],
        );
        let suppressed = counter_vec(
            "forkwatch_findings_suppressed_total",
            "Findings an [[ignore]] rule of the config file named: counted here, not printed, \
             and not in forkwatch_findings_total.",
            &["kind"],
        );
        let forks = counter_vec(
            "forkwatch_forks_total",
            "Forks seen by the kernel programs: new processes, threads, and vfork/posix_spawn \
             children.",
            &["kind"],
        );
        let lost = counter_vec(
            "forkwatch_events_lost_total",
            "Events dropped because the ring buffer was full, by category.",
            &["category"],
        );
        let map_full = counter_vec(
            "forkwatch_map_full_total",
            "Inserts a full kernel map refused, by map: what they would have recorded went \
             unwatched (tracked: a child's futex waits; blocked: a futex wait; family, \
             children: a fork family member's sharing).",
            &["map"],
        );
        let events = counter_vec(
            "forkwatch_events_total",
            "Events received from the kernel, by category.",
            &["category"],
        );
        let correlator = counter_vec(
            "forkwatch_correlator_total",
            "Correlator bookkeeping: unmatched exec/exit events, evicted and replaced children, \
             decisions withdrawn because /proc showed their evidence was lost.",
            &["outcome"],
        );
        let program_runs = counter_vec(
            "forkwatch_bpf_program_runs_total",
            "Times each eBPF program ran (counted while BPF run-time statistics are enabled).",
            &["program"],
        );
        let program_seconds = register(
            &registry,
            CounterVec::new(
                Opts::new(
                    "forkwatch_bpf_program_seconds_total",
                    "Time spent in each eBPF program (counted while BPF run-time statistics are \
                     enabled).",
                ),
                &["program"],
            )
            .expect("valid metric"),
        );
        let decode_errors = register(
            &registry,
            IntCounter::new(
                "forkwatch_decode_errors_total",
                "Ring-buffer records that could not be decoded.",
            )
            .expect("valid metric"),
        );
        let tracked = register(
            &registry,
            IntGauge::new(
                "forkwatch_tracked_processes",
                "Children of multithreaded forks currently tracked (not yet exec'd or exited).",
            )
            .expect("valid metric"),
        );
        let deadlocked = register(
            &registry,
            IntGauge::new(
                "forkwatch_deadlocked_processes",
                "Processes blocked right now on a reported inherited-lock deadlock.",
            )
            .expect("valid metric"),
        );
        let detector_active = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "forkwatch_detector_active",
                    "1 for each detector this kernel runs, 0 for one whose programs it refuses \
                     (`forkwatch check` and the daemon's start-up warning say why).",
                ),
                &["detector"],
            )
            .expect("valid metric"),
        );
        let write_probe = register(
            &registry,
            IntGauge::new(
                "forkwatch_write_probe_attached",
                "1 while the write probe (every syscall's slow path) is attached: two live \
                 members of a fork family hold one open file description of a regular file \
                 opened for writing without O_APPEND.",
            )
            .expect("valid metric"),
        );
        let write_probe_checks = register(
            &registry,
            IntCounter::new(
                "forkwatch_write_probe_checks_total",
                "Decisions whether the write probe is needed, one per 500 ms while some fork \
                 family has a child that has gone without exec for the grace window.",
            )
            .expect("valid metric"),
        );
        let scheduler_probes = register(
            &registry,
            IntGauge::new(
                "forkwatch_scheduler_probes_attached",
                "1 while the scheduler probes (sched_switch, sched_wakeup: every context switch \
                 on the host) are attached: something is tracked, or was in the last 2 s.",
            )
            .expect("valid metric"),
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("forkwatch_build_info", "Build information; always 1."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Export every label value from the start, so rate() works from the first scrape.
        for (kind, _) in FORK_KINDS {
            forks.with_label_values(&[kind]);
        }
        for category in lost_category::NAMES {
            lost.with_label_values(&[category]);
        }
        for map in map_full::NAMES {
            map_full.with_label_values(&[map]);
        }
        for category in monitor_common::names::category::ALL {
            events.with_label_values(&[category]);
        }
        for kind in Kind::ALL {
            findings.with_label_values(&[kind.as_str(), kind.severity().as_str()]);
            suppressed.with_label_values(&[kind.as_str()]);
        }
        for outcome in ["unmatched", "evicted", "replaced", "withdrawn"] {
            correlator.with_label_values(&[outcome]);
        }
        Self {
            registry,
            findings,
            suppressed,
            forks,
            lost,
            map_full,
            events,
            decode_errors,
            tracked,
            deadlocked,
            write_probe,
            write_probe_checks,
            detector_active,
            scheduler_probes,
            correlator,
            program_runs,
            program_seconds,
            pod_names: None,
            last_programs: HashMap::new(),
            last_kernel: KernelCounts::default(),
            last_stats: Stats::default(),
        }
    }

    /// A finding an [[ignore]] rule named (report/suppress.rs).
    pub fn suppressed(&self, kind: Kind) {
        self.suppressed.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn finding(&mut self, finding: &Finding) {
        self.findings
            .with_label_values(&[finding.kind.as_str(), finding.severity.as_str()])
            .inc();
        if let Some(pods) = &mut self.pod_names {
            let a = &finding.attribution;
            let namespace = pods
                .namespaces
                .label(a.pod_uid.is_some(), a.pod_namespace.as_deref());
            pods.by_namespace
                .with_label_values(&[finding.kind.as_str(), namespace])
                .inc();
        }
    }

    /// Registers the metrics of `--k8s-pod-names`. Without the flag they do not exist at all,
    /// so a daemon that makes no API requests exports no per-namespace series.
    pub fn enable_pod_names(&mut self) {
        if self.pod_names.is_some() {
            return;
        }
        let by_namespace = register(
            &self.registry,
            IntCounterVec::new(
                Opts::new(
                    "forkwatch_findings_by_namespace_total",
                    "Findings by kind and pod namespace (--k8s-pod-names). At most 100 distinct \
                     namespaces, then _other; _unknown: a pod not resolved; _none: not a pod.",
                ),
                &["kind", "namespace"],
            )
            .expect("valid metric"),
        );
        let lookup_errors = register(
            &self.registry,
            IntCounter::new(
                "forkwatch_pod_lookup_errors_total",
                "Failed requests for this node's pod list (--k8s-pod-names).",
            )
            .expect("valid metric"),
        );
        self.pod_names = Some(PodNameMetrics {
            by_namespace,
            namespaces: NamespaceLabels::default(),
            lookup_errors,
        });
    }

    /// A failed pod-list request.
    pub fn pod_lookup_error(&self) {
        if let Some(pods) = &self.pod_names {
            pods.lookup_errors.inc();
        }
    }

    pub fn event(&self, category: &str) {
        self.events.with_label_values(&[category]).inc();
    }

    /// Which detectors run, as decided when the probes were attached.
    pub fn detectors(&self, statuses: &[DetectorStatus]) {
        for status in statuses {
            self.detector_active
                .with_label_values(&[status.detector.name()])
                .set(i64::from(status.active()));
        }
    }

    pub fn write_probe(&self, attached: bool) {
        self.write_probe.set(i64::from(attached));
    }

    /// One decision of the write probe's attach rule was taken.
    pub fn write_probe_checked(&self) {
        self.write_probe_checks.inc();
    }

    pub fn scheduler_probes(&self, attached: bool) {
        self.scheduler_probes.set(i64::from(attached));
    }

    /// A decision withdrawn because /proc showed its evidence was lost.
    pub fn withdrawn(&self) {
        self.correlator.with_label_values(&["withdrawn"]).inc();
    }

    pub fn decode_error(&self) {
        self.decode_errors.inc();
    }

    pub fn correlator(&mut self, tracked: usize, deadlocked: usize, stats: Stats) {
        self.tracked.set(tracked as i64);
        self.deadlocked.set(deadlocked as i64);
        let last = std::mem::replace(&mut self.last_stats, stats);
        for (outcome, now, before) in [
            ("unmatched", stats.unmatched, last.unmatched),
            ("evicted", stats.evicted, last.evicted),
            ("replaced", stats.replaced, last.replaced),
        ] {
            self.correlator
                .with_label_values(&[outcome])
                .inc_by(now.saturating_sub(before));
        }
    }

    /// Folds a fresh read of the programs' run statistics into the exported counters.
    pub fn programs(&mut self, stats: &[(String, u64, Duration)]) {
        for (program, runs, time) in stats {
            let (last_runs, last_time) = self
                .last_programs
                .insert(program.clone(), (*runs, *time))
                .unwrap_or_default();
            self.program_runs
                .with_label_values(&[program])
                .inc_by(runs.saturating_sub(last_runs));
            self.program_seconds
                .with_label_values(&[program])
                .inc_by(time.saturating_sub(last_time).as_secs_f64());
        }
    }

    /// Folds a fresh read of the kernel's counters into the exported counters.
    pub fn kernel(&mut self, now: KernelCounts) {
        let last = std::mem::replace(&mut self.last_kernel, now);
        for (kind, indices) in FORK_KINDS {
            let delta: u64 = indices
                .iter()
                .map(|&i| now.forks[i as usize].saturating_sub(last.forks[i as usize]))
                .sum();
            self.forks.with_label_values(&[kind]).inc_by(delta);
        }
        for (i, category) in lost_category::NAMES.iter().enumerate() {
            self.lost
                .with_label_values(&[category])
                .inc_by(now.lost[i].saturating_sub(last.lost[i]));
        }
        for (i, map) in map_full::NAMES.iter().enumerate() {
            self.map_full
                .with_label_values(&[map])
                .inc_by(now.full[i].saturating_sub(last.full[i]));
        }
    }

    /// Inserts refused by a full map so far, per map, as last read from the kernel.
    pub fn map_full(&self) -> [u64; map_full::COUNT as usize] {
        self.last_kernel.full
    }

    /// Events lost so far per category, as last read from the kernel.
    pub fn lost(&self) -> [u64; lost_category::COUNT as usize] {
        self.last_kernel.lost
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_become_increments() {
        let mut m = Metrics::new();
        let mut counts = KernelCounts::default();
        counts.forks[fork_counter::SINGLE_THREADED as usize] = 5;
        counts.forks[fork_counter::MULTI_THREADED as usize] = 2;
        counts.forks[fork_counter::THREAD as usize] = 9;
        counts.lost[lost_category::EXIT as usize] = 1;
        counts.full[map_full::BLOCKED as usize] = 3;
        m.kernel(counts);
        m.kernel(counts);
        let text = m.render();
        assert!(
            text.contains("forkwatch_forks_total{kind=\"process\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("forkwatch_forks_total{kind=\"thread\"} 9"),
            "{text}"
        );
        assert!(
            text.contains("forkwatch_forks_total{kind=\"vfork\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("forkwatch_events_lost_total{category=\"exit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("forkwatch_map_full_total{map=\"blocked\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("forkwatch_map_full_total{map=\"tracked\"} 0"),
            "every map exported from the start: {text}"
        );
        assert!(text.contains("forkwatch_build_info{version="), "{text}");
        let critical =
            "forkwatch_findings_total{kind=\"inherited_lock_deadlock\",severity=\"critical\"} 0";
        assert!(
            text.contains(critical),
            "every kind exported from the start: {text}"
        );
        assert!(!text.contains("by_namespace"), "only with --k8s-pod-names");
    }

    #[test]
    fn findings_by_namespace_only_when_enabled_and_capped() {
        use crate::k8s::namespace_labels::MAX_NAMESPACES;
        let finding = |uid: Option<&str>, ns: Option<String>| {
            let mut f = Finding::example("p");
            f.attribution.pod_uid = uid.map(Into::into);
            f.attribution.pod_namespace = ns;
            f
        };
        let mut m = Metrics::new();
        m.finding(&finding(Some("u"), Some("shop".into())));
        assert!(!m.render().contains("forkwatch_findings_by_namespace_total"));
        m.enable_pod_names();
        for i in 0..MAX_NAMESPACES + 20 {
            m.finding(&finding(Some("u"), Some(format!("ns-{i}"))));
        }
        m.finding(&finding(Some("u"), Some("ns-0".into())));
        m.finding(&finding(Some("u"), None));
        m.finding(&finding(None, None));
        m.pod_lookup_error();
        let text = m.render();
        let series = |labels: &str| {
            format!("forkwatch_findings_by_namespace_total{{kind=\"mt_fork_no_exec\",{labels}}}")
        };
        assert!(
            text.contains(&(series("namespace=\"ns-0\"") + " 2")),
            "{text}"
        );
        assert!(
            text.contains(&(series("namespace=\"_other\"") + " 20")),
            "{text}"
        );
        assert!(
            text.contains(&(series("namespace=\"_unknown\"") + " 1")),
            "{text}"
        );
        assert!(
            text.contains(&(series("namespace=\"_none\"") + " 1")),
            "{text}"
        );
        let values = text
            .lines()
            .filter(|l| l.starts_with("forkwatch_findings_by_namespace_total{"))
            .count();
        assert_eq!(values, MAX_NAMESPACES + 3, "{text}");
        assert!(
            text.contains("forkwatch_pod_lookup_errors_total 1"),
            "{text}"
        );
    }
}
