//! Shared file offsets inside a fork family: `sys_enter` filtered to write(2) and writev(2),
//! which advance the offset of the open file description they write through. Reports, once per
//! (file, process), a second member writing through a regular file another member wrote through
//! since the fork. The daemon attaches it only on demand (see the program's doc).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::{
    DIRECTION_SEND, EventKind, FIRST_WATCHED_FD, SharedFileEvent,
    linux::{O_APPEND, S_IFMT, S_IFREG},
    lost_category, syscall,
};

use crate::{
    FORKWATCH_OFFSETS,
    kread::{self, read},
    maps::{
        EVENTS, FAMILY, FILE_REPORTED, FILE_USERS, LOST_EVENTS, URGENT, copied, count, in_tree,
    },
    sharing::{first_report, note_use},
};

/// tp_btf sys_enter: TP_PROTO(struct pt_regs *regs, long id). Attached by the daemon only while
/// two members of a fork family hold one open file description of a regular file opened for
/// writing without O_APPEND (the daemon's pipeline/write_candidate.rs): while attached, every
/// syscall on the host takes the tracing slow path.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter_write(ctx: BtfTracePointContext) -> u32 {
    let id: i64 = ctx.arg(1);
    // Only these advance the shared file offset: pwrite64 and pwritev write at an explicit
    // offset and do not move it, so they cannot race on it.
    if id != syscall::WRITE as i64 && id != syscall::WRITEV as i64 {
        return 0;
    }
    let _ = on_file_write(&ctx, id as u32);
    0
}

fn on_file_write(ctx: &BtfTracePointContext, syscall: u32) -> Result<(), i32> {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(family) = copied(&FAMILY, &pid) else {
        return Ok(());
    };
    let offsets = FORKWATCH_OFFSETS.load();
    let regs: *const u8 = ctx.arg(0);
    let fd: u64 = read(regs, offsets.regs_arg1)?;
    if fd < u64::from(FIRST_WATCHED_FD) {
        return Ok(()); // stdio: sharing it with children is normal
    }
    let file = kread::current_fd_file(fd as u32, &offsets)?;
    if file.is_null() {
        return Ok(());
    }
    let flags: u32 = read(file, offsets.file_flags)?;
    if flags & O_APPEND != 0 {
        return Ok(()); // appends are atomic with respect to the offset
    }
    let inode: *const u8 = read(file, offsets.file_inode)?;
    let mode: u16 = read(inode, offsets.inode_mode)?;
    if mode & S_IFMT != S_IFREG {
        return Ok(()); // pipes, ttys, devices, sockets: no shared offset to corrupt
    }
    let key = file as u64;
    let now = kread::now_ns();
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
        inode: read(inode, offsets.inode_ino).unwrap_or(0),
        cgroup_id: kread::current_cgroup_id(),
        fd: fd as u32,
        syscall,
        other_syscall: first.syscall,
        in_tree: in_tree(pid) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(URGENT);
    Ok(())
}
