//! Linux ABI values that both sides use: the kernel programs compare syscall registers against
//! them, the daemon names what they report.

/// Syscall numbers (x86_64) of the futex waits the sched_switch program recognizes.
pub mod syscall {
    pub const FUTEX: u32 = 202;
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
