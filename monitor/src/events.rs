//! Typed events, as the correlator sees them: decoded from the kernel's records, owned, and with
//! the kernel's fixed-size byte arrays turned into strings.

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
    pub cgroup_id: u64,
    /// The forking thread's name, which the child inherits.
    pub comm: String,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Fork(Fork),
    Exec(Exec),
    Exit(Exit),
}
