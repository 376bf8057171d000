//! End-to-end, as root: inherited-lock deadlocks. A parent thread holds a lock across fork();
//! the child blocks on it forever. The real daemon must report exactly that as
//! `inherited_lock_deadlock` (with the blocked thread's symbolized stack), report the waits that
//! could still end only as `possible_inherited_lock_wait`, and stay quiet otherwise.

use std::time::{Duration, Instant};

use crate::harness::{
    self, Daemon, KillOnDrop, run_forker, run_locker, run_python, spawn_forker, spawn_locker,
};

const DEADLOCK_AFTER_MS: u64 = 500;
const TIMEOUT: Duration = Duration::from_secs(10);

fn daemon() -> Daemon {
    daemon_deciding_after(DEADLOCK_AFTER_MS)
}

/// A daemon that decides a wait is a deadlock after `ms` blocked.
fn daemon_deciding_after(ms: u64) -> Daemon {
    Daemon::start(&["--deadlock-after", &format!("{ms}ms")])
}

/// Waits until process `pid` sleeps in futex(2), as /proc/PID/syscall shows.
fn wait_until_blocked_in_futex(pid: u32) {
    let futex = libc::SYS_futex.to_string();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if syscall.split_whitespace().next() == Some(futex.as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} did not block in futex(2) within {TIMEOUT:?}: {syscall}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock_findings(daemon: &Daemon, pid: u32) -> Vec<serde_json::Value> {
    daemon
        .findings_for(pid)
        .into_iter()
        .filter(|f| f["kind"].as_str().unwrap().contains("lock"))
        .collect()
}

#[test]
fn c_child_locking_an_inherited_mutex_is_a_certain_deadlock() {
    // The forkwatch_deadlocked_processes gauge it checks counts every deadlocked process on the
    // host, and other tests make some.
    harness::root().alone("a host-wide gauge").run(|| {
        let daemon = daemon();
        // The parent goes on running until the test is done (not for a fixed 300 ms): the
        // contention evidence is read from its /proc when the fork reaches the daemon, which
        // on a loaded machine can come later than that.
        let fixture = spawn_locker("deadlock", &["600000"]);
        let run = &fixture.run;
        let child = run.child();
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["severity"], "critical");
        assert_eq!(f["parent_pid"], run.parent());
        assert_eq!(f["tid"], child);
        assert_eq!(
            f["futex_addr"],
            run.text("lock"),
            "the inherited mutex: {f}"
        );
        assert_eq!(f["futex_op"], "FUTEX_WAIT_PRIVATE");
        assert_eq!(f["threads"], 1);
        assert!(
            f["blocked_ms"].as_u64().unwrap() >= DEADLOCK_AFTER_MS,
            "{f}"
        );
        // The parent's lock-waiter thread was blocked on the same mutex at the fork.
        assert_eq!(f["contended_in_parent_at_fork"], true, "{f}");
        assert!(f.get("reason").is_none());
        let stack = f["stack_summary"].as_str().unwrap_or_default();
        let lock = stack.find("pthread_mutex_lock");
        let own = stack.find("child_takes_inherited_lock");
        let main = stack.find("main");
        assert!(
            lock.is_some() && own > lock && main > own,
            "stack must show pthread_mutex_lock ← child_takes_inherited_lock ← main: {stack}"
        );
        assert_eq!(f["stack"][1]["module"], "libc.so.6", "{f}");

        // The gauge counts it while it is blocked, and drops once the process is gone.
        assert_eq!(daemon.metric("forkwatch_deadlocked_processes"), 1.0);
        drop(fixture); // SIGKILL, parent and child
        daemon.wait_metric(
            "forkwatch_deadlocked_processes",
            |v| v == 0.0,
            Duration::from_secs(3),
            "gauge stayed up after the process died",
        );
        daemon.barrier();
        assert_eq!(
            lock_findings(&daemon, child).len(),
            1,
            "once per process and address"
        );
        assert!(
            daemon.metric(
                "forkwatch_findings_total{kind=\"inherited_lock_deadlock\",severity=\"critical\"}"
            ) >= 1.0
        );
    });
}

/// Kernels before 5.18 pass sched_switch no `prev_state`: there the switch program reads the
/// task's own state (`sched_switch_task_state`). No such kernel is in the VM matrix with
/// everything else it needs (5.15–5.17 are not packaged by Debian; 5.10 lacks bpf_task_pt_regs),
/// so the daemon is told to use that program here. The wait must be seen by it: the scheduler
/// probes are attached first (held by another child, undecided for the whole test by a grace
/// window longer than it), so the daemon's /proc read at attach cannot be what finds it.
#[test]
fn deadlock_found_by_the_switch_program_for_kernels_without_prev_state() {
    harness::root().run(|| {
        let daemon = Daemon::start_under(
            &["env", "FORKWATCH_TEST_OLDER_TRACEPOINTS=1"],
            &[
                "--deadlock-after",
                &format!("{DEADLOCK_AFTER_MS}ms"),
                "--exec-grace",
                "1h",
            ],
        );
        assert!(
            daemon.log().contains("older tracepoint prototypes"),
            "the daemon did not take the older programs: {}",
            daemon.log()
        );
        // An undecided child that lives until the test ends keeps the scheduler probes attached.
        let _holder = spawn_forker("mt-fork-no-exec", &["3", "600000"]);
        daemon.wait_metric(
            "forkwatch_scheduler_probes_attached",
            |v| v == 1.0,
            TIMEOUT,
            "scheduler probes not attached",
        );
        let fixture = spawn_locker("deadlock", &["600000"]);
        let child = fixture.run.child();
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["severity"], "critical");
        assert_eq!(f["futex_addr"], fixture.run.text("lock"), "{f}");
    });
}

#[test]
fn python_lock_held_by_a_thread_across_os_fork_is_a_certain_deadlock() {
    harness::root().run(|| {
        let daemon = daemon();
        let run = run_python("lock_fork.py", &[]);
        let child = run.child();
        let _kill = KillOnDrop::new(child);
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["severity"], "critical");
        assert_eq!(f["threads"], 1);
        assert!(
            f["futex_op"]
                .as_str()
                .unwrap()
                .ends_with("PRIVATE|FUTEX_CLOCK_REALTIME"),
            "{f}"
        );
        assert!(f["exe"].as_str().unwrap().contains("python"), "{f}");
    });
}

#[test]
fn a_wait_with_a_timeout_is_never_critical() {
    harness::root().run(|| {
        let daemon = daemon();
        let run = run_locker("timed-wait"); // the child waits 1.5 s, then exits
        let f = daemon.expect_kind(run.child(), "possible_inherited_lock_wait", TIMEOUT);
        assert_eq!(f["severity"], "warning");
        assert_eq!(f["reason"], "timeout");
        daemon.barrier();
        assert!(
            daemon
                .findings_of(run.child(), "inherited_lock_deadlock")
                .is_empty()
        );
    });
}

#[test]
fn a_process_shared_mutex_the_parent_releases_is_at_most_a_warning() {
    harness::root().run(|| {
        let daemon = daemon();
        let run = run_locker("pshared"); // returns once the parent released it and reaped the child
        let found = lock_findings(&daemon, run.child());
        daemon.barrier();
        let found = if found.is_empty() {
            lock_findings(&daemon, run.child())
        } else {
            found
        };
        assert_eq!(
            found.len(),
            1,
            "blocked ~1.5 s on a shared futex: {found:?}"
        );
        assert_eq!(found[0]["kind"], "possible_inherited_lock_wait");
        assert_eq!(found[0]["reason"], "shared_futex");
    });
}

#[test]
fn a_child_thread_that_unlocks_in_time_is_quiet_but_the_thread_is_reported() {
    harness::root().run(|| {
        // The child is blocked 200 ms: "in time" must hold on a loaded machine too, where that
        // can stretch, so the daemon waits longer than usual before it calls a wait a deadlock.
        let deadlock_after_ms = 3000;
        let daemon = daemon_deciding_after(deadlock_after_ms);
        let run = run_locker("unlock-thread"); // the child blocks 200 ms, then exits
        let f = daemon.expect_kind(run.child(), "threads_after_mt_fork", TIMEOUT);
        assert_eq!(f["severity"], "warning");
        assert_eq!(f["threads"], 2);
        assert_eq!(f["parent_threads"], 2);
        std::thread::sleep(Duration::from_millis(deadlock_after_ms));
        daemon.barrier();
        assert!(
            lock_findings(&daemon, run.child()).is_empty(),
            "{:?}",
            daemon.findings()
        );
        assert_eq!(
            daemon
                .findings_of(run.child(), "threads_after_mt_fork")
                .len(),
            1
        );
    });
}

#[test]
fn heavy_lock_contention_without_fork_is_quiet() {
    harness::root().run(|| {
        let daemon = daemon();
        let run = run_forker("contention", &[]);
        // (Not the tracked-processes gauge: it is host-wide, and other tests fork concurrently.)
        daemon.assert_quiet(
            "lock contention in a process that never forks",
            &[run.parent()],
        );
    });
}

#[test]
fn a_child_deadlocked_before_the_daemon_started_is_reported_after_a_restart() {
    harness::root().run(|| {
        // The hazard is live first: the child blocks on the inherited mutex while its
        // multithreaded parent goes on running; only then does the daemon start.
        let live = spawn_locker("deadlock", &["20000"]);
        let child = live.run.child();
        wait_until_blocked_in_futex(child);
        let daemon = daemon();
        assert!(
            daemon.log().contains("seeded from /proc"),
            "{}",
            daemon.log()
        );
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["severity"], "critical");
        assert_eq!(f["futex_addr"], live.run.text("lock"));
        assert_eq!(f["parent_pid"], live.run.parent());
        // What the parent did at the fork is unknown after a restart: no evidence is claimed.
        assert_eq!(f["contended_in_parent_at_fork"], false);
        assert!(
            f["stack_summary"]
                .as_str()
                .unwrap_or_default()
                .contains("pthread_mutex_lock")
        );
        // Nothing stale: its fork was never seen, so no mt_fork_no_exec.
        daemon.barrier();
        assert!(daemon.findings_of(child, "mt_fork_no_exec").is_empty());
        assert_eq!(lock_findings(&daemon, child).len(), 1);
    });
}
