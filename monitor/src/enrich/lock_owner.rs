//! Which thread of the parent held the lock a child of a fork is stuck on.
//!
//! The child's memory is a copy of the parent's at the fork, and a lock that records its owner
//! keeps that record in the copy: nobody in the child can change it (the owner thread does not
//! exist there). Two kinds of locks record one:
//!
//! - **PI futexes** (`FUTEX_LOCK_PI`, `FUTEX_LOCK_PI2`): the kernel's ABI puts the owner's tid
//!   in the futex word itself (`FUTEX_TID_MASK`). Certain. (`FUTEX_WAIT_REQUEUE_PI` waits on a
//!   condition variable's word, which holds no owner: it goes the mutex way below.)
//! - **glibc's `pthread_mutex_t`** (x86_64): the futex is the mutex's first word `__lock`, and
//!   `__owner` (the int at offset 8) is the holder's tid. A futex word is just an int, though:
//!   semaphores (CPython's `threading.Lock`), condition variables, Rust's `Mutex` and glibc's
//!   internal locks wait on one too, with other data after it. So it is only read as a mutex
//!   when (1) the blocked thread's stack passes through glibc's `pthread_mutex_*lock`, and (2)
//!   the words there are consistent with a locked glibc mutex: a lock word of 1 or 2 (or, for
//!   robust and priority-inheriting mutexes, the owner's tid), at least one user, a known mutex
//!   kind. Both are heuristics: a program could lay out a struct that passes (2), and (1) is
//!   only as good as the symbols (without a stack, nothing is claimed).
//!
//! Either way the owner's tid is only reported if it is one of the parent's threads as recorded
//! when the fork was seen: a stale or foreign number is never turned into a name. Tids in the
//! mutex are as the process sees them (its PID namespace), so they are matched against the
//! parent's threads' namespace tids and reported as host tids.

use std::{fs::File, os::unix::fs::FileExt as _};

use monitor_common::{futex, syscall};
use serde::Serialize;

use crate::enrich::{procfs::ParentThread, stack::Frame};

/// The parent's thread that held the lock at the fork.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockOwner {
    /// Host tid, as every tid in a finding.
    pub tid: u32,
    /// Its name (comm) when the fork was seen.
    pub name: String,
}

/// Why a finding has no `lock_owner`: the `lock_owner_unknown_reason` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoOwner {
    /// The stack does not pass through pthread_mutex_*lock: a semaphore (CPython's
    /// threading.Lock), a condition variable, Rust's Mutex, a glibc-internal lock... none of
    /// which records an owner.
    NotAPthreadMutex,
    /// The blocked thread's stack could not be read, so what kind of lock it is is unknown.
    NoStack,
    /// The lock's memory could not be read (the process is gone, or no CAP_SYS_PTRACE).
    Unreadable,
    /// The stack says pthread_mutex_lock, but the words at the address do not look like a
    /// locked glibc mutex (another libc, a corrupted mutex).
    NotAGlibcMutexLayout,
    /// The parent's threads were not recorded at the fork (a child found at start-up, or a
    /// parent gone before the fork was seen).
    ParentThreadsUnknown,
    /// The recorded owner is none of the parent's threads at the fork (a process-shared lock
    /// held by another process, a thread that ended before the daemon read the parent's list).
    OwnerNotAParentThread,
}

impl NoOwner {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAPthreadMutex => "not_a_pthread_mutex",
            Self::NoStack => "no_stack",
            Self::Unreadable => "unreadable",
            Self::NotAGlibcMutexLayout => "not_a_glibc_mutex_layout",
            Self::ParentThreadsUnknown => "parent_threads_unknown",
            Self::OwnerNotAParentThread => "owner_not_a_parent_thread",
        }
    }
}

/// The futex ops whose word holds its owner's tid (the PI futex ABI).
fn is_pi_wait(syscall_nr: u32, op: u32) -> bool {
    syscall_nr == syscall::FUTEX && matches!(op & futex::CMD_MASK, futex::LOCK_PI | futex::LOCK_PI2)
}

/// The kernel's FUTEX_TID_MASK: the owner's tid in a PI futex word (and a robust mutex's).
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// glibc x86_64 `struct __pthread_mutex_s`: the words read, from the futex word on.
const MUTEX_BYTES: usize = 20;

/// Whether a frame is glibc's mutex lock: `pthread_mutex_lock`, `___pthread_mutex_lock`,
/// `pthread_mutex_timedlock`, `__pthread_mutex_clocklock_common`, `__pthread_mutex_cond_lock`...
fn is_pthread_mutex_lock(function: &str) -> bool {
    let name = function.trim_start_matches('_');
    name.starts_with("pthread_mutex_") && name.contains("lock") && !name.contains("unlock")
}

/// The owner's tid (as the process sees it) of a glibc mutex whose first `MUTEX_BYTES` are
/// `raw`, if they are consistent with a locked mutex.
fn glibc_mutex_owner(raw: &[u8; MUTEX_BYTES]) -> Option<u32> {
    let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let (lock, owner, nusers, kind) = (word(0), word(8), word(12), word(16));
    // PTHREAD_MUTEX_{NORMAL,RECURSIVE,ERRORCHECK,ADAPTIVE}_NP, ROBUST (16), PRIO_INHERIT (32),
    // PRIO_PROTECT (64), PSHARED (128), ELISION (256), NO_ELISION (512).
    const KIND_BITS: u32 = 0x3 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200;
    const ROBUST_OR_PI: u32 = 0x10 | 0x20;
    const PRIO_PROTECT: u32 = 0x40;
    if kind & !KIND_BITS != 0 || owner == 0 || owner > FUTEX_TID_MASK || nusers == 0 {
        return None;
    }
    let locked = if kind & ROBUST_OR_PI != 0 {
        lock & FUTEX_TID_MASK == owner
    } else if kind & PRIO_PROTECT != 0 {
        // The priority ceiling sits above bit 19.
        matches!(lock & 0x7_ffff, 1 | 2)
    } else {
        matches!(lock, 1 | 2)
    };
    locked.then_some(owner)
}

/// Maps an owner tid as the process sees it to the parent's thread at the fork.
fn parent_thread(owner: u32, threads: &[ParentThread]) -> Result<LockOwner, NoOwner> {
    if threads.is_empty() {
        return Err(NoOwner::ParentThreadsUnknown);
    }
    threads
        .iter()
        .find(|t| t.ns_tid == owner)
        .map(|t| LockOwner {
            tid: t.tid,
            name: t.name.clone(),
        })
        .ok_or(NoOwner::OwnerNotAParentThread)
}

/// The lock's owner from what was read: the futex word and what follows it (`raw`, None if
/// unreadable), the wait's syscall and op, and the blocked thread's stack.
pub fn decide(
    raw: Option<&[u8; MUTEX_BYTES]>,
    syscall_nr: u32,
    op: u32,
    frames: &[Frame],
    threads: &[ParentThread],
) -> Result<LockOwner, NoOwner> {
    if is_pi_wait(syscall_nr, op) {
        let raw = raw.ok_or(NoOwner::Unreadable)?;
        let word = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
        return parent_thread(word & FUTEX_TID_MASK, threads);
    }
    if frames.is_empty() {
        return Err(NoOwner::NoStack);
    }
    let through_mutex = frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .any(is_pthread_mutex_lock);
    if !through_mutex {
        return Err(NoOwner::NotAPthreadMutex);
    }
    let raw = raw.ok_or(NoOwner::Unreadable)?;
    let owner = glibc_mutex_owner(raw).ok_or(NoOwner::NotAGlibcMutexLayout)?;
    parent_thread(owner, threads)
}

/// Reads the words at the futex address from process `pid`'s memory: a fixed, small read
/// through /proc/PID/mem (needs CAP_SYS_PTRACE), which fails cleanly for an unmapped address.
pub fn read_lock(pid: u32, uaddr: u64) -> Option<[u8; MUTEX_BYTES]> {
    let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut raw = [0u8; MUTEX_BYTES];
    mem.read_exact_at(&mut raw, uaddr).ok()?;
    Some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mutex(lock: u32, owner: u32, nusers: u32, kind: u32) -> [u8; MUTEX_BYTES] {
        let mut raw = [0u8; MUTEX_BYTES];
        for (at, v) in [(0, lock), (4, 0), (8, owner), (12, nusers), (16, kind)] {
            raw[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        }
        raw
    }

    fn frame(function: &str) -> Frame {
        Frame {
            address: 1,
            function: Some(function.into()),
            module: Some("libc.so.6".into()),
            offset: 0,
            file: None,
            line: None,
        }
    }

    fn threads() -> Vec<ParentThread> {
        vec![
            ParentThread {
                tid: 5000,
                ns_tid: 5000,
                name: "main".into(),
            },
            ParentThread {
                tid: 5001,
                ns_tid: 7,
                name: "cache-refresh".into(),
            },
        ]
    }

    const WAIT_PRIVATE: u32 = 0x80;

    fn mutex_stack() -> Vec<Frame> {
        vec![
            frame("__lll_lock_wait"),
            frame("pthread_mutex_lock"),
            frame("main"),
        ]
    }

    #[test]
    fn a_locked_glibc_mutex_names_its_owner_by_namespace_tid() {
        let raw = mutex(2, 7, 1, 0);
        let owner = decide(
            Some(&raw),
            syscall::FUTEX,
            WAIT_PRIVATE,
            &mutex_stack(),
            &threads(),
        );
        assert_eq!(
            owner,
            Ok(LockOwner {
                tid: 5001,
                name: "cache-refresh".into()
            })
        );
        // Every mutex lock entry point counts, under any of glibc's aliases.
        for f in [
            "___pthread_mutex_lock",
            "pthread_mutex_timedlock",
            "__pthread_mutex_cond_lock",
        ] {
            let stack = [frame("__lll_lock_wait"), frame(f)];
            assert!(decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()).is_ok());
        }
    }

    #[test]
    fn a_semaphore_or_other_futex_user_has_no_owner() {
        // CPython 3.11's threading.Lock: sem_t, value 0 at the futex, `private` 0 at offset 8.
        let raw = mutex(0, 0, 0, 0);
        let stack = [
            frame("do_futex_wait"),
            frame("sem_clockwait"),
            frame("PyThread_acquire_lock_timed"),
        ];
        assert_eq!(
            decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()),
            Err(NoOwner::NotAPthreadMutex)
        );
        // Even words that would pass as a mutex are not read as one without the stack's word.
        let raw = mutex(2, 7, 1, 0);
        let stack = [frame("std::sys::sync::mutex::futex::Mutex::lock_contended")];
        assert_eq!(
            decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()),
            Err(NoOwner::NotAPthreadMutex)
        );
        assert_eq!(
            decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &[], &threads()),
            Err(NoOwner::NoStack)
        );
        // pthread_mutex_unlock is not a lock wait's frame.
        let stack = [frame("pthread_mutex_unlock")];
        assert_eq!(
            decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()),
            Err(NoOwner::NotAPthreadMutex)
        );
    }

    #[test]
    fn words_inconsistent_with_a_locked_mutex_claim_nothing() {
        let stack = mutex_stack();
        for raw in [
            mutex(0, 7, 1, 0),      // unlocked
            mutex(3, 7, 1, 0),      // no such lock state
            mutex(2, 0, 1, 0),      // no owner
            mutex(2, 7, 0, 0),      // no user
            mutex(2, 7, 1, 0x4000), // no such kind
            mutex(2, 7, 1, 0x20),   // PI mutex whose word is not its owner
        ] {
            assert_eq!(
                decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()),
                Err(NoOwner::NotAGlibcMutexLayout),
                "{raw:?}"
            );
        }
        // Robust: the lock word holds the owner (with FUTEX_WAITERS).
        let raw = mutex(0x8000_0007, 7, 1, 0x10);
        assert!(decide(Some(&raw), syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()).is_ok());
        assert_eq!(
            decide(None, syscall::FUTEX, WAIT_PRIVATE, &stack, &threads()),
            Err(NoOwner::Unreadable)
        );
    }

    #[test]
    fn an_owner_that_is_no_parent_thread_at_the_fork_is_never_named() {
        let raw = mutex(2, 5001, 1, 0); // the host tid, but the process sees 7
        assert_eq!(
            decide(
                Some(&raw),
                syscall::FUTEX,
                WAIT_PRIVATE,
                &mutex_stack(),
                &threads()
            ),
            Err(NoOwner::OwnerNotAParentThread)
        );
        let raw = mutex(2, 7, 1, 0);
        assert_eq!(
            decide(
                Some(&raw),
                syscall::FUTEX,
                WAIT_PRIVATE,
                &mutex_stack(),
                &[]
            ),
            Err(NoOwner::ParentThreadsUnknown)
        );
    }

    #[test]
    fn a_pi_futex_word_is_its_owner() {
        let raw = mutex(0x8000_0000 | 7, 0, 0, 0);
        let owner = decide(Some(&raw), syscall::FUTEX, futex::LOCK_PI, &[], &threads());
        assert_eq!(owner.map(|o| o.name), Ok("cache-refresh".into()));
    }

    #[test]
    fn reading_memory_is_bounded_and_fails_cleanly() {
        let words = [0x1234_5678u32; 8];
        let raw = read_lock(std::process::id(), words.as_ptr() as u64);
        assert_eq!(
            raw.map(|r| r[..4].to_vec()),
            Some(words[0].to_ne_bytes().to_vec())
        );
        assert_eq!(read_lock(std::process::id(), 0), None, "unmapped");
        assert_eq!(read_lock(0, 0x1000), None);
    }
}
