//! Linux ABI values that both sides use: the kernel programs compare kernel fields and syscall
//! registers against them, the daemon classifies and names what they report. Each is copied
//! once, here, from the kernel header named in its doc.

/// Address families (`sock_common.skc_family`; include/linux/socket.h).
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Socket types (`sock.sk_type`; include/linux/net.h).
pub const SOCK_STREAM: u16 = 1;
pub const SOCK_DGRAM: u16 = 2;
pub const SOCK_SEQPACKET: u16 = 5;

/// `sock_common.skc_state` of a connected socket (include/net/tcp_states.h); connected datagram
/// and Unix sockets use the TCP state names too.
pub const TCP_ESTABLISHED: u8 = 1;
/// `skc_state` of a listening socket: it only hands out connections, so sharing it is the
/// prefork pattern, not a hazard.
pub const TCP_LISTEN: u8 = 10;

/// `file.f_flags` bit: every write goes to the end (include/uapi/asm-generic/fcntl.h).
pub const O_APPEND: u32 = 0o2000;
/// `file.f_flags` access mode (the low two bits) and the two modes that may write
/// (include/uapi/asm-generic/fcntl.h).
pub const O_ACCMODE: u32 = 0o3;
pub const O_WRONLY: u32 = 0o1;
pub const O_RDWR: u32 = 0o2;
/// `inode.i_mode` file-type mask and the regular-file type (include/uapi/linux/stat.h).
pub const S_IFMT: u16 = 0o170000;
pub const S_IFREG: u16 = 0o100000;

/// Task state bits (`sched_switch`'s `prev_state`; include/linux/sched.h): the two sleeps.
pub const TASK_INTERRUPTIBLE: u32 = 0x1;
pub const TASK_UNINTERRUPTIBLE: u32 = 0x2;

/// x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) that the programs recognize or
/// the daemon names: the futex waits, and the calls that move data through a socket or a file.
pub mod syscall {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const PWRITE64: u32 = 18;
    pub const READV: u32 = 19;
    pub const WRITEV: u32 = 20;
    pub const SENDFILE: u32 = 40;
    pub const SENDTO: u32 = 44;
    pub const RECVFROM: u32 = 45;
    pub const SENDMSG: u32 = 46;
    pub const RECVMSG: u32 = 47;
    pub const FUTEX: u32 = 202;
    pub const SPLICE: u32 = 275;
    pub const PREADV: u32 = 295;
    pub const PWRITEV: u32 = 296;
    pub const RECVMMSG: u32 = 299;
    pub const SENDMMSG: u32 = 307;
    pub const PREADV2: u32 = 327;
    pub const PWRITEV2: u32 = 328;
    pub const FUTEX_WAITV: u32 = 449;
    pub const FUTEX_WAIT: u32 = 455;
}

/// `futex(2)` operations and flags (include/uapi/linux/futex.h).
pub mod futex {
    pub const WAIT: u32 = 0;
    pub const LOCK_PI: u32 = 6;
    pub const WAIT_BITSET: u32 = 9;
    pub const WAIT_REQUEUE_PI: u32 = 11;
    pub const LOCK_PI2: u32 = 13;
    pub const PRIVATE_FLAG: u32 = 128;
    pub const CLOCK_REALTIME: u32 = 256;
    /// `op & CMD_MASK` is the command.
    pub const CMD_MASK: u32 = !(PRIVATE_FLAG | CLOCK_REALTIME);
    /// futex2 (`futex_wait`, `futex_waitv`) flag for a process-private futex.
    pub const FUTEX2_PRIVATE: u32 = 128;

    /// Whether a `futex(2)` op blocks waiting for a futex word to change or a lock to be free.
    pub const fn is_wait(op: u32) -> bool {
        matches!(
            op & CMD_MASK,
            WAIT | WAIT_BITSET | LOCK_PI | LOCK_PI2 | WAIT_REQUEUE_PI
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futex_waits_are_recognized_with_any_flags() {
        for op in [0, 9, 6, 13, 11] {
            assert!(futex::is_wait(op));
            assert!(futex::is_wait(op | futex::PRIVATE_FLAG));
            assert!(futex::is_wait(
                op | futex::PRIVATE_FLAG | futex::CLOCK_REALTIME
            ));
        }
        // FUTEX_WAKE (1), FUTEX_UNLOCK_PI (7), FUTEX_WAKE_OP (5) do not block.
        for op in [1, 7, 5, 1 | futex::PRIVATE_FLAG] {
            assert!(!futex::is_wait(op));
        }
    }
}
