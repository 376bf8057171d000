//! Typed events, as the correlator sees them: decoded from the kernel's records, owned, and with
//! the kernel's fixed-size byte arrays turned into strings.

use monitor_common::names::category;

/// A new process created by a multithreaded parent (the kernel sends no other forks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    pub parent_pid: u32,
    /// The thread that called fork: the only one the child is a copy of.
    pub parent_tid: u32,
    pub child_pid: u32,
    /// Live threads of the parent at the fork.
    pub parent_threads: u32,
    /// The child shares the parent's memory (vfork / posix_spawn); never a hazard.
    pub shares_vm: bool,
    /// CLOCK_BOOTTIME nanoseconds.
    pub timestamp_ns: u64,
    /// The child's start time (CLOCK_BOOTTIME ns), its identity with the pid.
    pub child_start_ns: u64,
    /// The parent's start time (CLOCK_BOOTTIME ns), its identity with `parent_pid`.
    pub parent_start_ns: u64,
    pub cgroup_id: u64,
    /// The parent, hence the child, descends from the watched tree's root (`forkwatch exec`),
    /// as the kernel saw at the fork.
    pub in_tree: bool,
    /// The forking thread's name, which the child inherits.
    pub comm: String,
    /// The key of the forking thread's stack at the fork, when the kernel captures fork stacks
    /// (its [`ForkStack`] came just before, or within the last second from the same call site).
    pub stack: Option<StackKey>,
    /// The kernel skipped this fork's copy: its thread had sent its quota of copies already.
    pub stack_skipped: bool,
}

/// Which captured stack a fork refers to: one forking thread of one process (pid and start
/// time) at one call site (sp, ip and the fingerprint of the return addresses above them). ip
/// 0: the kernel could not read the registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub pid: u32,
    pub tid: u32,
    pub parent_start_ns: u64,
    pub ip: u64,
    pub sp: u64,
    pub site: u64,
}

/// The forking thread's registers and the top of its stack at a fork (the kernel sends one per
/// key per second; later forks refer to it by key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkStack {
    pub key: StackKey,
    pub timestamp_ns: u64,
    pub stack: crate::enrich::stack::CapturedStack,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    pub pid: u32,
    pub timestamp_ns: u64,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub pid: u32,
    pub timestamp_ns: u64,
    /// wait(2) status of the last thread.
    pub exit_code: u32,
}

/// A thread of a tracked process was created or exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadChange {
    pub pid: u32,
    pub tid: u32,
    pub created: bool,
    pub timestamp_ns: u64,
}

/// One process's use of a shared socket or open file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceUse {
    pub pid: u32,
    /// Syscall number (x86_64).
    pub syscall: u32,
    pub send: bool,
    pub timestamp_ns: u64,
}

/// A second process of a fork family moved data on a socket another member used since the fork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedSocket {
    /// The process that forked without exec.
    pub family: u32,
    /// The member that used it first, and the later one.
    pub first: ResourceUse,
    pub later: ResourceUse,
    pub inode: u64,
    pub cgroup_id: u64,
    /// The later user descends from the watched tree's root, as the kernel saw at its use.
    pub in_tree: bool,
    /// AF_UNIX = 1, AF_INET = 2, AF_INET6 = 10.
    pub sk_family: u16,
    /// SOCK_STREAM = 1, SOCK_DGRAM = 2, SOCK_SEQPACKET = 5.
    pub sk_type: u16,
    /// TCP state numbering; 1 (ESTABLISHED) for a connected socket of any type.
    pub state: u8,
    /// "127.0.0.1:5432", "[::1]:6379", a Unix path, "@abstract", or "" when unbound.
    pub local: String,
    pub peer: String,
    /// The later user's name when it used the socket.
    pub comm: String,
}

/// A second process of a fork family wrote through a regular-file open description another
/// member wrote through since the fork (their writes race on the shared offset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFile {
    pub family: u32,
    pub first: ResourceUse,
    pub later: ResourceUse,
    /// The later user's fd (its path: /proc/<pid>/fd/<fd>).
    pub fd: u32,
    pub inode: u64,
    pub cgroup_id: u64,
    /// The later user descends from the watched tree's root, as the kernel saw at its use.
    pub in_tree: bool,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Fork(Fork),
    Exec(Exec),
    Exit(Exit),
    Thread(ThreadChange),
    SharedSocket(SharedSocket),
    SharedFile(SharedFile),
    ForkStack(ForkStack),
}

impl Event {
    /// Metrics label of the event's category.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Fork(_) => category::FORK,
            Self::Exec(_) => category::EXEC,
            Self::Exit(_) => category::EXIT,
            Self::Thread(_) => category::THREAD,
            Self::SharedSocket(_) => category::SOCKET,
            Self::SharedFile(_) => category::FILE,
            Self::ForkStack(_) => category::FORK_STACK,
        }
    }
}

/// A thread of a tracked process asleep in a futex wait, as found in the kernel's BLOCKED map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedWait {
    pub pid: u32,
    pub tid: u32,
    /// The syscall number (futex, futex_wait, futex_waitv).
    pub syscall: u32,
    pub uaddr: u64,
    /// futex(2) op or futex2 flags.
    pub op: u32,
    /// Process-private futex: no other process can wake it.
    pub private: bool,
    pub has_timeout: bool,
    /// CLOCK_BOOTTIME ns when the thread went to sleep.
    pub since_ns: u64,
}

impl BlockedWait {
    pub fn from_kernel(tid: u32, raw: &monitor_common::BlockedWait) -> Self {
        Self {
            pid: raw.pid,
            tid,
            syscall: raw.syscall,
            uaddr: raw.uaddr,
            op: raw.op,
            private: raw.flags & monitor_common::BLOCKED_PRIVATE != 0,
            has_timeout: raw.flags & monitor_common::BLOCKED_TIMEOUT != 0,
            since_ns: raw.since_ns,
        }
    }
}
