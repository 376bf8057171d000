//! What the findings in CMD's tree add up to: the exit status, and what the JUnit report lists.
//! Every finding that was reported counts, folded repeats too: folding only shortens what is
//! printed. Suppressed findings (`[[ignore]]`) do not count.

use std::collections::BTreeMap;

use crate::report::finding::{Details, Finding, Severity};

/// The exit status of a run whose CMD succeeded but whose tree had a finding at or above
/// `--fail-on`.
pub const FINDINGS_STATUS: u8 = 3;
/// Failures listed one by one (in the JUnit report); past it they are counted only, so that a
/// fork storm cannot grow the daemon without bound.
const MAX_LISTED: usize = 1000;

/// One failing finding, as the JUnit report names it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub kind: &'static str,
    pub severity: Severity,
    pub time: String,
    pub pid: u32,
    pub comm: String,
    pub parent_pid: u32,
    pub parent_comm: String,
    pub exe: Option<String>,
    /// Where the fork was made: the first frames of the forking thread's stack outside the C
    /// library (`fork_site`), where the kernel captured it.
    pub site: Option<String>,
    /// Where a lock-waiting child is stuck (its blocked stack), for the lock-wait kinds.
    pub blocked_at: Option<String>,
    pub hint: Option<&'static str>,
}

/// How many findings of a kind were seen, and how many of them fail the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCount {
    pub seen: u64,
    pub failing: u64,
}

#[derive(Debug)]
pub struct Verdict {
    pub fail_on: Severity,
    /// By kind name, in name order (a stable report).
    pub kinds: BTreeMap<&'static str, KindCount>,
    pub failures: Vec<Failure>,
    /// Failures counted but not listed (beyond MAX_LISTED).
    pub unlisted: u64,
    /// Processes of the tree the kernel could not follow (its map was full): their hazards may
    /// have gone unseen, so the run fails like one with a finding.
    pub unwatched: u64,
}

impl Verdict {
    pub fn new(fail_on: Severity) -> Self {
        Self {
            fail_on,
            kinds: BTreeMap::new(),
            failures: Vec::new(),
            unlisted: 0,
            unwatched: 0,
        }
    }

    /// Counts a finding about CMD's tree that was reported (printed or folded).
    pub fn count(&mut self, f: &Finding) {
        let kind = self.kinds.entry(f.kind.as_str()).or_default();
        kind.seen += 1;
        if f.severity < self.fail_on {
            return;
        }
        kind.failing += 1;
        if self.failures.len() >= MAX_LISTED {
            self.unlisted += 1;
            return;
        }
        self.failures.push(Failure {
            kind: f.kind.as_str(),
            severity: f.severity,
            time: f.time.clone(),
            pid: f.pid,
            comm: f.comm.clone(),
            parent_pid: f.parent_pid,
            parent_comm: f.parent_comm.clone(),
            exe: f.exe.clone(),
            site: f.fork.as_ref().and_then(|fork| fork.fork_site.clone()),
            blocked_at: blocked_at(f),
            hint: f.hint,
        });
    }

    /// Whether a finding at or above `--fail-on` was seen, or part of the tree went unwatched.
    pub fn failed(&self) -> bool {
        self.unwatched > 0 || self.kinds.values().any(|k| k.failing > 0)
    }

    /// The exit status: CMD's own if it failed (its failure is the news, and a CI log shows it
    /// as the test runner's), else 3 for a failing finding, else 0.
    pub fn exit_status(&self, cmd_status: u8) -> u8 {
        if cmd_status != 0 {
            cmd_status
        } else if self.failed() {
            FINDINGS_STATUS
        } else {
            0
        }
    }
}

/// Where a lock-waiting child is blocked: its stack, which runs through the fork's call site.
fn blocked_at(f: &Finding) -> Option<String> {
    match &f.details {
        Details::LockWait(d) => d.stack_summary.clone(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::finding::Kind;

    fn finding(kind: Kind) -> Finding {
        let mut f = Finding::example("w");
        f.kind = kind;
        f.severity = kind.severity();
        f
    }

    #[test]
    fn cmd_failing_wins_then_findings_at_or_above_fail_on_then_success() {
        let mut v = Verdict::new(Severity::Warning);
        assert_eq!(v.exit_status(0), 0, "nothing seen");
        assert_eq!(v.exit_status(7), 7);
        v.count(&finding(Kind::MtForkNoExec));
        assert_eq!(v.exit_status(0), FINDINGS_STATUS);
        assert_eq!(v.exit_status(1), 1, "CMD's own failure is the status");
        assert_eq!(v.exit_status(130), 130);
    }

    #[test]
    fn fail_on_sets_the_least_severity_that_fails() {
        let mut critical_only = Verdict::new(Severity::Critical);
        critical_only.count(&finding(Kind::MtForkNoExec));
        assert!(
            !critical_only.failed(),
            "a warning under --fail-on critical"
        );
        assert_eq!(critical_only.exit_status(0), 0);
        assert_eq!(critical_only.kinds["mt_fork_no_exec"].seen, 1);
        critical_only.count(&finding(Kind::SharedSocket));
        assert_eq!(critical_only.exit_status(0), FINDINGS_STATUS);
        assert_eq!(critical_only.failures.len(), 1);
        assert_eq!(critical_only.failures[0].kind, "shared_socket");

        let mut info = Verdict::new(Severity::Info);
        info.count(&finding(Kind::ThreadsAfterMtFork));
        assert!(info.failed());
    }

    #[test]
    fn a_tree_partly_unwatched_fails_like_a_finding() {
        let mut v = Verdict::new(Severity::Critical);
        v.unwatched = 1;
        assert_eq!(v.exit_status(0), FINDINGS_STATUS);
        assert_eq!(v.exit_status(2), 2);
    }

    #[test]
    fn failures_past_the_listed_ones_are_still_counted() {
        let mut v = Verdict::new(Severity::Warning);
        for _ in 0..MAX_LISTED + 5 {
            v.count(&finding(Kind::MtForkNoExec));
        }
        assert_eq!(v.failures.len(), MAX_LISTED);
        assert_eq!(v.unlisted, 5);
        assert_eq!(v.kinds["mt_fork_no_exec"].failing, MAX_LISTED as u64 + 5);
    }
}
