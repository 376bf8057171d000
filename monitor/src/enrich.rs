//! Correlator decisions → findings, with what /proc still has to say about the processes.

use crate::{
    clock,
    correlator::{Decision, MtForkNoExec, Outcome},
    finding::{Details, Finding, Kind, MtForkNoExecDetails, SCHEMA_VERSION},
    procfs::{ForkContext, ProcFs},
};

#[derive(Clone, Copy, Debug)]
pub struct EnrichOptions {
    /// Put the whole command line in findings (it may contain secrets).
    pub full_cmdline: bool,
    pub exec_grace_ms: u64,
}

pub fn finding(decision: Decision<ForkContext>, proc: &ProcFs, opts: EnrichOptions) -> Finding {
    match decision {
        Decision::MtForkNoExec(d) => mt_fork_no_exec(d, proc, opts),
    }
}

fn mt_fork_no_exec(d: MtForkNoExec<ForkContext>, proc: &ProcFs, opts: EnrichOptions) -> Finding {
    let MtForkNoExec {
        fork,
        context,
        outcome,
        decided_ns,
    } = d;
    let pid = fork.child_pid;
    // A still-running child may have renamed itself (prctl) since the fork; only trust /proc if
    // the pid still belongs to the same process.
    let alive = proc.is_same_process(pid, fork.child_start_ns);
    let comm = alive
        .then(|| proc.comm(pid))
        .flatten()
        .unwrap_or_else(|| fork.comm.clone());
    let (exited_without_exec, exit_code, exec_after_ns) = match outcome {
        Outcome::ExitedWithoutExec { exit_code, .. } => (true, Some(exit_code as i32), None),
        Outcome::NoExecWithinGrace => (false, None, None),
        Outcome::ExecAfterGrace { after_ns } => (false, None, Some(after_ns)),
    };
    let ForkContext {
        parent_comm,
        thread_names,
        exe,
        cmdline,
    } = context;
    Finding {
        schema: SCHEMA_VERSION,
        kind: Kind::MtForkNoExec,
        severity: Kind::MtForkNoExec.severity(),
        time: clock::rfc3339_of_boot_ns(decided_ns),
        pid,
        comm,
        parent_pid: fork.parent_pid,
        parent_comm: parent_comm.unwrap_or_else(|| fork.comm.clone()),
        exe,
        argv0: cmdline.first().cloned(),
        cmdline: opts.full_cmdline.then_some(cmdline),
        cgroup_id: fork.cgroup_id,
        details: Details::MtForkNoExec(MtForkNoExecDetails {
            parent_tid: fork.parent_tid,
            parent_threads: fork.parent_threads,
            thread_names,
            exited_without_exec,
            exit_code,
            exec_after_ms: exec_after_ns.map(|ns| ns / 1_000_000),
            ms_without_exec: decided_ns.saturating_sub(fork.timestamp_ns) / 1_000_000,
            grace_ms: opts.exec_grace_ms,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Fork;

    fn decision(outcome: Outcome) -> Decision<ForkContext> {
        Decision::MtForkNoExec(MtForkNoExec {
            fork: Fork {
                parent_pid: 4_000_000,
                parent_tid: 4_000_001,
                child_pid: 4_000_002,
                parent_threads: 3,
                shares_vm: false,
                timestamp_ns: 1_000_000_000,
                child_start_ns: 1_000_000_000,
                cgroup_id: 9,
                comm: "gai-async".into(),
            },
            context: ForkContext {
                parent_comm: Some("ruby".into()),
                thread_names: vec!["ruby-timer-thr".into()],
                exe: Some("/usr/bin/ruby".into()),
                cmdline: vec!["ruby".into(), "--secret=hunter2".into()],
            },
            outcome,
            decided_ns: 1_250_000_000,
        })
    }

    fn opts(full_cmdline: bool) -> EnrichOptions {
        EnrichOptions {
            full_cmdline,
            exec_grace_ms: 1_000,
        }
    }

    #[test]
    fn exited_child_keeps_what_was_seen_at_the_fork() {
        let proc = ProcFs::new("/nonexistent-proc");
        let outcome = Outcome::ExitedWithoutExec {
            exit_code: 256,
            after_ns: 250_000_000,
        };
        let f = finding(decision(outcome), &proc, opts(false));
        assert_eq!((f.pid, f.parent_pid), (4_000_002, 4_000_000));
        assert_eq!(f.comm, "gai-async");
        assert_eq!(f.parent_comm, "ruby");
        assert_eq!(f.argv0.as_deref(), Some("ruby"));
        assert_eq!(f.cmdline, None);
        let json: serde_json::Value = serde_json::from_str(&f.to_json_line()).unwrap();
        assert_eq!(json["kind"], "mt_fork_no_exec");
        assert_eq!(json["severity"], "warning");
        assert_eq!(json["schema"], 1);
        assert_eq!(json["exited_without_exec"], true);
        assert_eq!(json["exit_code"], 256);
        assert_eq!(json["ms_without_exec"], 250);
        assert_eq!(json["parent_threads"], 3);
        assert_eq!(json["thread_names"][0], "ruby-timer-thr");
        assert!(
            json.get("cmdline").is_none(),
            "command line only on request"
        );
        assert!(!f.to_json_line().contains("hunter2"));
    }

    #[test]
    fn full_cmdline_on_request_and_late_exec() {
        let proc = ProcFs::new("/nonexistent-proc");
        let outcome = Outcome::ExecAfterGrace {
            after_ns: 1_200_000_000,
        };
        let f = finding(decision(outcome), &proc, opts(true));
        let json: serde_json::Value = serde_json::from_str(&f.to_json_line()).unwrap();
        assert_eq!(json["cmdline"][1], "--secret=hunter2");
        assert_eq!(json["exec_after_ms"], 1_200);
        assert_eq!(json["exited_without_exec"], false);
    }
}
