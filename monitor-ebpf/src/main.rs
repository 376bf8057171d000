//! forkwatch's kernel programs: tp_btf on the scheduler's process lifecycle tracepoints.
//!
//! The hot path is every fork, exec and exit on the host, so each program decides as early as it
//! can whether the event matters: thread creations, vfork/posix_spawn children and forks of
//! single-threaded processes only bump a per-CPU counter; exec and exit cost one hash lookup for
//! every process that is not tracked. Only forks of multithreaded processes reach userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use monitor_common::{
    BLOCKED_MAX_ENTRIES, BLOCKED_PRIVATE, BLOCKED_TIMEOUT, BlockedWait, EventKind, ExecEvent,
    ExitEvent, ForkEvent, KernelOffsets, RING_BUFFER_BYTES, TRACKED_MAX_ENTRIES, ThreadEvent,
    fork_counter, futex, lost_category, syscall,
};

/// Member offsets of the running kernel, written by the loader from BTF.
#[unsafe(no_mangle)]
static FORKWATCH_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_mm: 0,
    task_signal: 0,
    task_start_boottime: 0,
    task_exit_code: 0,
    signal_nr_threads: 0,
    regs_syscall_nr: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    regs_arg4: 0,
    regs_arg5: 0,
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
    let pid = child_pid as u32;
    if TRACKED.insert(&pid, &child_start_ns, 0).is_err() {
        count(&FORK_COUNTERS, fork_counter::TRACK_FULL);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(ForkEvent {
        kind: EventKind::Fork as u32,
        parent_tgid: (pid_tgid >> 32) as u32,
        parent_tid: pid_tgid as u32,
        child_pid: pid,
        parent_threads: parent_threads as u32,
        flags: 0,
        timestamp_ns: unsafe { bpf_ktime_get_boot_ns() },
        child_start_ns,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
    Ok(())
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    // Runs in the exec'ing task after de_thread(): its pid is the thread-group id.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
            entry.submit(0);
        }
        None => count(&LOST_EVENTS, lost_category::EXEC),
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if unsafe { TRACKED.get(&pid) }.is_none() {
        return 0;
    }
    // A thread that is exiting is not blocked in a futex any more (normally the wakeup already
    // removed it; a fatal signal may not have gone through one).
    if unsafe { BLOCKED.get(&tid) }.is_some() {
        let _ = BLOCKED.remove(&tid);
    }
    // TP_PROTO(struct task_struct *p, bool group_dead): only the last thread ends the process.
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
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
            entry.submit(0);
        }
        None => count(&LOST_EVENTS, lost_category::EXIT),
    }
    0
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
            entry.submit(0);
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
    if preempt & 0xff != 0 || prev_state as u32 == 0 {
        return 0; // preempted or still runnable: not waiting for anything
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
    BLOCKED.insert(&tid, &wait, 0)
}

/// A task is woken: whatever it was waiting for, it is not blocked any more.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p). A lookup (lock-free) first: deleting takes a bucket lock,
    // and almost no woken task is in the map.
    let task: *const u8 = ctx.arg(0);
    let offsets = FORKWATCH_OFFSETS.load();
    let Ok(tid) = (unsafe { read_at::<i32>(task, offsets.task_pid) }) else {
        return 0;
    };
    let tid = tid as u32;
    if unsafe { BLOCKED.get(&tid) }.is_some() {
        let _ = BLOCKED.remove(&tid);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
