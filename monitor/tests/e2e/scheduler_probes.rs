//! End-to-end, as root: the scheduler probes (sched_switch, sched_wakeup) run on every context
//! switch on the host, so the daemon attaches them only while a multithreaded fork's child is
//! tracked, and detaches them again once nothing has been tracked for 2 s. One test in a binary
//! of its own: the gauge it watches is host-wide, and other test binaries run one at a time.

use std::time::Duration;

use crate::harness::{Daemon, privileged, run_forker};

const GAUGE: &str = "forkwatch_scheduler_probes_attached";

#[test]
fn scheduler_probes_are_attached_only_while_something_is_tracked() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(&[]);
    // Idle host: nothing tracked, nothing attached.
    daemon.wait_metric(GAUGE, |v| v == 0.0, Duration::from_secs(5), "idle");
    // A child of a 3-thread parent that lives 1.5 s without exec is tracked all that time.
    let forker = std::thread::spawn(|| run_forker("mt-fork-no-exec", &["3", "1500"]));
    daemon.wait_metric(GAUGE, |v| v == 1.0, Duration::from_secs(1), "not attached");
    let run = forker.join().unwrap();
    daemon.expect_finding(run.child(), Duration::from_secs(5));
    // Gone 2 s after the last tracked child (plus a scan period).
    let took = daemon.wait_metric(GAUGE, |v| v == 0.0, Duration::from_secs(5), "not detached");
    assert!(
        took >= Duration::from_millis(500),
        "detached {took:?} after the child's exit, before the 2 s linger"
    );
}
