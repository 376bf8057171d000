//! The write probe's attach rule, as a pure decision: does a fork family hold a *candidate*, two
//! live members writing through one open file description of a regular file (one shared offset)?
//! Only then can `shared_file_offset` happen, and only then is the probe (every syscall's slow
//! path) worth its cost. The /proc and kcmp reads that feed it are in open_files.rs.
//!
//! What cannot become a candidate later, so needs no watching: a file a member opens after the
//! fork has an open file description of its own (two opens never share an offset); a member's
//! own files are not shared with the others. Only an inherited description can be shared, and a
//! family's set of inherited descriptions changes with its membership (a fork adds one, an exec
//! or exit takes one away), which is when the daemon checks again. The exceptions, covered by a
//! periodic re-check instead (see probe_switch.rs): a description passed to another member over
//! a Unix socket (SCM_RIGHTS) or taken with pidfd_getfd(2), `fcntl(F_SETFL)` clearing O_APPEND,
//! and processes forked with CLONE_FILES (one fd table, so a later open is in both).

use std::collections::BTreeMap;

use monitor_common::{
    FIRST_WATCHED_FD,
    linux::{O_ACCMODE, O_APPEND, O_RDWR, O_WRONLY},
};

/// An fd of a family member that could race on its offset: at or above FIRST_WATCHED_FD, a
/// regular file, open for writing without O_APPEND. `dev` and `ino` name the file: two fds with
/// the same description always name the same file, so only those are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFile {
    pub pid: u32,
    pub fd: u32,
    pub dev: u64,
    pub ino: u64,
}

/// Whether two fds (of two processes) are one open file description: kcmp(KCMP_FILE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Same {
    Yes,
    No,
    /// The kernel would not say (no kcmp, refused): counted as a candidate, since missing a real
    /// one would hide a finding, while a false one only costs the probe's overhead.
    Unknown,
}

/// Two members' fds through one description, or a pair that could not be ruled out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub first: OpenFile,
    pub second: OpenFile,
    /// kcmp confirmed it; false when it could not say, or the comparison budget ran out.
    pub confirmed: bool,
}

/// The most kcmp comparisons one family's check makes. Separate opens of one file (workers
/// each opening the same file for writing, without O_APPEND) are distinct descriptions and take
/// one comparison per pair of processes; past this (about 180 such workers) the check gives up
/// and counts the family as a candidate, rather than miss one.
pub const MAX_COMPARISONS: usize = 16_384;

/// The `flags:` of a /proc/PID/fdinfo/FD text (octal, as the kernel prints it).
pub fn fdinfo_flags(fdinfo: &str) -> Option<u32> {
    let value = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))?
        .trim();
    u32::from_str_radix(value, 8).ok()
}

/// Whether writes through a description opened with `flags` move a shared offset: opened for
/// writing (write-only or read-write), and not with O_APPEND (every append goes to the end,
/// atomically with respect to the offset).
pub fn moves_offset(flags: u32) -> bool {
    matches!(flags & O_ACCMODE, O_WRONLY | O_RDWR) && flags & O_APPEND == 0
}

/// Whether an fd number is one the write probe watches (not stdio).
pub fn is_watched_fd(fd: u32) -> bool {
    fd >= FIRST_WATCHED_FD
}

/// Whether the target of a /proc/PID/fd/N link is a path, as every file on a mounted file
/// system has (unlinked ones too: "/tmp/x (deleted)", memfds: "/memfd:name"). Sockets, pipes
/// and anonymous inodes (eventfd, epoll, pidfd) are named "type:[...]" and have no offset that
/// write(2) moves. Read before anything else: it is the cheapest way past a server's sockets.
pub fn names_a_path(target: &[u8]) -> bool {
    target.first() == Some(&b'/')
}

/// The first candidate among the fds of one family's members, if any: two fds of two different
/// processes on the same file that `same` says are one description. At most MAX_COMPARISONS
/// calls of `same`.
pub fn find_candidate(
    files: &[OpenFile],
    mut same: impl FnMut(&OpenFile, &OpenFile) -> Same,
) -> Option<Candidate> {
    let mut by_file: BTreeMap<(u64, u64), Vec<&OpenFile>> = BTreeMap::new();
    for file in files {
        by_file.entry((file.dev, file.ino)).or_default().push(file);
    }
    let mut comparisons = 0;
    for group in by_file.values() {
        for (i, first) in group.iter().enumerate() {
            for second in &group[i + 1..] {
                if first.pid == second.pid {
                    continue; // within one process: one offset, one writer
                }
                if comparisons == MAX_COMPARISONS {
                    return Some(Candidate {
                        first: **first,
                        second: **second,
                        confirmed: false,
                    });
                }
                comparisons += 1;
                match same(first, second) {
                    Same::No => {}
                    answer => {
                        return Some(Candidate {
                            first: **first,
                            second: **second,
                            confirmed: answer == Same::Yes,
                        });
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pid: u32, fd: u32, ino: u64) -> OpenFile {
        OpenFile {
            pid,
            fd,
            dev: 8,
            ino,
        }
    }

    /// A (pid, fd) pair.
    type Fd = (u32, u32);

    /// kcmp as the tests' world has it: the fds listed in `shared` are one description.
    fn kcmp(shared: &[(Fd, Fd)]) -> impl FnMut(&OpenFile, &OpenFile) -> Same {
        move |a, b| {
            let (a, b) = ((a.pid, a.fd), (b.pid, b.fd));
            if shared
                .iter()
                .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
            {
                Same::Yes
            } else {
                Same::No
            }
        }
    }

    #[test]
    fn fdinfo_flags_are_octal() {
        let text = "pos:\t0\nflags:\t0100001\nmnt_id:\t25\nino:\t1234\n";
        assert_eq!(fdinfo_flags(text), Some(0o100001));
        assert_eq!(fdinfo_flags("pos:\t0\nflags:\t02\n"), Some(2));
    }

    #[test]
    fn fdinfo_without_flags_or_with_garbage_is_none() {
        assert_eq!(fdinfo_flags(""), None);
        assert_eq!(fdinfo_flags("pos:\t0\n"), None);
        assert_eq!(fdinfo_flags("flags:\t0109\n"), None, "9 is not octal");
        assert_eq!(fdinfo_flags("flags:\t77777777777777777777\n"), None);
        assert_eq!(fdinfo_flags("flags:\t-1\n"), None);
        assert_eq!(fdinfo_flags("flags:\n"), None);
    }

    #[test]
    fn only_writes_without_append_move_the_offset() {
        assert!(moves_offset(0o1)); // O_WRONLY
        assert!(moves_offset(0o2)); // O_RDWR
        assert!(moves_offset(0o100001 | 0o1000)); // O_LARGEFILE | O_TRUNC
        assert!(!moves_offset(0o0), "read-only");
        assert!(
            !moves_offset(0o3),
            "access mode 3 (ioctl only) cannot write"
        );
        assert!(!moves_offset(0o2001), "O_APPEND");
        assert!(!moves_offset(0o2002), "O_APPEND | O_RDWR");
    }

    #[test]
    fn only_link_targets_that_are_paths_can_be_files() {
        assert!(names_a_path(b"/var/log/app.log"));
        assert!(names_a_path(b"/tmp/#123 (deleted)"));
        assert!(names_a_path(b"/memfd:forkwatch-selftest (deleted)"));
        for target in [
            &b"socket:[123]"[..],
            b"pipe:[456]",
            b"anon_inode:[eventfd]",
            b"anon_inode:[pidfd]",
            b"",
        ] {
            assert!(!names_a_path(target), "{}", String::from_utf8_lossy(target));
        }
    }

    #[test]
    fn stdio_is_not_watched() {
        assert!(!is_watched_fd(0) && !is_watched_fd(1) && !is_watched_fd(2));
        assert!(is_watched_fd(3));
    }

    #[test]
    fn one_description_in_two_processes_is_a_candidate() {
        let files = [file(10, 3, 100), file(11, 3, 100)];
        let found = find_candidate(&files, kcmp(&[((10, 3), (11, 3))]));
        assert_eq!(
            found,
            Some(Candidate {
                first: files[0],
                second: files[1],
                confirmed: true
            })
        );
    }

    #[test]
    fn the_same_file_opened_twice_is_not() {
        // Each process opened it itself (after the fork): two descriptions, two offsets.
        let files = [file(10, 3, 100), file(11, 4, 100)];
        assert_eq!(find_candidate(&files, kcmp(&[])), None);
    }

    #[test]
    fn different_files_are_never_compared() {
        let files = [file(10, 3, 100), file(11, 3, 101)];
        let found = find_candidate(&files, |_, _| panic!("compared different files"));
        assert_eq!(found, None);
    }

    #[test]
    fn one_process_alone_is_not_a_candidate() {
        // dup'd fds of one process: one offset, but one writer.
        let files = [file(10, 3, 100), file(10, 4, 100)];
        let found = find_candidate(&files, |_, _| panic!("compared within one process"));
        assert_eq!(found, None);
        assert_eq!(find_candidate(&[], kcmp(&[])), None);
    }

    #[test]
    fn the_shared_pair_is_found_among_others() {
        // A worker's fd 5 is its parent's fd 7 (dup'd before the fork); the rest are own opens.
        let files = [
            file(10, 3, 100),
            file(11, 3, 100),
            file(12, 3, 100),
            file(10, 7, 200),
            file(12, 5, 200),
            file(11, 4, 300),
        ];
        let found = find_candidate(&files, kcmp(&[((10, 7), (12, 5))])).unwrap();
        assert_eq!((found.first, found.second), (files[3], files[4]));
        assert!(found.confirmed);
    }

    #[test]
    fn an_unanswered_comparison_counts_as_a_candidate() {
        let files = [file(10, 3, 100), file(11, 3, 100)];
        let found = find_candidate(&files, |_, _| Same::Unknown).unwrap();
        assert!(!found.confirmed);
    }

    #[test]
    fn comparisons_are_bounded() {
        // Many processes each with their own open of one file: no pair is shared, and the
        // check stops after MAX_COMPARISONS, counting the family as a candidate.
        let files: Vec<OpenFile> = (0..200).map(|pid| file(pid, 3, 100)).collect();
        let mut calls = 0;
        let found = find_candidate(&files, |_, _| {
            calls += 1;
            Same::No
        });
        assert_eq!(calls, MAX_COMPARISONS);
        assert!(!found.unwrap().confirmed);
        // Below the bound every pair is compared, and none is found.
        let few: Vec<OpenFile> = (0..20).map(|pid| file(pid, 3, 100)).collect();
        let mut calls = 0;
        let none = find_candidate(&few, |_, _| {
            calls += 1;
            Same::No
        });
        assert_eq!((none, calls), (None, 20 * 19 / 2));
    }
}
