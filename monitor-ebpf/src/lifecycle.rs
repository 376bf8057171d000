//! Process lifecycle: fork, exec and exit, and the thread changes of tracked processes. Keeps
//! `TRACKED` (children of multithreaded forks) and the fork families (`FAMILY`, `CHILDREN`) that
//! the sharing and write probes watch.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::{
    EventKind, ExecEvent, ExitEvent, FORK_FLAG_IN_TREE, FORK_FLAG_STACK, FORK_FLAG_STACK_SKIPPED,
    FORK_SITE_WORDS, FORK_STACK_BURST, FORK_STACK_BURST_NS, FORK_STACK_EVERY_NS,
    FORK_STACK_PAGE_BYTES, FORK_STACK_PAGES, FORK_WAKEUP_EVERY_NS, ForkEvent, ForkStackEvent,
    ThreadEvent, fork_counter, lost_category, map_full,
};

use crate::{
    FORKWATCH_OFFSETS,
    kread::{self, read},
    maps::{
        CHILDREN, EVENTS, FAMILY, FAMILY_SLOTS, FORK_COUNTERS, FORK_SITE_SCRATCH,
        FORK_STACK_BURSTS, FORK_STACKS, FORK_WAKEUPS, LOST_EVENTS, TRACKED, TRACKED_SLOTS, URGENT,
        blocked_count, contains, copied, count, family_of, insert, insert_member, is_tracked,
        join_tree, leave_tree, may_hold, remove_member, unblock, wakeup_flags,
    },
};

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> u32 {
    // Errors only mean a kernel read failed; there is nothing better to do than to drop the event.
    let _ = on_fork(&ctx, false);
    0
}

/// The same, and for a multithreaded parent also the forking thread's user registers and stack
/// (a `ForkStackEvent` before the fork's record). A program of its own because
/// `bpf_task_pt_regs` is Linux 5.15: where the verifier refuses it, the daemon attaches the
/// one above instead and fork stacks are unavailable.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork_stack(ctx: BtfTracePointContext) -> u32 {
    let _ = on_fork(&ctx, true);
    0
}

#[inline(always)]
fn on_fork(ctx: &BtfTracePointContext, capture_stack: bool) -> Result<(), i32> {
    let offsets = FORKWATCH_OFFSETS.load();
    // TP_PROTO(struct task_struct *parent, struct task_struct *child); parent is current.
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);

    let child_pid: i32 = read(child, offsets.task_pid)?;
    let child_tgid: i32 = read(child, offsets.task_tgid)?;
    // The parent is current: its ids are read once for the family, the event and the wakeup.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if child_pid != child_tgid {
        count(&FORK_COUNTERS, fork_counter::THREAD);
        if is_tracked(tgid) {
            send_thread_event(EventKind::ThreadCreated, tgid, child_pid as u32);
        }
        return Ok(());
    }
    // Every new process, before the early returns below: a vfork or posix_spawn child and a
    // single-threaded parent's child are in the tree too, and may fork unsafely later.
    let in_tree = join_tree(tgid, child_pid as u32);
    let parent_mm: u64 = read(parent, offsets.task_mm)?;
    if parent_mm == 0 {
        // A kernel thread spawning a worker (kthreadd, usermodehelper): no user state to inherit.
        return Ok(());
    }
    let child_mm: u64 = read(child, offsets.task_mm)?;
    if child_mm == parent_mm {
        // CLONE_VM without CLONE_THREAD: vfork or posix_spawn. The child runs on the parent's
        // memory until it execs or exits, which is the safe pattern: count it, never send it
        // (FORK_FLAG_SHARES_VM is therefore never set by this program).
        count(&FORK_COUNTERS, fork_counter::SHARED_VM);
        return Ok(());
    }
    join_family(tgid, child_pid as u32);
    let signal: *const u8 = read(parent, offsets.task_signal)?;
    let parent_threads: i32 = read(signal, offsets.signal_nr_threads)?;
    if parent_threads < 2 {
        count(&FORK_COUNTERS, fork_counter::SINGLE_THREADED);
        return Ok(());
    }
    count(&FORK_COUNTERS, fork_counter::MULTI_THREADED);
    let parent_start_ns = kread::process_start_ns(parent, &offsets).unwrap_or(0);
    // Before the fork's record, so that the daemon has the stack when the fork arrives.
    let (mut flags, stack) = if capture_stack {
        let (stack, sent) = send_fork_stack(pid_tgid, parent_start_ns, parent_mm as *const u8);
        let skipped = if sent { 0 } else { FORK_FLAG_STACK_SKIPPED };
        (FORK_FLAG_STACK | skipped, stack)
    } else {
        (0, StackKey::default())
    };
    if in_tree {
        flags |= FORK_FLAG_IN_TREE;
    }

    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        // Not tracked either: exec/exit events for a child the daemon never saw are useless.
        count(&LOST_EVENTS, lost_category::FORK);
        return Ok(());
    };
    let child_start_ns: u64 = read(child, offsets.task_start_boottime).unwrap_or(0);
    let pid = child_pid as u32;
    // Full: the fork is still reported, but the child's futex waits go unseen (counted).
    let _ = insert_member(
        &TRACKED,
        &TRACKED_SLOTS,
        pid,
        &child_start_ns,
        map_full::TRACKED,
    );
    let now_ns = kread::now_ns();
    entry.write(ForkEvent {
        kind: EventKind::Fork as u32,
        parent_tgid: tgid,
        parent_tid: pid_tgid as u32,
        child_pid: pid,
        parent_threads: parent_threads as u32,
        flags,
        timestamp_ns: now_ns,
        child_start_ns,
        parent_start_ns,
        cgroup_id: kread::current_cgroup_id(),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        stack_ip: stack.ip,
        stack_sp: stack.sp,
        stack_site: stack.site,
    });
    entry.submit(fork_wakeup_flags(pid_tgid, parent_start_ns, now_ns));
    Ok(())
}

/// What identifies a forking thread's call site, besides the thread: the fork's registers and
/// a fingerprint of the return addresses above them (all 0 without registers).
#[derive(Clone, Copy, Default)]
struct StackKey {
    ip: u64,
    sp: u64,
    site: u64,
}

/// Sends the forking thread's user registers and the pages of its stack from sp up (a
/// `ForkStackEvent`), unless the same thread's stack at the same call site went out less than
/// FORK_STACK_EVERY_NS ago (in a fork storm from one loop the daemon reuses what it unwound
/// then), or the thread already sent FORK_STACK_BURST copies within FORK_STACK_BURST_NS.
/// Returns the key the fork's record repeats, and false when a copy was due but skipped by that
/// cap.
#[inline(always)]
fn send_fork_stack(pid_tgid: u64, parent_start_ns: u64, mm: *const u8) -> (StackKey, bool) {
    let offsets = FORKWATCH_OFFSETS.load();
    let regs = kread::current_regs();
    if regs.is_null() {
        return (StackKey::default(), true);
    }
    let (Ok(ip), Ok(sp), Ok(bp)) = (
        read::<u64>(regs, offsets.regs_ip),
        read::<u64>(regs, offsets.regs_sp),
        read::<u64>(regs, offsets.regs_bp),
    ) else {
        return (StackKey::default(), true);
    };
    let stack = StackKey {
        ip,
        sp,
        site: site_fingerprint(sp, mm),
    };
    let now_ns = kread::now_ns();
    let key = [pid_tgid, parent_start_ns, sp, ip, stack.site];
    if let Some(last) = copied(&FORK_STACKS, &key)
        && now_ns.saturating_sub(last) < FORK_STACK_EVERY_NS
    {
        return (stack, true);
    }
    let thread = [pid_tgid, parent_start_ns];
    let mut burst = copied(&FORK_STACK_BURSTS, &thread).unwrap_or([0, 0]);
    if now_ns.saturating_sub(burst[0]) >= FORK_STACK_BURST_NS {
        burst = [now_ns, 0];
    }
    if burst[1] >= FORK_STACK_BURST {
        return (stack, false);
    }
    // Noted as sent before the reservation: a full ring buffer is not tried again for this
    // key within FORK_STACK_EVERY_NS (every fork of a storm would try, and count a loss).
    let _ = FORK_STACKS.insert(&key, &now_ns, 0);
    let _ = FORK_STACK_BURSTS.insert(&thread, &[burst[0], burst[1] + 1], 0);
    let Some(mut entry) = EVENTS.reserve::<ForkStackEvent>(0) else {
        count(&LOST_EVENTS, lost_category::FORK_STACK);
        return (stack, true);
    };
    let event = entry.as_mut_ptr();
    let base = sp & !(FORK_STACK_PAGE_BYTES as u64 - 1);
    let mut pages = 0u32;
    // SAFETY: `event` is the reservation, valid and exclusively ours until submitted, and sized
    // for a ForkStackEvent: the header fields are written through it in place (the record is
    // far larger than the program's stack), and each page copy writes one of its
    // FORK_STACK_PAGES pages, at a constant offset inside `stack`.
    unsafe {
        let copy = core::ptr::addr_of_mut!((*event).stack).cast::<u8>();
        for page in 0..FORK_STACK_PAGES {
            let offset = page * FORK_STACK_PAGE_BYTES;
            // The stack's mapping ends somewhere above sp: the first page that cannot be read
            // ends the copy.
            let to = copy.add(offset);
            if kread::read_user_bytes(to, FORK_STACK_PAGE_BYTES as u32, base + offset as u64)
                .is_err()
            {
                break;
            }
            pages += 1;
        }
        core::ptr::addr_of_mut!((*event).kind).write(EventKind::ForkStack as u32);
        core::ptr::addr_of_mut!((*event).tgid).write((pid_tgid >> 32) as u32);
        core::ptr::addr_of_mut!((*event).tid).write(pid_tgid as u32);
        core::ptr::addr_of_mut!((*event).pages).write(pages);
        core::ptr::addr_of_mut!((*event).parent_start_ns).write(parent_start_ns);
        core::ptr::addr_of_mut!((*event).timestamp_ns).write(now_ns);
        core::ptr::addr_of_mut!((*event).ip).write(ip);
        core::ptr::addr_of_mut!((*event).sp).write(sp);
        core::ptr::addr_of_mut!((*event).bp).write(bp);
        core::ptr::addr_of_mut!((*event).base).write(base);
        core::ptr::addr_of_mut!((*event).site).write(stack.site);
    }
    // No wakeup of its own: the fork's record, submitted next, decides that.
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    (stack, true)
}

/// A fingerprint of the call site: a hash of the FORK_SITE_WORDS words above sp that point into
/// the executable's code (`mm->start_code..end_code`). The C library's fork runs at the same sp
/// and ip whoever called it; the return address into its caller tells two callers apart, and
/// locals (counters, pids) rarely look like code addresses, so a loop's forks share one. 0
/// when the words cannot be read (a stack that ends within 1 KiB of sp).
#[inline(always)]
fn site_fingerprint(sp: u64, mm: *const u8) -> u64 {
    let offsets = FORKWATCH_OFFSETS.load();
    let (Ok(start), Ok(end)) = (
        read::<u64>(mm, offsets.mm_start_code),
        read::<u64>(mm, offsets.mm_end_code),
    ) else {
        return 0;
    };
    if end <= start {
        return 0;
    }
    // One unsigned compare per word: `word - start` wraps above the span for a word below it.
    let span = end - start;
    let Some(words) = FORK_SITE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let len = (FORK_SITE_WORDS * 8) as u32;
    // SAFETY: `words` is this CPU's scratch value, FORK_SITE_WORDS u64s, valid while the program
    // runs and used by no other program on this CPU meanwhile (tp_btf programs do not nest).
    if unsafe { kread::read_user_bytes(words.cast(), len, sp) }.is_err() {
        return 0;
    }
    let mut hash = 0u64;
    for i in 0..FORK_SITE_WORDS {
        // SAFETY: i < FORK_SITE_WORDS, inside the scratch value read above.
        let word = unsafe { (*words)[i] };
        if word.wrapping_sub(start) < span {
            hash = (hash.rotate_left(7) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    hash
}

/// Submit flags of a fork event: urgent for the first fork of a thread in each
/// FORK_WAKEUP_EVERY_NS, routine for the rest. The daemon reads the parent's fork context from
/// /proc at the first (promptly, while it lives) and reuses it for the next forks of the same
/// thread for longer than this (FORK_CONTEXT_REUSE_NS), so a fork storm wakes it a few times a
/// second, not once per fork.
#[inline(always)]
fn fork_wakeup_flags(pid_tgid: u64, parent_start_ns: u64, now_ns: u64) -> u64 {
    // With the process's start time: a pid reused by a new process is a new forking thread.
    let key = [pid_tgid, parent_start_ns];
    if let Some(last) = copied(&FORK_WAKEUPS, &key)
        && now_ns.saturating_sub(last) < FORK_WAKEUP_EVERY_NS
    {
        return wakeup_flags();
    }
    let _ = FORK_WAKEUPS.insert(&key, &now_ns, 0);
    URGENT
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> u32 {
    // Runs in the exec'ing task after de_thread(): its pid is the thread-group id.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A new program shares nothing it does not inherit on purpose: it leaves its family.
    leave_family(pid);
    // Once exec'd the process no longer carries the parent's state: stop tracking it. The
    // delete says whether it was tracked (no lookup first); the filter slot spares it to
    // nearly every exec on the host.
    if !may_hold(&TRACKED_SLOTS, pid) || !remove_member(&TRACKED, &TRACKED_SLOTS, pid) {
        return 0;
    }
    match EVENTS.reserve::<ExecEvent>(0) {
        Some(mut entry) => {
            entry.write(ExecEvent {
                kind: EventKind::Exec as u32,
                pid,
                timestamp_ns: kread::now_ns(),
                comm: bpf_get_current_comm().unwrap_or([0; 16]),
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::EXEC),
    }
    0
}

/// Exit on kernels whose tracepoint passes group-dead (TP_PROTO(struct task_struct *p, bool
/// group_dead)): only the last thread ends the process.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    let group_dead: u64 = ctx.arg(1);
    on_exit(task, group_dead & 0xff != 0);
    0
}

/// Exit on kernels whose tracepoint passes the task alone (TP_PROTO(struct task_struct *p):
/// before group_dead was added, e.g. 6.1 and 6.12). do_exit() decrements signal->live before
/// the tracepoint, so 0 means the last thread is leaving. Two threads exiting at once can both
/// read 0: the daemon takes a second exit of a process it no longer tracks as unmatched.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit_live(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    let offsets = FORKWATCH_OFFSETS.load();
    let group_dead = read::<*const u8>(task, offsets.task_signal)
        .and_then(|signal| read::<i32>(signal, offsets.signal_live))
        .is_ok_and(|live| live == 0);
    on_exit(task, group_dead);
    0
}

#[inline(always)]
fn on_exit(task: *const u8, group_dead: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if group_dead {
        leave_family(pid);
        leave_tree(pid);
    }
    // A thread that is exiting is not blocked in a futex any more (normally the wakeup already
    // removed it; a fatal signal may not have gone through one, and an exec that killed the
    // other threads untracked the process first: so before the TRACKED check).
    if blocked_count() != 0 {
        unblock(tid);
    }
    if !is_tracked(pid) {
        return;
    }
    if !group_dead {
        send_thread_event(EventKind::ThreadExited, pid, tid);
        return;
    }
    let _ = remove_member(&TRACKED, &TRACKED_SLOTS, pid);
    let offsets = FORKWATCH_OFFSETS.load();
    let exit_code: i32 = read(task, offsets.task_exit_code).unwrap_or(0);
    match EVENTS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            entry.write(ExitEvent {
                kind: EventKind::Exit as u32,
                pid,
                timestamp_ns: kread::now_ns(),
                exit_code: exit_code as u32,
                _pad: 0,
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::EXIT),
    }
}

/// Makes `child` (and its parent, if it is not yet) a member of the parent's fork family.
#[inline(always)]
fn join_family(parent: u32, child: u32) {
    let family = match family_of(parent) {
        Some(family) => family,
        None => {
            let _ = insert_member(&FAMILY, &FAMILY_SLOTS, parent, &parent, map_full::FAMILY);
            parent
        }
    };
    // Full: this member's sharing goes unseen; the refusal is counted for the metrics.
    let _ = insert_member(&FAMILY, &FAMILY_SLOTS, child, &family, map_full::FAMILY);
    let _ = insert(&CHILDREN, &child, &kread::now_ns(), map_full::CHILDREN);
}

/// Takes `pid` out of its fork family. Most processes are in none: the filter slot says so
/// without hashing. A member is deleted without a lookup first (the delete says whether it was
/// one), and so is its `CHILDREN` entry, which a child has when it is a member; a process the
/// family map refused (full) may still be a child, and is looked up there (a lookup takes no
/// bucket lock, a delete of a missing key does).
#[inline(always)]
fn leave_family(pid: u32) {
    let member = may_hold(&FAMILY_SLOTS, pid) && remove_member(&FAMILY, &FAMILY_SLOTS, pid);
    if member || contains(&CHILDREN, &pid) {
        let _ = CHILDREN.remove(&pid);
    }
}

fn send_thread_event(kind: EventKind, pid: u32, tid: u32) {
    match EVENTS.reserve::<ThreadEvent>(0) {
        Some(mut entry) => {
            entry.write(ThreadEvent {
                kind: kind as u32,
                pid,
                tid,
                _pad: 0,
                timestamp_ns: kread::now_ns(),
            });
            entry.submit(wakeup_flags());
        }
        None => count(&LOST_EVENTS, lost_category::THREAD),
    }
}
