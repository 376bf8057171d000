//! Empty programs on the hooks that every task on the host pays forkwatch's programs for: the
//! floor `cargo xtask bench` measures those programs against (xtask/src/bench/hooks.rs). What an
//! empty program costs per call on the same hook, measured the same way (the kernel's BPF
//! run-time statistics), is what the kernel charges for running any program there; the rest of
//! forkwatch's cost is its own. Only the bench loads this object: the daemon's object
//! (`forkwatch`, main.rs) and its program names stay as they are.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext},
};

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_sched_switch(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn floor_sched_wakeup(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn floor_sock_send_length(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn floor_sock_recv_length(_ctx: BtfTracePointContext) -> u32 {
    0
}

#[fentry(function = "security_socket_sendmsg")]
pub fn floor_socket_sendmsg(_ctx: FEntryContext) -> u32 {
    0
}

#[fentry(function = "security_socket_recvmsg")]
pub fn floor_socket_recvmsg(_ctx: FEntryContext) -> u32 {
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
