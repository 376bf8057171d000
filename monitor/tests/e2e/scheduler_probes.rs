//! End-to-end, as root: the scheduler probes (sched_switch, sched_wakeup) run on every context
//! switch on the host, so the daemon attaches them only while a multithreaded fork's child is
//! undecided (in its grace window), and detaches them 2 s after the last one was decided, even
//! while the child lives on (a worker of a threaded master). A decided child's futex waits are
//! then read from /proc at each scan. The tests run alone: any other test's multithreaded fork
//! is tracked by this daemon too, and switches the probes.

use std::{process::Command, time::Duration};

use crate::harness::{self, Daemon, compiled, spawn, spawn_forker};

const GAUGE: &str = "forkwatch_scheduler_probes_attached";

/// Longer than the 1 s grace window plus the 2 s linger, with room for a slow machine.
const SWITCHED: Duration = Duration::from_secs(10);

#[test]
fn scheduler_probes_are_attached_only_while_a_child_is_undecided() {
    harness::root()
        .alone("the probes follow every tracked child on the host")
        .run(|| {
            let daemon = Daemon::start(&[]);
            // Idle host: nothing tracked, nothing attached.
            daemon.wait_metric(GAUGE, |v| v == 0.0, Duration::from_secs(5), "idle");
            // A child of a 3-thread parent that lives without exec until the test is done with
            // it: undecided for its grace window (attached then, and for 2 s after), then
            // reported, and tracked as long as it lives.
            let forker = spawn_forker("mt-fork-no-exec", &["3", "600000"]);
            daemon.wait_metric(GAUGE, |v| v == 1.0, SWITCHED, "not attached");
            daemon.expect_finding(forker.run.child(), SWITCHED);
            // Reported and still alive: it no longer keeps them.
            daemon.wait_metric(GAUGE, |v| v == 0.0, SWITCHED, "kept for a decided child");
            assert!(
                daemon.metric("forkwatch_tracked_processes") >= 1.0,
                "the child is no longer tracked"
            );
        });
}

#[test]
fn a_decided_child_that_deadlocks_later_is_found_without_the_scheduler_probes() {
    decided_child_deadlocks_later(&[]);
}

/// Its /proc `stat` and `status` then hold bytes that are not UTF-8, which must not hide its
/// threads' waits from the scan.
#[test]
fn a_decided_child_named_with_bytes_that_are_not_utf8_is_found_all_the_same() {
    decided_child_deadlocks_later(&[("HOSTILE_NAME", "1")]);
}

fn decided_child_deadlocks_later(env: &'static [(&'static str, &'static str)]) {
    harness::root()
        .alone("the probes follow every tracked child on the host")
        .run(|| {
            let daemon = Daemon::start(&[]);
            // The child lives on after its fork and takes the lock its parent's thread holds
            // only when told: by then it has been reported and the probes have gone.
            let mut fixture = spawn(
                Command::new(compiled("locker"))
                    .args(["deadlock", "600000"])
                    .env("LOCK_ON_STDIN", "1")
                    .envs(env.iter().copied()),
            );
            let child = fixture.run.child();
            daemon.expect_kind(child, "mt_fork_no_exec", SWITCHED);
            daemon.wait_metric(GAUGE, |v| v == 0.0, SWITCHED, "kept for a decided child");
            fixture.send("lock");
            let f = daemon.expect_kind(child, "inherited_lock_deadlock", SWITCHED);
            assert_eq!(f["severity"], "critical", "{f}");
            assert_eq!(f["futex_addr"], fixture.run.text("lock"), "{f}");
            // Nothing undecided since: found from /proc, not by the probes.
            assert_eq!(daemon.metric(GAUGE), 0.0, "the probes were attached again");
        });
}
