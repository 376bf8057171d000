//! The signals `exec` passes on to CMD: what a terminal, a CI runner or a supervisor sends to
//! stop a job. A signal the terminal sent (Ctrl-C, Ctrl-\, a hangup) went to the whole
//! foreground process group, CMD included (it stays in forkwatch's group, so that it can read
//! the terminal): passing it on again would deliver it twice, and a second SIGINT aborts what
//! the first began (pytest's summary, a cleanup). The kernel marks those with `SI_KERNEL`; a
//! signal sent with kill(2) (a runner, `timeout`, a person) is `SI_USER` and is passed on.
//!
//! tokio's signal streams do not say who sent a signal, so the handler is a plain `SA_SIGINFO`
//! one that writes the number, and whether the kernel sent it, into a pipe.

use std::{
    io::Read as _,
    os::fd::{FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::Context as _;
use tokio::io::{Interest, unix::AsyncFd};

pub const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The pipe's write end, for the handler (-1 before [`Signals::install`]).
static PIPE: AtomicI32 = AtomicI32::new(-1);
/// Marks a signal the kernel sent in the byte written to the pipe.
const FROM_KERNEL: u8 = 0x80;

/// A signal received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub number: libc::c_int,
    /// Sent by the kernel to the process group (the terminal): CMD has it already.
    pub from_kernel: bool,
}

pub struct Signals {
    read: AsyncFd<std::fs::File>,
    _write: OwnedFd,
}

extern "C" fn on_signal(number: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    let byte = (number as u8 & !FROM_KERNEL)
        | if code == libc::SI_KERNEL {
            FROM_KERNEL
        } else {
            0
        };
    // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking (a full pipe drops the
    // byte: dozens of signals are already waiting to be read then) and errno is restored.
    unsafe {
        let saved = *libc::__errno_location();
        libc::write(PIPE.load(Ordering::Relaxed), (&raw const byte).cast(), 1);
        *libc::__errno_location() = saved;
    }
}

impl Signals {
    /// Installs the handler for [`FORWARDED`]. From here on those signals no longer end
    /// forkwatch; they are for [`Signals::next`] to read.
    pub fn install() -> anyhow::Result<Signals> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error()).context("creating the signal pipe");
        }
        // SAFETY: two descriptors just opened for us, owned by nothing else.
        let (read, write) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        PIPE.store(fds[1], Ordering::Relaxed);
        for number in FORWARDED {
            // SAFETY: a zeroed sigaction is a valid start; the handler only does
            // async-signal-safe work; sigaction reads the struct and writes nothing back
            // (no old action asked for).
            let ok = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(number, &action, std::ptr::null_mut()) == 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("installing the handler of signal {number}"));
            }
        }
        // SAFETY: the AsyncFd owns the read end, which stays open for as long as it lives.
        let read = unsafe { AsyncFd::register_with_interest(read, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the signal pipe: {e}"))?;
        Ok(Signals {
            read,
            _write: write,
        })
    }

    /// The next signal received, or an error if the pipe failed.
    pub async fn next(&mut self) -> anyhow::Result<Received> {
        loop {
            let mut ready = self.read.readable_mut().await?;
            let mut byte = [0u8; 1];
            match ready.get_inner_mut().read(&mut byte) {
                Ok(1) => {
                    return Ok(Received {
                        number: libc::c_int::from(byte[0] & !FROM_KERNEL),
                        from_kernel: byte[0] & FROM_KERNEL != 0,
                    });
                }
                Ok(_) => anyhow::bail!("the signal pipe closed"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // The handler stays installed; it must not write to a descriptor number that is
        // about to be closed and reused.
        PIPE.store(-1, Ordering::Relaxed);
    }
}
