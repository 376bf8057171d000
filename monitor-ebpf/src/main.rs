//! forkwatch's kernel programs: tp_btf on the scheduler's process lifecycle tracepoints.
//!
//! The hot path is every fork, exec and exit on the host, so each program decides as early as it
//! can whether the event matters: thread creations, vfork/posix_spawn children and forks of
//! single-threaded processes only bump a per-CPU counter; exec and exit cost one hash lookup for
//! every process that is not tracked. Only forks of multithreaded processes reach userspace.
#![no_std]
#![no_main]
// The BPF target has no atomic types in core; the intrinsic is the atomic add (BPF_ATOMIC).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use monitor_common::{
    BLOCKED_MAX_ENTRIES, BLOCKED_PRIVATE, BLOCKED_TIMEOUT, BlockedWait, DIRECTION_RECV,
    DIRECTION_SEND, EventKind, ExecEvent, ExitEvent, FAMILY_MAX_ENTRIES, FORK_WAKEUP_EVERY_NS,
    ForkEvent, KernelOffsets, RING_BUFFER_BYTES, SOCKET_MAX_ENTRIES, SharedFileEvent,
    SharedSocketEvent, SockPid, SockUser, TRACKED_MAX_ENTRIES, ThreadEvent, fork_counter, futex,
    lost_category, syscall,
};

/// Ring-buffer fill (bytes) from which a routine record (exec, exit, thread) wakes the daemon.
/// Below it they are submitted without a wakeup and the daemon collects them on its drain tick:
/// under a fork+exec storm a wakeup per record costs more (a cross-CPU IPI and two context
/// switches) than the rest of the work. Written by the loader; 0 (the fallback) always wakes.
#[unsafe(no_mangle)]
static FORKWATCH_WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Submit flags of records the daemon acts on at once (forks, shared sockets and files): it
/// reads the processes' /proc entries, which a short-lived process takes with it. Forced: the
/// kernel's own policy (flags 0) wakes only a reader that has caught up, and routine records
/// left for the drain tick mean it has not.
const URGENT: u64 = BPF_RB_FORCE_WAKEUP as u64;

/// Submit flags of a fork event: urgent for the first fork of a thread in each
/// FORK_WAKEUP_EVERY_NS, routine for the rest. The daemon reads the parent's fork context from
/// /proc at the first (promptly, while it lives) and reuses it for the next forks of the same
/// thread for longer than this (FORK_CONTEXT_REUSE_NS), so a fork storm wakes it a few times a
/// second, not once per fork.
#[inline(always)]
fn fork_wakeup_flags(pid_tgid: u64, parent_start_ns: u64, now_ns: u64) -> u64 {
    // With the process's start time: a pid reused by a new process is a new forking thread.
    let key = [pid_tgid, parent_start_ns];
    if let Some(last) = unsafe { FORK_WAKEUPS.get(&key) }
        && now_ns.saturating_sub(*last) < FORK_WAKEUP_EVERY_NS
    {
        return wakeup_flags();
    }
    let _ = FORK_WAKEUPS.insert(&key, &now_ns, 0);
    URGENT
}

/// Submit flags of routine records: see FORKWATCH_WAKEUP_BYTES.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if pending >= FORKWATCH_WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Member offsets of the running kernel, written by the loader from BTF.
#[unsafe(no_mangle)]
static FORKWATCH_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_mm: 0,
    task_signal: 0,
    task_start_boottime: 0,
    task_group_leader: 0,
    task_exit_code: 0,
    signal_nr_threads: 0,
    regs_syscall_nr: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    regs_arg4: 0,
    regs_arg5: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    skc_family: 0,
    skc_state: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    sk_type: 0,
    sk_protocol: 0,
    sk_socket: 0,
    socket_file: 0,
    socket_inode: 0,
    inode_ino: 0,
    unix_peer: 0,
    unix_addr: 0,
    unix_address_name: 0,
    file_flags: 0,
    file_inode: 0,
    inode_mode: 0,
});

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Processes created by a multithreaded fork that have not exec'd or exited yet
/// (pid → child start time). Filled here, emptied by exec/exit; the daemon only reads it.
#[map]
static TRACKED: HashMap<u32, u64> = HashMap::with_max_entries(TRACKED_MAX_ENTRIES, 0);

/// Threads of tracked processes asleep in a futex wait (tid → the wait), for the daemon to scan.
#[map]
static BLOCKED: HashMap<u32, BlockedWait> = HashMap::with_max_entries(BLOCKED_MAX_ENTRIES, 0);

/// Fork families (tgid → the family's root pid): a process that forked without exec, and its
/// children until they exec. Every member's socket I/O is watched; everyone else's costs one
/// lookup. A plain hash map, not LRU: exec and exit remove entries in the kernel, so none is
/// ever orphaned, and LRU inserts and deletes cost a third more on every fork and exec
/// (measured: 4.0 → 2.9 µs per fork, 3.8 → 2.6 µs per exec in a fork+exec storm).
#[map]
static FAMILY: HashMap<u32, u32> = HashMap::with_max_entries(FAMILY_MAX_ENTRIES, 0);

/// When a fork last woke the daemon, per forking thread ([pid_tgid, process start] → boot ns): see
/// `fork_wakeup_flags`. LRU: nothing removes entries, and a forgotten one only costs a wakeup.
#[map]
static FORK_WAKEUPS: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(4096, 0);

/// Children in a fork family that have not exec'd (pid → when they joined). The daemon scans it
/// to attach the write probe only while some child has gone without exec for the grace window.
/// Plain hash map, like FAMILY.
#[map]
static CHILDREN: HashMap<u32, u64> = HashMap::with_max_entries(FAMILY_MAX_ENTRIES, 0);

/// Open file description (`struct file *`) → the family member that writes through it.
#[map]
static FILE_USERS: LruHashMap<u64, SockUser> = LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// (file, process) pairs already reported.
#[map]
static FILE_REPORTED: LruHashMap<SockPid, u8> = LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// Socket inode → the family member that moves data on it.
#[map]
static SOCK_USERS: LruHashMap<u64, SockUser> = LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// (socket inode, process) pairs already reported: each is sent to userspace once.
#[map]
static SOCK_REPORTED: LruHashMap<SockPid, u8> = LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// How many entries `BLOCKED` holds. Every insert and delete of it is in these programs and
/// adjusts the count, so with none (nearly always) `sched_wakeup` returns after one array read,
/// before reading the task or hashing. A stale high count is only slower, never wrong; it
/// cannot read 0 with an entry present: the insert and its increment happen in `sched_switch`
/// before the sleeping task is off its CPU, which a wakeup of that task waits for.
#[map]
static BLOCKED_COUNT: Array<u64> = Array::with_max_entries(1, 0);

fn blocked_count() -> u64 {
    BLOCKED_COUNT.get(0).copied().unwrap_or(u64::MAX)
}

/// Adds `delta` (two's complement for a decrement) to `BLOCKED_COUNT`, atomically: sleeps and
/// wakeups run on every CPU at once.
fn blocked_count_add(delta: u64) {
    if let Some(slot) = BLOCKED_COUNT.get_ptr_mut(0) {
        // SAFETY: the map's value is a valid, aligned u64 for the program's lifetime.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            )
        };
    }
}

/// Removes `tid` from `BLOCKED` if it is there, keeping the count.
fn unblock(tid: u32) {
    if unsafe { BLOCKED.get(&tid) }.is_some() && BLOCKED.remove(&tid).is_ok() {
        blocked_count_add(u64::MAX);
    }
}

#[map]
static FORK_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fork_counter::COUNT, 0);

#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost_category::COUNT, 0);

#[inline(always)]
fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race with this increment.
        unsafe { *slot += 1 };
    }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
unsafe fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> u32 {
    // Errors only mean a kernel read failed; there is nothing better to do than to drop the event.
    let _ = unsafe { on_fork(&ctx) };
    0
}

unsafe fn on_fork(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let offsets = FORKWATCH_OFFSETS.load();
    // TP_PROTO(struct task_struct *parent, struct task_struct *child); parent is current.
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);

    let child_pid: i32 = unsafe { read_at(child, offsets.task_pid)? };
    let child_tgid: i32 = unsafe { read_at(child, offsets.task_tgid)? };
    if child_pid != child_tgid {
        count(&FORK_COUNTERS, fork_counter::THREAD);
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if unsafe { TRACKED.get(&tgid) }.is_some() {
            send_thread_event(EventKind::ThreadCreated, tgid, child_pid as u32);
        }
        return Ok(());
    }
    let parent_mm: u64 = unsafe { read_at(parent, offsets.task_mm)? };
    if parent_mm == 0 {
        // A kernel thread spawning a worker (kthreadd, usermodehelper): no user state to inherit.
        return Ok(());
    }
    let child_mm: u64 = unsafe { read_at(child, offsets.task_mm)? };
    if child_mm == parent_mm {
        // CLONE_VM without CLONE_THREAD: vfork or posix_spawn. The child runs on the parent's
        // memory until it execs or exits, which is the safe pattern: count it, never send it
        // (FORK_FLAG_SHARES_VM is therefore never set by this program).
        count(&FORK_COUNTERS, fork_counter::SHARED_VM);
        return Ok(());
    }
    // The parent is current: its ids are read once for the family, the event and the wakeup.
    let pid_tgid = bpf_get_current_pid_tgid();
    join_family((pid_tgid >> 32) as u32, child_pid as u32);
    let signal: *const u8 = unsafe { read_at(parent, offsets.task_signal)? };
    let parent_threads: i32 = unsafe { read_at(signal, offsets.signal_nr_threads)? };
    if parent_threads < 2 {
        count(&FORK_COUNTERS, fork_counter::SINGLE_THREADED);
        return Ok(());
    }
    count(&FORK_COUNTERS, fork_counter::MULTI_THREADED);

    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        // Not tracked either: exec/exit events for a child the daemon never saw are useless.
        count(&LOST_EVENTS, lost_category::FORK);
        return Ok(());
    };
    let child_start_ns: u64 = unsafe { read_at(child, offsets.task_start_boottime) }.unwrap_or(0);
    let parent_start_ns: u64 =
        match unsafe { read_at::<*const u8>(parent, offsets.task_group_leader) } {
            Ok(leader) => unsafe { read_at(leader, offsets.task_start_boottime) }.unwrap_or(0),
            Err(_) => 0,
        };
    let pid = child_pid as u32;
    if TRACKED.insert(&pid, &child_start_ns, 0).is_err() {
        count(&FORK_COUNTERS, fork_counter::TRACK_FULL);
    }
    let now_ns = unsafe { bpf_ktime_get_boot_ns() };
    entry.write(ForkEvent {
        kind: EventKind::Fork as u32,
        parent_tgid: (pid_tgid >> 32) as u32,
        parent_tid: pid_tgid as u32,
        child_pid: pid,
        parent_threads: parent_threads as u32,
        flags: 0,
        timestamp_ns: now_ns,
        child_start_ns,
        parent_start_ns,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(fork_wakeup_flags(pid_tgid, parent_start_ns, now_ns));
    Ok(())
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    // Runs in the exec'ing task after de_thread(): its pid is the thread-group id.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A new program shares nothing it does not inherit on purpose: it leaves its family.
    leave_family(pid);
    if unsafe { TRACKED.get(&pid) }.is_none() {
        return 0;
    }
    // Once exec'd the process no longer carries the parent's state: stop tracking it.
    let _ = TRACKED.remove(&pid);
    match EVENTS.reserve::<ExecEvent>(0) {
        Some(mut entry) => {
            entry.write(ExecEvent {
                kind: EventKind::Exec as u32,
                pid,
                timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
                comm: bpf_get_current_comm().unwrap_or([0; 16]),
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::EXEC),
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // TP_PROTO(struct task_struct *p, bool group_dead): only the last thread ends the process.
    let group_dead: u64 = ctx.arg(1);
    let group_dead = group_dead & 0xff != 0;
    if group_dead {
        leave_family(pid);
    }
    // A thread that is exiting is not blocked in a futex any more (normally the wakeup already
    // removed it; a fatal signal may not have gone through one, and an exec that killed the
    // other threads untracked the process first: so before the TRACKED check).
    if blocked_count() != 0 {
        unblock(tid);
    }
    if unsafe { TRACKED.get(&pid) }.is_none() {
        return 0;
    }
    if !group_dead {
        send_thread_event(EventKind::ThreadExited, pid, tid);
        return 0;
    }
    let _ = TRACKED.remove(&pid);
    let task: *const u8 = ctx.arg(0);
    let offsets = FORKWATCH_OFFSETS.load();
    let exit_code: i32 = unsafe { read_at(task, offsets.task_exit_code) }.unwrap_or(0);
    match EVENTS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            entry.write(ExitEvent {
                kind: EventKind::Exit as u32,
                pid,
                timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
                exit_code: exit_code as u32,
                _pad: 0,
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::EXIT),
    }
    0
}

/// Makes `child` (and its parent, if it is not yet) a member of the parent's fork family.
#[inline(always)]
fn join_family(parent: u32, child: u32) {
    let family = match unsafe { FAMILY.get(&parent) } {
        Some(&family) => family,
        None => {
            let _ = FAMILY.insert(&parent, &parent, 0);
            parent
        }
    };
    let _ = FAMILY.insert(&child, &family, 0);
    let _ = CHILDREN.insert(&child, &unsafe { bpf_ktime_get_boot_ns() }, 0);
}

#[inline(always)]
fn leave_family(pid: u32) {
    if unsafe { FAMILY.get(&pid) }.is_some() {
        let _ = FAMILY.remove(&pid);
    }
    if unsafe { CHILDREN.get(&pid) }.is_some() {
        let _ = CHILDREN.remove(&pid);
    }
}

/// Notes that `pid` (of `family`) used a shared resource (a socket or an open file), keyed in
/// `users`. Returns the other member's record when this use makes the resource shared: another
/// member used it after this process was born (a use before that was a handover, not sharing).
#[inline(always)]
fn note_use(
    users: &LruHashMap<u64, SockUser>,
    key: u64,
    family: u32,
    pid: u32,
    now: u64,
    direction: u8,
) -> Result<Option<SockUser>, i32> {
    let other = match users.get_ptr_mut(&key) {
        Some(user) if unsafe { (*user).family } == family => {
            if unsafe { (*user).pid } == pid {
                unsafe { (*user).last_ns = now }; // steady traffic of the current user
                return Ok(None);
            }
            unsafe { *user }
        }
        // First use since joining the family (or an entry of another family).
        _ => return claim(users, key, family, pid, now, direction).map(|()| None),
    };
    let offsets = FORKWATCH_OFFSETS.load();
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let leader: *const u8 = unsafe { read_at(task, offsets.task_group_leader)? };
    let born: u64 = unsafe { read_at(leader, offsets.task_start_boottime)? };
    if other.last_ns < born {
        return claim(users, key, family, pid, now, direction).map(|()| None);
    }
    Ok(Some(other))
}

/// Makes `pid` the user of the resource.
#[inline(always)]
fn claim(
    users: &LruHashMap<u64, SockUser>,
    key: u64,
    family: u32,
    pid: u32,
    now: u64,
    direction: u8,
) -> Result<(), i32> {
    let user = SockUser {
        family,
        pid,
        first_ns: now,
        last_ns: now,
        syscall: current_syscall(),
        direction: direction as u32,
    };
    users.insert(&key, &user, 0)
}

/// Whether (resource, pid) was reported already; marks it reported.
#[inline(always)]
fn first_report(reported: &LruHashMap<SockPid, u8>, key: u64, pid: u32) -> Result<bool, i32> {
    let seen = SockPid {
        socket: key,
        pid,
        _pad: 0,
    };
    if unsafe { reported.get(&seen) }.is_some() {
        return Ok(false);
    }
    reported.insert(&seen, &1, 0)?;
    Ok(true)
}

fn send_thread_event(kind: EventKind, pid: u32, tid: u32) {
    match EVENTS.reserve::<ThreadEvent>(0) {
        Some(mut entry) => {
            entry.write(ThreadEvent {
                kind: kind as u32,
                pid,
                tid,
                _pad: 0,
                timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::THREAD),
    }
}

/// A task is switched out. If it is going to sleep (not preempted) and belongs to a tracked
/// process, and its saved user registers say it is in a futex wait, remember the wait.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state); prev is current.
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    // Only a sleep (TASK_INTERRUPTIBLE, or TASK_UNINTERRUPTIBLE as in killable waits): not a
    // preemption, not still runnable, and not a dying thread's last switch (TASK_DEAD), whose
    // saved registers still show the futex wait it was killed in but whose exit hook has run,
    // so its entry would never be removed.
    if preempt & 0xff != 0 || prev_state as u32 & TASK_SLEEPING == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if unsafe { TRACKED.get(&pid) }.is_none() {
        return 0;
    }
    let _ = unsafe { record_futex_wait(pid, pid_tgid as u32) };
    0
}

unsafe fn record_futex_wait(pid: u32, tid: u32) -> Result<(), i32> {
    let offsets = FORKWATCH_OFFSETS.load();
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task) } as *const u8;
    if regs.is_null() {
        return Ok(());
    }
    let nr: u64 = unsafe { read_at(regs, offsets.regs_syscall_nr)? };
    let arg1: u64 = unsafe { read_at(regs, offsets.regs_arg1)? };
    let arg2: u64 = unsafe { read_at(regs, offsets.regs_arg2)? };
    let arg4: u64 = unsafe { read_at(regs, offsets.regs_arg4)? };
    let (uaddr, op, private, timeout) = match nr as u32 {
        // futex(uaddr, op, val, timeout, uaddr2, val3)
        syscall::FUTEX => {
            let op = arg2 as u32;
            if !futex::is_wait(op) {
                return Ok(());
            }
            (arg1, op, op & futex::PRIVATE_FLAG != 0, arg4 != 0)
        }
        // futex_wait(uaddr, val, mask, flags, timeout, clockid)
        syscall::FUTEX_WAIT => {
            let timeout: u64 = unsafe { read_at(regs, offsets.regs_arg5)? };
            let flags = arg4 as u32;
            (
                arg1,
                flags,
                flags & futex::FUTEX2_PRIVATE != 0,
                timeout != 0,
            )
        }
        // futex_waitv(waiters, nr_futexes, flags, timeout, clockid): report the first waiter,
        // struct futex_waitv { u64 val; u64 uaddr; u32 flags; u32 __reserved; }.
        syscall::FUTEX_WAITV => {
            let uaddr: u64 = unsafe { bpf_probe_read_user((arg1 + 8) as *const u64)? };
            let flags: u32 = unsafe { bpf_probe_read_user((arg1 + 16) as *const u32)? };
            (uaddr, flags, flags & futex::FUTEX2_PRIVATE != 0, arg4 != 0)
        }
        _ => return Ok(()),
    };
    let mut flags = 0;
    if private {
        flags |= BLOCKED_PRIVATE;
    }
    if timeout {
        flags |= BLOCKED_TIMEOUT;
    }
    let wait = BlockedWait {
        pid,
        syscall: nr as u32,
        uaddr,
        op,
        flags,
        since_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    let new = unsafe { BLOCKED.get(&tid) }.is_none();
    BLOCKED.insert(&tid, &wait, 0)?;
    if new {
        blocked_count_add(1);
    }
    Ok(())
}

/// A task is woken: whatever it was waiting for, it is not blocked any more.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p). Runs on every wakeup on the host: with nothing blocked
    // (BLOCKED_COUNT), return at once. Else a lookup (lock-free) first: deleting takes a
    // bucket lock, and almost no woken task is in the map.
    if blocked_count() == 0 {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    let offsets = FORKWATCH_OFFSETS.load();
    let Ok(tid) = (unsafe { read_at::<i32>(task, offsets.task_pid) }) else {
        return 0;
    };
    unblock(tid as u32);
    0
}

/// TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE (include/linux/sched.h, stable UAPI-like values).
const TASK_SLEEPING: u32 = 0x1 | 0x2;

/// TCP_LISTEN: a listening socket only hands out connections; sharing it is the prefork pattern.
const TCP_LISTEN: u8 = 10;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> u32 {
    let _ = unsafe { on_socket_io(&ctx, DIRECTION_SEND) };
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> u32 {
    let _ = unsafe { on_socket_io(&ctx, DIRECTION_RECV) };
    0
}

/// TP_PROTO(struct sock *sk, int ret, int flags), after data moved through a socket (send,
/// sendmsg, write, ... and their receiving twins).
unsafe fn on_socket_io(ctx: &BtfTracePointContext, direction: u8) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let Some(&family) = (unsafe { FAMILY.get(&pid) }) else {
        return Ok(()); // not in a fork family: the whole cost for almost every process
    };
    let moved: i64 = ctx.arg(1);
    if moved as i32 <= 0 {
        return Ok(()); // nothing moved (error, EOF, EAGAIN)
    }
    let sk: *const u8 = ctx.arg(0);
    let offsets = FORKWATCH_OFFSETS.load();
    // The inode, not the struct sock address: the slab hands a freed sock's address to the next
    // socket (a prefork server's next accepted connection), inode numbers are not reused.
    let inode = unsafe { socket_inode(sk, &offsets)? };
    if inode == 0 {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(first) = note_use(&SOCK_USERS, inode, family, pid, now, direction)? else {
        return Ok(());
    };
    if !first_report(&SOCK_REPORTED, inode, pid)? {
        return Ok(());
    }
    let state: u8 = unsafe { read_at(sk, offsets.skc_state)? };
    if state == TCP_LISTEN || unsafe { is_stdio(sk, &offsets) } {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SharedSocketEvent>(0) else {
        count(&LOST_EVENTS, lost_category::SOCKET);
        return Ok(());
    };
    // Filled in place: the event is too large for the 512-byte BPF stack.
    let e = entry.as_mut_ptr();
    unsafe {
        (*e).kind = EventKind::SharedSocket as u32;
        (*e).pid = pid;
        (*e).other_pid = first.pid;
        (*e).family = family;
        (*e).timestamp_ns = now;
        (*e).other_timestamp_ns = first.first_ns;
        (*e).socket = sk as u64;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        (*e).syscall = current_syscall();
        (*e).other_syscall = first.syscall;
        (*e).state = state;
        (*e).direction = direction;
        (*e).other_direction = first.direction as u8;
        (*e)._pad = 0;
        (*e)._pad2 = 0;
        let sk_family: u16 = read_at(sk, offsets.skc_family).unwrap_or(0);
        (*e).sk_family = sk_family;
        (*e).sk_type = read_at(sk, offsets.sk_type).unwrap_or(0);
        (*e).protocol = read_at(sk, offsets.sk_protocol).unwrap_or(0);
        (*e).local_port = read_at(sk, offsets.skc_num).unwrap_or(0);
        let dport: u16 = read_at(sk, offsets.skc_dport).unwrap_or(0);
        (*e).peer_port = u16::from_be(dport);
        (*e).local_addr = [0; 16];
        (*e).peer_addr = [0; 16];
        (*e).local_path[0] = 0;
        (*e).peer_path[0] = 0;
        match sk_family {
            AF_INET => {
                let local: [u8; 4] = read_at(sk, offsets.skc_rcv_saddr).unwrap_or([0; 4]);
                let peer: [u8; 4] = read_at(sk, offsets.skc_daddr).unwrap_or([0; 4]);
                (*e).local_addr = ipv4_in_16(local);
                (*e).peer_addr = ipv4_in_16(peer);
            }
            AF_INET6 => {
                (*e).local_addr = read_at(sk, offsets.skc_v6_rcv_saddr).unwrap_or([0; 16]);
                (*e).peer_addr = read_at(sk, offsets.skc_v6_daddr).unwrap_or([0; 16]);
            }
            AF_UNIX => {
                unix_path(sk, &offsets, &mut (*e).local_path);
                if let Ok(peer) = read_at::<*const u8>(sk, offsets.unix_peer)
                    && !peer.is_null()
                {
                    unix_path(peer, &offsets, &mut (*e).peer_path);
                }
            }
            _ => {}
        }
        (*e).inode = inode;
    }
    entry.submit(URGENT);
    Ok(())
}

#[inline(always)]
fn ipv4_in_16(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[0] = addr[0];
    out[1] = addr[1];
    out[2] = addr[2];
    out[3] = addr[3];
    out
}

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The syscall the current task is in (orig_ax), from its saved user registers.
#[inline(always)]
fn current_syscall() -> u32 {
    let offsets = FORKWATCH_OFFSETS.load();
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task) } as *const u8;
    if regs.is_null() {
        return u32::MAX;
    }
    unsafe { read_at::<u64>(regs, offsets.regs_syscall_nr) }.map_or(u32::MAX, |nr| nr as u32)
}

/// Whether the socket is one of the current process's fds 0-2: stdio shared with a child (a
/// journald stream, a terminal over ssh) is normal.
#[inline(always)]
unsafe fn is_stdio(sk: *const u8, offsets: &KernelOffsets) -> bool {
    let lookup = || -> Result<bool, i32> {
        let socket: *const u8 = unsafe { read_at(sk, offsets.sk_socket)? };
        let file: *const u8 = unsafe { read_at(socket, offsets.socket_file)? };
        for fd in 0..3u32 {
            if unsafe { current_fd_file(fd, offsets)? } == file {
                return Ok(true);
            }
        }
        Ok(false)
    };
    lookup().unwrap_or(false)
}

/// `SOCK_INODE(sk->sk_socket)->i_ino`: the socket's inode, embedded in `struct socket_alloc`.
#[inline(always)]
unsafe fn socket_inode(sk: *const u8, offsets: &KernelOffsets) -> Result<u64, i32> {
    let socket: *const u8 = unsafe { read_at(sk, offsets.sk_socket)? };
    if socket.is_null() {
        return Ok(0);
    }
    let inode = unsafe { socket.add(offsets.socket_inode as usize) };
    let ino: u64 = unsafe { read_at(inode, offsets.inode_ino)? };
    Ok(ino)
}

/// The bound path of a Unix socket (`unix_sk(sk)->addr->name->sun_path`), NUL-terminated.
#[inline(always)]
unsafe fn unix_path(sk: *const u8, offsets: &KernelOffsets, out: &mut [u8; 108]) {
    let Ok(addr) = (unsafe { read_at::<*const u8>(sk, offsets.unix_addr) }) else {
        return;
    };
    if addr.is_null() {
        return;
    }
    // struct sockaddr_un { sa_family_t sun_family; char sun_path[108]; }
    let path = unsafe { addr.add(offsets.unix_address_name as usize + 2) };
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(path, out) };
}

/// x86_64 syscall numbers of the writes that advance the shared file offset. pwrite64 and
/// pwritev write at an explicit offset and do not move it, so they cannot race on it.
const SYS_WRITE: i64 = 1;
const SYS_WRITEV: i64 = 20;
const O_APPEND: u32 = 0o2000;
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;

/// tp_btf sys_enter: TP_PROTO(struct pt_regs *regs, long id). Attached by the daemon only while
/// a fork family has a child that has not exec'd within the grace window: while attached, every
/// syscall on the host takes the tracing slow path.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_write(ctx: BtfTracePointContext) -> u32 {
    let id: i64 = ctx.arg(1);
    if id != SYS_WRITE && id != SYS_WRITEV {
        return 0;
    }
    let _ = unsafe { on_file_write(&ctx, id as u32) };
    0
}

unsafe fn on_file_write(ctx: &BtfTracePointContext, syscall: u32) -> Result<(), i32> {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(&family) = (unsafe { FAMILY.get(&pid) }) else {
        return Ok(());
    };
    let offsets = FORKWATCH_OFFSETS.load();
    let regs: *const u8 = ctx.arg(0);
    let fd: u64 = unsafe { read_at(regs, offsets.regs_arg1)? };
    if fd < 3 {
        return Ok(()); // stdio: sharing it with children is normal
    }
    let file = unsafe { current_fd_file(fd as u32, &offsets)? };
    if file.is_null() {
        return Ok(());
    }
    let flags: u32 = unsafe { read_at(file, offsets.file_flags)? };
    if flags & O_APPEND != 0 {
        return Ok(()); // appends are atomic with respect to the offset
    }
    let inode: *const u8 = unsafe { read_at(file, offsets.file_inode)? };
    let mode: u16 = unsafe { read_at(inode, offsets.inode_mode)? };
    if mode & S_IFMT != S_IFREG {
        return Ok(()); // pipes, ttys, devices, sockets: no shared offset to corrupt
    }
    let key = file as u64;
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(first) = note_use(&FILE_USERS, key, family, pid, now, DIRECTION_SEND)? else {
        return Ok(());
    };
    if !first_report(&FILE_REPORTED, key, pid)? {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SharedFileEvent>(0) else {
        count(&LOST_EVENTS, lost_category::FILE);
        return Ok(());
    };
    entry.write(SharedFileEvent {
        kind: EventKind::SharedFile as u32,
        pid,
        other_pid: first.pid,
        family,
        timestamp_ns: now,
        other_timestamp_ns: first.first_ns,
        file: key,
        inode: unsafe { read_at(inode, offsets.inode_ino) }.unwrap_or(0),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        fd: fd as u32,
        syscall,
        other_syscall: first.syscall,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(URGENT);
    Ok(())
}

/// `current->files->fdt->fd[fd]`, or null.
#[inline(always)]
unsafe fn current_fd_file(fd: u32, offsets: &KernelOffsets) -> Result<*const u8, i32> {
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let files: *const u8 = unsafe { read_at(task, offsets.task_files)? };
    let fdt: *const u8 = unsafe { read_at(files, offsets.files_fdt)? };
    let max_fds: u32 = unsafe { read_at(fdt, offsets.fdtable_max_fds)? };
    if fd >= max_fds {
        return Ok(core::ptr::null());
    }
    let fds: *const u8 = unsafe { read_at(fdt, offsets.fdtable_fd)? };
    unsafe { read_at(fds, fd * 8) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
