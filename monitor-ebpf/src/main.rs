//! forkwatch's kernel programs (tp_btf), and what they send to the daemon.
//!
//! - [`lifecycle`]: `sched_process_fork`, `_exec`, `_exit`. The hot path is every fork, exec and
//!   exit on the host, so each program decides as early as it can whether the event matters:
//!   thread creations, vfork/posix_spawn children and forks of single-threaded processes only
//!   bump a per-CPU counter; exec and exit cost one hash lookup for every process that is not
//!   tracked. Forks of multithreaded processes are sent, and the children they create are
//!   tracked: their exec, exit and thread creations and exits are sent too.
//! - [`futex`]: `sched_switch` (or `sched_switch_task_state`), `sched_wakeup`: futex waits of
//!   tracked processes' threads, kept in a map the daemon scans (never sent).
//! - [`sharing`]: `sock_send_length`, `sock_recv_length`: a socket used by two members of a fork
//!   family is sent, once per (socket, process).
//! - [`write`]: `sys_enter` (on demand): a regular file's offset written through by two members
//!   of a fork family is sent, once per (file, process).
//!
//! Everything is sent through the `EVENTS` ring buffer ([`maps`]) as the records of
//! `monitor_common::wire`; [`kread`] holds every raw read of kernel and user memory.
#![no_std]
#![no_main]
// The BPF target has no atomic types in core; the intrinsic is the atomic add (BPF_ATOMIC).
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Every unsafe block says why it is sound; most code reaches the kernel through the safe helpers
// of `kread` and `maps`.
#![deny(clippy::undocumented_unsafe_blocks)]

mod futex;
mod kread;
mod lifecycle;
mod maps;
mod sharing;
mod write;

use aya_ebpf::Global;
use monitor_common::KernelOffsets;

/// Ring-buffer fill (bytes) from which a routine record (exec, exit, thread) wakes the daemon.
/// Below it they are submitted without a wakeup and the daemon collects them on its drain tick:
/// under a fork+exec storm a wakeup per record costs more (a cross-CPU IPI and two context
/// switches) than the rest of the work. Written by the loader; 0 (the fallback) always wakes.
#[unsafe(no_mangle)]
static FORKWATCH_WAKEUP_BYTES: Global<u64> = Global::new(0);

/// The host tgid whose descendants make the watched tree (`forkwatch exec`), 0 for none.
/// Written by the loader; read-only, so the verifier drops the tree's code from every program
/// when it is 0 and the daemon pays nothing for it.
#[unsafe(no_mangle)]
static FORKWATCH_TREE_ROOT: Global<u32> = Global::new(0);

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
    signal_live: 0,
    task_state: 0,
    regs_syscall_nr: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    regs_arg4: 0,
    regs_arg5: 0,
    regs_ip: 0,
    regs_sp: 0,
    regs_bp: 0,
    mm_start_code: 0,
    mm_end_code: 0,
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
    socket_sk: 0,
    socket_file: 0,
    socket_inode: 0,
    inode_ino: 0,
    unix_peer: 0,
    unix_addr: 0,
    unix_address_len: 0,
    unix_address_name: 0,
    file_flags: 0,
    file_inode: 0,
    inode_mode: 0,
});

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
