//! The correlator's rules, driven by synthetic event streams and a synthetic clock.

use super::*;
use crate::wire::event::Exec;

const MS: u64 = 1_000_000;
const GRACE: u64 = 1_000 * MS;
const SLACK: u64 = 20 * MS;
const DEADLOCK: u64 = 1_000 * MS;

/// Test contexts carry no fork-time evidence...
impl ForkEvidence for &'static str {
    fn parent_futex_waits(&self) -> &[u64] {
        &[]
    }
}

/// ...except these, whose parent was waiting on address 0x1000 at the fork.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contended;

impl ForkEvidence for Contended {
    fn parent_futex_waits(&self) -> &[u64] {
        &[0x1000]
    }
}

fn config(max_tracked: usize) -> Config {
    Config {
        exec_grace_ns: GRACE,
        reorder_slack_ns: SLACK,
        max_tracked,
        deadlock_after_ns: DEADLOCK,
    }
}

fn correlator() -> Correlator<&'static str> {
    Correlator::new(config(1_000))
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
        parent_start_ns: 0,
        cgroup_id: 1,
        in_tree: false,
        comm: "worker".into(),
        stack: None,
        stack_skipped: false,
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

fn outcomes<C: std::fmt::Debug>(decisions: &[Decision<C>]) -> Vec<(u32, Outcome)> {
    decisions
        .iter()
        .map(|d| match d {
            Decision::MtForkNoExec(d) => (d.fork.child_pid, d.outcome),
            other => panic!("not an mt_fork_no_exec decision: {other:?}"),
        })
        .collect::<Vec<_>>()
}

fn thread(pid: u32, tid: u32, created: bool) -> Event {
    Event::Thread(ThreadChange {
        pid,
        tid,
        created,
        timestamp_ns: 5,
    })
}

fn wait(pid: u32, uaddr: u64, since: u64) -> BlockedWait {
    BlockedWait {
        pid,
        tid: pid,
        syscall: 202,
        uaddr,
        op: 0x80,
        private: true,
        has_timeout: false,
        since_ns: since,
    }
}

fn lock_waits<C: Clone + std::fmt::Debug>(decisions: Vec<Decision<C>>) -> Vec<LockWait<C>> {
    decisions
        .into_iter()
        .map(|d| match d {
            Decision::LockWait(w) => w,
            other => panic!("not a lock wait: {other:?}"),
        })
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
    let Decision::MtForkNoExec(finding) = &d[0] else {
        panic!()
    };
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
    assert_eq!(c.undecided(), 1);
    let d = c.tick(100 + GRACE + SLACK);
    assert_eq!(outcomes(&d), [(20, Outcome::NoExecWithinGrace)]);
    let Decision::MtForkNoExec(finding) = &d[0] else {
        panic!()
    };
    assert_eq!(finding.decided_ns, 100 + GRACE);
    assert_eq!(c.next_wakeup_ns(), None);
    // Still tracked until it execs or exits, but never reported twice, and nothing is pending.
    assert_eq!((c.tracked(), c.undecided()), (1, 0));
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
    let mut c = Correlator::new(config(2));
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
fn single_threaded_private_untimed_wait_is_a_certain_deadlock_once() {
    let mut c = correlator();
    c.on_event(fork(20, 0, 3), "");
    let w = wait(20, 0x1000, 10 * MS);
    // Not yet: blocked for less than deadlock_after.
    assert!(c.on_blocked(&[w], 10 * MS + DEADLOCK - 1).is_empty());
    let found = lock_waits(c.on_blocked(&[w], 10 * MS + DEADLOCK));
    assert_eq!(found.len(), 1);
    assert!(found[0].reasons.is_empty(), "certain");
    assert_eq!(found[0].blocked_ns, DEADLOCK);
    assert_eq!(found[0].threads, 1);
    assert!(!found[0].contended_in_parent_at_fork);
    assert_eq!(c.deadlocked(), 1);
    // Once per (process, address), however often it is scanned.
    assert!(c.on_blocked(&[w], 100 * DEADLOCK).is_empty());
    assert_eq!(c.deadlocked(), 1);
    // Woken (gone from the scan): the gauge drops, nothing new is reported.
    assert!(c.on_blocked(&[], 101 * DEADLOCK).is_empty());
    assert_eq!(c.deadlocked(), 0);
    // A second address in the same process is a new finding.
    assert_eq!(
        c.on_blocked(&[wait(20, 0x2000, 0)], 200 * DEADLOCK).len(),
        1
    );
}

#[test]
fn timeout_or_shared_futex_is_only_possible() {
    let mut c = correlator();
    c.on_event(fork(20, 0, 2), "");
    c.on_event(fork(21, 0, 2), "");
    let timed = BlockedWait {
        has_timeout: true,
        ..wait(20, 0x1000, 0)
    };
    let shared = BlockedWait {
        private: false,
        ..wait(21, 0x1000, 0)
    };
    let found = lock_waits(c.on_blocked(&[timed, shared], DEADLOCK));
    assert_eq!(found[0].reasons, [WaitReason::Timeout]);
    assert_eq!(found[1].reasons, [WaitReason::SharedFutex]);
    assert_eq!(c.deadlocked(), 0);
}

#[test]
fn multithreaded_child_waits_need_evidence_from_the_parent() {
    let mut c = Correlator::new(config(10));
    c.on_event(fork(20, 0, 2), Contended);
    c.on_event(fork(21, 0, 2), Contended);
    for pid in [20, 21] {
        let d = c.on_event(thread(pid, pid + 100, true), Contended);
        assert_eq!(d.len(), 1, "threads_after_mt_fork");
    }
    // 0x2000: the parent was not waiting on it at the fork (an idle worker): quiet.
    assert!(c.on_blocked(&[wait(20, 0x2000, 0)], DEADLOCK).is_empty());
    // 0x1000: the parent was, so it is reported as possible.
    let found = lock_waits(c.on_blocked(&[wait(21, 0x1000, 0)], DEADLOCK));
    assert_eq!(found[0].reasons, [WaitReason::Multithreaded]);
    assert!(found[0].contended_in_parent_at_fork);
    assert_eq!(found[0].threads, 2);
}

#[test]
fn a_thread_that_exits_makes_the_child_single_threaded_again() {
    let mut c = correlator();
    c.on_event(fork(20, 0, 2), "");
    let d = c.on_event(thread(20, 120, true), "");
    let [Decision::ThreadsAfterMtFork(t)] = d.as_slice() else {
        panic!("{d:?}")
    };
    assert_eq!((t.tid, t.threads), (120, 2));
    assert!(
        c.on_event(thread(20, 121, true), "").is_empty(),
        "once per process"
    );
    c.on_event(thread(20, 120, false), "");
    c.on_event(thread(20, 121, false), "");
    let found = lock_waits(c.on_blocked(&[wait(20, 0x1000, 0)], DEADLOCK));
    assert!(
        found[0].reasons.is_empty(),
        "single-threaded again: certain"
    );
}

#[test]
fn waits_of_untracked_or_execd_processes_are_ignored() {
    let mut c = correlator();
    assert!(c.on_blocked(&[wait(99, 0x1000, 0)], DEADLOCK).is_empty());
    c.on_event(fork(20, 0, 2), "");
    c.on_event(exec(20, 1), "");
    assert!(c.on_blocked(&[wait(20, 0x1000, 0)], DEADLOCK).is_empty());
    assert!(c.on_event(thread(77, 78, true), "").is_empty());
}

fn shared(sk_family: u16, sk_type: u16, state: u8) -> Event {
    let user = |pid| crate::wire::event::ResourceUse {
        pid,
        syscall: 1,
        send: true,
        timestamp_ns: 1,
    };
    Event::SharedSocket(SharedSocket {
        family: 10,
        first: user(10),
        later: user(11),
        inode: 5,
        cgroup_id: 1,
        in_tree: false,
        sk_family,
        sk_type,
        state,
        local: String::new(),
        peer: String::new(),
        comm: String::new(),
    })
}

fn sharing(decisions: &[Decision<&str>]) -> Option<Sharing> {
    match decisions {
        [] => None,
        [Decision::SharedSocket(_, sharing)] => Some(*sharing),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shared_connections_are_classified_by_type_and_state() {
    let mut c = correlator();
    let mut check = |family, kind, state| sharing(&c.on_event(shared(family, kind, state), ""));
    // TCP, TCP6, Unix stream and seqpacket connections.
    assert_eq!(
        check(AF_INET, SOCK_STREAM, TCP_ESTABLISHED),
        Some(Sharing::Stream)
    );
    assert_eq!(
        check(AF_INET6, SOCK_STREAM, TCP_ESTABLISHED),
        Some(Sharing::Stream)
    );
    assert_eq!(
        check(AF_UNIX, SOCK_STREAM, TCP_ESTABLISHED),
        Some(Sharing::Stream)
    );
    assert_eq!(
        check(AF_UNIX, SOCK_SEQPACKET, TCP_ESTABLISHED),
        Some(Sharing::Stream)
    );
    // Connected UDP / Unix datagram: a warning; unconnected (a worker pool's server
    // socket): quiet.
    assert_eq!(
        check(AF_INET, SOCK_DGRAM, TCP_ESTABLISHED),
        Some(Sharing::Datagram)
    );
    assert_eq!(
        check(AF_UNIX, SOCK_DGRAM, TCP_ESTABLISHED),
        Some(Sharing::Datagram)
    );
    assert_eq!(check(AF_INET, SOCK_DGRAM, 7), None);
    // Listening sockets (prefork accept), netlink, packet, raw: quiet.
    assert_eq!(check(AF_INET, SOCK_STREAM, TCP_LISTEN), None);
    assert_eq!(check(16, SOCK_DGRAM, TCP_ESTABLISHED), None);
    assert_eq!(check(17, SOCK_DGRAM, TCP_ESTABLISHED), None);
    assert_eq!(check(AF_INET, 3, TCP_ESTABLISHED), None);
}

#[test]
fn a_seeded_child_is_never_mt_fork_no_exec_but_its_deadlock_is_reported() {
    let mut c = correlator();
    let Event::Fork(f) = fork(20, 0, 2) else {
        unreachable!()
    };
    c.seed(f, "", 1);
    assert_eq!(c.tracked(), 1);
    assert_eq!(c.next_wakeup_ns(), None);
    assert!(c.tick(u64::MAX).is_empty());
    assert!(
        c.on_event(exit(20, 5), "").is_empty(),
        "exit of a seeded child: quiet"
    );
    let Event::Fork(f) = fork(21, 0, 2) else {
        unreachable!()
    };
    c.seed(f, "", 1);
    let found = lock_waits(c.on_blocked(&[wait(21, 0x1000, 0)], DEADLOCK));
    assert!(found[0].reasons.is_empty());
}

#[test]
fn a_seeded_child_with_threads_is_no_certain_deadlock() {
    // A child found at start with a second thread (joining it, say): without evidence from the
    // parent at the fork, its untimed private wait is what idle threads do.
    let mut c = correlator();
    let Event::Fork(f) = fork(22, 0, 2) else {
        unreachable!()
    };
    c.seed(f, "", 2);
    assert!(lock_waits(c.on_blocked(&[wait(22, 0x1000, 0)], DEADLOCK)).is_empty());
}

#[test]
fn huge_timestamps_do_not_overflow() {
    let mut c = correlator();
    c.on_event(fork(20, u64::MAX - 1, 2), "");
    assert_eq!(c.next_wakeup_ns(), Some(u64::MAX));
    assert_eq!(c.tick(u64::MAX).len(), 1);
}
