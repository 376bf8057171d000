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
// A parent's fork context is read from /proc at most once per FORK_CONTEXT_REUSE_NS per forking
// thread: in a fork storm from one process, reading it for every fork would cost more than the
// fork. The kernel wakes the daemon at once only for the first fork in each such window.
use monitor_common::FORK_CONTEXT_REUSE_NS;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    clock,
    correlate::{self, Correlator},
    enrich::procfs::{ForkContext, ProcFs},
    enrich::{self, EnrichOptions},
    kernel::Probes,
    pipeline::seed,
    report::finding::Finding,
    telemetry::{self, Telemetry},
    wire,
    wire::event::{BlockedWait, Event, Fork},
};

#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub correlator: correlate::Config,
    pub enrich: EnrichOptions,
}

/// How often the kernel's map of blocked threads is scanned while something is tracked. A
/// deadlock is reported at most this long after `--deadlock-after`.
const BLOCKED_SCAN_INTERVAL: Duration = Duration::from_millis(100);

pub type BlockedMap = BpfHashMap<MapData, u32, monitor_common::BlockedWait>;

/// At most one `events_lost` record per this long: a storm must not flood the findings.
const EVENTS_LOST_EVERY: Duration = Duration::from_secs(10);

/// How often the ring buffer is drained when the kernel did not wake the daemon. The programs
/// wake it only once the ring is an eighth full (probes::wakeup_bytes): per-record wakeups cost
/// a fork+exec storm more than everything else forkwatch does. Findings are decided at deadlines
/// of a second or more, so this adds nothing that matters to their latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);

/// The scheduler probes stay attached this long after the last tracked process is gone: fork
/// storms of multithreaded processes come and go, and each attach rescans /proc.
const SCHEDULER_LINGER: Duration = Duration::from_secs(2);

/// What woke the event loop.
enum Wake {
    Events,
    Deadline,
    Scan,
    Families,
}

/// How often the fork families are checked for a child that went without exec, to attach or
/// detach the write probe.
const FAMILY_SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// A forking thread, identified across pid reuse: a parent that exits and whose pid goes to a new
/// process within FORK_CONTEXT_REUSE_NS must not lend it its executable, argv and thread names.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ForkingThread {
    parent: u32,
    parent_start_ns: u64,
    tid: u32,
}

pub struct Pipeline {
    events: AsyncFd<RingBuf<MapData>>,
    blocked: BlockedMap,
    children: BpfHashMap<MapData, u32, u64>,
    /// The kernel's tracked-children map: seeded children are added to it at start.
    tracked_map: BpfHashMap<MapData, u32, u64>,
    /// Futex waits of seeded children found in /proc at start, fed to the correlator while
    /// they last (see seed.rs).
    seeded_waits: Vec<seed::SeededWait>,
    /// Owned here to switch the write probe; dropping the pipeline detaches everything.
    probes: Probes,
    exec_grace_ns: u64,
    /// Forking thread → (boot ns when read, context): see FORK_CONTEXT_REUSE_NS.
    fork_contexts: std::collections::HashMap<ForkingThread, (u64, ForkContext)>,
    /// Lost-event counts as of the last `events_lost` record, and when it was written.
    lost_reported: [u64; monitor_common::lost_category::COUNT as usize],
    lost_reported_at: Option<std::time::Instant>,
    /// Since when nothing has been tracked while the scheduler probes are attached.
    scheduler_idle_since: Option<std::time::Instant>,
    /// When the scheduler probes were last attached (boot ns). A BLOCKED entry from before is
    /// not trusted: its wakeup may have come while they were detached. Waits in progress at
    /// the attach are read from /proc instead (waits_from_proc).
    scheduler_attached_ns: u64,
    correlator: Correlator<ForkContext>,
    proc: ProcFs,
    enrich: EnrichOptions,
    findings: mpsc::UnboundedSender<Finding>,
    telemetry: Arc<Mutex<Telemetry>>,
}

impl Pipeline {
    pub fn new(
        mut probes: Probes,
        config: PipelineConfig,
        findings: mpsc::UnboundedSender<Finding>,
        telemetry: Arc<Mutex<Telemetry>>,
    ) -> anyhow::Result<Self> {
        let events = probes.take_events()?;
        let blocked = probes.take_blocked()?;
        let children = probes.take_children()?;
        let tracked_map = probes.take_tracked()?;
        let family_map = probes.take_family()?;
        let mut pipeline = Self {
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
            // as the AsyncFd owns the ring buffer.
            events: unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            blocked,
            children,
            tracked_map,
            seeded_waits: Vec::new(),
            probes,
            exec_grace_ns: config.correlator.exec_grace_ns,
            fork_contexts: std::collections::HashMap::new(),
            lost_reported: Default::default(),
            lost_reported_at: None,
            scheduler_idle_since: None,
            scheduler_attached_ns: 0,
            correlator: Correlator::new(config.correlator),
            proc: ProcFs::default(),
            enrich: config.enrich,
            findings,
            telemetry,
        };
        // Before the daemon reports ready: hazards already live are part of the state.
        pipeline.seed_from_proc();
        seed_families(&pipeline.proc, family_map, &mut pipeline.children);
        Ok(pipeline)
    }

    /// Runs until `shutdown` completes, then drains what the kernel already sent, so that no
    /// event that reached the ring buffer is lost on a clean stop.
    ///
    /// Runs on a thread of its own (see pipeline/mod.rs): the work between awaits reads /proc and
    /// unwinds stacks, blocking, and under a fork storm long, and nothing else waits on it.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let every = |period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            interval
        };
        let (mut drain, mut scan) = (every(DRAIN_INTERVAL), every(BLOCKED_SCAN_INTERVAL));
        let mut families = every(FAMILY_SCAN_INTERVAL);
        loop {
            let wakeup = self
                .correlator
                .next_wakeup_ns()
                .map(|at| Duration::from_nanos(at.saturating_sub(clock::boot_ns())));
            let woken = tokio::select! {
                () = &mut shutdown => break,
                guard = self.events.readable_mut() => {
                    guard?.clear_ready();
                    Wake::Events
                }
                () = sleep_or_forever(wakeup) => Wake::Deadline,
                // Routine records come only from tracked processes (a process becomes tracked by
                // a fork, and the first fork of a thread per 50 ms wakes the daemon): with none
                // tracked, the 100 ms scan tick drains what is left, and an idle daemon sleeps.
                _ = drain.tick(), if self.correlator.tracked() > 0 => Wake::Events,
                _ = scan.tick() => Wake::Scan,
                _ = families.tick() => Wake::Families,
            };
            // Whatever woke the loop, the ring is drained first: records below the wakeup
            // threshold wait there without a wakeup, and a scan or a deadline decision must see
            // every event that happened before it.
            self.drain();
            self.switch_scheduler_probes();
            match woken {
                Wake::Events | Wake::Deadline => {}
                Wake::Scan => self.scan_blocked(),
                Wake::Families => {
                    self.switch_write_probe();
                    let now = clock::boot_ns();
                    self.fork_contexts.retain(|_, (read_ns, _)| {
                        now.saturating_sub(*read_ns) < FORK_CONTEXT_REUSE_NS
                    });
                    let stats = self.probes.program_stats();
                    self.telemetry().metrics.programs(&stats);
                    self.report_lost_events();
                }
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
                wire::decode(&record)
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

    /// Restart recovery: tracks the children of multithreaded forks that were already running,
    /// in the kernel too, and remembers their threads already asleep in a futex wait.
    fn seed_from_proc(&mut self) {
        let seeded = seed::scan(&self.proc, clock::boot_ns());
        let count = seeded.len();
        for s in seeded {
            let pid = s.fork.child_pid;
            if let Err(err) = self
                .tracked_map
                .insert(&pid, &s.fork.child_start_ns, NO_EXIST)
            {
                tracing::debug!(%err, pid, "cannot track a seeded child in the kernel");
            }
            // Checked after the insert: exited before it, the kernel would never remove the
            // entry, and the next process to get the pid would be tracked in its place.
            if !self.proc.is_same_process(pid, s.fork.child_start_ns) {
                let _ = self.tracked_map.remove(&pid);
                continue;
            }
            self.seeded_waits.extend(s.waits);
            self.correlator.seed(s.fork, s.context);
        }
        if count > 0 {
            tracing::info!(
                children = count,
                blocked = self.seeded_waits.len(),
                "seeded from /proc: running children of multithreaded forks that never exec'd"
            );
        }
    }

    /// Feeds the correlator every tracked thread now asleep in a futex wait. Only tracked
    /// processes' threads are ever in the map, so with nothing tracked there is nothing to read
    /// (the empty scan still clears the deadlocked gauge of processes that went away).
    fn scan_blocked(&mut self) {
        let mut waits: Vec<BlockedWait> = if self.correlator.tracked() == 0 {
            Vec::new()
        } else {
            self.blocked
                .iter()
                .filter_map(Result::ok)
                .map(|(tid, wait)| BlockedWait::from_kernel(tid, &wait))
                .filter(|w| w.since_ns >= self.scheduler_attached_ns)
                .collect()
        };
        // Seeded waits count for as long as the thread provably has not moved.
        let proc = &self.proc;
        self.seeded_waits.retain(|w| seed::still_blocked(proc, w));
        let seeded: Vec<BlockedWait> = self
            .seeded_waits
            .iter()
            .map(|s| s.wait)
            .filter(|s| !waits.iter().any(|w| w.tid == s.tid))
            .collect();
        waits.extend(seeded);
        let decisions = self.correlator.on_blocked(&waits, clock::boot_ns());
        self.decide(decisions);
        self.update_gauges();
    }

    /// Attaches the scheduler probes as soon as something is tracked, and detaches them once
    /// nothing has been (in the correlator nor in the kernel's map) for SCHEDULER_LINGER. A
    /// tracked child's thread that went to sleep before they were attached is never seen going
    /// to sleep again: at each attach, the tracked children's waits are read from /proc (and
    /// re-verified at every scan, like those found at start). Without that, three of the
    /// deadlock tests fail: their children block within a millisecond of the fork.
    fn switch_scheduler_probes(&mut self) {
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
            if since.elapsed() >= SCHEDULER_LINGER && self.tracked_map.keys().next().is_none() {
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
        let tracked: Vec<(u32, u64)> = self.tracked_map.iter().filter_map(Result::ok).collect();
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
    fn switch_write_probe(&mut self) {
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

    /// Writes an `events_lost` record into the findings stream when the kernel dropped events
    /// since the last one (at most one per EVENTS_LOST_EVERY).
    fn report_lost_events(&mut self) {
        let lost = {
            let mut telemetry = self.telemetry();
            telemetry.refresh();
            telemetry.metrics.lost()
        };
        if lost == self.lost_reported
            || self
                .lost_reported_at
                .is_some_and(|at| at.elapsed() < EVENTS_LOST_EVERY)
        {
            return;
        }
        let since: std::collections::BTreeMap<&'static str, u64> =
            monitor_common::lost_category::NAMES
                .iter()
                .zip(lost.iter().zip(self.lost_reported))
                .filter(|(_, (now, before))| *now > before)
                .map(|(name, (now, before))| (*name, now - before))
                .collect();
        self.lost_reported = lost;
        self.lost_reported_at = Some(std::time::Instant::now());
        let finding = enrich::events_lost(since, lost.iter().sum(), clock::boot_ns());
        let _ = self.findings.send(finding);
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
            Event::Fork(f) => self.fork_context(f),
            _ => ForkContext::default(),
        };
        self.telemetry().metrics.event(event.category());
        let decisions = self.correlator.on_event(event, context);
        self.decide(decisions);
    }

    /// The context of a fork at `at_ns`: from /proc, or from a read of the same forking thread
    /// of the same process (pid and start time) less than FORK_CONTEXT_REUSE_NS old.
    fn fork_context(&mut self, fork: &Fork) -> ForkContext {
        let thread = ForkingThread {
            parent: fork.parent_pid,
            parent_start_ns: fork.parent_start_ns,
            tid: fork.parent_tid,
        };
        if let Some((read_ns, context)) = self.fork_contexts.get(&thread)
            && fork.timestamp_ns.abs_diff(*read_ns) < FORK_CONTEXT_REUSE_NS
        {
            return context.clone();
        }
        let (context, from_parent) = self.proc.fork_context_of(fork);
        // A parent already gone (or replaced) was described through its child: not reusable
        // for its siblings.
        if from_parent {
            self.fork_contexts
                .insert(thread, (clock::boot_ns(), context.clone()));
        }
        context
    }

    fn decide(&mut self, decisions: Vec<correlate::Decision<ForkContext>>) {
        for decision in decisions {
            match enrich::finding(decision, &self.proc, self.enrich) {
                // The receiver only goes away when the daemon is shutting down.
                Some(finding) => drop(self.findings.send(finding)),
                None => self.telemetry().metrics.withdrawn(),
            }
        }
    }

    fn telemetry(&self) -> std::sync::MutexGuard<'_, Telemetry> {
        telemetry::lock(&self.telemetry)
    }
}

/// BPF_NOEXIST: an entry the kernel programs made since attaching is newer than /proc's.
const NO_EXIST: u64 = 1;

/// Restart recovery for sharing: makes the members of fork families that share a socket (see
/// seed.rs) members in the kernel again, so that their next uses of a shared connection are
/// seen. Each is re-checked after the insert, like the tracked children.
fn seed_families(
    proc: &ProcFs,
    mut family: BpfHashMap<MapData, u32, u32>,
    children: &mut BpfHashMap<MapData, u32, u64>,
) {
    let now = clock::boot_ns();
    let mut seeded = 0;
    for m in seed::families(proc) {
        if let Err(err) = family.insert(&m.pid, &m.family, NO_EXIST) {
            tracing::debug!(%err, pid = m.pid, "cannot seed a fork-family member");
            continue;
        }
        if m.child {
            let _ = children.insert(&m.pid, &now, NO_EXIST);
        }
        if proc.is_same_process(m.pid, m.start_ns) {
            seeded += 1;
        } else {
            let _ = family.remove(&m.pid);
            let _ = children.remove(&m.pid);
        }
    }
    if seeded > 0 {
        tracing::info!(
            members = seeded,
            "seeded from /proc: fork families whose parent and child (never exec'd) share a socket"
        );
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
