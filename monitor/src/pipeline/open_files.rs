//! What the write probe's attach rule (write_candidate.rs) reads about a process: its fds that
//! could race on an offset, from /proc/PID/fd and /proc/PID/fdinfo, and whether two fds are one
//! open file description, from kcmp(2).
//!
//! /proc/PID is shaped by the process's owner: any user can hold a million fds, name files as
//! they like or keep a file on a FUSE server that never answers. So every read is bounded, a
//! malformed entry is skipped, and the file behind an fd is never opened (an open of a FIFO or a
//! device can block or have effects): its type comes from statx(2) on the /proc/PID/fd/N link
//! with AT_STATX_DONT_SYNC, which answers from the inode the link already names and asks no
//! network or FUSE server.

use std::{ffi::CString, fs, io::Read as _, os::unix::ffi::OsStrExt as _, path::Path};

use crate::pipeline::write_candidate::{
    OpenFile, Same, fdinfo_flags, is_watched_fd, moves_offset, names_a_path,
};

/// How much of a /proc/PID/fdinfo/N file is read: `pos:` (at most 20 digits) and `flags:` come
/// first; what some file types add after them (epoll's watches, inotify's marks) can be long.
const FDINFO_READ_BYTES: u64 = 256;

/// kcmp(2)'s type for "the same open file description" (include/uapi/linux/kcmp.h).
const KCMP_FILE: libc::c_int = 0;

/// How many of a process's fds are looked at: its lowest. /proc/PID/fd lists fds in ascending
/// order, and a description shared by a fork was opened before it, when the process had few
/// fds, so it has a low number; a server's thousands of connections come later.
pub const MAX_FDS_PER_PROCESS: usize = 4096;

/// The check's fd budget (shared by every family it looks at) is spent.
#[derive(Debug, PartialEq, Eq)]
pub struct OutOfBudget;

/// The fds of `pid` that could race on an offset (see [`OpenFile`]), appended to `out`: of its
/// lowest MAX_FDS_PER_PROCESS fds, and no more than `budget` (decremented). A process that is
/// gone has none.
///
/// Per fd: the link's target first (one readlink), since most fds of a server are sockets and
/// pipes, whose targets are not paths; then the flags in fdinfo; then the file type.
pub fn offset_files(
    proc_root: &Path,
    pid: u32,
    budget: &mut usize,
    out: &mut Vec<OpenFile>,
) -> Result<(), OutOfBudget> {
    let dir = proc_root.join(pid.to_string());
    let Ok(entries) = fs::read_dir(dir.join("fd")) else {
        return Ok(());
    };
    for entry in entries.take(MAX_FDS_PER_PROCESS) {
        if *budget == 0 {
            return Err(OutOfBudget);
        }
        *budget -= 1;
        let Some(fd) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        if !is_watched_fd(fd) {
            continue;
        }
        let link = dir.join(format!("fd/{fd}"));
        if !fs::read_link(&link).is_ok_and(|target| names_a_path(target.as_os_str().as_bytes())) {
            continue; // closed meanwhile, or a socket, pipe or anonymous inode
        }
        let Some(flags) = read_fdinfo_flags(&dir.join(format!("fdinfo/{fd}"))) else {
            continue; // closed meanwhile, or unreadable
        };
        if !moves_offset(flags) {
            continue;
        }
        if let Some((dev, ino)) = regular_file_id(&link) {
            out.push(OpenFile { pid, fd, dev, ino });
        }
    }
    Ok(())
}

fn read_fdinfo_flags(path: &Path) -> Option<u32> {
    let mut text = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(FDINFO_READ_BYTES)
        .read_to_end(&mut text)
        .ok()?;
    fdinfo_flags(std::str::from_utf8(&text).ok()?)
}

/// (device, inode) of the file an fd link names, if it is a regular file. statx follows the
/// magic link to the open file itself (even if unlinked) without opening it.
fn regular_file_id(link: &Path) -> Option<(u64, u64)> {
    let path = CString::new(link.as_os_str().as_bytes()).ok()?;
    // SAFETY: statx is plain data, valid zeroed.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_TYPE | libc::STATX_INO;
    // SAFETY: `path` is a NUL-terminated string and `stx` a writable statx buffer, both alive
    // for the call. The raw syscall: the libc wrapper is missing from older musl.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            mask,
            &mut stx as *mut libc::statx,
        )
    };
    if rc != 0 || stx.stx_mask & mask != mask {
        return None;
    }
    let regular = u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFREG;
    let dev = (u64::from(stx.stx_dev_major) << 32) | u64::from(stx.stx_dev_minor);
    regular.then_some((dev, stx.stx_ino))
}

/// Whether `a` and `b` are one open file description, by kcmp(KCMP_FILE) (needs ptrace access
/// to both: the daemon's CAP_SYS_PTRACE). A process or fd gone meanwhile is "no"; a kernel that
/// will not compare (no kcmp, refused) is "unknown".
pub fn same_description(a: &OpenFile, b: &OpenFile) -> Same {
    let (Ok(pid_a), Ok(pid_b)) = (libc::pid_t::try_from(a.pid), libc::pid_t::try_from(b.pid))
    else {
        return Same::No;
    };
    // SAFETY: kcmp takes only integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid_a,
            pid_b,
            KCMP_FILE,
            libc::c_ulong::from(a.fd),
            libc::c_ulong::from(b.fd),
        )
    };
    match rc {
        0 => Same::Yes,
        // 1 and 2 order two different descriptions; 3 says they differ, without an order.
        1.. => Same::No,
        _ => match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH | libc::EBADF) => Same::No,
            _ => Same::Unknown,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    fn mine(budget: usize) -> Result<Vec<OpenFile>, OutOfBudget> {
        let mut files = Vec::new();
        let mut budget = budget;
        offset_files(
            Path::new("/proc"),
            std::process::id(),
            &mut budget,
            &mut files,
        )?;
        Ok(files)
    }

    fn open(dir: &Path, name: &str, options: &mut fs::OpenOptions) -> fs::File {
        options.create(true).open(dir.join(name)).unwrap()
    }

    #[test]
    fn lists_this_process_files_open_for_writing_without_append() {
        let dir = std::env::temp_dir().join(format!("fw-open-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let written = open(&dir, "w", fs::OpenOptions::new().write(true));
        let appended = open(&dir, "a", fs::OpenOptions::new().append(true));
        let read = open(&dir, "r", fs::OpenOptions::new().read(true).write(true));
        let read_only = fs::File::open(dir.join("r")).unwrap();
        let (pipe_read, pipe_write) = std::io::pipe().unwrap();
        let files = mine(usize::MAX).unwrap();
        let has = |fd: i32| files.iter().any(|f| f.fd as i32 == fd);
        assert!(has(written.as_raw_fd()), "{files:?}");
        assert!(has(read.as_raw_fd()), "O_RDWR: {files:?}");
        assert!(!has(appended.as_raw_fd()), "O_APPEND: {files:?}");
        assert!(!has(read_only.as_raw_fd()), "read-only: {files:?}");
        assert!(!has(pipe_write.as_raw_fd()), "a pipe: {files:?}");
        drop((pipe_read, pipe_write));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_budget_bounds_the_entries_read() {
        assert_eq!(mine(0), Err(OutOfBudget));
        let mut files = Vec::new();
        let mut budget = 1000;
        offset_files(Path::new("/proc"), u32::MAX, &mut budget, &mut files).unwrap();
        assert!(files.is_empty(), "no such process");
    }

    #[test]
    fn kcmp_tells_one_description_from_two_opens_of_one_file() {
        let dir = std::env::temp_dir().join(format!("fw-kcmp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let first = open(&dir, "f", fs::OpenOptions::new().write(true));
        let dup = first.try_clone().unwrap();
        let other = open(&dir, "f", fs::OpenOptions::new().write(true));
        let me = std::process::id();
        let file = |f: &fs::File| OpenFile {
            pid: me,
            fd: f.as_raw_fd() as u32,
            dev: 0,
            ino: 0,
        };
        assert_eq!(same_description(&file(&first), &file(&dup)), Same::Yes);
        assert_eq!(same_description(&file(&first), &file(&other)), Same::No);
        let closed = OpenFile {
            fd: 1_000_000,
            ..file(&first)
        };
        assert_eq!(same_description(&file(&first), &closed), Same::No);
        let _ = fs::remove_dir_all(&dir);
    }
}
