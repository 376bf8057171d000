//! The processes each test started (daemons, fixtures, servers), so that a test that runs out
//! of time can have them killed: its body may be stuck waiting on one of them, and a daemon left
//! running would keep its probes attached to the host.
//!
//! Each is held as a pidfd: unlike a pid, it can never name another process that got the same
//! pid after this one was reaped, so a late kill cannot hit a stranger.

use std::{
    cell::RefCell,
    collections::HashMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Child,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

thread_local! {
    /// The processes of the test this thread works for.
    static CURRENT: RefCell<Option<Arc<Started>>> = const { RefCell::new(None) };
}

/// The processes one test started and has not finished with.
#[derive(Default)]
pub struct Started {
    pidfds: Mutex<HashMap<u64, OwnedFd>>,
    next: AtomicU64,
}

impl Started {
    pub fn new() -> Arc<Started> {
        Arc::default()
    }

    /// The set of the test the calling thread works for, if any.
    pub fn current() -> Option<Arc<Started>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Makes the calling thread's processes this set's.
    pub fn adopt(self: &Arc<Started>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// Sends SIGKILL to every process still in the set; how many there were.
    pub fn kill_all(&self) -> usize {
        let pidfds = self.pidfds.lock().unwrap_or_else(PoisonError::into_inner);
        pidfds.values().for_each(kill);
        pidfds.len()
    }
}

/// A pidfd for `pid`, `None` if there is no such process (or no pidfds: kernels before 5.3).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor just opened for us, owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends SIGKILL to the process of a pidfd (nothing happens if it has gone).
pub fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal only reads its arguments: an open pidfd, a signal number and
    // no siginfo; a process already gone makes it fail with ESRCH.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// A process in its test's set until dropped (drop it once the process has been waited for).
pub struct Watched {
    started: Arc<Started>,
    key: u64,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.started
            .pidfds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Puts a child process into the set of the test the calling thread works for. `None` outside
/// a test, or on a kernel without pidfds (before 5.3): then nobody kills it at a timeout.
pub fn watch(child: &Child) -> Option<Watched> {
    // The child has not been waited for, so its pid still names it.
    watch_pidfd(pidfd_open(child.id())?)
}

/// [`watch`] for a process known by its pidfd (a fixture's child, which is not ours to wait for).
pub fn watch_pidfd(pidfd: OwnedFd) -> Option<Watched> {
    let started = Started::current()?;
    let key = started.next.fetch_add(1, Ordering::Relaxed);
    started
        .pidfds
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, pidfd);
    Some(Watched { started, key })
}
