//! CMD's process tree, as a cgroup v2 of its own: CMD joins it before it execs (so before any
//! of its code runs), every process it and its descendants start is born in it, and a process
//! elsewhere on the host can only enter it if someone with write access to the cgroup moves it
//! there. Every finding carries the cgroup id the kernel saw at the fork or the shared use
//! (`bpf_get_current_cgroup_id`), so membership is decided from the event itself, never from
//! /proc after the fact, where the process may have gone and its pid been reused.
//!
//! A process of the tree that creates cgroups below this one (a nested container runtime, say)
//! stays in the tree: those cgroups' ids are members too. One that moves itself to a cgroup
//! elsewhere (`systemd-run --scope`, a container started through a daemon) leaves it.

use std::{
    collections::HashSet,
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::cli::UsageError;

/// The name of an exec's cgroup, before forkwatch's pid.
const PREFIX: &str = "forkwatch-exec-";

/// The cgroup `forkwatch exec` runs CMD in, removed again at the end.
pub struct Tree {
    dir: PathBuf,
    /// Its cgroup id: the cgroup2 directory's inode number.
    id: u64,
    /// The ids of the cgroups found below it so far.
    below: HashSet<u64>,
}

impl Tree {
    /// Creates the cgroup: below forkwatch's own cgroup in the cgroup2 hierarchy, named after
    /// forkwatch's pid. An error says what is missing and how to get it.
    pub fn create() -> Result<Tree, UsageError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| UsageError(format!("cannot read /proc/self/mountinfo: {e}")))?;
        let mount = cgroup2_mount(&mountinfo).ok_or_else(|| {
            UsageError(
                "forkwatch exec runs CMD in a cgroup of its own, and no cgroup2 filesystem is \
                 mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`)"
                    .to_owned(),
            )
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| unified_path(&text).map(str::to_owned))
            .ok_or_else(|| {
                UsageError("cannot tell forkwatch's own cgroup from /proc/self/cgroup".to_owned())
            })?;
        let parent = mount.join(own.trim_start_matches('/'));
        remove_stale(&parent);
        let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| {
            let fix = if e.raw_os_error() == Some(libc::EROFS) {
                "the cgroup filesystem is mounted read-only, as in a container by default: run \
                 forkwatch on the host, or in a container given a writable cgroup2"
            } else {
                "run it as root (`sudo forkwatch exec ...`), or from a cgroup delegated to you \
                 (`systemd-run --user --scope -p Delegate=yes forkwatch exec ...`)"
            };
            UsageError(format!(
                "forkwatch exec runs CMD in a cgroup of its own and cannot create {}: {e}; {fix}",
                dir.display()
            ))
        })?;
        let id = std::fs::metadata(&dir)
            .map_err(|e| UsageError(format!("cannot stat {}: {e}", dir.display())))?
            .ino();
        Ok(Tree {
            dir,
            id,
            below: HashSet::new(),
        })
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its `cgroup.procs`, as CMD's child writes it before exec (no allocation there).
    pub fn procs(&self) -> CString {
        // A path from /proc/self/mountinfo and /proc/self/cgroup has no NUL byte.
        CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap_or_default()
    }

    /// Whether a finding with this cgroup id is about the tree: the cgroup itself or one below
    /// it. Those below are looked up when an id is not known yet (they are rare, and few).
    pub fn contains(&mut self, cgroup_id: u64) -> bool {
        if cgroup_id == self.id || self.below.contains(&cgroup_id) {
            return true;
        }
        if cgroup_id == 0 {
            return false;
        }
        collect_below(&self.dir, &mut self.below);
        self.below.contains(&cgroup_id)
    }

    /// Removes the cgroup. Processes of the tree still running (CMD left them behind) are
    /// moved to forkwatch's own cgroup first; they go on running, unwatched.
    pub fn remove(self) {
        let parent = self.dir.parent().map(|p| p.join("cgroup.procs"));
        for attempt in 0..3 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            let left: Vec<&str> = procs.lines().collect();
            if attempt == 0 && !left.is_empty() {
                tracing::warn!(
                    processes = left.len(),
                    cgroup = %self.dir.display(),
                    "processes of CMD's tree are still running after it exited: moving them \
                     out of its cgroup, unwatched"
                );
            }
            for pid in left {
                if let Some(parent) = &parent {
                    let _ = std::fs::write(parent, pid);
                }
            }
        }
        if let Err(err) = remove_below(&self.dir) {
            tracing::warn!(%err, cgroup = %self.dir.display(), "cannot remove CMD's cgroup");
        }
    }
}

/// Removes the empty cgroups that execs killed before they could clean up left in `parent`
/// (a SIGKILL, an OOM kill). Only those whose forkwatch is gone: a running exec's cgroup is
/// empty for a moment before CMD joins it. rmdir itself refuses a cgroup with processes.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && remove_below(&entry.path()).is_ok() {
            tracing::info!(cgroup = %entry.path().display(), "removed a stale exec cgroup");
        }
    }
}

/// Removes cgroups below `dir` (children first), then `dir`.
fn remove_below(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_below(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Adds the inode numbers (cgroup ids) of every directory below `dir` to `ids`.
fn collect_below(dir: &Path, ids: &mut HashSet<u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // Not following links: cgroupfs has none, and a directory tree in a test has none.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(meta) = entry.metadata() {
                ids.insert(meta.ino());
            }
            collect_below(&entry.path(), ids);
        }
    }
}

/// Where the cgroup2 filesystem is mounted, from /proc/self/mountinfo: `/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split(' ').next()?;
        let root = before.split(' ').nth(3)?;
        // A bind mount of a subtree (root other than /) does not show the whole hierarchy.
        (fstype == "cgroup2" && root == "/")
            .then(|| before.split(' ').nth(4).map(unescape_mountinfo))
            .flatten()
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(digits) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// The cgroup2 path in the contents of /proc/<pid>/cgroup (its `0::/path` line).
pub fn unified_path(contents: &str) -> Option<&str> {
    contents.lines().find_map(|line| line.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "30 24 0:25 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:26 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      32 30 0:27 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A bind mount of a subtree is passed over; a path with a space is unescaped.
        let bind = "40 1 0:26 /sub /mnt/sub rw - cgroup2 cgroup2 rw\n\
                    41 1 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(bind), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(cgroup2_mount("garbage\n\n- -\n"), None);
    }

    #[test]
    fn the_unified_line_of_proc_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/user.slice/s.scope\n";
        assert_eq!(unified_path(hybrid), Some("/user.slice/s.scope"));
        assert_eq!(unified_path("1:name=systemd:/\n"), None);
    }

    /// Membership over a directory tree standing in for the cgroup: the root, directories
    /// created below it later (found when first asked about), nothing else.
    #[test]
    fn members_are_the_cgroup_and_those_below_it() {
        let base = std::env::temp_dir().join(format!("fw-tree-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let mut tree = Tree {
            id: ino(&root),
            dir: root.clone(),
            below: HashSet::new(),
        };
        assert!(tree.contains(ino(&root)));
        assert!(!tree.contains(ino(&outside)));
        assert!(
            !tree.contains(0),
            "events_lost and seeded children have no cgroup"
        );
        let nested = root.join("a/b");
        std::fs::create_dir_all(&nested).unwrap();
        assert!(
            tree.contains(ino(&nested)),
            "created after the first lookup"
        );
        assert!(tree.contains(ino(&root.join("a"))));
        assert!(!tree.contains(ino(&outside)));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
