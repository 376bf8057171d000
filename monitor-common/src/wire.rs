//! The kernel/daemon contract: what the eBPF programs write and the daemon reads back byte for
//! byte (ring-buffer records, map keys and values, the offsets global), the per-CPU counter
//! indices, and the map sizes both sides agree on.
//!
//! Every record the kernel writes to the ring buffer starts with a `u32` [`EventKind`] tag, so the
//! daemon can decode a record without trusting its length. All types are `#[repr(C)]` with
//! explicit padding fields: the kernel writes them byte for byte and userspace reads them back on
//! the same machine, so layout (not endianness) is the contract.

/// Length of `task_struct::comm`, including the trailing NUL.
pub const COMM_LEN: usize = 16;

/// Tag at offset 0 of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Fork = 1,
    Exec = 2,
    Exit = 3,
    /// A tracked process created a thread.
    ThreadCreated = 4,
    /// A thread (not the last one) of a tracked process exited.
    ThreadExited = 5,
    /// A second process of one fork family used a socket another member used since the fork.
    SharedSocket = 6,
    /// A second process of one fork family wrote through a regular-file open description
    /// (without O_APPEND) another member wrote through since the fork.
    SharedFile = 7,
    /// The forking thread's registers and a copy of its user stack at a fork of a multithreaded
    /// parent ([`ForkStackEvent`]), sent just before the [`ForkEvent`] it belongs to.
    ForkStack = 8,
}

impl EventKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Fork),
            2 => Some(Self::Exec),
            3 => Some(Self::Exit),
            4 => Some(Self::ThreadCreated),
            5 => Some(Self::ThreadExited),
            6 => Some(Self::SharedSocket),
            7 => Some(Self::SharedFile),
            8 => Some(Self::ForkStack),
            _ => None,
        }
    }
}

/// `ForkEvent::flags`: the child shares the parent's address space (`CLONE_VM`: vfork,
/// posix_spawn). The kernel filters these out already; the flag stays on the wire so the
/// correlator can refuse them too.
pub const FORK_FLAG_SHARES_VM: u32 = 1 << 0;
/// `ForkEvent::flags`: the program that captures fork stacks ran (this kernel has
/// `bpf_task_pt_regs`), and `stack_ip`/`stack_sp` are the forking thread's user registers; its
/// stack went out as a [`ForkStackEvent`] with the same key, now or within the last
/// [`FORK_STACK_EVERY_NS`].
pub const FORK_FLAG_STACK: u32 = 1 << 1;
/// `ForkEvent::flags`: with [`FORK_FLAG_STACK`], no copy of this fork's stack was sent: its
/// thread sent [`FORK_STACK_BURST`] copies within the last [`FORK_STACK_BURST_NS`] already.
pub const FORK_FLAG_STACK_SKIPPED: u32 = 1 << 2;
/// `ForkEvent::flags`: the forking process descends from the watched tree's root (see
/// [`TREE_MAX_ENTRIES`]), so the child does too.
pub const FORK_FLAG_IN_TREE: u32 = 1 << 3;

/// A new process (not a thread) created by a parent that had at least two live threads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkEvent {
    pub kind: u32,
    /// Thread-group id of the forking process.
    pub parent_tgid: u32,
    /// The thread that called fork/clone: the only one the child is a copy of.
    pub parent_tid: u32,
    pub child_pid: u32,
    /// `parent->signal->nr_threads` at the fork.
    pub parent_threads: u32,
    pub flags: u32,
    /// `bpf_ktime_get_boot_ns()` at the fork.
    pub timestamp_ns: u64,
    /// `child->start_boottime`: with the pid, the identity of the child across pid reuse.
    pub child_start_ns: u64,
    /// `parent->group_leader->start_boottime`: the forking process's identity with its tgid, so
    /// that nothing learnt about one parent is reused for another that got the same pid.
    pub parent_start_ns: u64,
    pub cgroup_id: u64,
    /// The forking thread's comm; the child starts with the same one.
    pub comm: [u8; COMM_LEN],
    /// With [`FORK_FLAG_STACK`]: the forking thread's user instruction and stack pointers at the
    /// fork (0 when its registers could not be read) and its call site's fingerprint, the key of
    /// its [`ForkStackEvent`].
    pub stack_ip: u64,
    pub stack_sp: u64,
    pub stack_site: u64,
}

/// Pages of user stack a [`ForkStackEvent`] carries: from the page holding the forking thread's
/// sp upwards, so at least (FORK_STACK_PAGES - 1) × 4 KiB of its callers' frames. 16 KiB: a
/// C program's or an interpreter's native frames from the fork up to its main loop fit (deep
/// recursion does not, and its outer frames are left out). Whole pages, read one by one at fixed
/// offsets of the record, so the verifier checks each copy's bounds as constants.
pub const FORK_STACK_PAGES: usize = 4;
/// Bytes of one page of a [`ForkStackEvent`]'s copy.
pub const FORK_STACK_PAGE_BYTES: usize = 4096;
/// One forking thread's stack at one call site (same sp, ip and site fingerprint) is sent at
/// most once per this long; its later forks in between refer to it by key, and the daemon reuses
/// what it unwound.
pub const FORK_STACK_EVERY_NS: u64 = 1_000_000_000;
/// Words above sp that make a call site's fingerprint: a hash of those among them that point
/// into the executable's code (return addresses, above all the one into fork's caller). sp and
/// ip alone are the same for two call sites at the same depth (the syscall in the C library's
/// fork, on the same stack): 1 KiB reaches past the C library's fork frames to the caller's
/// return address.
pub const FORK_SITE_WORDS: usize = 128;
/// At most this many copies per forking thread per [`FORK_STACK_BURST_NS`], whatever the keys:
/// a fingerprint that changed at every fork (a code pointer among the locals) must not turn a
/// fork storm into a 16 KiB copy per fork.
pub const FORK_STACK_BURST: u64 = 8;
pub const FORK_STACK_BURST_NS: u64 = 100_000_000;
/// Capacity of the kernel's map of stacks recently sent (LRU): forking threads × call sites.
pub const FORK_STACK_MAX_ENTRIES: u32 = 4096;

/// The forking thread's user registers and stack at a fork of a multithreaded parent: what the
/// daemon unwinds (with the modules' CFI) into the fork's call stack. Keyed by (tgid, tid,
/// parent_start_ns, ip, sp, site), which the [`ForkEvent`] repeats.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkStackEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// How many pages of `stack` were read (the copy stops at the first unreadable page: the
    /// top of the stack's mapping).
    pub pages: u32,
    pub parent_start_ns: u64,
    pub timestamp_ns: u64,
    /// User registers at the fork: instruction, stack and frame pointer (rbp on x86_64).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// User address of `stack[0]`: sp rounded down to its page.
    pub base: u64,
    /// The call site's fingerprint (see [`FORK_SITE_WORDS`]).
    pub site: u64,
    pub stack: [u8; FORK_STACK_PAGES * FORK_STACK_PAGE_BYTES],
}

/// A tracked process called execve successfully.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    pub kind: u32,
    /// Thread-group id (after exec the calling thread is the leader).
    pub pid: u32,
    pub timestamp_ns: u64,
    /// The comm after exec (the new program's name).
    pub comm: [u8; COMM_LEN],
}

/// The last thread of a tracked process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitEvent {
    pub kind: u32,
    pub pid: u32,
    pub timestamp_ns: u64,
    /// `task->exit_code` of the last thread (wait(2) status encoding).
    pub exit_code: u32,
    pub _pad: u32,
}

/// A thread of a tracked process was created or exited ([`EventKind::ThreadCreated`] /
/// [`EventKind::ThreadExited`]); the daemon keeps each tracked process's thread count from these.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub timestamp_ns: u64,
}

/// Longest Unix socket path (`sockaddr_un.sun_path`).
pub const UNIX_PATH_LEN: usize = 108;

/// `SharedSocketEvent::direction` / `SockUser::direction`.
pub const DIRECTION_SEND: u8 = 0;
pub const DIRECTION_RECV: u8 = 1;

/// Sent the first time a second process of a fork family moves data on a socket that another
/// member already used since the fork. Deduplicated in the kernel per (socket, process).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedSocketEvent {
    pub kind: u32,
    /// The process using the socket now (the later user).
    pub pid: u32,
    /// The member that used it first after the fork.
    pub other_pid: u32,
    /// The fork family: the pid of the process that forked without exec.
    pub family: u32,
    pub timestamp_ns: u64,
    pub other_timestamp_ns: u64,
    /// `struct sock *`: the identity of the connection (never shown; the inode is).
    pub socket: u64,
    /// Inode number of the socket (as in /proc/<pid>/fd: `socket:[inode]`).
    pub inode: u64,
    pub cgroup_id: u64,
    /// Syscall numbers of this use and of the other process's first use.
    pub syscall: u32,
    pub other_syscall: u32,
    /// `AF_*`.
    pub sk_family: u16,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`, ...
    pub sk_type: u16,
    pub protocol: u16,
    /// `sk_state` (TCP states; `TCP_ESTABLISHED` = 1 for a connected datagram socket).
    pub state: u8,
    pub direction: u8,
    pub other_direction: u8,
    /// 1 when the later user descends from the watched tree's root (see [`TREE_MAX_ENTRIES`]).
    pub in_tree: u8,
    /// Ports in host byte order.
    pub local_port: u16,
    pub peer_port: u16,
    pub _pad2: u16,
    /// IPv4 (first 4 bytes) or IPv6 addresses, network byte order.
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    /// Unix socket paths (NUL-terminated; empty when unbound; abstract names start with NUL).
    pub local_path: [u8; UNIX_PATH_LEN],
    pub peer_path: [u8; UNIX_PATH_LEN],
    /// The later user's comm (it may be gone by the time the daemon looks).
    pub comm: [u8; COMM_LEN],
}

/// Sent the first time a second process of a fork family writes through a regular-file open
/// description (shared offset, no O_APPEND) another member wrote through since the fork.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedFileEvent {
    pub kind: u32,
    pub pid: u32,
    pub other_pid: u32,
    pub family: u32,
    pub timestamp_ns: u64,
    pub other_timestamp_ns: u64,
    /// `struct file *` (identity only).
    pub file: u64,
    pub inode: u64,
    pub cgroup_id: u64,
    /// The fd the later user wrote through (its path is /proc/<pid>/fd/<fd>).
    pub fd: u32,
    pub syscall: u32,
    pub other_syscall: u32,
    /// 1 when the later user descends from the watched tree's root (see [`TREE_MAX_ENTRIES`]).
    pub in_tree: u32,
    pub comm: [u8; COMM_LEN],
}

/// Value of the `SOCK_USERS` map (key: the socket's inode number; unlike a `struct sock *`,
/// never reused by a later socket while the map remembers it): the family member that moves
/// data on the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockUser {
    pub family: u32,
    pub pid: u32,
    /// Its first and its latest use.
    pub first_ns: u64,
    pub last_ns: u64,
    pub syscall: u32,
    pub direction: u32,
}

/// Key of the `SOCK_REPORTED` map: (socket inode, process) pairs already sent to userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockPid {
    pub socket: u64,
    pub pid: u32,
    pub _pad: u32,
}

/// `BlockedWait::flags`: the futex is process-private (no other process can wake it).
pub const BLOCKED_PRIVATE: u32 = 1 << 0;
/// `BlockedWait::flags`: the wait has a timeout.
pub const BLOCKED_TIMEOUT: u32 = 1 << 1;

/// Value of the `BLOCKED` map (key: tid): a thread of a tracked process that went to sleep in a
/// futex wait and has not been woken since. Written by sched_switch, deleted by sched_wakeup;
/// the daemon scans the map instead of receiving an event per sleep, so busy lock traffic in a
/// tracked process costs no ring-buffer bandwidth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedWait {
    pub pid: u32,
    /// The syscall: [`FUTEX`](crate::syscall::FUTEX), [`FUTEX_WAIT`](crate::syscall::FUTEX_WAIT)
    /// or [`FUTEX_WAITV`](crate::syscall::FUTEX_WAITV).
    pub syscall: u32,
    /// The futex address (for futex_waitv, the first waiter's).
    pub uaddr: u64,
    /// `futex(2)` op, or the futex2 flags.
    pub op: u32,
    pub flags: u32,
    /// CLOCK_BOOTTIME ns when the thread went to sleep.
    pub since_ns: u64,
}

/// Kernel struct member offsets, read from the running kernel's BTF at load time and written into
/// the programs' read-only data (`EbpfLoader::override_global`). Never hard-coded: they move
/// between kernel versions and configs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_mm: u32,
    pub task_signal: u32,
    pub task_start_boottime: u32,
    pub task_group_leader: u32,
    pub task_exit_code: u32,
    pub signal_nr_threads: u32,
    /// signal_struct.live (an atomic_t: its counter at +0), for group-dead where
    /// sched_process_exit does not pass it.
    pub signal_live: u32,
    /// task_struct.__state (5.14+; `state` before, a long whose low half is read): whether a
    /// task switched out is going to sleep, where sched_switch does not pass `prev_state`.
    pub task_state: u32,
    /// `struct pt_regs` members holding the syscall number and arguments 1, 2, 4 and 5 (on
    /// x86_64: orig_ax, di, si, r10, r8).
    pub regs_syscall_nr: u32,
    pub regs_arg1: u32,
    pub regs_arg2: u32,
    pub regs_arg4: u32,
    pub regs_arg5: u32,
    /// `struct pt_regs` members with the user instruction, stack and frame pointers (x86_64:
    /// ip, sp, bp), for the fork stack.
    pub regs_ip: u32,
    pub regs_sp: u32,
    pub regs_bp: u32,
    /// task_struct.mm's start_code and end_code: the executable's code, for a fork site's
    /// fingerprint.
    pub mm_start_code: u32,
    pub mm_end_code: u32,
    /// task_struct.files, files_struct.fdt, fdtable.fd: to tell a socket on fds 0-2 (stdio).
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    /// struct sock_common (at the start of struct sock).
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_num: u32,
    pub skc_dport: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// struct sock.
    pub sk_type: u32,
    pub sk_protocol: u32,
    pub sk_socket: u32,
    /// struct socket.sk, .file; struct socket_alloc.vfs_inode; inode.i_ino.
    pub socket_sk: u32,
    pub socket_file: u32,
    pub socket_inode: u32,
    pub inode_ino: u32,
    /// struct unix_sock.peer, .addr; struct unix_address.len, .name.
    pub unix_peer: u32,
    pub unix_addr: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// struct file.f_flags, .f_inode; struct inode.i_mode.
    pub file_flags: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
}

/// Indices into the per-CPU `FORK_COUNTERS` array: every fork the kernel sees, by kind, including
/// the ones filtered out before the ring buffer.
pub mod fork_counter {
    /// A new process whose parent had one thread (never tracked).
    pub const SINGLE_THREADED: u32 = 0;
    /// A new process from a multithreaded parent (tracked, sent to userspace).
    pub const MULTI_THREADED: u32 = 1;
    /// A new thread (`CLONE_THREAD`).
    pub const THREAD: u32 = 2;
    /// A new process sharing the parent's memory (`CLONE_VM`: vfork, posix_spawn).
    pub const SHARED_VM: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Indices into the per-CPU `MAP_FULL` array: inserts that a full map refused, by map. Only the
/// plain hash maps can refuse (the LRU maps make room by evicting).
pub mod map_full {
    /// Children of multithreaded forks: an untracked child's futex waits go unseen.
    pub const TRACKED: u32 = 0;
    /// Futex waits of tracked processes: a deadlock goes unseen.
    pub const BLOCKED: u32 = 1;
    /// Fork family members: their shared sockets and files go unseen.
    pub const FAMILY: u32 = 2;
    /// Family children that have not exec'd: the write probe is not attached for them.
    pub const CHILDREN: u32 = 3;
    /// The watched tree of `forkwatch exec`: a descendant of CMD goes unwatched.
    pub const TREE: u32 = 4;
    pub const COUNT: u32 = 5;
    /// Metric label of each map, by index.
    pub const NAMES: [&str; COUNT as usize] = ["tracked", "blocked", "family", "children", "tree"];
}

/// Indices into the per-CPU `LOST_EVENTS` array: ring-buffer reservations that failed, by the
/// category of event that was dropped.
pub mod lost_category {
    pub const FORK: u32 = 0;
    pub const EXEC: u32 = 1;
    pub const EXIT: u32 = 2;
    pub const THREAD: u32 = 3;
    pub const SOCKET: u32 = 4;
    pub const FILE: u32 = 5;
    pub const FORK_STACK: u32 = 6;
    pub const COUNT: u32 = 7;
    /// Metric label of each category, by index.
    pub const NAMES: [&str; COUNT as usize] = crate::names::category::ALL;
}

/// The daemon reuses a parent's fork context (read from /proc) for this long per forking thread.
pub const FORK_CONTEXT_REUSE_NS: u64 = 100_000_000;
/// A thread's fork wakes the daemon at once at most once per this long (half the reuse time, so
/// a fork collected by the drain tick still finds its context fresh); see the eBPF programs.
pub const FORK_WAKEUP_EVERY_NS: u64 = FORK_CONTEXT_REUSE_NS / 2;

/// Default capacity of the tracked-process map.
pub const TRACKED_MAX_ENTRIES: u32 = 65_536;
/// Capacity of the `BLOCKED` map: threads of tracked processes asleep in a futex wait.
pub const BLOCKED_MAX_ENTRIES: u32 = 16_384;
/// Capacity of the fork-family maps (`FAMILY`, `CHILDREN`; plain hash maps: exec and exit
/// remove their entries in the kernel).
pub const FAMILY_MAX_ENTRIES: u32 = 65_536;
/// Slots of each member filter (`TRACKED_SLOTS`, `FAMILY_SLOTS`, a power of two): a pid's slot
/// is its low bits. Each slot has two counts, elements 2 × slot (the kernel programs' inserts)
/// and 2 × slot + 1 (the entries the daemon seeded): see the eBPF `maps`. 2 × 16,384 × 8 bytes
/// = 256 KiB of kernel memory per filter; with n members on the host an uninvolved pid finds its
/// slot taken with odds of about n / 16,384.
pub const MEMBER_SLOTS: u32 = 16_384;

/// The element of a member filter with the kernel programs' count of `pid`'s slot; the
/// daemon's count is the next element.
#[inline(always)]
pub const fn member_slot(pid: u32) -> u32 {
    (pid & (MEMBER_SLOTS - 1)) * 2
}
/// Capacity of the `TREE` map of `forkwatch exec` (1 for the daemon, which watches no tree):
/// the live processes descending from the tree's root, the `FORKWATCH_TREE_ROOT` global (a
/// host tgid; 0: no tree). The fork program adds a child whose parent is the root or in the
/// map, on every fork that makes a process (vfork and posix_spawn too: the child may fork
/// before it execs), and the exit program removes it, so membership follows descent, whatever
/// cgroup or parent the process later has. Each record about a descendant says so
/// ([`FORK_FLAG_IN_TREE`], `in_tree`), decided when the kernel wrote it: the process may be
/// gone and its pid reused by the time the daemon reads it.
pub const TREE_MAX_ENTRIES: u32 = 32_768;
/// Capacity of the socket and file maps (`SOCK_*`, `FILE_*`; LRU).
pub const SOCKET_MAX_ENTRIES: u32 = 65_536;
/// The lowest fd whose writes the write probe watches: 0-2 are stdio, which parent and child
/// share on purpose (a shell's subshells, a daemon's log on stderr). The daemon's check for a
/// write-offset candidate skips the same fds, so that it never attaches the probe for writes
/// the probe ignores.
pub const FIRST_WATCHED_FD: u32 = 3;
/// Default ring-buffer size in bytes (a power of two, a multiple of the page size).
pub const RING_BUFFER_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with
    // explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::ExitEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ThreadEvent {}
    unsafe impl aya::Pod for super::BlockedWait {}
    unsafe impl aya::Pod for super::SharedSocketEvent {}
    unsafe impl aya::Pod for super::SockUser {}
    unsafe impl aya::Pod for super::SockPid {}
    unsafe impl aya::Pod for super::SharedFileEvent {}
    unsafe impl aya::Pod for super::ForkStackEvent {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn member_slots_pair_the_two_counts_of_a_slot_inside_the_filter() {
        assert!(MEMBER_SLOTS.is_power_of_two());
        // Pids one slot-count apart share a slot; neighbours do not.
        assert_eq!(member_slot(7), member_slot(7 + MEMBER_SLOTS));
        assert_ne!(member_slot(7), member_slot(8));
        // The programs' count is even, the daemon's the odd one after it, both in the map.
        assert_eq!(member_slot(7) % 2, 0);
        assert_eq!(member_slot(u32::MAX) + 1, 2 * MEMBER_SLOTS - 1);
    }

    #[test]
    fn every_record_starts_with_its_kind_tag() {
        assert_eq!(offset_of!(ForkEvent, kind), 0);
        assert_eq!(offset_of!(ExecEvent, kind), 0);
        assert_eq!(offset_of!(ExitEvent, kind), 0);
        assert_eq!(offset_of!(ThreadEvent, kind), 0);
        assert_eq!(offset_of!(SharedSocketEvent, kind), 0);
        assert_eq!(offset_of!(ForkStackEvent, kind), 0);
        for kind in [
            EventKind::Fork,
            EventKind::Exec,
            EventKind::Exit,
            EventKind::ThreadCreated,
            EventKind::ThreadExited,
            EventKind::SharedSocket,
            EventKind::SharedFile,
            EventKind::ForkStack,
        ] {
            assert_eq!(EventKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(EventKind::from_u32(0), None);
    }

    #[test]
    fn records_have_no_implicit_padding() {
        // Explicit padding keeps every byte the kernel writes initialized and the layout equal
        // on both sides; the sizes below are the sums of the fields.
        assert_eq!(size_of::<ForkEvent>(), 6 * 4 + 4 * 8 + COMM_LEN + 3 * 8);
        assert_eq!(
            size_of::<ForkStackEvent>(),
            4 * 4 + 7 * 8 + FORK_STACK_PAGES * FORK_STACK_PAGE_BYTES
        );
        assert_eq!(size_of::<ExecEvent>(), 2 * 4 + 8 + COMM_LEN);
        assert_eq!(size_of::<ExitEvent>(), 2 * 4 + 8 + 2 * 4);
        assert_eq!(size_of::<KernelOffsets>(), 46 * 4);
        assert_eq!(
            size_of::<SharedSocketEvent>(),
            4 * 4 + 5 * 8 + 2 * 4 + 3 * 2 + 4 + 3 * 2 + 2 * 16 + 2 * UNIX_PATH_LEN + COMM_LEN
        );
        assert_eq!(size_of::<SockUser>(), 32);
        assert_eq!(
            size_of::<SharedFileEvent>(),
            4 * 4 + 5 * 8 + 4 * 4 + COMM_LEN
        );
        assert_eq!(size_of::<SockPid>(), 16);
        assert_eq!(size_of::<ThreadEvent>(), 4 * 4 + 8);
        assert_eq!(size_of::<BlockedWait>(), 2 * 4 + 8 + 2 * 4 + 8);
        assert_eq!(align_of::<ForkEvent>(), 8);
    }

    #[test]
    fn ring_buffer_default_is_a_power_of_two_page_multiple() {
        assert!(RING_BUFFER_BYTES.is_power_of_two() && RING_BUFFER_BYTES >= 4096);
    }

    #[test]
    fn lost_categories_are_named_in_index_order() {
        use crate::names::category;
        assert_eq!(lost_category::NAMES.len(), lost_category::COUNT as usize);
        for (index, name) in [
            (lost_category::FORK, category::FORK),
            (lost_category::EXEC, category::EXEC),
            (lost_category::EXIT, category::EXIT),
            (lost_category::THREAD, category::THREAD),
            (lost_category::SOCKET, category::SOCKET),
            (lost_category::FILE, category::FILE),
            (lost_category::FORK_STACK, category::FORK_STACK),
        ] {
            assert_eq!(lost_category::NAMES[index as usize], name);
        }
    }
}
