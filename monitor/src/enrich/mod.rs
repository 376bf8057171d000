//! Correlator decisions → findings, with what /proc still has to say about the processes.

pub mod cgroup;
pub mod fork_stack;
pub mod lock_owner;
pub mod procfs;
pub mod runtime;
pub mod stack;

use monitor_common::{futex, linux, syscall};

use self::{
    cgroup::Attribution,
    procfs::{ForkContext, ProcFs},
    runtime::Runtime,
};
use crate::{
    clock,
    correlate::{
        Decision, LockWait, MtForkNoExec, Outcome, Sharing, ThreadsAfterMtFork, WaitReason,
    },
    report::finding::{
        Details, EventsLostDetails, FileInfo, Finding, Kind, LockWaitDetails, MtForkNoExecDetails,
        ResourceUseInfo, SCHEMA_VERSION, SharedFileDetails, SharedSocketDetails, SocketInfo,
        ThreadsAfterMtForkDetails,
    },
    report::hint,
    wire::event::{Fork, ResourceUse, SharedFile, SharedSocket},
};

/// How long reading a lock from a child's memory may take (20 bytes: microseconds, unless the
/// page is backed by a file whose server holds it up).
const LOCK_READ_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);
/// Frames of a blocked thread's stack worth showing.
const MAX_STACK_FRAMES: usize = 32;

#[derive(Clone, Copy, Debug)]
pub struct EnrichOptions {
    /// Put the whole command line in findings (it may contain secrets).
    pub full_cmdline: bool,
    pub exec_grace_ms: u64,
}

/// The finding for a decision, or `None` when /proc shows the decision rests on a lost event
/// (see [`lost_evidence`]).
pub fn finding(
    decision: Decision<ForkContext>,
    proc: &ProcFs,
    opts: EnrichOptions,
) -> Option<Finding> {
    let fork_stack = fork_stack_of(&decision);
    let mut finding = match decision {
        Decision::MtForkNoExec(d) => {
            if let Some(why) = lost_evidence(&d, proc) {
                tracing::debug!(pid = d.fork.child_pid, why, "mt_fork_no_exec withdrawn");
                return None;
            }
            mt_fork_no_exec(d, proc, opts)
        }
        Decision::LockWait(mut d) => {
            if let Err(why) = confirm_lock_wait(&mut d, proc) {
                tracing::info!(pid = d.wait.pid, why, "lock wait withdrawn");
                return None;
            }
            lock_wait(d, proc, opts)
        }
        Decision::ThreadsAfterMtFork(d) => threads_after_mt_fork(d, proc, opts),
        Decision::SharedSocket(socket, sharing) => shared_socket(socket, sharing, proc, opts),
        Decision::SharedFile(file) => shared_file(file, proc, opts),
    };
    finding.fork = fork_stack.map(|stack| stack.details());
    Some(finding)
}

/// The stack of the fork a decision is about: the findings about a fork's child carry it. (A
/// shared socket or file is told by the kernel from its fork family, not from one fork.)
pub fn fork_stack_of(decision: &Decision<ForkContext>) -> Option<fork_stack::ForkStackRef> {
    match decision {
        Decision::MtForkNoExec(d) => Some(d.context.fork_stack.clone()),
        Decision::LockWait(d) => Some(d.context.fork_stack.clone()),
        Decision::ThreadsAfterMtFork(d) => Some(d.context.fork_stack.clone()),
        Decision::SharedSocket(..) | Decision::SharedFile(_) => None,
    }
}

/// A child decided at its deadline is still running without exec, or so the events say. When
/// the ring buffer overflowed, its exec or exit event may be what was lost: before reporting,
/// check /proc. Gone or a zombie (its exit was not seen), or running another executable (its exec was not
/// seen): the evidence is gone, and forkwatch would rather stay quiet than cry wolf.
fn lost_evidence(d: &MtForkNoExec<ForkContext>, proc: &ProcFs) -> Option<&'static str> {
    if d.outcome != Outcome::NoExecWithinGrace {
        return None; // decided by an event that did arrive
    }
    let pid = d.fork.child_pid;
    if !proc.is_same_process(pid, d.fork.child_start_ns) {
        return Some("the child is gone but its exit event never arrived");
    }
    // Exited, not yet reaped: as gone as above (a busy parent reaps late; its zombie keeps the
    // /proc entry and start time, so the check above cannot see it).
    if proc.has_exited(pid) {
        return Some("the child has exited (not yet reaped) but its exit event never arrived");
    }
    match (&d.context.exe, proc.exe(pid)) {
        (Some(then), Some(now)) if *then != now => {
            return Some("the child runs another executable");
        }
        _ => {}
    }
    (proc.same_image(pid, d.context.stack_start) == Some(false))
        .then_some("the child exec'd (its exec event was lost): its stack moved")
}

/// A wait decided from events, checked against /proc before it is reported: lost thread or exec
/// events would have the correlator reason about a child that is no longer what it thinks.
/// A child that exec'd is no child of the fork any more (withdrawn, with why); one that has more
/// threads than the events said is at most a possible wait, and only with evidence from the
/// parent (the correlator's rule for multithreaded children).
fn confirm_lock_wait(d: &mut LockWait<ForkContext>, proc: &ProcFs) -> Result<(), &'static str> {
    let pid = d.wait.pid;
    if !proc.is_same_process(pid, d.fork.child_start_ns) {
        return Ok(()); // gone since: reported as seen (its stack will be missing)
    }
    if proc.same_image(pid, d.context.stack_start) == Some(false) {
        return Err("the child exec'd (its exec event was lost): its stack moved");
    }
    let threads = proc
        .status_value(pid, "Threads")
        .and_then(|n| u32::try_from(n).ok());
    if let Some(threads) = threads.filter(|&n| n > d.threads) {
        if !d.contended_in_parent_at_fork {
            return Err("the child has more threads than its thread events said");
        }
        d.threads = threads;
        if !d.reasons.contains(&WaitReason::Multithreaded) {
            d.reasons.push(WaitReason::Multithreaded);
        }
    }
    Ok(())
}

/// Who a finding is about, as far as is known.
struct Subject {
    pid: u32,
    comm: String,
    parent_pid: u32,
    parent_comm: String,
    exe: Option<String>,
    cmdline: Vec<String>,
    cgroup_id: u64,
    in_tree: bool,
    attribution: Attribution,
    runtime: Option<Runtime>,
}

impl Subject {
    /// The two processes sharing a resource: they used it a moment ago, so /proc describes
    /// them (the later one's comm from the event in case it is already gone).
    fn sharers(
        later: &ResourceUse,
        first: &ResourceUse,
        comm: &str,
        (cgroup_id, in_tree): (u64, bool),
        proc: &ProcFs,
    ) -> Self {
        let exe = proc.exe(later.pid);
        Self {
            pid: later.pid,
            comm: proc.comm(later.pid).unwrap_or_else(|| comm.to_owned()),
            parent_pid: first.pid,
            parent_comm: proc.comm(first.pid).unwrap_or_default(),
            runtime: proc.runtime(later.pid, exe.as_deref()),
            exe,
            cmdline: proc.cmdline(later.pid),
            cgroup_id,
            in_tree,
            attribution: proc
                .attribution(later.pid)
                .or_else(|| proc.attribution(first.pid))
                .unwrap_or_default(),
        }
    }

    /// A tracked child, described with what was seen at its fork. `exited`: its exit was seen,
    /// so whatever /proc now shows at its pid is another process.
    fn child(fork: &Fork, context: ForkContext, proc: &ProcFs, exited: bool) -> Self {
        let pid = fork.child_pid;
        // A still-running child may have renamed itself (prctl) since the fork; only trust
        // /proc if the pid still belongs to the same process. /proc's start time counts in
        // clock ticks (10 ms), so a process that got the pid within the same tick passes that
        // check: a child known to have exited is never looked up at all.
        let alive = !exited && proc.is_same_process(pid, fork.child_start_ns);
        let comm = alive
            .then(|| proc.comm(pid))
            .flatten()
            .unwrap_or_else(|| fork.comm.clone());
        Self {
            pid,
            comm,
            parent_pid: fork.parent_pid,
            parent_comm: context.parent_comm.unwrap_or_else(|| fork.comm.clone()),
            runtime: context.runtime,
            exe: context.exe,
            cmdline: context.cmdline,
            cgroup_id: fork.cgroup_id,
            in_tree: fork.in_tree,
            attribution: context.attribution,
        }
    }
}

fn common(
    kind: Kind,
    subject: Subject,
    decided_ns: u64,
    opts: EnrichOptions,
    details: Details,
) -> Finding {
    Finding {
        schema: SCHEMA_VERSION,
        kind,
        severity: kind.severity(),
        time: clock::rfc3339_of_boot_ns(decided_ns),
        pid: subject.pid,
        comm: subject.comm,
        parent_pid: subject.parent_pid,
        parent_comm: subject.parent_comm,
        exe: subject.exe,
        argv0: subject.cmdline.first().map(|arg| procfs::argv0(arg)),
        cmdline: opts.full_cmdline.then_some(subject.cmdline),
        cgroup_id: subject.cgroup_id,
        in_tree: subject.in_tree,
        attribution: subject.attribution,
        details,
        fork: None,
        runtime: subject.runtime,
        hint: hint::hint(kind, subject.runtime),
    }
}

fn mt_fork_no_exec(d: MtForkNoExec<ForkContext>, proc: &ProcFs, opts: EnrichOptions) -> Finding {
    let (exited_without_exec, exit_code, exec_after_ns) = match d.outcome {
        Outcome::ExitedWithoutExec { exit_code, .. } => (true, Some(exit_code as i32), None),
        Outcome::NoExecWithinGrace => (false, None, None),
        Outcome::ExecAfterGrace { after_ns } => (false, None, Some(after_ns)),
    };
    let details = Details::MtForkNoExec(MtForkNoExecDetails {
        parent_tid: d.fork.parent_tid,
        parent_threads: d.fork.parent_threads,
        thread_names: d.context.thread_names_but(d.fork.parent_tid),
        exited_without_exec,
        exit_code,
        exec_after_ms: exec_after_ns.map(|ns| ns / 1_000_000),
        ms_without_exec: d.decided_ns.saturating_sub(d.fork.timestamp_ns) / 1_000_000,
        grace_ms: opts.exec_grace_ms,
    });
    let subject = Subject::child(&d.fork, d.context, proc, exited_without_exec);
    common(Kind::MtForkNoExec, subject, d.decided_ns, opts, details)
}

fn lock_wait(d: LockWait<ForkContext>, proc: &ProcFs, opts: EnrichOptions) -> Finding {
    let kind = if d.reasons.is_empty() {
        Kind::InheritedLockDeadlock
    } else {
        Kind::PossibleInheritedLockWait
    };
    // The thread holds still while blocked, so its stack can be read from outside; if it woke in
    // the meantime (or the pid was reused) there is no stack to show.
    let alive = proc.is_same_process(d.wait.pid, d.fork.child_start_ns);
    let frames = if alive {
        stack::blocked_thread_stack_within(
            d.wait.pid,
            d.wait.tid,
            MAX_STACK_FRAMES,
            stack::UNWIND_BUDGET,
        )
        .unwrap_or_else(|err| {
            tracing::debug!(%err, pid = d.wait.pid, "no stack for the blocked thread");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    // The child's copy of the lock is what the parent had at the fork (see lock_owner.rs).
    let (pid, uaddr) = (d.wait.pid, d.wait.uaddr);
    let lock = alive
        .then(|| {
            stack::within(LOCK_READ_BUDGET, move || {
                Ok(lock_owner::read_lock(pid, uaddr))
            })
        })
        .and_then(|read| read.ok().flatten());
    let owner = lock_owner::decide(
        lock.as_ref(),
        d.wait.syscall,
        d.wait.op,
        &frames,
        &d.context.threads,
    );
    let reasons: Vec<&str> = d.reasons.iter().map(|r| r.as_str()).collect();
    let details = Details::LockWait(LockWaitDetails {
        tid: d.wait.tid,
        futex_addr: format!("{:#x}", d.wait.uaddr),
        futex_op: futex_op_name(d.wait.syscall, d.wait.op),
        blocked_ms: d.blocked_ns / 1_000_000,
        threads: d.threads,
        contended_in_parent_at_fork: d.contended_in_parent_at_fork,
        reason: (!reasons.is_empty()).then(|| reasons.join(",")),
        stack_summary: (!frames.is_empty()).then(|| stack::format_stack(&frames)),
        stack: frames,
        lock_owner_unknown_reason: owner.as_ref().err().map(|why| why.as_str()),
        lock_owner: owner.ok(),
    });
    let subject = Subject::child(&d.fork, d.context, proc, false);
    common(kind, subject, d.decided_ns, opts, details)
}

fn threads_after_mt_fork(
    d: ThreadsAfterMtFork<ForkContext>,
    proc: &ProcFs,
    opts: EnrichOptions,
) -> Finding {
    let details = Details::ThreadsAfterMtFork(ThreadsAfterMtForkDetails {
        tid: d.tid,
        threads: d.threads,
        parent_threads: d.fork.parent_threads,
    });
    let subject = Subject::child(&d.fork, d.context, proc, false);
    common(
        Kind::ThreadsAfterMtFork,
        subject,
        d.decided_ns,
        opts,
        details,
    )
}

fn shared_socket(
    socket: SharedSocket,
    sharing: Sharing,
    proc: &ProcFs,
    opts: EnrichOptions,
) -> Finding {
    let kind = match sharing {
        Sharing::Stream => Kind::SharedSocket,
        Sharing::Datagram => Kind::SharedDatagramSocket,
    };
    let subject = Subject::sharers(
        &socket.later,
        &socket.first,
        &socket.comm,
        (socket.cgroup_id, socket.in_tree),
        proc,
    );
    let details = Details::SharedSocket(SharedSocketDetails {
        socket: SocketInfo {
            family: match socket.sk_family {
                linux::AF_UNIX => "unix",
                linux::AF_INET => "inet",
                linux::AF_INET6 => "inet6",
                _ => "other",
            },
            kind: match socket.sk_type {
                linux::SOCK_STREAM => "stream",
                linux::SOCK_DGRAM => "dgram",
                linux::SOCK_SEQPACKET => "seqpacket",
                _ => "other",
            },
            inode: socket.inode,
            local: socket.local,
            peer: socket.peer,
        },
        family_pid: socket.family,
        first_use: use_info(&socket.first),
        later_use: use_info(&socket.later),
    });
    common(kind, subject, socket.later.timestamp_ns, opts, details)
}

fn shared_file(file: SharedFile, proc: &ProcFs, opts: EnrichOptions) -> Finding {
    let subject = Subject::sharers(
        &file.later,
        &file.first,
        &file.comm,
        (file.cgroup_id, file.in_tree),
        proc,
    );
    let details = Details::SharedFile(SharedFileDetails {
        file: FileInfo {
            // The writers may already be gone; an inherited fd has the same number in both.
            path: proc
                .fd_path(file.later.pid, file.fd, file.inode)
                .or_else(|| proc.fd_path(file.first.pid, file.fd, file.inode)),
            inode: file.inode,
            fd: file.fd,
        },
        family_pid: file.family,
        first_use: use_info(&file.first),
        later_use: use_info(&file.later),
    });
    common(
        Kind::SharedFileOffset,
        subject,
        file.later.timestamp_ns,
        opts,
        details,
    )
}

/// The `events_lost` record: not about a process.
pub fn events_lost(
    lost: std::collections::BTreeMap<&'static str, u64>,
    lost_total: u64,
    now_ns: u64,
) -> Finding {
    let subject = Subject {
        pid: 0,
        comm: String::new(),
        parent_pid: 0,
        parent_comm: String::new(),
        exe: None,
        cmdline: Vec::new(),
        cgroup_id: 0,
        in_tree: false,
        attribution: Attribution::default(),
        runtime: None,
    };
    let details = Details::EventsLost(EventsLostDetails { lost, lost_total });
    common(
        Kind::EventsLost,
        subject,
        now_ns,
        EnrichOptions {
            full_cmdline: false,
            exec_grace_ms: 0,
        },
        details,
    )
}

fn use_info(u: &ResourceUse) -> ResourceUseInfo {
    ResourceUseInfo {
        pid: u.pid,
        syscall: syscall_name(u.syscall),
        direction: if u.send { "send" } else { "recv" },
        time: clock::rfc3339_of_boot_ns(u.timestamp_ns),
    }
}

/// Names of the x86_64 syscalls that move data through a socket.
fn syscall_name(nr: u32) -> String {
    let name = match nr {
        syscall::READ => "read",
        syscall::WRITE => "write",
        syscall::PWRITE64 => "pwrite64",
        syscall::READV => "readv",
        syscall::WRITEV => "writev",
        syscall::SENDFILE => "sendfile",
        syscall::SENDTO => "sendto",
        syscall::RECVFROM => "recvfrom",
        syscall::SENDMSG => "sendmsg",
        syscall::RECVMSG => "recvmsg",
        syscall::SPLICE => "splice",
        syscall::PREADV => "preadv",
        syscall::PWRITEV => "pwritev",
        syscall::RECVMMSG => "recvmmsg",
        syscall::SENDMMSG => "sendmmsg",
        syscall::PREADV2 => "preadv2",
        syscall::PWRITEV2 => "pwritev2",
        u32::MAX => "unknown",
        other => return format!("syscall_{other}"),
    };
    name.to_owned()
}

/// A readable name for the wait: "FUTEX_WAIT_PRIVATE", "FUTEX_WAIT_BITSET_PRIVATE|
/// FUTEX_CLOCK_REALTIME", "futex_wait", ...
pub fn futex_op_name(nr: u32, op: u32) -> String {
    match nr {
        syscall::FUTEX => {
            let command = match op & futex::CMD_MASK {
                futex::WAIT => "FUTEX_WAIT".to_owned(),
                futex::WAIT_BITSET => "FUTEX_WAIT_BITSET".to_owned(),
                futex::LOCK_PI => "FUTEX_LOCK_PI".to_owned(),
                futex::LOCK_PI2 => "FUTEX_LOCK_PI2".to_owned(),
                futex::WAIT_REQUEUE_PI => "FUTEX_WAIT_REQUEUE_PI".to_owned(),
                other => format!("FUTEX_OP_{other}"),
            };
            let mut name = command;
            if op & futex::PRIVATE_FLAG != 0 {
                name.push_str("_PRIVATE");
            }
            if op & futex::CLOCK_REALTIME != 0 {
                name.push_str("|FUTEX_CLOCK_REALTIME");
            }
            name
        }
        syscall::FUTEX_WAIT => "futex_wait".to_owned(),
        syscall::FUTEX_WAITV => "futex_waitv".to_owned(),
        other => format!("syscall_{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlate::WaitReason, wire::event::BlockedWait};

    fn fork() -> Fork {
        Fork {
            parent_pid: 4_000_000,
            parent_tid: 4_000_001,
            child_pid: 4_000_002,
            parent_threads: 3,
            shares_vm: false,
            timestamp_ns: 1_000_000_000,
            child_start_ns: 1_000_000_000,
            parent_start_ns: 500_000_000,
            cgroup_id: 9,
            in_tree: false,
            comm: "gai-async".into(),
            stack: None,
            stack_skipped: false,
        }
    }

    fn context() -> ForkContext {
        ForkContext {
            parent_comm: Some("ruby".into()),
            threads: vec![
                procfs::ParentThread {
                    tid: 4_000_001,
                    ns_tid: 4_000_001,
                    name: "gai-async".into(),
                },
                procfs::ParentThread {
                    tid: 4_000_003,
                    ns_tid: 4_000_003,
                    name: "ruby-timer-thr".into(),
                },
            ],
            runtime: Some(Runtime::Ruby),
            exe: Some("/usr/bin/ruby".into()),
            cmdline: vec!["ruby".into(), "--secret=hunter2".into()],
            parent_futex_waits: vec![],
            attribution: crate::enrich::cgroup::attribute("/system.slice/app.service"),
            stack_start: None,
            fork_stack: Default::default(),
        }
    }

    fn decision(outcome: Outcome) -> Decision<ForkContext> {
        Decision::MtForkNoExec(MtForkNoExec {
            fork: fork(),
            context: context(),
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

    fn json(f: &Finding) -> serde_json::Value {
        serde_json::from_str(&f.to_json_line()).unwrap()
    }

    #[test]
    fn exited_child_keeps_what_was_seen_at_the_fork() {
        let proc = ProcFs::new("/nonexistent-proc");
        let outcome = Outcome::ExitedWithoutExec {
            exit_code: 256,
            after_ns: 250_000_000,
        };
        let f = finding(decision(outcome), &proc, opts(false)).unwrap();
        assert_eq!((f.pid, f.parent_pid), (4_000_002, 4_000_000));
        assert_eq!(f.comm, "gai-async");
        assert_eq!(f.parent_comm, "ruby");
        assert_eq!(f.argv0.as_deref(), Some("ruby"));
        assert_eq!(f.cmdline, None);
        let json = json(&f);
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
        assert_eq!(json["cgroup"], "/system.slice/app.service");
        assert_eq!(json["systemd_unit"], "app.service");
        assert_eq!(json["container"], serde_json::Value::Null);
        assert_eq!(json["pod_uid"], serde_json::Value::Null);
        // A fork this context was not captured at: no stack, and why.
        assert_eq!(json["fork_stack"], serde_json::Value::Null);
        assert_eq!(json["fork_site"], serde_json::Value::Null);
        assert_eq!(json["fork_stack_unavailable_reason"], "fork_not_seen");
    }

    #[test]
    fn full_cmdline_on_request_and_late_exec() {
        let proc = ProcFs::new("/nonexistent-proc");
        let outcome = Outcome::ExecAfterGrace {
            after_ns: 1_200_000_000,
        };
        let json = json(&finding(decision(outcome), &proc, opts(true)).unwrap());
        assert_eq!(json["cmdline"][1], "--secret=hunter2");
        assert_eq!(json["exec_after_ms"], 1_200);
        assert_eq!(json["exited_without_exec"], false);
    }

    fn lock_decision(reasons: Vec<WaitReason>) -> Decision<ForkContext> {
        Decision::LockWait(LockWait {
            fork: fork(),
            context: context(),
            wait: BlockedWait {
                pid: 4_000_002,
                tid: 4_000_002,
                syscall: 202,
                uaddr: 0x55d0_c0a0,
                op: 0x80,
                private: true,
                has_timeout: false,
                since_ns: 0,
            },
            blocked_ns: 1_500_000_000,
            threads: 1,
            contended_in_parent_at_fork: true,
            reasons,
            decided_ns: 2_500_000_000,
        })
    }

    #[test]
    fn certain_and_possible_lock_waits() {
        let proc = ProcFs::new("/nonexistent-proc");
        let certain = json(&finding(lock_decision(vec![]), &proc, opts(false)).unwrap());
        assert_eq!(certain["kind"], "inherited_lock_deadlock");
        assert_eq!(certain["severity"], "critical");
        assert_eq!(certain["futex_addr"], "0x55d0c0a0");
        assert_eq!(certain["futex_op"], "FUTEX_WAIT_PRIVATE");
        assert_eq!(certain["blocked_ms"], 1_500);
        assert_eq!(certain["contended_in_parent_at_fork"], true);
        assert!(certain.get("reason").is_none());
        assert_eq!(
            certain["stack"],
            serde_json::json!([]),
            "process gone: no stack"
        );

        let reasons = vec![WaitReason::Timeout, WaitReason::SharedFutex];
        let possible = json(&finding(lock_decision(reasons), &proc, opts(false)).unwrap());
        assert_eq!(possible["kind"], "possible_inherited_lock_wait");
        assert_eq!(possible["severity"], "warning");
        assert_eq!(possible["reason"], "timeout,shared_futex");
    }

    #[test]
    fn a_deadline_decision_whose_child_vanished_unseen_is_withdrawn() {
        // The child is not in /proc and no exit event came: the exit (or an exec) was lost.
        let proc = ProcFs::new("/nonexistent-proc");
        assert_eq!(
            finding(decision(Outcome::NoExecWithinGrace), &proc, opts(false)),
            None
        );
    }

    #[test]
    fn a_deadline_decision_whose_child_is_an_unreaped_zombie_is_withdrawn() {
        // A real child that exits at once and is not reaped until the end: its /proc entry and
        // start time stay, only its state says it has exited.
        let proc = ProcFs::default();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !proc.has_exited(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let mut d = decision(Outcome::NoExecWithinGrace);
        let Decision::MtForkNoExec(inner) = &mut d else {
            unreachable!()
        };
        inner.fork.child_pid = pid;
        inner.fork.child_start_ns = proc.start_ticks(pid).unwrap() * (1_000_000_000 / hz);
        assert_eq!(finding(d, &proc, opts(false)), None);
        child.wait().unwrap();
    }

    #[test]
    fn a_deadline_decision_for_a_child_that_exec_d_unseen_is_withdrawn() {
        // This test process plays the child: alive, same start time, but another exe than the
        // one recorded at the fork.
        let proc = ProcFs::default();
        let me = std::process::id();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let start_ns = proc.start_ticks(me).unwrap() * (1_000_000_000 / hz);
        let mut d = decision(Outcome::NoExecWithinGrace);
        let Decision::MtForkNoExec(inner) = &mut d else {
            unreachable!()
        };
        inner.fork.child_pid = me;
        inner.fork.child_start_ns = start_ns;
        inner.context.exe = Some("/usr/bin/ruby".into());
        assert_eq!(finding(d.clone(), &proc, opts(false)), None);
        // Same exe as now: a real finding.
        let Decision::MtForkNoExec(inner) = &mut d else {
            unreachable!()
        };
        inner.context.exe = proc.exe(me);
        assert!(finding(d, &proc, opts(false)).is_some());
    }

    #[test]
    fn futex_op_names() {
        assert_eq!(futex_op_name(202, 0x80), "FUTEX_WAIT_PRIVATE");
        assert_eq!(
            futex_op_name(202, 0x189),
            "FUTEX_WAIT_BITSET_PRIVATE|FUTEX_CLOCK_REALTIME"
        );
        assert_eq!(futex_op_name(202, 6), "FUTEX_LOCK_PI");
        assert_eq!(futex_op_name(455, 0x82), "futex_wait");
        assert_eq!(futex_op_name(449, 0), "futex_waitv");
    }
}
