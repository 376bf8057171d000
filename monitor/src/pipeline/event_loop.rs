//! The event loop: ring buffer → decoder → correlator → findings.
//!
//! It owns the ring buffer and the correlator, and hands finished findings to a channel; what
//! happens to them (sinks, metrics, a selftest's checks) is the caller's business. Its other jobs
//! each have a file: the parents' fork contexts (fork_context.rs), the probes attached on demand
//! (probe_switch.rs), restart seeding (seed.rs) and `events_lost` records (lost.rs).

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
    correlate::{self, Correlator},
    enrich::procfs::{ForkContext, ProcFs},
    enrich::{self, EnrichOptions},
    kernel::{Members, Probes},
    pipeline::{
        fork_context::ForkContexts, fork_stacks::ForkStacks, lost::LostReports,
        probe_switch::WriteGate, seed,
    },
    report::finding::Finding,
    telemetry::{self, Telemetry},
    wire,
    wire::event::{BlockedWait, Event},
};

#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub correlator: correlate::Config,
    pub enrich: EnrichOptions,
    /// The kernel marks a watched tree (`forkwatch exec`): tell when nothing about it is pending
    /// (see `Telemetry::tree_settled`).
    pub watch_tree: bool,
}

/// How often the kernel's map of blocked threads is scanned while the scheduler probes are
/// attached. A deadlock is reported at most this long after `--deadlock-after`.
const BLOCKED_SCAN_INTERVAL: Duration = Duration::from_millis(100);

/// The /proc part of the blocked scan (re-verifying the waits found there, and while the
/// scheduler probes are detached reading every tracked thread) runs again only after this many
/// times as long as it took: at most 0.25 % of a core, half the daemon's idle budget. Its cost
/// grows with the tracked processes' threads (measured: 50 lingering workers of 11 threads,
/// ~23 ms a scan); past a few hundred of them a decided child's deadlock is reported that much
/// later (each wait counts only up to when /proc last proved it: `seed::SeededWait::proven`).
const PROC_SCAN_SHARE: u32 = 400;

pub type BlockedMap = BpfHashMap<MapData, u32, monitor_common::BlockedWait>;

/// How often the ring buffer is drained when the kernel did not wake the daemon. The programs
/// wake it only once the ring is an eighth full (probes::wakeup_bytes): per-record wakeups cost
/// a fork+exec storm more than everything else forkwatch does. Findings are decided at deadlines
/// of a second or more, so this adds nothing that matters to their latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);

/// What woke the event loop.
enum Wake {
    Events,
    Deadline,
    Scan,
    Housekeeping,
}

/// The housekeeping tick: how often the fork families are checked for a child that went without
/// exec (to attach or detach the write probe), the program statistics and lost events are read,
/// and, while the scheduler probes are detached, the blocked scan runs, reading every tracked
/// child's threads from /proc: two small files per thread (its syscall line, and its context
/// switches for a thread in a futex wait), so a host with many long-lived workers with idle
/// thread pools pays for it at most this often, not every BLOCKED_SCAN_INTERVAL (and less often
/// when PROC_SCAN_SHARE says so). A decided child's deadlock is reported within
/// `--deadlock-after` plus twice the time between two such scans. At rest (nothing undecided)
/// this is the only timer that wakes the daemon: every wakeup takes a CPU from whatever runs on
/// the host.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);

pub struct Pipeline {
    pub(super) events: AsyncFd<RingBuf<MapData>>,
    pub(super) blocked: BlockedMap,
    pub(super) children: BpfHashMap<MapData, u32, u64>,
    /// The kernel's fork families (member → family root), for the write probe's attach rule.
    pub(super) family_map: Members<u32>,
    /// What the write probe's attach rule found last (probe_switch.rs).
    pub(super) write_gate: WriteGate,
    /// The kernel's tracked-children map: seeded children are added to it at start.
    pub(super) tracked_map: Members<u64>,
    /// Futex waits of seeded children found in /proc at start, fed to the correlator while
    /// they last (see seed.rs).
    pub(super) seeded_waits: Vec<seed::SeededWait>,
    /// Owned here to switch the write probe; dropping the pipeline detaches everything.
    pub(super) probes: Probes,
    pub(super) exec_grace_ns: u64,
    pub(super) fork_contexts: ForkContexts,
    /// The fork stacks the kernel captured, unwound, and the findings waiting for theirs.
    pub(super) fork_stacks: ForkStacks,
    pub(super) lost: LostReports,
    /// Since when nothing has been tracked while the scheduler probes are attached.
    pub(super) scheduler_idle_since: Option<std::time::Instant>,
    /// When the scheduler probes were last attached (boot ns). A BLOCKED entry from before is
    /// not trusted: its wakeup may have come while they were detached. Waits in progress at
    /// the attach are read from /proc instead (waits_from_proc).
    pub(super) scheduler_attached_ns: u64,
    /// When the /proc part of the blocked scan may run again (PROC_SCAN_SHARE).
    pub(super) proc_scan_due: Option<std::time::Instant>,
    pub(super) correlator: Correlator<ForkContext>,
    pub(super) proc: ProcFs,
    pub(super) enrich: EnrichOptions,
    pub(super) findings: mpsc::UnboundedSender<Finding>,
    pub(super) telemetry: Arc<Mutex<Telemetry>>,
    /// See `PipelineConfig::watch_tree`.
    pub(super) watch_tree: bool,
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
        let fork_stacks = ForkStacks::new(probes.fork_stacks().map_err(str::to_owned));
        let mut pipeline = Self {
            // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
            // as the AsyncFd owns the ring buffer.
            events: unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            blocked,
            children,
            family_map,
            write_gate: WriteGate::default(),
            tracked_map,
            seeded_waits: Vec::new(),
            probes,
            exec_grace_ns: config.correlator.exec_grace_ns,
            fork_contexts: ForkContexts::default(),
            fork_stacks,
            lost: LostReports::default(),
            scheduler_idle_since: None,
            scheduler_attached_ns: 0,
            proc_scan_due: None,
            correlator: Correlator::new(config.correlator),
            proc: ProcFs::default().keeping_full_cmdline(config.enrich.full_cmdline),
            enrich: config.enrich,
            findings,
            telemetry,
            watch_tree: config.watch_tree,
        };
        // Before the daemon reports ready: hazards already live are part of the state.
        pipeline.seed_from_proc();
        seed::seed_families(
            &pipeline.proc,
            &mut pipeline.family_map,
            &mut pipeline.children,
        );
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
        let mut housekeeping = every(HOUSEKEEPING_INTERVAL);
        let unwound = self.fork_stacks.notifier();
        // The last drain found records: more are likely in the ring.
        let mut records_flowing = false;
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
                // Records without a wakeup matter while a decision is pending (a child's exec or
                // exit before its deadline) or while they keep coming (a storm). Otherwise the
                // 100 ms scan tick drains what is left: a reported worker that lives for days
                // would else wake the daemon 40 times a second for nothing.
                _ = drain.tick(), if self.correlator.undecided() > 0 || records_flowing => {
                    Wake::Events
                }
                // The kernel's map is only worth scanning while the probes fill it; while they
                // are detached the housekeeping tick reads /proc instead.
                _ = scan.tick(), if self.probes.scheduler_probes_attached() => Wake::Scan,
                _ = housekeeping.tick() => Wake::Housekeeping,
                // A fork stack was unwound: the findings held for it can go.
                () = unwound.notified() => Wake::Events,
            };
            // Whatever woke the loop, the ring is drained first: records below the wakeup
            // threshold wait there without a wakeup, and a scan or a deadline decision must see
            // every event that happened before it.
            let round = std::time::Instant::now();
            records_flowing = self.drain() > 0;
            self.telemetry().pipeline_beat();
            self.switch_scheduler_probes();
            match woken {
                Wake::Events | Wake::Deadline => {}
                Wake::Scan => self.scan_blocked(),
                Wake::Housekeeping => {
                    if !self.probes.scheduler_probes_attached() {
                        self.scan_blocked();
                    }
                    self.switch_write_probe();
                    self.fork_contexts.expire(clock::boot_ns());
                    self.fork_stacks.expire(clock::boot_ns());
                    let stats = self.probes.program_stats();
                    self.telemetry().metrics.programs(&stats);
                    self.report_lost_events();
                }
            }
            let decisions = self.correlator.tick(clock::boot_ns());
            self.decide(decisions);
            self.send_held(false);
            self.note_tree_settled(round);
        }
        self.drain();
        self.send_held(true);
        Ok(())
    }

    /// Handles every record currently in the ring buffer; returns how many there were.
    fn drain(&mut self) -> usize {
        let mut records = 0;
        loop {
            let decoded = {
                let Some(record) = self.events.get_mut().next() else {
                    break;
                };
                wire::decode(&record)
            };
            records += 1;
            match decoded {
                Ok(event) => self.handle(event),
                Err(err) => {
                    tracing::warn!(%err, "malformed ring-buffer record skipped");
                    self.telemetry().metrics.decode_error();
                }
            }
        }
        self.update_gauges();
        records
    }

    /// Feeds the correlator every tracked thread now asleep in a futex wait: from the kernel's
    /// map while the scheduler probes are attached, from /proc while they are not, and the waits
    /// found in /proc before (at start, at an attach, while detached) for as long as /proc shows
    /// them unchanged, each as far as it was last proven. Only tracked processes' threads are
    /// ever in the map, so with nothing tracked there is nothing to read (the empty scan still
    /// clears the deadlocked gauge of processes that went away).
    fn scan_blocked(&mut self) {
        let attached = self.probes.scheduler_probes_attached();
        if self
            .proc_scan_due
            .is_none_or(|due| std::time::Instant::now() >= due)
        {
            let began = std::time::Instant::now();
            // Seeded waits count for as long as the thread provably has not moved. First: a
            // wait read from /proc below was read just now, and is not read twice in one scan.
            let (proc, now) = (&self.proc, clock::boot_ns());
            let mut alive = seed::Alive::new();
            self.seeded_waits
                .retain_mut(|w| seed::reverify(proc, w, now, &mut alive));
            if !attached && self.correlator.tracked() > 0 {
                // No probe sees a wait begin: /proc is read instead (probe_switch.rs).
                self.waits_from_proc();
            }
            self.proc_scan_due = Some(began + began.elapsed() * PROC_SCAN_SHARE);
        }
        let mut waits: Vec<BlockedWait> = if self.correlator.tracked() == 0 || !attached {
            Vec::new()
        } else {
            self.kernel_waits()
        };
        let now = clock::boot_ns();
        let seeded: Vec<BlockedWait> = self
            .seeded_waits
            .iter()
            .map(|s| s.proven(now))
            .filter(|s| !waits.iter().any(|w| w.tid == s.tid))
            .collect();
        waits.extend(seeded);
        let decisions = self.correlator.on_blocked(&waits, now);
        // The gauges before the findings go out: whoever reads a deadlock finding and then
        // scrapes the metrics finds it counted.
        self.update_gauges();
        self.decide(decisions);
    }

    /// The waits in the kernel's map recorded since the scheduler probes were last attached: an
    /// older entry's wakeup may have come while they were detached.
    pub(super) fn kernel_waits(&self) -> Vec<BlockedWait> {
        self.blocked
            .iter()
            .filter_map(Result::ok)
            .map(|(tid, wait)| BlockedWait::from_kernel(tid, &wait))
            .filter(|w| w.since_ns >= self.scheduler_attached_ns)
            .collect()
    }

    /// Writes an `events_lost` record into the findings stream when one is due (lost.rs).
    fn report_lost_events(&mut self) {
        let lost = {
            let mut telemetry = self.telemetry();
            telemetry.refresh();
            telemetry.metrics.lost()
        };
        if let Some(finding) = self.lost.due(lost) {
            let _ = self.findings.send(finding);
        }
    }

    fn update_gauges(&self) {
        let (tracked, stats) = (self.correlator.tracked(), self.correlator.stats());
        let deadlocked = self.correlator.deadlocked();
        self.telemetry()
            .metrics
            .correlator(tracked, deadlocked, stats);
    }

    fn handle(&mut self, event: Event) {
        self.telemetry().metrics.event(event.category());
        let context = match event {
            Event::ForkStack(stack) => return self.fork_stacks.captured(&self.proc, stack),
            Event::Fork(ref f) => {
                let mut context = self.fork_contexts.of(&self.proc, f);
                context.fork_stack = self.fork_stacks.of(f);
                context
            }
            _ => ForkContext::default(),
        };
        let decisions = self.correlator.on_event(event, context);
        self.decide(decisions);
    }

    pub(super) fn decide(&mut self, decisions: Vec<correlate::Decision<ForkContext>>) {
        for decision in decisions {
            let fork_stack = enrich::fork_stack_of(&decision);
            match enrich::finding(decision, &self.proc, self.enrich) {
                Some(finding) => {
                    // Held back while its fork's stack is still being unwound.
                    if let Some(finding) = self.fork_stacks.settle(finding, fork_stack) {
                        // The receiver only goes away when the daemon is shutting down.
                        drop(self.findings.send(finding));
                    }
                }
                None => self.telemetry().metrics.withdrawn(),
            }
        }
    }

    /// With a watched tree: if no child of it is tracked (so no decision about it is pending)
    /// and no finding is held back, everything the kernel sent about the tree before `round`
    /// (when this round's drain began) has been decided and sent.
    fn note_tree_settled(&mut self, round: std::time::Instant) {
        if self.watch_tree && self.correlator.tracked_in_tree() == 0 && !self.fork_stacks.holding()
        {
            self.telemetry().tree_settled(round);
        }
    }

    /// Sends the held findings whose fork stacks are done or whose budget is spent (`all`:
    /// every one, as the pipeline stops).
    fn send_held(&mut self, all: bool) {
        for finding in self.fork_stacks.release(std::time::Instant::now(), all) {
            drop(self.findings.send(finding));
        }
    }

    pub(super) fn telemetry(&self) -> std::sync::MutexGuard<'_, Telemetry> {
        telemetry::lock(&self.telemetry)
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
