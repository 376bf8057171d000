//! The selftest's scenarios, one per detector it proves (and the safe patterns that must stay
//! quiet), and how each is judged from the findings.

use crate::{
    commands::fixture,
    report::finding::{Finding, Kind},
};

/// What a scenario's fixture must produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly one finding of this kind about the fixture's parent or child.
    Once(Kind),
    /// No finding at all about the child.
    Quiet,
}

/// How long the fixture runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// It forks, its child does its part and is reaped, and it ends.
    ToCompletion,
    /// Until the selftest has the finding and stops it (the child never ends, or must keep
    /// going until the daemon watches it).
    UntilStopped,
}

pub struct Scenario {
    /// Printed on the verdict line. A positive scenario is named after the finding kind.
    pub name: &'static str,
    /// The detector it proves; the scenario is skipped when that detector is unavailable.
    pub detector: Kind,
    pub fixture: &'static str,
    pub expect: Expect,
    pub runs: Runs,
    /// What the fixture does, for the verdict line.
    pub what: &'static str,
}

/// In the order they run. Each quiet scenario comes before a positive one: its fixture has
/// ended (child reaped) before the next one starts, and the pipeline handles events in the
/// order the kernel sent them, so once a later scenario's finding has arrived, every event of
/// the quiet child has been handled, and a finding about it would have come already. That is
/// what decides a quiet scenario without waiting for a timeout.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "fork_exec_quiet",
        detector: Kind::MtForkNoExec,
        fixture: fixture::MT_FORK_EXEC,
        expect: Expect::Quiet,
        runs: Runs::ToCompletion,
        what: "multithreaded fork + exec",
    },
    Scenario {
        name: "single_threaded_fork_quiet",
        detector: Kind::MtForkNoExec,
        fixture: fixture::ST_FORK_NO_EXEC,
        expect: Expect::Quiet,
        runs: Runs::ToCompletion,
        what: "single-threaded fork without exec",
    },
    Scenario {
        name: "spawn_quiet",
        detector: Kind::MtForkNoExec,
        fixture: fixture::MT_SPAWN,
        expect: Expect::Quiet,
        runs: Runs::ToCompletion,
        what: "posix_spawn (CLONE_VM) from a multithreaded process",
    },
    Scenario {
        name: "mt_fork_no_exec",
        detector: Kind::MtForkNoExec,
        fixture: fixture::MT_FORK_NO_EXEC,
        expect: Expect::Once(Kind::MtForkNoExec),
        runs: Runs::ToCompletion,
        what: "multithreaded fork without exec",
    },
    Scenario {
        name: "threads_after_mt_fork",
        detector: Kind::ThreadsAfterMtFork,
        fixture: fixture::MT_FORK_THREAD,
        expect: Expect::Once(Kind::ThreadsAfterMtFork),
        runs: Runs::ToCompletion,
        what: "child of a multithreaded fork starting a thread",
    },
    Scenario {
        name: "shared_socket",
        detector: Kind::SharedSocket,
        fixture: fixture::SHARED_SOCKET,
        expect: Expect::Once(Kind::SharedSocket),
        runs: Runs::ToCompletion,
        what: "loopback TCP connection used by parent and child",
    },
    Scenario {
        name: "inherited_lock_deadlock",
        detector: Kind::InheritedLockDeadlock,
        fixture: fixture::MT_FORK_DEADLOCK,
        expect: Expect::Once(Kind::InheritedLockDeadlock),
        runs: Runs::UntilStopped,
        what: "child blocked on a lock another thread held at the fork",
    },
    Scenario {
        name: "shared_file_offset",
        detector: Kind::SharedFileOffset,
        fixture: fixture::SHARED_FILE,
        expect: Expect::Once(Kind::SharedFileOffset),
        runs: Runs::UntilStopped,
        what: "file (no O_APPEND) written by parent and child in turns",
    },
];

/// The processes of one started scenario.
#[derive(Clone, Copy, Debug)]
pub struct Pids {
    pub parent: u32,
    pub child: u32,
}

impl Scenario {
    /// Whether the finding this scenario waits for has arrived (a quiet one waits for none).
    pub fn reported(&self, pids: Pids, findings: &[Finding]) -> bool {
        match self.expect {
            Expect::Once(kind) => count(kind, pids, findings) > 0,
            Expect::Quiet => false,
        }
    }

    /// The verdict from every finding of the run: pass or fail, and the one-line reason.
    pub fn judge(&self, pids: Pids, findings: &[Finding], waited_secs: u64) -> (bool, String) {
        let Pids { parent, child } = pids;
        match self.expect {
            Expect::Once(kind) => {
                let what = format!("{} (parent {parent}, child {child})", self.what);
                match count(kind, pids, findings) {
                    1 => (true, format!("{what} reported once")),
                    0 => {
                        let others: Vec<&str> = findings
                            .iter()
                            .filter(|f| f.pid == parent || f.pid == child)
                            .map(|f| f.kind.as_str())
                            .collect();
                        let also = if others.is_empty() {
                            String::new()
                        } else {
                            format!(" (only as {})", others.join(", "))
                        };
                        (
                            false,
                            format!("{what} not reported within {waited_secs} s{also}"),
                        )
                    }
                    n => (false, format!("{what} reported {n} times, not once")),
                }
            }
            Expect::Quiet => {
                let about: Vec<&str> = findings
                    .iter()
                    .filter(|f| f.pid == child)
                    .map(|f| f.kind.as_str())
                    .collect();
                let what = format!("{} (child {child})", self.what);
                if about.is_empty() {
                    (true, format!("{what} not reported"))
                } else {
                    (false, format!("{what} reported as {}", about.join(", ")))
                }
            }
        }
    }
}

fn count(kind: Kind, pids: Pids, findings: &[Finding]) -> usize {
    findings
        .iter()
        .filter(|f| f.kind == kind && (f.pid == pids.parent || f.pid == pids.child))
        .count()
}
