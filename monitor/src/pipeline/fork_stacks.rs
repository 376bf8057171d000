//! The fork stacks the kernel captured. A copy is kept until a finding needs it, then unwound
//! once, on a thread of its own (cold symbolization of a large binary with debug info takes
//! from a hundred milliseconds to a second and more, which the event loop must not spend while
//! a fork storm fills the ring buffer), and every fork from the same thread and call site
//! reuses the result. Most forks of multithreaded programs exec at once (a Rust or Java
//! program spawning a command): their copies are never unwound. A finding whose fork's stack is
//! still being unwound is held back until it is done, or until its budget is spent (then it
//! goes out saying so).
//!
//! The parent's mappings are read at once when the copy arrives, while the parent has most
//! likely not moved on; the unwinder reads the mapped files through the parent's /proc entry,
//! so a parent that exits first leaves the stack unnamed or missing, never a wrong one.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use monitor_common::FORK_STACK_EVERY_NS;

use crate::{
    enrich::{
        fork_stack::{self, Captured, ForkStackRef, Slot, Unwound, reason},
        procfs::{self, ProcFs},
        stack,
    },
    report::finding::Finding,
    wire::event::{Fork, ForkStack, StackKey},
};

/// Frames of a fork stack worth keeping.
const MAX_FRAMES: usize = 32;
/// Stacks waiting for the unwinder thread; past this a stack is left out (`unwinder_busy`).
const QUEUE: usize = 16;
/// How long a finding is held back for its fork's stack.
const HOLD_BUDGET: Duration = stack::UNWIND_BUDGET;
/// A key's unwound stack is kept this long after its copy last arrived: the kernel sends a copy
/// at most every FORK_STACK_EVERY_NS per key, and a fork refers to the latest.
const KEEP_NS: u64 = 3 * FORK_STACK_EVERY_NS;

/// One copy for the unwinder thread, and the slot it fills.
struct Job {
    captured: Captured,
    slot: Arc<Slot>,
}

pub struct ForkStacks {
    /// None: the kernel does not capture fork stacks, with why.
    kernel: Result<(), String>,
    /// Key → (boot ns its copy last arrived, its slot).
    slots: HashMap<StackKey, (u64, Arc<Slot>)>,
    /// The unwinder thread's queue, started with the first copy.
    jobs: Option<SyncSender<Job>>,
    /// Woken when the unwinder finishes a stack, so held findings go out at once.
    unwound: Arc<tokio::sync::Notify>,
    /// Findings held back for their fork's stack, in the order they were decided.
    held: VecDeque<(Finding, ForkStackRef, Instant)>,
}

impl ForkStacks {
    /// `kernel`: whether the kernel captures fork stacks, or why not.
    pub fn new(kernel: Result<(), String>) -> Self {
        Self {
            kernel,
            slots: HashMap::new(),
            jobs: None,
            unwound: Arc::new(tokio::sync::Notify::new()),
            held: VecDeque::new(),
        }
    }

    /// Whether a finding is held back for its fork's stack.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// What the event loop waits on to send held findings.
    pub fn notifier(&self) -> Arc<tokio::sync::Notify> {
        self.unwound.clone()
    }

    /// A copy arrived: keep it for the forks that refer to it, unless this key's copy is kept
    /// already (and not given up for want of room in the unwinder's queue).
    pub fn captured(&mut self, proc: &ProcFs, captured: ForkStack) {
        let key = captured.key;
        if let Some((seen_ns, slot)) = self.slots.get_mut(&key)
            && slot.outcome() != Some(Err(reason::BUSY))
        {
            *seen_ns = captured.timestamp_ns;
            return;
        }
        // Read, then checked: a parent still itself after the read was itself during it.
        let maps = read_maps(proc, key.pid);
        let slot = match maps {
            Some(maps) if proc.is_same_process(key.pid, key.parent_start_ns) => {
                Slot::waiting(Captured {
                    pid: key.pid,
                    maps,
                    stack: captured.stack,
                })
            }
            _ => Slot::settled(Err(reason::PARENT_EXITED)),
        };
        self.slots
            .insert(key, (captured.timestamp_ns, Arc::new(slot)));
    }

    /// Hands the copy of `slot` to the unwinder thread, if it has not been already.
    fn unwind(&mut self, slot: &Arc<Slot>) {
        let Some(captured) = slot.take_pending() else {
            return;
        };
        let job = Job {
            captured,
            slot: slot.clone(),
        };
        let jobs = self
            .jobs
            .get_or_insert_with(|| spawn_unwinder(self.unwound.clone()));
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => slot.set(Err(reason::BUSY)),
            // The thread could not be started (logged then).
            Err(TrySendError::Disconnected(_)) => slot.set(Err(reason::FAILED)),
        }
    }

    /// The stack of `fork`: its slot, or why it has none.
    pub fn of(&self, fork: &Fork) -> ForkStackRef {
        let Some(key) = fork.stack else {
            // The kernel attached the plain fork program (or this fork was not seen live).
            return ForkStackRef::Unavailable(match self.kernel {
                Ok(()) => reason::RECORD_LOST,
                Err(_) => reason::KERNEL_UNSUPPORTED,
            });
        };
        if key.ip == 0 {
            return ForkStackRef::Unavailable(reason::NO_REGISTERS);
        }
        match self.slots.get(&key) {
            Some((_, slot)) => ForkStackRef::Unwinding(slot.clone()),
            None if fork.stack_skipped => ForkStackRef::Unavailable(reason::SKIPPED),
            None => ForkStackRef::Unavailable(reason::RECORD_LOST),
        }
    }

    /// `finding` now if its fork's stack is settled (filled in), or None: it is held back
    /// until [`ForkStacks::release`] finds it done or its budget spent.
    pub fn settle(&mut self, finding: Finding, stack: Option<ForkStackRef>) -> Option<Finding> {
        let Some(stack) = stack else {
            return Some(finding);
        };
        if let ForkStackRef::Unwinding(slot) = &stack {
            self.unwind(slot);
        }
        match stack.outcome() {
            Some(outcome) => Some(with_stack(finding, outcome)),
            None => {
                self.held
                    .push_back((finding, stack, Instant::now() + HOLD_BUDGET));
                None
            }
        }
    }

    /// The held findings whose stacks are done, or whose budget is spent by `now` (`all`: every
    /// one, as the daemon stops), filled in.
    pub fn release(&mut self, now: Instant, all: bool) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.held.len());
        for (finding, stack, deadline) in self.held.drain(..) {
            match stack.outcome() {
                Some(outcome) => out.push(with_stack(finding, outcome)),
                None if all || now >= deadline => {
                    out.push(with_stack(finding, Err(reason::TIMED_OUT)))
                }
                None => kept.push_back((finding, stack, deadline)),
            }
        }
        self.held = kept;
        out
    }

    /// Forgets the keys whose copy is too old to be referred to.
    pub fn expire(&mut self, now_ns: u64) {
        self.slots
            .retain(|_, (seen_ns, _)| now_ns.saturating_sub(*seen_ns) < KEEP_NS);
    }
}

fn with_stack(mut finding: Finding, outcome: Unwound) -> Finding {
    finding.fork = Some(fork_stack::details(outcome));
    finding
}

/// /proc/<pid>/maps as `procfs::read_maps` reads it.
fn read_maps(proc: &ProcFs, pid: u32) -> Option<String> {
    procfs::read_maps(&proc.root().join(pid.to_string()).join("maps")).ok()
}

/// Starts the unwinder thread; a queue whose thread could not be started is disconnected.
fn spawn_unwinder(unwound: Arc<tokio::sync::Notify>) -> SyncSender<Job> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("fw-forkstack".into())
        .spawn(move || unwinder(&rx, &unwound));
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot start the fork-stack unwinder thread");
    }
    tx
}

/// The unwinder thread: one stack at a time, until the pipeline is dropped. A stack that hangs
/// (a mapped file on a server that never answers) holds up the stacks queued behind it, never
/// the event loop: their findings go out when their budget is spent.
fn unwinder(jobs: &Receiver<Job>, unwound: &tokio::sync::Notify) {
    while let Ok(Job { captured, slot }) = jobs.recv() {
        let started = Instant::now();
        let pid = captured.pid;
        let result = stack::captured_stack(pid, &captured.maps, &captured.stack, MAX_FRAMES)
            .map(Arc::new)
            .map_err(|err| {
                tracing::debug!(%err, pid, "fork stack not unwound");
                reason::FAILED
            });
        tracing::debug!(
            pid,
            ms = started.elapsed().as_millis() as u64,
            frames = result.as_ref().map_or(0, |f| f.len()),
            "fork stack unwound"
        );
        slot.set(result);
        unwound.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: u64) -> StackKey {
        StackKey {
            pid: 0x7fff_fff0,
            tid: 0x7fff_fff0,
            parent_start_ns: 1,
            ip,
            sp: 0x1000,
            site: 0,
        }
    }

    fn fork(stack: Option<StackKey>) -> Fork {
        Fork {
            parent_pid: 0x7fff_fff0,
            parent_tid: 0x7fff_fff0,
            child_pid: 0x7fff_fff1,
            parent_threads: 2,
            shares_vm: false,
            timestamp_ns: 1,
            child_start_ns: 1,
            parent_start_ns: 1,
            cgroup_id: 0,
            in_tree: false,
            comm: "x".into(),
            stack,
            stack_skipped: false,
        }
    }

    fn reason_of(stack: &ForkStackRef) -> Option<&'static str> {
        stack.outcome().and_then(|o| o.err())
    }

    #[test]
    fn each_fork_learns_why_it_has_no_stack() {
        let without = ForkStacks::new(Err("old kernel".into()));
        assert_eq!(
            reason_of(&without.of(&fork(None))),
            Some(reason::KERNEL_UNSUPPORTED)
        );
        let mut with = ForkStacks::new(Ok(()));
        assert_eq!(
            reason_of(&with.of(&fork(Some(key(0))))),
            Some(reason::NO_REGISTERS)
        );
        assert_eq!(
            reason_of(&with.of(&fork(Some(key(5))))),
            Some(reason::RECORD_LOST)
        );
        // A copy whose parent is gone (a pid above pid_max) is settled at once.
        let proc = ProcFs::new("/nonexistent-proc");
        with.captured(
            &proc,
            ForkStack {
                key: key(5),
                timestamp_ns: 1,
                stack: crate::enrich::stack::CapturedStack {
                    ip: 5,
                    sp: 0x1000,
                    bp: 0,
                    base: 0x1000,
                    bytes: vec![0; 64],
                },
            },
        );
        assert_eq!(
            reason_of(&with.of(&fork(Some(key(5))))),
            Some(reason::PARENT_EXITED)
        );
        with.expire(KEEP_NS + 1);
        assert_eq!(
            reason_of(&with.of(&fork(Some(key(5))))),
            Some(reason::RECORD_LOST)
        );
    }

    #[test]
    fn a_copy_is_unwound_only_when_a_finding_needs_it() {
        // This test process plays the parent: alive, with its start time.
        let proc = ProcFs::default();
        let me = std::process::id();
        // SAFETY: sysconf reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let start_ns = proc.start_ticks(me).unwrap() * (1_000_000_000 / hz);
        let key = StackKey {
            pid: me,
            tid: me,
            parent_start_ns: start_ns,
            ip: a_copy_is_unwound_only_when_a_finding_needs_it as *const () as u64,
            sp: 0x1000,
            site: 7,
        };
        let mut stacks = ForkStacks::new(Ok(()));
        let copy = crate::enrich::stack::CapturedStack {
            ip: key.ip,
            sp: key.sp,
            bp: 0,
            base: 0x1000,
            bytes: vec![0; 64],
        };
        stacks.captured(
            &proc,
            ForkStack {
                key,
                timestamp_ns: 1,
                stack: copy,
            },
        );
        let fork = Fork {
            parent_pid: me,
            parent_tid: me,
            parent_start_ns: start_ns,
            ..fork(Some(key))
        };
        let stack = stacks.of(&fork);
        assert_eq!(stack.outcome(), None, "kept, not unwound");
        assert!(stacks.jobs.is_none(), "no unwinder started for it");
        assert_eq!(
            stacks.settle(Finding::example("w"), Some(stack.clone())),
            None,
            "held while it is unwound"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let released = loop {
            let out = stacks.release(Instant::now(), false);
            if let Some(finding) = out.into_iter().next() {
                break finding;
            }
            assert!(Instant::now() < deadline, "never unwound");
            std::thread::sleep(Duration::from_millis(10));
        };
        let details = released.fork.unwrap();
        assert_ne!(
            details.fork_stack_unavailable_reason,
            Some(reason::TIMED_OUT)
        );
        assert!(stack.outcome().is_some());
    }

    #[test]
    fn findings_are_held_until_their_stack_is_done_or_their_budget_spent() {
        let mut stacks = ForkStacks::new(Ok(()));
        let finding = Finding::example("worker");
        // Not about a fork: out at once, untouched.
        assert_eq!(stacks.settle(finding.clone(), None), Some(finding.clone()));
        let (done, late) = (Arc::new(Slot::default()), Arc::new(Slot::default()));
        assert_eq!(
            stacks.settle(finding.clone(), Some(ForkStackRef::Unwinding(done.clone()))),
            None
        );
        assert_eq!(
            stacks.settle(finding.clone(), Some(ForkStackRef::Unwinding(late.clone()))),
            None
        );
        let now = Instant::now();
        assert!(stacks.release(now, false).is_empty());
        done.set(Err(reason::FAILED));
        let out = stacks.release(now, false);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].fork.as_ref().unwrap().fork_stack_unavailable_reason,
            Some(reason::FAILED)
        );
        let out = stacks.release(now + HOLD_BUDGET + Duration::from_millis(1), false);
        assert_eq!(
            out[0].fork.as_ref().unwrap().fork_stack_unavailable_reason,
            Some(reason::TIMED_OUT)
        );
        assert!(stacks.release(now, true).is_empty());
    }
}
