//! Entry points for the fuzz targets (fuzz/): the parsers of text that other users control.
//! Another user writes their process's /proc entries (its comm, the paths it maps, its cgroup's
//! name) and a compromised API server the pod list; each parser must return for any input,
//! never panic. Not an API: the daemon's own code calls the parsers directly.

use crate::{
    enrich::{cgroup, procfs, runtime, stack},
    k8s::pod_list,
    pipeline::write_candidate,
};

/// Lines of /proc/PID/maps (paths are any bytes a user can name a file with).
pub fn proc_maps(text: &str) {
    for line in text.lines() {
        let _ = stack::parse_maps_line(line);
    }
    // The runtime is told from the same lines' path column.
    let _ = runtime::from_maps(text);
}

/// /proc/PID/task/TID/syscall, as the unwinder and the futex-wait reader parse it.
pub fn proc_syscall(line: &str) {
    let _ = stack::parse_syscall_line(line);
    let _ = procfs::parse_futex_wait(line);
}

/// /proc/PID/stat (the comm in it is the process's own choice: spaces, parentheses) and
/// argv[0] (/proc/PID/cmdline).
pub fn proc_stat(text: &str) {
    let _ = procfs::parse_stat_field(text, procfs::STAT_START_TIME);
    let _ = procfs::parse_stat_field(text, procfs::STAT_START_STACK);
    let _ = procfs::argv0(text);
}

/// /proc/PID/fdinfo/FD (its `flags:` line) and the target of a /proc/PID/fd/FD link, as the
/// write probe's attach rule reads them (the process's owner chooses the file types and paths).
pub fn proc_fdinfo(text: &[u8]) {
    if let Ok(text) = std::str::from_utf8(text) {
        let _ = write_candidate::fdinfo_flags(text).map(write_candidate::moves_offset);
    }
    let _ = write_candidate::names_a_path(text);
}

/// /proc/PID/cgroup, and the cgroup path in it (a container runtime or a user with a delegated
/// subtree names the directories).
pub fn cgroup(text: &str) {
    if let Some(path) = cgroup::path_from_proc(text) {
        let _ = cgroup::attribute(path);
    }
    let _ = cgroup::attribute(text);
}

/// The API server's pod list.
pub fn pod_list(body: &[u8]) {
    let _ = pod_list::parse(body);
}
