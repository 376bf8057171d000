//! End-to-end, as root: the scheduler probes (sched_switch, sched_wakeup) run on every context
//! switch on the host, so the daemon attaches them only while a multithreaded fork's child is
//! tracked, and detaches them again once nothing has been tracked for 2 s. The test runs alone:
//! any other test's multithreaded fork is tracked by this daemon too, and keeps them attached.

use std::time::Duration;

use crate::harness::{self, Daemon, spawn_forker};

const GAUGE: &str = "forkwatch_scheduler_probes_attached";

#[test]
fn scheduler_probes_are_attached_only_while_something_is_tracked() {
    harness::root()
        .alone("the probes follow every tracked child on the host")
        .run(|| {
            let daemon = Daemon::start(&[]);
            // Idle host: nothing tracked, nothing attached.
            daemon.wait_metric(GAUGE, |v| v == 0.0, Duration::from_secs(5), "idle");
            // A child of a 3-thread parent that lives without exec until the test is done with it
            // (not for a fixed time, which a slow machine could use up before the daemon attaches)
            // is tracked all that time.
            let forker = spawn_forker("mt-fork-no-exec", &["3", "600000"]);
            daemon.wait_metric(GAUGE, |v| v == 1.0, Duration::from_secs(5), "not attached");
            daemon.expect_finding(forker.run.child(), Duration::from_secs(5));
            // Killed with its parent: gone 2 s after the last tracked child (plus a scan period).
            drop(forker);
            let took =
                daemon.wait_metric(GAUGE, |v| v == 0.0, Duration::from_secs(5), "not detached");
            assert!(
                took >= Duration::from_millis(500),
                "detached {took:?} after the child's exit, before the 2 s linger"
            );
        });
}
