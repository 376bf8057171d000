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
//! Each tracked child carries an opaque context `C` (what the daemon read from /proc when the
//! fork arrived), handed back with the decision.

use std::collections::{BTreeSet, HashMap};

use crate::events::{Event, Exit, Fork};

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// How long a child of a multithreaded fork may run before it must have exec'd.
    pub exec_grace_ns: u64,
    /// How long after a deadline `tick` waits before deciding, so that an exec or exit stamped
    /// before the deadline but still in the ring buffer is not misread as late.
    pub reorder_slack_ns: u64,
    /// Most children tracked at once; beyond it the oldest are evicted (and counted).
    pub max_tracked: usize,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<C> {
    MtForkNoExec(MtForkNoExec<C>),
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
}

pub struct Correlator<C> {
    config: Config,
    tracked: HashMap<u32, Tracked<C>>,
    /// (deadline, pid) of every child not yet reported, in deadline order.
    deadlines: BTreeSet<(u64, u32)>,
    /// (fork time, pid) of every tracked child, for evicting the oldest.
    by_age: BTreeSet<(u64, u32)>,
    stats: Stats,
}

impl<C: Clone> Correlator<C> {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            tracked: HashMap::new(),
            deadlines: BTreeSet::new(),
            by_age: BTreeSet::new(),
            stats: Stats::default(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.tracked.len()
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
        }
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
            },
        );
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
mod tests {
    use super::*;
    use crate::events::Exec;

    const MS: u64 = 1_000_000;
    const GRACE: u64 = 1_000 * MS;
    const SLACK: u64 = 20 * MS;

    fn correlator() -> Correlator<&'static str> {
        Correlator::new(Config {
            exec_grace_ns: GRACE,
            reorder_slack_ns: SLACK,
            max_tracked: 1_000,
        })
    }

    fn fork(child: u32, at: u64, threads: u32) -> Event {
        Event::Fork(Fork {
            parent_pid: 10,
            parent_tid: 11,
            child_pid: child,
            parent_threads: threads,
            shares_vm: false,
            timestamp_ns: at,
            child_start_ns: at,
            cgroup_id: 1,
            comm: "worker".into(),
        })
    }

    fn exec(pid: u32, at: u64) -> Event {
        Event::Exec(Exec {
            pid,
            timestamp_ns: at,
            comm: "true".into(),
        })
    }

    fn exit(pid: u32, at: u64) -> Event {
        Event::Exit(Exit {
            pid,
            timestamp_ns: at,
            exit_code: 0,
        })
    }

    fn outcomes(decisions: &[Decision<&str>]) -> Vec<(u32, Outcome)> {
        decisions
            .iter()
            .map(|Decision::MtForkNoExec(d)| (d.fork.child_pid, d.outcome))
            .collect()
    }

    #[test]
    fn exit_without_exec_is_reported_at_the_exit() {
        let mut c = correlator();
        assert!(c.on_event(fork(20, 0, 3), "ctx").is_empty());
        let d = c.on_event(exit(20, 5 * MS), "");
        assert_eq!(
            outcomes(&d),
            [(
                20,
                Outcome::ExitedWithoutExec {
                    exit_code: 0,
                    after_ns: 5 * MS
                }
            )]
        );
        let Decision::MtForkNoExec(finding) = &d[0];
        assert_eq!(finding.context, "ctx");
        assert_eq!(finding.fork.parent_threads, 3);
        assert_eq!(c.tracked(), 0);
        assert!(c.tick(10 * GRACE).is_empty(), "decided once only");
    }

    #[test]
    fn no_exec_is_reported_at_the_deadline_not_before() {
        let mut c = correlator();
        c.on_event(fork(20, 100, 2), "");
        assert_eq!(c.next_wakeup_ns(), Some(100 + GRACE + SLACK));
        assert!(c.tick(100 + GRACE + SLACK - 1).is_empty());
        let d = c.tick(100 + GRACE + SLACK);
        assert_eq!(outcomes(&d), [(20, Outcome::NoExecWithinGrace)]);
        let Decision::MtForkNoExec(finding) = &d[0];
        assert_eq!(finding.decided_ns, 100 + GRACE);
        assert_eq!(c.next_wakeup_ns(), None);
        // Still tracked until it execs or exits, but never reported twice.
        assert_eq!(c.tracked(), 1);
        assert!(c.on_event(exec(20, 5 * GRACE), "").is_empty());
        assert!(c.on_event(exit(20, 6 * GRACE), "").is_empty());
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn exec_within_grace_is_quiet_up_to_the_boundary() {
        let mut c = correlator();
        c.on_event(fork(20, 0, 4), "");
        c.on_event(fork(21, 0, 4), "");
        assert!(c.on_event(exec(20, 1), "").is_empty());
        // Exactly at the deadline still counts as within the grace window.
        assert!(c.on_event(exec(21, GRACE), "").is_empty());
        assert!(c.tick(100 * GRACE).is_empty());
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn exec_just_after_the_deadline_arriving_before_the_tick_is_reported() {
        let mut c = correlator();
        c.on_event(fork(20, 0, 2), "");
        let d = c.on_event(exec(20, GRACE + 1), "");
        assert_eq!(
            outcomes(&d),
            [(
                20,
                Outcome::ExecAfterGrace {
                    after_ns: GRACE + 1
                }
            )]
        );
        assert!(c.tick(100 * GRACE).is_empty());
    }

    #[test]
    fn exec_stamped_in_grace_but_processed_late_is_quiet() {
        // The tick came after the deadline but within the reorder slack: the exec still counts.
        let mut c = correlator();
        c.on_event(fork(20, 0, 2), "");
        assert!(c.tick(GRACE + SLACK / 2).is_empty());
        assert!(c.on_event(exec(20, GRACE - 1), "").is_empty());
        assert!(c.tick(100 * GRACE).is_empty());
    }

    #[test]
    fn exit_after_the_deadline_but_before_the_tick_is_an_exit_without_exec() {
        let mut c = correlator();
        c.on_event(fork(20, 0, 2), "");
        let d = c.on_event(exit(20, GRACE + 5), "");
        assert_eq!(
            outcomes(&d),
            [(
                20,
                Outcome::ExitedWithoutExec {
                    exit_code: 0,
                    after_ns: GRACE + 5
                }
            )]
        );
    }

    #[test]
    fn vfork_single_threaded_and_threads_are_never_tracked() {
        let mut c = correlator();
        let Event::Fork(mut vfork) = fork(20, 0, 8) else {
            unreachable!()
        };
        vfork.shares_vm = true;
        c.on_event(Event::Fork(vfork), "");
        c.on_event(fork(21, 0, 1), "");
        c.on_event(fork(22, 0, 0), "");
        assert_eq!(c.tracked(), 0);
        assert!(c.on_event(exit(20, 1), "").is_empty());
        assert!(c.on_event(exit(21, 1), "").is_empty());
        assert!(c.tick(100 * GRACE).is_empty());
        assert_eq!(c.stats().ignored_forks, 3);
    }

    #[test]
    fn out_of_order_and_unknown_events_are_ignored() {
        let mut c = correlator();
        // Exit and exec for pids never seen forking (e.g. the daemon started later).
        assert!(c.on_event(exit(30, 5), "").is_empty());
        assert!(c.on_event(exec(31, 5), "").is_empty());
        // An exec arriving after the exit of the same child: the exit decided, the exec is stale.
        c.on_event(fork(20, 0, 2), "");
        assert_eq!(c.on_event(exit(20, 10), "").len(), 1);
        assert!(c.on_event(exec(20, 5), "").is_empty());
        assert_eq!(c.stats().unmatched, 3);
    }

    #[test]
    fn deadlines_fire_in_order_across_children() {
        let mut c = correlator();
        c.on_event(fork(22, 2 * MS, 2), "");
        c.on_event(fork(20, 0, 2), "");
        c.on_event(fork(21, MS, 2), "");
        let d = c.tick(GRACE + SLACK + MS);
        assert_eq!(
            outcomes(&d),
            [
                (20, Outcome::NoExecWithinGrace),
                (21, Outcome::NoExecWithinGrace)
            ]
        );
        assert_eq!(
            outcomes(&c.tick(u64::MAX)),
            [(22, Outcome::NoExecWithinGrace)]
        );
    }

    #[test]
    fn a_reused_pid_replaces_the_stale_child() {
        let mut c = correlator();
        c.on_event(fork(20, 0, 2), "old");
        c.on_event(fork(20, 10 * MS, 2), "new");
        assert_eq!(c.stats().replaced, 1);
        assert_eq!(c.tracked(), 1);
        let d = c.tick(u64::MAX);
        let [Decision::MtForkNoExec(finding)] = d.as_slice() else {
            panic!("{d:?}")
        };
        assert_eq!(finding.context, "new");
        assert_eq!(finding.decided_ns, 10 * MS + GRACE);
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let mut c = Correlator::new(Config {
            exec_grace_ns: GRACE,
            reorder_slack_ns: SLACK,
            max_tracked: 2,
        });
        c.on_event(fork(20, 0, 2), "");
        c.on_event(fork(21, 1, 2), "");
        c.on_event(fork(22, 2, 2), "");
        assert_eq!(c.tracked(), 2);
        assert_eq!(c.stats().evicted, 1);
        let pids: Vec<u32> = outcomes(&c.tick(u64::MAX))
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(pids, [21, 22]);
    }

    #[test]
    fn huge_timestamps_do_not_overflow() {
        let mut c = correlator();
        c.on_event(fork(20, u64::MAX - 1, 2), "");
        assert_eq!(c.next_wakeup_ns(), Some(u64::MAX));
        assert_eq!(c.tick(u64::MAX).len(), 1);
    }
}
