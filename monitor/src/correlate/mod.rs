//! The correlator: a pure state machine over lifecycle events and a clock it is handed.
//!
//! It does no I/O and reads no clock. The daemon feeds it decoded events (each stamped by the
//! kernel with CLOCK_BOOTTIME) and calls [`Correlator::tick`] with the current boot time; it
//! answers with decisions. That keeps every rule unit-testable with synthetic streams.
//!
//! Rule `mt_fork_no_exec`: a process created by fork (not vfork/posix_spawn, not a thread) from a
//! parent with ≥ 2 live threads, which exits without exec, or has not exec'd within the grace
//! window. Decided at the exit or at the deadline, whichever comes first.
//!
//! Rule `inherited_lock_deadlock`: a tracked child (forked from a multithreaded parent, not
//! exec'd) whose only thread has been asleep in a futex wait with no timeout on a
//! process-private futex for `deadlock_after`. Nothing but a signal can ever wake it: no other
//! thread exists in the child and no other process can reach a private futex. Certain.
//! `possible_inherited_lock_wait` is the same wait with something that could still end it (a
//! timeout, a shared futex, other threads); for a multithreaded child only when the parent was
//! waiting on the same address at the fork, because idle worker threads of a child wait forever
//! legitimately. Each once per (process, futex address).
//!
//! Rule `threads_after_mt_fork`: such a child creates a thread. Once per process.
//!
//! Rules `shared_socket` / `shared_datagram_socket`: two processes of one fork family (any fork
//! without exec, multithreaded or not) both move data on one socket. The kernel already dropped
//! listening sockets, stdio and repeats; here only the kinds of socket that carry a conversation
//! remain: connected stream and seqpacket sockets (TCP, Unix) are `shared_socket`, connected
//! datagram sockets (UDP, Unix) `shared_datagram_socket`. An unconnected datagram socket served
//! by several workers is the datagram twin of a shared listener, and stays quiet.
//!
//! Rule `shared_file_offset`: two processes of one fork family write through one regular-file
//! open description without O_APPEND (the kernel filters stdio, appends and non-regular files):
//! their writes race on the shared offset.
//!
//! Each tracked child carries an opaque context `C` (what the daemon read from /proc when the
//! fork arrived), handed back with the decision; [`ForkEvidence`] is the part the rules read.

use std::collections::{BTreeSet, HashMap, HashSet};

use monitor_common::linux::{
    AF_INET, AF_INET6, AF_UNIX, SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM, TCP_ESTABLISHED,
    TCP_LISTEN,
};

use crate::wire::event::{BlockedWait, Event, Exit, Fork, SharedFile, SharedSocket, ThreadChange};

/// What the rules need from the fork-time context.
pub trait ForkEvidence {
    /// Futex addresses some thread of the parent was waiting on at the fork.
    fn parent_futex_waits(&self) -> &[u64];
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How long a child of a multithreaded fork may run before it must have exec'd.
    pub exec_grace_ns: u64,
    /// How long after a deadline `tick` waits before deciding, so that an exec or exit stamped
    /// before the deadline but still in the ring buffer is not misread as late.
    pub reorder_slack_ns: u64,
    /// Most children tracked at once; beyond it the oldest are evicted (and counted).
    pub max_tracked: usize,
    /// How long a futex wait must last before it is reported.
    pub deadlock_after_ns: u64,
}

/// How a tracked child ended up violating the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It exited without ever calling exec.
    ExitedWithoutExec { exit_code: u32, after_ns: u64 },
    /// Still running without exec when the grace window closed.
    NoExecWithinGrace,
    /// It exec'd, but only after the grace window (seen before the deadline was processed).
    ExecAfterGrace { after_ns: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtForkNoExec<C> {
    pub fork: Fork,
    pub context: C,
    pub outcome: Outcome,
    /// Boot time of the decision: the exit/exec timestamp, or the deadline.
    pub decided_ns: u64,
}

/// Why a long futex wait might still end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// The wait has a timeout.
    Timeout,
    /// The futex is shared: another process can wake it.
    SharedFutex,
    /// The child has other threads that could release the lock.
    Multithreaded,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::SharedFutex => "shared_futex",
            Self::Multithreaded => "multithreaded",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockWait<C> {
    pub fork: Fork,
    pub context: C,
    pub wait: BlockedWait,
    pub blocked_ns: u64,
    /// Live threads of the child when decided.
    pub threads: u32,
    pub contended_in_parent_at_fork: bool,
    /// Empty: a certain deadlock. Otherwise what could still end the wait.
    pub reasons: Vec<WaitReason>,
    pub decided_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadsAfterMtFork<C> {
    pub fork: Fork,
    pub context: C,
    /// The new thread.
    pub tid: u32,
    pub threads: u32,
    pub decided_ns: u64,
}

/// How a socket is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// A connected stream or seqpacket socket: one conversation, two talkers.
    Stream,
    /// A connected datagram socket.
    Datagram,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<C> {
    MtForkNoExec(MtForkNoExec<C>),
    LockWait(LockWait<C>),
    ThreadsAfterMtFork(ThreadsAfterMtFork<C>),
    SharedSocket(SharedSocket, Sharing),
    SharedFile(SharedFile),
}

/// Which socket sharing is a hazard (see the module docs).
pub fn classify_sharing(socket: &SharedSocket) -> Option<Sharing> {
    if !matches!(socket.sk_family, AF_UNIX | AF_INET | AF_INET6) || socket.state == TCP_LISTEN {
        return None;
    }
    match socket.sk_type {
        SOCK_STREAM | SOCK_SEQPACKET => Some(Sharing::Stream),
        SOCK_DGRAM if socket.state == TCP_ESTABLISHED => Some(Sharing::Datagram),
        _ => None,
    }
}

/// Counters about the correlator's own health, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Exec/exit events for a pid the correlator was not tracking.
    pub unmatched: u64,
    /// Children dropped because `max_tracked` was reached.
    pub evicted: u64,
    /// A fork for a pid that was still tracked (its exit was lost; pid reused).
    pub replaced: u64,
    /// Forks ignored because they are not hazards (vfork, single-threaded parent).
    pub ignored_forks: u64,
}

struct Tracked<C> {
    fork: Fork,
    context: C,
    deadline_ns: u64,
    /// The finding for this child has been emitted; it stays tracked until exec or exit.
    reported: bool,
    /// Live threads (the child starts with one).
    threads: u32,
    threads_reported: bool,
    /// Futex addresses already reported for this child.
    reported_waits: HashSet<u64>,
    /// Of those, the ones reported as certain deadlocks.
    deadlocked_on: HashSet<u64>,
}

pub struct Correlator<C> {
    config: Config,
    tracked: HashMap<u32, Tracked<C>>,
    /// (deadline, pid) of every child not yet reported, in deadline order.
    deadlines: BTreeSet<(u64, u32)>,
    /// (fork time, pid) of every tracked child, for evicting the oldest.
    by_age: BTreeSet<(u64, u32)>,
    stats: Stats,
    /// Tracked processes whose certain deadlock was still in place at the last scan.
    deadlocked: usize,
}

impl<C: Clone + ForkEvidence> Correlator<C> {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            tracked: HashMap::new(),
            deadlines: BTreeSet::new(),
            by_age: BTreeSet::new(),
            stats: Stats::default(),
            deadlocked: 0,
        }
    }

    /// Processes still blocked on a reported certain deadlock, as of the last scan.
    pub fn deadlocked(&self) -> usize {
        self.deadlocked
    }

    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    /// Tracked children not yet decided (neither exec'd, exited nor reported). A reported child
    /// can stay tracked for days (a worker of a threaded master): this, not `tracked`, says
    /// whether a decision is pending.
    pub fn undecided(&self) -> usize {
        self.deadlines.len()
    }

    /// Tracked children that descend from the watched tree's root (`forkwatch exec`): the
    /// decisions still to come about the tree.
    pub fn tracked_in_tree(&self) -> usize {
        self.tracked.values().filter(|t| t.fork.in_tree).count()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The boot time at which `tick` has something to decide, if any.
    pub fn next_wakeup_ns(&self) -> Option<u64> {
        self.deadlines
            .first()
            .map(|&(deadline, _)| deadline.saturating_add(self.config.reorder_slack_ns))
    }

    /// Feeds one event. `context` is only used for forks.
    pub fn on_event(&mut self, event: Event, context: C) -> Vec<Decision<C>> {
        match event {
            Event::Fork(fork) => {
                self.on_fork(fork, context);
                Vec::new()
            }
            Event::Exec(exec) => self.on_exec(exec.pid, exec.timestamp_ns),
            Event::Exit(exit) => self.on_exit(exit),
            Event::Thread(change) => self.on_thread(change),
            Event::SharedSocket(socket) => match classify_sharing(&socket) {
                Some(sharing) => vec![Decision::SharedSocket(socket, sharing)],
                None => Vec::new(),
            },
            Event::SharedFile(file) => vec![Decision::SharedFile(file)],
            // Enrichment, not evidence: the pipeline keeps fork stacks (pipeline/fork_stacks.rs).
            Event::ForkStack(_) => Vec::new(),
        }
    }

    /// Tracks a child reconstructed at start (see pipeline/seed.rs): its fork was not seen, so it is never
    /// reported as `mt_fork_no_exec`, but every other rule applies to it.
    /// `threads`: its live threads when found (their creation was not seen).
    pub fn seed(&mut self, fork: Fork, context: C, threads: u32) {
        let pid = fork.child_pid;
        self.on_fork(fork, context);
        if let Some(t) = self.tracked.get_mut(&pid) {
            t.threads = threads.max(1);
            t.reported = true;
            self.deadlines.remove(&(t.deadline_ns, pid));
        }
    }

    /// Feeds a scan of every thread of a tracked process currently asleep in a futex wait.
    pub fn on_blocked(&mut self, waits: &[BlockedWait], now_ns: u64) -> Vec<Decision<C>> {
        let mut decisions = Vec::new();
        let mut deadlocked = HashSet::new();
        for wait in waits {
            let Some(t) = self.tracked.get_mut(&wait.pid) else {
                continue;
            };
            if t.deadlocked_on.contains(&wait.uaddr) {
                deadlocked.insert(wait.pid);
            }
            let blocked_ns = now_ns.saturating_sub(wait.since_ns);
            if blocked_ns < self.config.deadlock_after_ns || t.reported_waits.contains(&wait.uaddr)
            {
                continue;
            }
            let contended = t.context.parent_futex_waits().contains(&wait.uaddr);
            let mut reasons = Vec::new();
            if wait.has_timeout {
                reasons.push(WaitReason::Timeout);
            }
            if !wait.private {
                reasons.push(WaitReason::SharedFutex);
            }
            if t.threads > 1 {
                if !contended {
                    // Other threads may well release it, and idle worker threads wait forever
                    // by design: without evidence from the parent this is noise.
                    continue;
                }
                reasons.push(WaitReason::Multithreaded);
            }
            t.reported_waits.insert(wait.uaddr);
            if reasons.is_empty() {
                t.deadlocked_on.insert(wait.uaddr);
                deadlocked.insert(wait.pid);
            }
            decisions.push(Decision::LockWait(LockWait {
                fork: t.fork.clone(),
                context: t.context.clone(),
                wait: *wait,
                blocked_ns,
                threads: t.threads,
                contended_in_parent_at_fork: contended,
                reasons,
                decided_ns: now_ns,
            }));
        }
        self.deadlocked = deadlocked.len();
        decisions
    }

    /// Decides every child whose grace window closed (plus the reorder slack) by `now_ns`.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Decision<C>> {
        let mut decisions = Vec::new();
        while let Some(&(deadline, pid)) = self.deadlines.first() {
            if deadline.saturating_add(self.config.reorder_slack_ns) > now_ns {
                break;
            }
            self.deadlines.pop_first();
            if let Some(t) = self.tracked.get_mut(&pid) {
                t.reported = true;
                decisions.push(Decision::MtForkNoExec(MtForkNoExec {
                    fork: t.fork.clone(),
                    context: t.context.clone(),
                    outcome: Outcome::NoExecWithinGrace,
                    decided_ns: deadline,
                }));
            }
        }
        decisions
    }

    fn on_fork(&mut self, fork: Fork, context: C) {
        if fork.shares_vm || fork.parent_threads < 2 {
            self.stats.ignored_forks += 1;
            return;
        }
        if self.remove(fork.child_pid).is_some() {
            self.stats.replaced += 1;
        }
        while self.tracked.len() >= self.config.max_tracked.max(1) {
            let Some(&(_, oldest)) = self.by_age.first() else {
                break;
            };
            self.remove(oldest);
            self.stats.evicted += 1;
        }
        let pid = fork.child_pid;
        let deadline_ns = fork.timestamp_ns.saturating_add(self.config.exec_grace_ns);
        self.deadlines.insert((deadline_ns, pid));
        self.by_age.insert((fork.timestamp_ns, pid));
        self.tracked.insert(
            pid,
            Tracked {
                fork,
                context,
                deadline_ns,
                reported: false,
                threads: 1,
                threads_reported: false,
                reported_waits: HashSet::new(),
                deadlocked_on: HashSet::new(),
            },
        );
    }

    fn on_thread(&mut self, change: ThreadChange) -> Vec<Decision<C>> {
        let Some(t) = self.tracked.get_mut(&change.pid) else {
            self.stats.unmatched += 1;
            return Vec::new();
        };
        if !change.created {
            t.threads = t.threads.saturating_sub(1).max(1);
            return Vec::new();
        }
        t.threads += 1;
        if t.threads_reported {
            return Vec::new();
        }
        t.threads_reported = true;
        vec![Decision::ThreadsAfterMtFork(ThreadsAfterMtFork {
            fork: t.fork.clone(),
            context: t.context.clone(),
            tid: change.tid,
            threads: t.threads,
            decided_ns: change.timestamp_ns,
        })]
    }

    fn on_exec(&mut self, pid: u32, timestamp_ns: u64) -> Vec<Decision<C>> {
        let Some(t) = self.remove(pid) else {
            self.stats.unmatched += 1;
            return Vec::new();
        };
        if t.reported || timestamp_ns <= t.deadline_ns {
            // Exec'd within the grace window (the safe pattern), or already reported.
            return Vec::new();
        }
        let after_ns = timestamp_ns.saturating_sub(t.fork.timestamp_ns);
        vec![Decision::MtForkNoExec(MtForkNoExec {
            fork: t.fork,
            context: t.context,
            outcome: Outcome::ExecAfterGrace { after_ns },
            decided_ns: timestamp_ns,
        })]
    }

    fn on_exit(&mut self, exit: Exit) -> Vec<Decision<C>> {
        let Some(t) = self.remove(exit.pid) else {
            self.stats.unmatched += 1;
            return Vec::new();
        };
        if t.reported {
            return Vec::new();
        }
        let after_ns = exit.timestamp_ns.saturating_sub(t.fork.timestamp_ns);
        vec![Decision::MtForkNoExec(MtForkNoExec {
            fork: t.fork,
            context: t.context,
            outcome: Outcome::ExitedWithoutExec {
                exit_code: exit.exit_code,
                after_ns,
            },
            decided_ns: exit.timestamp_ns,
        })]
    }

    fn remove(&mut self, pid: u32) -> Option<Tracked<C>> {
        let t = self.tracked.remove(&pid)?;
        self.deadlines.remove(&(t.deadline_ns, pid));
        self.by_age.remove(&(t.fork.timestamp_ns, pid));
        Some(t)
    }
}

#[cfg(test)]
mod tests;
