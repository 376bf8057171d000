//! Findings: what forkwatch reports, serialized as one JSON object per line.
//!
//! The schema is versioned by `schema` and documented in docs/findings.md. Fields are only ever added
//! within one schema version; a rename or removal bumps it.

use serde::Serialize;

pub const SCHEMA_VERSION: u32 = 1;

// ValueEnum: `forkwatch exec --fail-on` takes a severity by the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[allow(
    dead_code,
    reason = "the schema's full scale; later finding kinds use every level"
)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    MtForkNoExec,
    InheritedLockDeadlock,
    PossibleInheritedLockWait,
    ThreadsAfterMtFork,
    SharedSocket,
    SharedDatagramSocket,
    SharedFileOffset,
    EventsLost,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Self::MtForkNoExec,
        Self::InheritedLockDeadlock,
        Self::PossibleInheritedLockWait,
        Self::ThreadsAfterMtFork,
        Self::SharedSocket,
        Self::SharedDatagramSocket,
        Self::SharedFileOffset,
        Self::EventsLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MtForkNoExec => "mt_fork_no_exec",
            Self::InheritedLockDeadlock => "inherited_lock_deadlock",
            Self::PossibleInheritedLockWait => "possible_inherited_lock_wait",
            Self::ThreadsAfterMtFork => "threads_after_mt_fork",
            Self::SharedSocket => "shared_socket",
            Self::SharedDatagramSocket => "shared_datagram_socket",
            Self::SharedFileOffset => "shared_file_offset",
            Self::EventsLost => "events_lost",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::InheritedLockDeadlock | Self::SharedSocket => Severity::Critical,
            Self::MtForkNoExec
            | Self::PossibleInheritedLockWait
            | Self::ThreadsAfterMtFork
            | Self::SharedDatagramSocket
            | Self::SharedFileOffset
            | Self::EventsLost => Severity::Warning,
        }
    }
}

/// Fields every finding has.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub schema: u32,
    pub kind: Kind,
    pub severity: Severity,
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    pub pid: u32,
    pub comm: String,
    pub parent_pid: u32,
    pub parent_comm: String,
    /// Executable of the process, when /proc still had it.
    pub exe: Option<String>,
    /// argv[0]; the full command line only with `--full-cmdline` (it may hold secrets).
    pub argv0: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Vec<String>>,
    /// cgroup v2 id of the forking process (its inode number in the cgroup filesystem).
    pub cgroup_id: u64,
    /// The process descends from `forkwatch exec`'s CMD, as the kernel saw (what exec reports
    /// and judges; never written out: exec reports nothing else).
    #[serde(skip)]
    pub in_tree: bool,
    /// cgroup path, container {runtime, id}, pod_uid, systemd_unit.
    #[serde(flatten)]
    pub attribution: crate::enrich::cgroup::Attribution,
    #[serde(flatten)]
    pub details: Details,
    /// The forking thread's stack at the fork: on the findings about a fork's child
    /// (`mt_fork_no_exec`, the lock waits, `threads_after_mt_fork`), absent on the others.
    #[serde(flatten)]
    pub fork: Option<ForkStackDetails>,
    /// The language runtime of the process (`cpython`, `ruby`, `jvm`, `node`, `glibc`), when
    /// told from its executable and mapped files; it picks the hint.
    pub runtime: Option<crate::enrich::runtime::Runtime>,
    /// How to fix it, from the table in report/hint.rs (docs/findings.md#hints).
    pub hint: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Details {
    MtForkNoExec(MtForkNoExecDetails),
    LockWait(LockWaitDetails),
    ThreadsAfterMtFork(ThreadsAfterMtForkDetails),
    SharedSocket(SharedSocketDetails),
    SharedFile(SharedFileDetails),
    EventsLost(EventsLostDetails),
}

/// `events_lost`: the ring buffer overflowed; findings may be missing (never invented: see
/// docs/findings.md). Not about a process: `pid` and `parent_pid` are 0.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventsLostDetails {
    /// Events dropped since the previous `events_lost` record, by category.
    pub lost: std::collections::BTreeMap<&'static str, u64>,
    /// Dropped since the daemon started.
    pub lost_total: u64,
}

/// `shared_file_offset`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SharedFileDetails {
    pub file: FileInfo,
    pub family_pid: u32,
    pub first_use: ResourceUseInfo,
    pub later_use: ResourceUseInfo,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileInfo {
    /// From /proc/<pid>/fd/<fd> while the later writer still had it open.
    pub path: Option<String>,
    pub inode: u64,
    /// The later writer's fd.
    pub fd: u32,
}

/// `shared_socket` and `shared_datagram_socket`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SharedSocketDetails {
    pub socket: SocketInfo,
    /// The fork family: the pid of the process that forked without exec.
    pub family_pid: u32,
    /// The first family member to use the socket since the fork (`parent_pid`)...
    pub first_use: ResourceUseInfo,
    /// ...and the later one (`pid`).
    pub later_use: ResourceUseInfo,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SocketInfo {
    /// "inet", "inet6" or "unix".
    pub family: &'static str,
    /// "stream", "dgram" or "seqpacket".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// As in /proc/<pid>/fd: `socket:[inode]`.
    pub inode: u64,
    /// "127.0.0.1:40122", "[::1]:6379", a Unix path, or "" when unbound.
    pub local: String,
    pub peer: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResourceUseInfo {
    pub pid: u32,
    /// The syscall that moved data, e.g. "sendto", "write", "recvfrom".
    pub syscall: String,
    /// "send" or "recv".
    pub direction: &'static str,
    /// RFC 3339 UTC.
    pub time: String,
}

/// `inherited_lock_deadlock` and `possible_inherited_lock_wait`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LockWaitDetails {
    /// The blocked thread.
    pub tid: u32,
    /// Address of the futex word in the process ("0x7f12..."); the same address in the parent.
    pub futex_addr: String,
    /// The futex operation, e.g. "FUTEX_WAIT_PRIVATE" (futex2 calls: "futex_wait", ...).
    pub futex_op: String,
    pub blocked_ms: u64,
    /// Live threads of the process when decided.
    pub threads: u32,
    /// Some thread of the parent was waiting on the same address at the fork.
    pub contended_in_parent_at_fork: bool,
    /// For `possible_inherited_lock_wait`: what could still end the wait (comma-separated:
    /// "timeout", "shared_futex", "multithreaded").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The blocked thread's user stack, innermost first ("a ← b ← c").
    pub stack_summary: Option<String>,
    pub stack: Vec<crate::enrich::stack::Frame>,
    /// The parent's thread that held the lock at the fork, when the lock records its owner
    /// (enrich/lock_owner.rs).
    pub lock_owner: Option<crate::enrich::lock_owner::LockOwner>,
    /// Why `lock_owner` is null (`not_a_pthread_mutex`, ...); null when it is not.
    pub lock_owner_unknown_reason: Option<&'static str>,
}

/// The fork's call stack (enrich/fork_stack.rs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForkStackDetails {
    /// Where the fork was called: its first frames outside the C library ("a ← b").
    pub fork_site: Option<String>,
    /// The forking thread's user stack at the fork, innermost first.
    pub fork_stack: Option<Vec<crate::enrich::stack::Frame>>,
    /// Why `fork_stack` is null (`kernel_unsupported`, ...); null when it is not.
    pub fork_stack_unavailable_reason: Option<&'static str>,
}

/// `threads_after_mt_fork`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThreadsAfterMtForkDetails {
    /// The thread the child created.
    pub tid: u32,
    pub threads: u32,
    pub parent_threads: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MtForkNoExecDetails {
    /// The thread of the parent that called fork: the only thread the child is a copy of.
    pub parent_tid: u32,
    /// Live threads of the parent at the fork (from the kernel, exact).
    pub parent_threads: u32,
    /// Names of the parent's other threads, read from /proc when the fork was seen.
    pub thread_names: Vec<String>,
    pub exited_without_exec: bool,
    /// wait(2)-style exit status, when the child exited.
    pub exit_code: Option<i32>,
    /// When the child exec'd after the grace window: how long after the fork.
    pub exec_after_ms: Option<u64>,
    /// How long the child ran without exec before the decision (exit, exec or deadline).
    pub ms_without_exec: u64,
    pub grace_ms: u64,
}

impl Finding {
    /// A `mt_fork_no_exec` finding about a process named `comm`, for unit tests.
    #[cfg(test)]
    pub fn example(comm: &str) -> Finding {
        Finding {
            schema: SCHEMA_VERSION,
            kind: Kind::MtForkNoExec,
            severity: Severity::Warning,
            time: "2026-11-27T10:00:00.000Z".into(),
            pid: 2,
            comm: comm.into(),
            parent_pid: 1,
            parent_comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            argv0: Some("python3".into()),
            cmdline: None,
            cgroup_id: 1,
            in_tree: false,
            attribution: Default::default(),
            details: Details::MtForkNoExec(MtForkNoExecDetails {
                parent_tid: 1,
                parent_threads: 2,
                thread_names: vec!["worker".into()],
                exited_without_exec: true,
                exit_code: Some(0),
                exec_after_ms: None,
                ms_without_exec: 12,
                grace_ms: 1000,
            }),
            fork: None,
            runtime: Some(crate::enrich::runtime::Runtime::Cpython),
            hint: crate::report::hint::hint(
                Kind::MtForkNoExec,
                Some(crate::enrich::runtime::Runtime::Cpython),
            ),
        }
    }

    pub fn to_json_line(&self) -> String {
        to_json_line(self)
    }
}

/// `repeated`: findings folded into one record (report/fold.rs): of one kind, from one parent
/// executable and one fork call site, within
/// `--repeat-window` of the first, which was printed on its own.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Repeated {
    pub schema: u32,
    /// Always "repeated".
    pub kind: &'static str,
    /// The folded findings' severity.
    pub severity: Severity,
    /// RFC 3339 UTC: the last folded finding's time.
    pub time: String,
    pub of_kind: Kind,
    /// The parent executable they share (null when /proc no longer had it: then they share
    /// `parent_comm`).
    pub exe: Option<String>,
    /// The first folded finding's parent_comm.
    pub parent_comm: String,
    /// The fork call site they share (`fork_site`; null for findings without a fork stack).
    pub fork_site: Option<String>,
    /// How many findings were folded (the first, printed, not included).
    pub count: u64,
    pub first_time: String,
    pub last_time: String,
    /// The first few folded findings' pids.
    pub sample_pids: Vec<u32>,
}

impl Repeated {
    pub fn to_json_line(&self) -> String {
        to_json_line(self)
    }
}

fn to_json_line(record: &impl Serialize) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let mut line = serde_json::to_string(record).unwrap_or_default();
    line.push('\n');
    line
}
