//! Blocked-wait tracking: `sched_switch` records a tracked process's thread that goes to sleep in
//! a futex wait in `BLOCKED`, `sched_wakeup` (and exit) removes it. Nothing is sent: the daemon
//! scans the map for waits that last. The daemon attaches both only while something is tracked,
//! because they run on every context switch and wakeup on the host.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use monitor_common::{
    BLOCKED_PRIVATE, BLOCKED_TIMEOUT, BlockedWait, futex,
    linux::{TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE},
    syscall,
};

use crate::{
    FORKWATCH_OFFSETS,
    kread::{self, read, read_user},
    maps::{block, blocked_count, is_tracked, unblock},
};

/// A task going to sleep (`prev_state`), as opposed to one preempted, still runnable, or dying.
const TASK_SLEEPING: u32 = TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE;

/// A task is switched out. If it is going to sleep (not preempted) and belongs to a tracked
/// process, and its saved user registers say it is in a futex wait, remember the wait.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state); prev is current.
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    on_switch(preempt & 0xff != 0, prev_state as u32);
    0
}

/// The same on kernels whose tracepoint has no `prev_state` (before 5.18):
/// TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next). The task's own
/// state is read instead, as those kernels' own sched_switch event does. A wakeup racing with
/// the switch can already have set it to running: that wait then ended at once, and is missed
/// rather than recorded.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_task_state(ctx: BtfTracePointContext) -> u32 {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let offsets = FORKWATCH_OFFSETS.load();
    // Before 5.14 `state` is a long: its low half (little-endian) holds the same bits.
    let Ok(state) = read::<u32>(prev, offsets.task_state) else {
        return 0;
    };
    on_switch(preempt & 0xff != 0, state);
    0
}

#[inline(always)]
fn on_switch(preempt: bool, prev_state: u32) {
    // Only a sleep (TASK_INTERRUPTIBLE, or TASK_UNINTERRUPTIBLE as in killable waits): not a
    // preemption, not still runnable, and not a dying thread's last switch (TASK_DEAD), whose
    // saved registers still show the futex wait it was killed in but whose exit hook has run,
    // so its entry would never be removed.
    if preempt || prev_state & TASK_SLEEPING == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if !is_tracked(pid) {
        return;
    }
    let _ = record_futex_wait(pid, pid_tgid as u32);
}

fn record_futex_wait(pid: u32, tid: u32) -> Result<(), i32> {
    let offsets = FORKWATCH_OFFSETS.load();
    let regs = kread::current_regs();
    if regs.is_null() {
        return Ok(());
    }
    let nr: u64 = read(regs, offsets.regs_syscall_nr)?;
    let arg1: u64 = read(regs, offsets.regs_arg1)?;
    let arg2: u64 = read(regs, offsets.regs_arg2)?;
    let arg4: u64 = read(regs, offsets.regs_arg4)?;
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
            let timeout: u64 = read(regs, offsets.regs_arg5)?;
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
            let uaddr: u64 = read_user(arg1 + 8)?;
            let flags: u32 = read_user(arg1 + 16)?;
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
        since_ns: kread::now_ns(),
    };
    block(tid, &wait)
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
    let Ok(tid) = read::<i32>(task, offsets.task_pid) else {
        return 0;
    };
    unblock(tid as u32);
    0
}
