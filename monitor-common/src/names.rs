//! Names the daemon looks things up by in the eBPF object, and the event-category names it
//! exports. The kernel side cannot use these constants (aya names a map, program or global after
//! its Rust identifier), so each one here must equal an identifier in `monitor-ebpf/src`: the
//! statics in `maps.rs` and `main.rs` and the `#[btf_tracepoint]` and `#[fentry]` functions.
//! Which of the programs a kernel gets is the daemon's choice (`kernel::detectors`).

/// Name of the global in the eBPF object that holds [`KernelOffsets`](crate::KernelOffsets).
pub const OFFSETS_GLOBAL: &str = "FORKWATCH_OFFSETS";

/// Name of the eBPF global with the ring-buffer fill (bytes) from which a record wakes the
/// daemon; below it the daemon's drain tick collects records.
pub const WAKEUP_GLOBAL: &str = "FORKWATCH_WAKEUP_BYTES";

/// Name of the eBPF global with the host tgid whose descendants make the watched tree
/// (`forkwatch exec`'s own; 0 for the daemon). See `TREE_MAX_ENTRIES`.
pub const TREE_ROOT_GLOBAL: &str = "FORKWATCH_TREE_ROOT";

pub const EVENTS: &str = "EVENTS";
pub const TREE: &str = "TREE";
pub const TRACKED: &str = "TRACKED";
pub const FORK_COUNTERS: &str = "FORK_COUNTERS";
pub const LOST_EVENTS: &str = "LOST_EVENTS";
pub const MAP_FULL: &str = "MAP_FULL";
pub const BLOCKED: &str = "BLOCKED";
pub const CHILDREN: &str = "CHILDREN";
pub const FAMILY: &str = "FAMILY";
/// The member filters in front of `TRACKED` and `FAMILY` (see `MEMBER_SLOTS`).
pub const TRACKED_SLOTS: &str = "TRACKED_SLOTS";
pub const FAMILY_SLOTS: &str = "FAMILY_SLOTS";
/// The write probe (tp_btf sys_enter): attached only while a fork family has a child that
/// has not exec'd for the grace window, because any syscall tracepoint slows every syscall.
pub const WRITE_PROGRAM: (&str, &str) = ("sys_enter_write", "sys_enter");
/// The scheduler probes (tp_btf, each named after its tracepoint): they find the futex waits
/// of tracked processes and run on every context switch and wakeup on the host, so the daemon
/// attaches them only while something is tracked (`forkwatch check` verifies them).
/// In attach order: sched_wakeup first, so that no entry sched_switch adds can miss the
/// wakeup that removes it; detached in reverse.
pub const SCHEDULER_PROGRAMS: [&str; 2] = ["sched_wakeup", SWITCH_PROGRAM];
/// The same, on kernels whose sched_switch does not pass `prev_state` (before 5.18): the
/// switch program reads the task's state instead.
pub const SCHEDULER_PROGRAMS_TASK_STATE: [&str; 2] = ["sched_wakeup", SWITCH_PROGRAM_TASK_STATE];
/// The tp_btf tracepoint of the switch programs, one per prototype (as for exit below).
pub const SWITCH_TRACEPOINT: &str = "sched_switch";
pub const SWITCH_PROGRAM: &str = "sched_switch";
pub const SWITCH_PROGRAM_TASK_STATE: &str = "sched_switch_task_state";
/// (program name in the object, tp_btf tracepoint it attaches to) of fork and exec.
pub const LIFECYCLE_PROGRAMS: [(&str, &str); 2] = [
    ("sched_process_fork", "sched_process_fork"),
    ("sched_process_exec", "sched_process_exec"),
];
/// The fork program that also captures the forking thread's user stack (needs
/// `bpf_task_pt_regs`, Linux 5.15): attached instead of `sched_process_fork` where the kernel
/// accepts it.
pub const FORK_STACK_PROGRAM: &str = "sched_process_fork_stack";
/// The tp_btf tracepoint of the exit programs, one per prototype: `EXIT_PROGRAM` reads the
/// `group_dead` argument (passed by newer kernels), `EXIT_PROGRAM_LIVE` the task's signal->live.
pub const EXIT_TRACEPOINT: &str = "sched_process_exit";
pub const EXIT_PROGRAM: &str = "sched_process_exit";
pub const EXIT_PROGRAM_LIVE: &str = "sched_process_exit_live";
/// Socket I/O where the kernel has the sock: length tracepoints: (program, tp_btf tracepoint).
pub const SOCKET_TRACEPOINT_PROGRAMS: [(&str, &str); 2] = [
    ("sock_send_length", "sock_send_length"),
    ("sock_recv_length", "sock_recv_length"),
];
/// Socket I/O elsewhere: (program, kernel function its fentry attaches to).
pub const SOCKET_HOOK_PROGRAMS: [(&str, &str); 2] = [
    ("socket_sendmsg_entry", "security_socket_sendmsg"),
    ("socket_recvmsg_entry", "security_socket_recvmsg"),
];

/// Event categories: the `category` label of `forkwatch_events_total` and
/// `forkwatch_events_lost_total`, and the keys of the `events_lost` finding. [`ALL`](category::ALL)
/// is in [`lost_category`](crate::lost_category) index order.
pub mod category {
    pub const FORK: &str = "fork";
    pub const EXEC: &str = "exec";
    pub const EXIT: &str = "exit";
    /// A thread of a tracked process was created or exited.
    pub const THREAD: &str = "thread";
    /// A socket shared within a fork family.
    pub const SOCKET: &str = "socket";
    /// A file offset shared within a fork family.
    pub const FILE: &str = "file";
    /// A fork's user stack (sent once per forking thread and call site per second).
    pub const FORK_STACK: &str = "fork_stack";
    pub const ALL: [&str; 7] = [FORK, EXEC, EXIT, THREAD, SOCKET, FILE, FORK_STACK];
}
