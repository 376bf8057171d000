//! End-to-end, as root: process identity is (pid, start time). Pids are reused on purpose (the
//! host's ns_last_pid) and no finding may describe a process that merely got the same pid.

use std::time::Duration;

use crate::harness::{self, Daemon, KillOnDrop, python, spawn_holding};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_reused_pid_is_never_described_as_the_process_that_had_it() {
    // The host's next pid is host-wide: other tests' processes would take the pids it means to
    // reuse, and get them after it, so that its daemon reports on them.
    harness::root().alone("ns_last_pid").run(|| {
        // C and G exit at once and must be reported as exited: a wide grace window keeps that
        // true on a loaded machine.
        let daemon = Daemon::start(&["--exec-grace", "2s"]);
        // B stays until the fixture is finished, so that its /proc is there when G's fork
        // reaches the daemon (A stays 50 ms: it must go for B to get its pid).
        let fixture = spawn_holding(&mut python("pid_reuse.py", &[]));
        let run = &fixture.run;
        let _d = KillOnDrop::new(run.get("d"));
        let (a, b, c, g, d) = (
            run.get("a"),
            run.get("b"),
            run.get("c"),
            run.get("g"),
            run.get("d"),
        );
        assert_eq!(
            (a, c),
            (b, d),
            "the fixture reused both pids: {:?}",
            run.values
        );

        // C and G (often at one pid: B's child gets the pid A's child had) are each reported as
        // themselves: the fork's own name comes from the kernel, and the parent's name and threads
        // read from /proc must be of that same parent, never of the process that had its pid
        // before. B forked about 50 ms after A, inside the 100 ms a parent's context is reused.
        let ours = |f: &serde_json::Value| [c, g, d].iter().any(|&p| f["pid"] == p);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while daemon.findings().iter().filter(|f| ours(f)).count() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "findings: {:?}\nlog:\n{}",
                daemon.findings(),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Past every deadline: D, blocked forever on a lock it holds at C's pid, adds nothing.
        daemon.barrier();
        let found: Vec<_> = daemon.findings().into_iter().filter(ours).collect();
        assert_eq!(found.len(), 2, "one finding for C and one for G: {found:?}");
        for (name, pid) in [("alpha", c), ("beta", g)] {
            let f = found
                .iter()
                .find(|f| f["comm"] == format!("{name}-main"))
                .unwrap_or_else(|| panic!("no finding for {name}'s child: {found:?}"));
            assert_eq!(f["pid"], pid, "{f}");
            assert_eq!(f["kind"], "mt_fork_no_exec", "{f}");
            assert_eq!(f["exited_without_exec"], true, "{f}");
            assert_eq!(f["parent_pid"], a, "{f}");
            assert_eq!(f["parent_comm"], format!("{name}-main"), "{f}");
            assert_eq!(
                f["thread_names"],
                serde_json::json!([format!("{name}-worker")]),
                "{f}"
            );
        }
        // A's pid, now B's, is only ever a parent.
        assert!(
            daemon.findings_for(a).is_empty(),
            "{:?}",
            daemon.findings_for(a)
        );
        fixture.finish();
    });
}
