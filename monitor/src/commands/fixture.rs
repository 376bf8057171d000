//! Helper processes `forkwatch selftest` runs (as `forkwatch fixture NAME`): a multithreaded
//! process that forks a child which exits without exec, one whose child execs at once, and one
//! whose child blocks forever on a lock another thread held at the fork.
//! They are part of the binary so the selftest works anywhere the binary does (a scratch
//! container image has no compiler and no /bin/true).

use std::{ffi::CString, os::unix::ffi::OsStrExt, sync::mpsc, time::Duration};

use anyhow::{Context as _, bail};

pub const MT_FORK_NO_EXEC: &str = "mt-fork-no-exec";
pub const MT_FORK_EXEC: &str = "mt-fork-exec";
pub const MT_FORK_DEADLOCK: &str = "mt-fork-deadlock";
const NOOP: &str = "noop";

pub fn run(name: &str) -> anyhow::Result<()> {
    match name {
        MT_FORK_NO_EXEC => mt_fork(false),
        MT_FORK_EXEC => mt_fork(true),
        MT_FORK_DEADLOCK => mt_fork_deadlock(),
        NOOP => Ok(()),
        other => bail!("unknown fixture {other:?}"),
    }
}

/// Forks from a process with a second live thread; prints the child's pid on stdout.
fn mt_fork(exec: bool) -> anyhow::Result<()> {
    // Everything the child needs is prepared before the fork: after it, only async-signal-safe
    // calls (execv, usleep, _exit) are allowed in the child of a multithreaded process.
    let exe = std::env::current_exe().context("current_exe")?;
    let path = CString::new(exe.as_os_str().as_bytes())?;
    let args = [path.clone(), CString::new("fixture")?, CString::new(NOOP)?];
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let (done, wait) = mpsc::channel::<()>();
    let helper = std::thread::Builder::new()
        .name("fixture-helper".into())
        .spawn(move || {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        })?;

    // SAFETY: fork in a multithreaded process; the child only calls async-signal-safe functions.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            if exec {
                libc::execv(path.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            libc::usleep(20_000);
            libc::_exit(0);
        }
    }
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    println!("{pid}");
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(done);
    let _ = helper.join();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("fixture child {pid} ended with wait status {status}");
    }
    Ok(())
}

/// A thread holds a mutex across the fork; the child locks it and blocks forever (the caller
/// kills it). Prints the child's pid and returns without waiting for it.
fn mt_fork_deadlock() -> anyhow::Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (held, is_held) = mpsc::channel::<()>();
    let holder = std::thread::Builder::new()
        .name("fixture-holder".into())
        .spawn(move || {
            let _guard = LOCK.lock();
            let _ = held.send(());
            std::thread::sleep(Duration::from_secs(3));
        })?;
    is_held.recv()?;
    // SAFETY: the child only blocks on the futex (std's Mutex is a bare futex word, no
    // allocation) and never returns from it; nothing else runs in it.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // Close the inherited stdout/stderr first: a caller reading our output to its end would
        // otherwise wait for as long as this child lives.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
        let _guard = LOCK.lock();
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    println!("{pid}");
    drop(holder);
    Ok(())
}
