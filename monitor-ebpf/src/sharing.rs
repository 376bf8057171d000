//! Socket sharing inside a fork family: on every send and receive of a family member, note who
//! uses the socket (`SOCK_USERS`) and report, once per (socket, process), a second member that
//! uses it after another did since the fork. Also the use-tracking shared with the write probe
//! (`note_use`, `first_report`).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{btf_tracepoint, fentry},
    maps::LruHashMap,
    programs::{BtfTracePointContext, FEntryContext},
};
use monitor_common::{
    DIRECTION_RECV, DIRECTION_SEND, EventKind, KernelOffsets, SharedSocketEvent, SockPid, SockUser,
    UNIX_PATH_LEN,
    linux::{AF_INET, AF_INET6, AF_UNIX, TCP_LISTEN},
    lost_category,
};

use crate::{
    FORKWATCH_OFFSETS,
    kread::{self, read},
    maps::{
        EVENTS, Holder, LOST_EVENTS, SOCK_REPORTED, SOCK_USERS, URGENT, contains, count, family_of,
        holder, in_tree,
    },
};

// Where the kernel has them (6.3 and later), the sock: length tracepoints: after data moved
// through a socket (send, sendmsg, write, ... and their receiving twins), with how much.
// TP_PROTO(struct sock *sk, int ret, int flags).

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> u32 {
    let _ = on_socket_io(ctx.arg(0), ctx.arg::<i64>(1) as i32, DIRECTION_SEND);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> u32 {
    let _ = on_socket_io(ctx.arg(0), ctx.arg::<i64>(1) as i32, DIRECTION_RECV);
    0
}

// Elsewhere, fentry on the LSM hooks every socket send and receive goes through, before the
// data moves: security_socket_sendmsg(struct socket *sock, struct msghdr *msg, int size) and
// security_socket_recvmsg(sock, msg, int size, int flags). Not sock_sendmsg: the compiler
// inlines it into the send syscalls (on 6.1 fentry there saw no send(2) at all), while the
// hooks live in another file and are always called. `size` is what the caller asked to move.

#[fentry(function = "security_socket_sendmsg")]
pub fn socket_sendmsg_entry(ctx: FEntryContext) -> u32 {
    let _ = on_socket_call(&ctx, DIRECTION_SEND);
    0
}

#[fentry(function = "security_socket_recvmsg")]
pub fn socket_recvmsg_entry(ctx: FEntryContext) -> u32 {
    let _ = on_socket_call(&ctx, DIRECTION_RECV);
    0
}

#[inline(always)]
fn on_socket_call(ctx: &FEntryContext, direction: u8) -> Result<(), i32> {
    // The family check first, as in on_socket_io: nearly every caller is not in one, and
    // finding the sock costs a read.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(family) = family_of(pid) else {
        return Ok(());
    };
    let size: i64 = ctx.arg(2);
    if size <= 0 {
        return Ok(());
    }
    let sock: *const u8 = ctx.arg(0);
    let sk: *const u8 = read(sock, FORKWATCH_OFFSETS.load().socket_sk)?;
    on_member_io(sk, pid, family, direction)
}

/// Socket I/O of any task: `moved` bytes through socket `sk`. Only a fork family member's
/// matters; for anyone else (nearly every call) the cost is the pid and its filter slot.
#[inline(always)]
fn on_socket_io(sk: *const u8, moved: i32, direction: u8) -> Result<(), i32> {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(family) = family_of(pid) else {
        return Ok(());
    };
    if moved <= 0 {
        return Ok(()); // nothing moved (error, EOF, EAGAIN)
    }
    on_member_io(sk, pid, family, direction)
}

/// Member `pid` of `family` moved (or asked to move) data through socket `sk`.
#[inline(always)]
fn on_member_io(sk: *const u8, pid: u32, family: u32, direction: u8) -> Result<(), i32> {
    let offsets = FORKWATCH_OFFSETS.load();
    // The inode, not the struct sock address: the slab hands a freed sock's address to the next
    // socket (a prefork server's next accepted connection), inode numbers are not reused.
    let inode = kread::socket_inode(sk, &offsets)?;
    if inode == 0 {
        return Ok(());
    }
    let now = kread::now_ns();
    let Some(first) = note_use(&SOCK_USERS, inode, family, pid, now, direction)? else {
        return Ok(());
    };
    if !first_report(&SOCK_REPORTED, inode, pid)? {
        return Ok(());
    }
    let state: u8 = read(sk, offsets.skc_state)?;
    if state == TCP_LISTEN || is_stdio(sk, &offsets) {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SharedSocketEvent>(0) else {
        count(&LOST_EVENTS, lost_category::SOCKET);
        return Ok(());
    };
    // Filled in place: the event is too large for the 512-byte BPF stack.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to the reserved record, which is ours alone until the submit below,
    // valid for writes of a whole SharedSocketEvent and aligned (the ring buffer aligns records
    // to 8 bytes). Fields are assigned as places, which writes without reading or dropping the
    // uninitialized bytes (every field is a plain integer or byte array); the path arrays
    // are zeroed before a reference to them is made. Every field is written before the submit.
    unsafe {
        (*e).kind = EventKind::SharedSocket as u32;
        (*e).pid = pid;
        (*e).other_pid = first.pid;
        (*e).family = family;
        (*e).timestamp_ns = now;
        (*e).other_timestamp_ns = first.first_ns;
        (*e).socket = sk as u64;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*e).cgroup_id = kread::current_cgroup_id();
        (*e).syscall = kread::current_syscall(&offsets);
        (*e).other_syscall = first.syscall;
        (*e).state = state;
        (*e).direction = direction;
        (*e).other_direction = first.direction as u8;
        (*e).in_tree = in_tree(pid) as u8;
        (*e)._pad2 = 0;
        let sk_family: u16 = read(sk, offsets.skc_family).unwrap_or(0);
        (*e).sk_family = sk_family;
        (*e).sk_type = read(sk, offsets.sk_type).unwrap_or(0);
        (*e).protocol = read(sk, offsets.sk_protocol).unwrap_or(0);
        (*e).local_port = read(sk, offsets.skc_num).unwrap_or(0);
        let dport: u16 = read(sk, offsets.skc_dport).unwrap_or(0);
        (*e).peer_port = u16::from_be(dport);
        (*e).local_addr = [0; 16];
        (*e).peer_addr = [0; 16];
        // Whole arrays: the decoder reads an abstract name past the leading NUL.
        (*e).local_path = [0; UNIX_PATH_LEN];
        (*e).peer_path = [0; UNIX_PATH_LEN];
        match sk_family {
            AF_INET => {
                let local: [u8; 4] = read(sk, offsets.skc_rcv_saddr).unwrap_or([0; 4]);
                let peer: [u8; 4] = read(sk, offsets.skc_daddr).unwrap_or([0; 4]);
                (*e).local_addr = ipv4_in_16(local);
                (*e).peer_addr = ipv4_in_16(peer);
            }
            AF_INET6 => {
                (*e).local_addr = read(sk, offsets.skc_v6_rcv_saddr).unwrap_or([0; 16]);
                (*e).peer_addr = read(sk, offsets.skc_v6_daddr).unwrap_or([0; 16]);
            }
            AF_UNIX => {
                kread::unix_path(sk, &offsets, &mut (*e).local_path);
                if let Ok(peer) = read::<*const u8>(sk, offsets.unix_peer)
                    && !peer.is_null()
                {
                    kread::unix_path(peer, &offsets, &mut (*e).peer_path);
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

/// Whether the socket is one of the current process's fds 0-2: stdio shared with a child (a
/// journald stream, a terminal over ssh) is normal.
#[inline(always)]
fn is_stdio(sk: *const u8, offsets: &KernelOffsets) -> bool {
    let lookup = || -> Result<bool, i32> {
        let socket: *const u8 = read(sk, offsets.sk_socket)?;
        let file: *const u8 = read(socket, offsets.socket_file)?;
        for fd in 0..3u32 {
            if kread::current_fd_file(fd, offsets)? == file {
                return Ok(true);
            }
        }
        Ok(false)
    };
    lookup().unwrap_or(false)
}

/// Notes that `pid` (of `family`) used a shared resource (a socket or an open file), keyed in
/// `users`. Returns the other member's record when this use makes the resource shared: another
/// member used it after this process was born (a use before that was a handover, not sharing).
#[inline(always)]
pub fn note_use(
    users: &LruHashMap<u64, SockUser>,
    key: u64,
    family: u32,
    pid: u32,
    now: u64,
    direction: u8,
) -> Result<Option<SockUser>, i32> {
    let other = match holder(users, key, family, pid, now) {
        Holder::Me => return Ok(None),
        Holder::Other(other) => other,
        // First use since joining the family (or an entry of another family).
        Holder::Nobody => return claim(users, key, family, pid, now, direction).map(|()| None),
    };
    let offsets = FORKWATCH_OFFSETS.load();
    let born = kread::process_start_ns(kread::current_task(), &offsets)?;
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
        syscall: kread::current_syscall(&FORKWATCH_OFFSETS.load()),
        direction: direction as u32,
    };
    users.insert(&key, &user, 0)
}

/// Whether (resource, pid) was reported already; marks it reported.
#[inline(always)]
pub fn first_report(reported: &LruHashMap<SockPid, u8>, key: u64, pid: u32) -> Result<bool, i32> {
    let seen = SockPid {
        socket: key,
        pid,
        _pad: 0,
    };
    if contains(reported, &seen) {
        return Ok(false);
    }
    reported.insert(&seen, &1, 0)?;
    Ok(true)
}
