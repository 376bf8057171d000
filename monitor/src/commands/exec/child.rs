//! CMD itself: started as forkwatch's child (so in the watched tree), waited for through a pidfd, sent the signals
//! forkwatch receives, and its end told as a shell tells it (`128 + signal`).

use std::{
    ffi::{CString, OsStr, OsString},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            process::{CommandExt as _, ExitStatusExt as _},
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
};

use anyhow::Context as _;
use tokio::io::{Interest, unix::AsyncFd};

/// A shell's status for a command it found but could not execute.
const CANNOT_EXECUTE: u8 = 126;
/// A shell's status for a command it did not find.
const NOT_FOUND: u8 = 127;

pub struct Cmd {
    child: Child,
    /// Readable once CMD has exited; it names CMD and no other process until CMD is reaped.
    pidfd: AsyncFd<OwnedFd>,
}

/// CMD's program, found before the probes load: a missing command costs nothing, and a
/// failure after the fork is never mistaken for a missing command (the child's errors come back
/// as a bare errno). Not found or not executable: a shell's status for it, and the message.
pub fn find(argv: &[OsString]) -> Result<PathBuf, (u8, String)> {
    let program = argv
        .first()
        .ok_or_else(|| (NOT_FOUND, "no command given".to_owned()))?;
    let path = std::env::var_os("PATH");
    resolve(program, path.as_deref(), is_executable)
}

impl Cmd {
    /// Starts `program` (from [`find`]) with `argv` and forkwatch's stdin, stdout and stderr.
    /// It is killed if forkwatch dies (a CI job must not go on unwatched, and nobody would
    /// forward its signals).
    pub fn spawn(program: &Path, argv: &[OsString]) -> anyhow::Result<Cmd> {
        let mut command = Command::new(program);
        if let Some((arg0, args)) = argv.split_first() {
            command.arg0(arg0).args(args);
        }
        // The config file's values became variables of forkwatch's own: not CMD's.
        for name in crate::cli::config::applied() {
            command.env_remove(name);
        }
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls may be made: prctl and getppid are system calls, and it
        // allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // forkwatch died before the prctl: nobody is watching.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pidfd = pidfd_open(child.id())?;
        // SAFETY: the AsyncFd owns the pidfd, which stays open and names CMD for as long as
        // the AsyncFd lives.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching CMD's pidfd: {e}"))?;
        Ok(Cmd { child, pidfd })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for CMD to exit and reaps it.
    pub async fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ready.clear_ready();
        }
    }

    /// Sends `signal` to CMD (nothing happens once it has exited).
    pub fn signal(&self, signal: i32) {
        // SAFETY: pidfd_send_signal reads its arguments only: an open pidfd, a signal number
        // and no siginfo. An exited CMD makes it fail with ESRCH, which is nothing to report.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// Where `program` is, as execvp finds it: itself if it has a slash, else the first executable
/// file of that name in `path` (the default path without one). Not found is a shell's 127, found
/// but not executable its 126.
fn resolve(
    program: &OsStr,
    path: Option<&OsStr>,
    executable: impl Fn(&Path) -> Option<bool>,
) -> Result<PathBuf, (u8, String)> {
    let shown = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        return match executable(Path::new(program)) {
            Some(true) => Ok(PathBuf::from(program)),
            Some(false) => Err((CANNOT_EXECUTE, format!("{shown}: permission denied"))),
            None => Err((NOT_FOUND, format!("{shown}: no such file"))),
        };
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut found_but_not_executable = false;
    for dir in std::env::split_paths(path) {
        // An empty entry is the current directory.
        let candidate = if dir.as_os_str().is_empty() {
            Path::new(".").join(program)
        } else {
            dir.join(program)
        };
        match executable(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => found_but_not_executable = true,
            None => {}
        }
    }
    if found_but_not_executable {
        Err((CANNOT_EXECUTE, format!("{shown}: permission denied")))
    } else {
        Err((NOT_FOUND, format!("{shown}: command not found")))
    }
}

/// Whether `path` is a file this process may execute; `None` if there is no file.
fn is_executable(path: &Path) -> Option<bool> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        return Some(false);
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: access reads a NUL-terminated path and a mode.
    Some(unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0)
}

fn pidfd_open(pid: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(std::io::Error::last_os_error)
        .context("pidfd_open on CMD (Linux 5.3 or later)")?;
    // SAFETY: a descriptor just opened for us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// CMD's status as a shell gives it: its exit code, or 128 plus the signal that killed it.
pub fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_told_as_a_shell_tells_them() {
        // wait(2) statuses: exit code in the second byte, a signal in the low seven bits.
        assert_eq!(status_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(status_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(status_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        // Killed with a core dump: the signal still.
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGSEGV | 0x80)), 139);
    }

    #[test]
    fn commands_are_found_as_execvp_finds_them() {
        let files = |p: &Path| match p.to_str() {
            Some("/a/tool") => Some(false),
            Some("/b/tool" | "/b/other" | "./local" | "/x/y") => Some(true),
            _ => None,
        };
        let path = Some(OsStr::new("/a:/b::/c"));
        let found = |p: &str| resolve(OsStr::new(p), path, files);
        assert_eq!(found("tool"), Ok(PathBuf::from("/b/tool")), "skips /a's");
        assert_eq!(
            found("local"),
            Ok(PathBuf::from("./local")),
            "empty entry: ."
        );
        assert_eq!(found("/x/y"), Ok(PathBuf::from("/x/y")));
        assert_eq!(found("missing").unwrap_err().0, 127);
        assert_eq!(found("/nowhere/z").unwrap_err().0, 127);
        let only_a = resolve(OsStr::new("tool"), Some(OsStr::new("/a")), files);
        assert_eq!(only_a.unwrap_err().0, 126);
        assert_eq!(found("/a/tool").unwrap_err().0, 126);
    }
}
