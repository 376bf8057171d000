//! End-to-end, as root: the scheduler probes (sched_switch, sched_wakeup) run on every context
//! switch on the host, so the daemon attaches them only while a multithreaded fork's child is
//! tracked, and detaches them again once nothing has been tracked for 2 s. One test in a binary
//! of its own: the gauge it watches is host-wide, and other test binaries run one at a time.

mod harness;

use std::time::{Duration, Instant};

use harness::{Daemon, privileged, run_forker};

const GAUGE: &str = "forkwatch_scheduler_probes_attached";

/// Polls the gauge until it reads `want`; how long that took.
fn until_gauge(daemon: &Daemon, want: f64, within: Duration) -> Duration {
    let begin = Instant::now();
    loop {
        if daemon.metric(GAUGE) == want {
            return begin.elapsed();
        }
        assert!(
            begin.elapsed() < within,
            "{GAUGE} is not {want} after {within:?}\nlog:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scheduler_probes_are_attached_only_while_something_is_tracked() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(&[]);
    // Idle host: nothing tracked, nothing attached.
    until_gauge(&daemon, 0.0, Duration::from_secs(5));
    // A child of a 3-thread parent that lives 1.5 s without exec is tracked all that time.
    let forker = std::thread::spawn(|| run_forker("mt-fork-no-exec", &["3", "1500"]));
    until_gauge(&daemon, 1.0, Duration::from_secs(1));
    let run = forker.join().unwrap();
    daemon.expect_finding(run.child(), Duration::from_secs(5));
    // Gone 2 s after the last tracked child (plus a scan period).
    let took = until_gauge(&daemon, 0.0, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(500),
        "detached {took:?} after the child's exit, before the 2 s linger"
    );
}
