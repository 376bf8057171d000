//! Best-effort reads of /proc that make a finding actionable: the executable, argv[0], and the
//! names of the parent's threads (they tell which library owned them: `gai-async`,
//! `ruby-timer-thr`, `grpc_global_tim`...).
//!
//! Everything here may fail (the process exited, pid reused, hidepid): every field is optional
//! and a failure is never an error.

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use crate::{
    enrich::cgroup::{self, Attribution},
    enrich::runtime::{self, Runtime},
    wire::event::Fork,
};

/// What the daemon learns about a fork when its event arrives, a few hundred microseconds after
/// the fork itself. The parent's threads may have changed in between; the kernel's thread count
/// in the event is exact, the names are as close as userspace can get.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForkContext {
    /// The parent process's name (its main thread's comm).
    pub parent_comm: Option<String>,
    /// The parent's threads, the forking one included, in tid order: who held a lock at the
    /// fork (enrich/lock_owner.rs) and the `thread_names` of findings.
    pub threads: Vec<ParentThread>,
    /// The parent's language runtime (enrich/runtime.rs), which picks a finding's hint.
    pub runtime: Option<Runtime>,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// Futex addresses the parent's other threads were waiting on (see
    /// [`ProcFs::futex_waits`] for how exact that is).
    pub parent_futex_waits: Vec<u64>,
    /// The child's container / pod / systemd unit.
    pub attribution: Attribution,
    /// Where the parent's initial stack starts (/proc/pid/stat `startstack`): an image's
    /// identity, randomized at every exec and kept across fork (see [`ProcFs::same_image`]).
    pub stack_start: Option<u64>,
    /// The forking thread's stack at this fork, or why there is none (set per fork by the
    /// pipeline, never read from /proc: see enrich/fork_stack.rs).
    pub fork_stack: crate::enrich::fork_stack::ForkStackRef,
}

/// One of the parent's threads when the fork was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentThread {
    /// Host tid.
    pub tid: u32,
    /// Its tid in the process's own PID namespace (the one a mutex records): the host tid
    /// outside containers.
    pub ns_tid: u32,
    /// Its comm.
    pub name: String,
}

impl ForkContext {
    /// Names of the parent's threads other than `forking_tid`, in tid order.
    pub fn thread_names_but(&self, forking_tid: u32) -> Vec<String> {
        self.threads
            .iter()
            .filter(|t| t.tid != forking_tid)
            .map(|t| t.name.clone())
            .collect()
    }
}

impl crate::correlate::ForkEvidence for ForkContext {
    fn parent_futex_waits(&self) -> &[u64] {
        &self.parent_futex_waits
    }
}

/// How much of /proc/PID/cmdline is read for argv[0] alone: the process's owner writes it, and
/// a program that sets its title can make it the whole argument area (megabytes).
const ARGV0_READ_BYTES: u64 = 4096;
/// How much of /proc/PID/cmdline is read with `--full-cmdline`.
const CMDLINE_READ_BYTES: u64 = 64 * 1024;
/// How much of /proc/PID/maps is read to tell a runtime (about 2,500 lines): the target owns
/// its maps, which can run to megabytes. A process whose runtime library is mapped beyond that
/// is told by its executable's name alone, or not at all (then its hint is the generic one).
const MAPS_READ_BYTES: u64 = 256 * 1024;
/// How much of /proc/PID/maps an unwinder reads (`read_maps`): every module a stack can run
/// through. The process owns its mappings: up to vm.max_map_count (65,530), each line naming a
/// file by a path of up to 4 KiB, some 256 MiB of text a local user could make the daemon read
/// and parse. A module mapped beyond this many bytes' worth of lines goes unnamed in its stacks.
pub const UNWIND_MAPS_READ_BYTES: u64 = 4 << 20;
/// The longest argv0 a finding shows, in bytes.
pub const ARGV0_MAX_BYTES: usize = 128;

pub struct ProcFs {
    root: PathBuf,
    /// Keep whole command lines (`--full-cmdline`); else argv[0] only, for every tracked child.
    full_cmdline: bool,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            full_cmdline: false,
        }
    }

    /// Reads (and keeps, in fork contexts) whole command lines, not argv[0] alone.
    pub fn keeping_full_cmdline(self, full_cmdline: bool) -> Self {
        Self {
            full_cmdline,
            ..self
        }
    }

    /// Where /proc is mounted for this reader.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, pid: u32, leaf: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(leaf)
    }

    /// Snapshot for a fork of `child` by thread `parent_tid` of `parent`. Read from the parent:
    /// until it execs, a child runs the parent's executable with its argv in its cgroup, and
    /// reading the child instead would describe the new program of a child that exec'd at once
    /// (the usual case). The child is the fallback when the parent has already exited.
    pub fn fork_context(&self, parent: u32, parent_tid: u32, child: u32) -> ForkContext {
        let mut cmdline = self.cmdline(parent);
        if cmdline.is_empty() {
            cmdline = self.cmdline(child);
        }
        let exe = self.exe(parent).or_else(|| self.exe(child));
        let runtime = self
            .runtime(parent, exe.as_deref())
            .or_else(|| self.runtime(child, exe.as_deref()));
        ForkContext {
            parent_comm: self.comm(parent),
            threads: self.threads(parent),
            runtime,
            exe,
            cmdline,
            parent_futex_waits: self.futex_waits(parent, parent_tid),
            attribution: self
                .attribution(parent)
                .or_else(|| self.attribution(child))
                .unwrap_or_default(),
            stack_start: self.stack_start(parent).or_else(|| self.stack_start(child)),
            fork_stack: Default::default(),
        }
    }

    /// [`ProcFs::fork_context`] for a fork event, checked against the identities it carries:
    /// /proc is read after the fork, by which time the parent may have exited and its pid gone
    /// to another process, whose executable and threads would then be reported as the parent's.
    /// Read first and checked after: a process still the same after the reads was the same
    /// during them. Without the parent, the child is read alone if it is still itself; else
    /// nothing is known. The flag says whether the context came from the parent.
    pub fn fork_context_of(&self, fork: &Fork) -> (ForkContext, bool) {
        let context = self.fork_context(fork.parent_pid, fork.parent_tid, fork.child_pid);
        if self.is_same_process(fork.parent_pid, fork.parent_start_ns) {
            let complete = context.parent_comm.is_some();
            return (context, complete);
        }
        // No /proc/0: every parent read fails and the child fills in what it can.
        let context = self.fork_context(0, 0, fork.child_pid);
        if self.is_same_process(fork.child_pid, fork.child_start_ns) {
            (context, false)
        } else {
            (ForkContext::default(), false)
        }
    }

    /// The container, pod or systemd unit of `pid`, from /proc/pid/cgroup.
    pub fn attribution(&self, pid: u32) -> Option<Attribution> {
        let contents = read_small(&self.path(pid, "cgroup"))?;
        cgroup::path_from_proc(&contents).map(cgroup::attribute)
    }

    /// Futex addresses that threads of `pid` (other than `skip_tid`) are blocked on, from
    /// /proc/pid/task/*/syscall.
    ///
    /// How exact: this runs when the fork event reaches the daemon, typically well under a
    /// millisecond after the fork, not at the fork itself. A thread that started or stopped
    /// waiting in between is misreported, so the result is evidence, never proof; and a thread
    /// that holds a lock without waiting (the usual culprit) shows nothing here at all.
    pub fn futex_waits(&self, pid: u32, skip_tid: u32) -> Vec<u64> {
        let mut waits: Vec<u64> = self
            .tids(pid)
            .into_iter()
            .filter(|&tid| tid != skip_tid)
            .filter_map(|tid| Some(parse_futex_wait(&self.syscall_line(pid, tid)?)?.uaddr))
            .collect();
        waits.sort_unstable();
        waits.dedup();
        waits
    }

    /// /proc/pid/task/tid/syscall: what the thread is blocked in.
    pub fn syscall_line(&self, pid: u32, tid: u32) -> Option<String> {
        read_small(&self.path(pid, &format!("task/{tid}/syscall")))
    }

    /// Context switches of a thread so far (voluntary + involuntary): unchanged means it has not
    /// run in between.
    pub fn context_switches(&self, pid: u32, tid: u32) -> Option<u64> {
        let status = read_small(&self.path(pid, &format!("task/{tid}/status")))?;
        let count = |key: &str| -> Option<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))?
                .trim()
                .parse()
                .ok()
        };
        Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
    }

    /// A `Key:` value of /proc/pid/status.
    pub fn status_value(&self, pid: u32, key: &str) -> Option<u64> {
        self.status_line(pid, key)?.parse().ok()
    }

    /// Every process id in /proc.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Start time of `pid` in CLOCK_BOOTTIME nanoseconds (tick resolution).
    pub fn start_ns(&self, pid: u32) -> Option<u64> {
        Some(self.start_ticks(pid)? * (1_000_000_000 / clock_ticks_per_second()))
    }

    /// Thread ids of `pid`, ascending.
    pub fn tids(&self, pid: u32) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.path(pid, "task")) else {
            return Vec::new();
        };
        let mut tids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        tids
    }

    pub fn comm(&self, pid: u32) -> Option<String> {
        read_trimmed(&self.path(pid, "comm"))
    }

    pub fn exe(&self, pid: u32) -> Option<String> {
        fs::read_link(self.path(pid, "exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// Inodes of the sockets `pid` has open (its /proc/pid/fd links `socket:[N]`).
    pub fn socket_inodes(&self, pid: u32) -> std::collections::BTreeSet<u64> {
        let Ok(entries) = fs::read_dir(self.path(pid, "fd")) else {
            return Default::default();
        };
        entries
            .filter_map(|e| {
                let target = fs::read_link(e.ok()?.path()).ok()?;
                parse_socket_link(target.to_str()?)
            })
            .collect()
    }

    /// What fd `fd` of `pid` refers to (the target of /proc/pid/fd/N), if it is still the file
    /// with inode `ino` (the fd may have been closed and reused since).
    pub fn fd_path(&self, pid: u32, fd: u32, ino: u64) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let link = self.path(pid, &format!("fd/{fd}"));
        // metadata() follows the link to the open file itself, even if it was unlinked.
        if fs::metadata(&link).ok()?.ino() != ino {
            return None;
        }
        fs::read_link(link)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The command line as far as findings may show it: argv[0] alone unless whole command
    /// lines were asked for, and never more than a bounded read of it.
    pub fn cmdline(&self, pid: u32) -> Vec<String> {
        let limit = if self.full_cmdline {
            CMDLINE_READ_BYTES
        } else {
            ARGV0_READ_BYTES
        };
        let Ok(raw) = read_capped(&self.path(pid, "cmdline"), limit) else {
            return Vec::new();
        };
        let args = raw
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned());
        if self.full_cmdline {
            args.collect()
        } else {
            args.take(1).collect()
        }
    }

    /// Every thread of `pid`, in tid order, with its name and its tid in the process's PID
    /// namespace. Outside a container (an `NSpid:` of one entry) that is the host tid, and no
    /// thread's status is read.
    pub fn threads(&self, pid: u32) -> Vec<ParentThread> {
        let nested = self
            .status_line(pid, "NSpid")
            .is_some_and(|ids| ids.split_whitespace().count() > 1);
        self.tids(pid)
            .into_iter()
            .filter_map(|tid| {
                let name = read_trimmed(&self.path(pid, &format!("task/{tid}/comm")))?;
                let ns_tid = if nested {
                    // The innermost namespace's id is the last; a thread that is gone is left out.
                    read_small(&self.path(pid, &format!("task/{tid}/status")))?
                        .lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))?
                        .split_whitespace()
                        .last()?
                        .parse()
                        .ok()?
                } else {
                    tid
                };
                Some(ParentThread { tid, ns_tid, name })
            })
            .collect()
    }

    /// The language runtime of `pid` (enrich/runtime.rs): from its executable's name, else
    /// from the files it maps (a bounded read of /proc/PID/maps, only for executables the name
    /// does not tell).
    pub fn runtime(&self, pid: u32, exe: Option<&str>) -> Option<Runtime> {
        if let Some(runtime) = exe.and_then(runtime::from_exe) {
            return Some(runtime);
        }
        let maps = read_capped(&self.path(pid, "maps"), MAPS_READ_BYTES).ok()?;
        runtime::from_maps(&String::from_utf8_lossy(&maps))
    }

    /// The rest of a `Key:` line of /proc/pid/status.
    fn status_line(&self, pid: u32, key: &str) -> Option<String> {
        let status = read_small(&self.path(pid, "status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }

    /// Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat).
    pub fn start_ticks(&self, pid: u32) -> Option<u64> {
        let stat = read_small(&self.path(pid, "stat"))?;
        parse_stat_field(&stat, STAT_START_TIME)
    }

    /// Whether `pid` has exited and waits to be reaped (state `Z`, or `X` while it is), per field 3
    /// of /proc/pid/stat. Its /proc entry is still there, with its start time: only the state
    /// tells it from a live process.
    pub fn has_exited(&self, pid: u32) -> bool {
        read_small(&self.path(pid, "stat"))
            .and_then(|stat| stat_state(&stat))
            .is_some_and(|state| matches!(state, 'Z' | 'X'))
    }

    /// Where the initial stack of `pid`'s program image starts (`startstack`, which the kernel
    /// shows to a reader allowed to ptrace it, else 0: then None).
    pub fn stack_start(&self, pid: u32) -> Option<u64> {
        let stat = read_small(&self.path(pid, "stat"))?;
        parse_stat_field(&stat, STAT_START_STACK).filter(|&at| at != 0)
    }

    /// Whether `pid` still runs the program image it had at a fork that `stack_start` (read
    /// then, from the parent) describes: Some(false) once it has exec'd, even into the same
    /// executable, since every exec places the stack anew. None where that cannot be told:
    /// address randomization is off (host-wide or for the process), or /proc hides it.
    pub fn same_image(&self, pid: u32, stack_start: Option<u64>) -> Option<bool> {
        let then = stack_start?;
        let now = self.stack_start(pid)?;
        if !self.randomizes_addresses(pid) {
            return None;
        }
        Some(now == then)
    }

    /// Whether exec places `pid`'s stack at a random address: `kernel.randomize_va_space` is
    /// on and the process's personality lacks ADDR_NO_RANDOMIZE (`setarch -R`).
    fn randomizes_addresses(&self, pid: u32) -> bool {
        const ADDR_NO_RANDOMIZE: u64 = 0x0040000;
        let host = read_small(&self.root.join("sys/kernel/randomize_va_space"))
            .is_some_and(|v| v.trim() != "0");
        let personality = read_small(&self.path(pid, "personality"))
            .and_then(|p| u64::from_str_radix(p.trim(), 16).ok());
        host && personality.is_some_and(|p| p & ADDR_NO_RANDOMIZE == 0)
    }

    /// Whether `pid` is still the process that started at `start_ns` (CLOCK_BOOTTIME), so that
    /// nothing read from /proc is attributed to a process that merely reused the pid.
    ///
    /// Exact to the tick: /proc/pid/stat shows the same `task->start_boottime` the kernel
    /// programs read, rounded down to clock ticks the same way, so a process started a tick
    /// later is told apart. One started within the same tick (10 ms) at the same pid is not:
    /// callers that know a process is gone do not ask.
    pub fn is_same_process(&self, pid: u32, start_ns: u64) -> bool {
        let Some(ticks) = self.start_ticks(pid) else {
            return false;
        };
        let hz = clock_ticks_per_second();
        ticks == start_ns / (1_000_000_000 / hz)
    }
}

/// A futex wait as /proc/.../syscall shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallWait {
    pub nr: u32,
    pub uaddr: u64,
    /// futex(2) op, or the futex2 flags.
    pub op: u32,
    pub private: bool,
    pub has_timeout: bool,
}

/// The futex wait in a /proc/.../syscall line ("nr arg1 ... arg6 sp pc", hex args), if the
/// thread is blocked in one: futex(2) with a waiting op, or futex_wait(2). futex_waitv's first
/// argument is an array in the process's memory, not an address, so it is left out.
/// argv[0] as a finding shows it: up to its first whitespace and at most [`ARGV0_MAX_BYTES`].
/// A program that sets its title writes a whole command line there (`postgres: alice shop
/// 10.0.0.5(51234) idle`), which may hold what `--full-cmdline` exists to keep out.
pub fn argv0(arg: &str) -> String {
    let word = arg.split(char::is_whitespace).next().unwrap_or_default();
    let mut end = word.len().min(ARGV0_MAX_BYTES);
    while !word.is_char_boundary(end) {
        end -= 1;
    }
    word[..end].to_owned()
}

pub fn parse_futex_wait(line: &str) -> Option<SyscallWait> {
    use monitor_common::{futex, syscall};
    let mut fields = line.split_whitespace();
    let nr: u32 = fields.next()?.parse().ok()?;
    let hex = |f: Option<&str>| u64::from_str_radix(f?.strip_prefix("0x")?, 16).ok();
    let args: Vec<u64> = (0..5).map_while(|_| hex(fields.next())).collect();
    let [uaddr, arg2, _, arg4, arg5] = args[..] else {
        return None;
    };
    match nr {
        // futex(uaddr, op, val, timeout, ...)
        syscall::FUTEX if futex::is_wait(arg2 as u32) => Some(SyscallWait {
            nr,
            uaddr,
            op: arg2 as u32,
            private: arg2 as u32 & futex::PRIVATE_FLAG != 0,
            has_timeout: arg4 != 0,
        }),
        // futex_wait(uaddr, val, mask, flags, timeout, clockid)
        syscall::FUTEX_WAIT => Some(SyscallWait {
            nr,
            uaddr,
            op: arg4 as u32,
            private: arg4 as u32 & futex::FUTEX2_PRIVATE != 0,
            has_timeout: arg5 != 0,
        }),
        _ => None,
    }
}

/// The inode in an fd link `socket:[12345]`.
fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Room for a whole small /proc file (`stat`, `status`, `syscall`, `cgroup`) in one read.
const PROC_FILE_BYTES: usize = 4096;

/// A small /proc file, whole. One read into a page-sized buffer: /proc files report size 0, so
/// `fs::read_to_string` stats the file and grows its buffer from 32 bytes (six reads for a
/// `stat`), and the blocked scan reads a few such files per tracked thread every 500 ms.
/// Lossy, never refused: the comm in `stat` and `status` is any bytes its process chose, and a
/// name that is not UTF-8 must not hide the process's start time or its threads' waits (it
/// would with `read_to_string`, which fails on the whole file).
fn read_small(path: &Path) -> Option<String> {
    let mut raw = Vec::with_capacity(PROC_FILE_BYTES);
    fs::File::open(path).ok()?.read_to_end(&mut raw).ok()?;
    Some(lossy(raw))
}

/// Text of bytes that are UTF-8 but for what a process chose (a name, a mapped file's path):
/// invalid bytes become U+FFFD, without a copy when there is none.
fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

/// A /proc/<pid>/maps file as text for an unwinder, at most UNWIND_MAPS_READ_BYTES of it
/// (lossy: mapped file names need not be UTF-8).
pub fn read_maps(path: &Path) -> io::Result<String> {
    read_capped(path, UNWIND_MAPS_READ_BYTES).map(lossy)
}

/// The first `limit` bytes of a file whose length its process controls (cmdline, maps).
fn read_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `read_small`, without the trailing newline (`comm`).
fn read_trimmed(path: &Path) -> Option<String> {
    let text = read_small(path)?;
    Some(text.trim_end_matches('\n').to_owned())
}

/// Checks that this process is in the host's PID namespace: the kernel programs report host
/// pids, and in a nested namespace every pid would name another process in /proc (or none), so
/// every deadline decision would be withdrawn, silently. The host's (initial) PID namespace has
/// a fixed inode, PROC_PID_INIT_INO.
pub fn require_host_pid_namespace() -> Result<(), String> {
    const HOST_PID_NAMESPACE: &str = "pid:[4026531836]";
    let link = fs::read_link("/proc/self/ns/pid")
        .map_err(|e| format!("cannot read /proc/self/ns/pid: {e}; is /proc mounted?"))?;
    if link.as_os_str() == HOST_PID_NAMESPACE {
        return Ok(());
    }
    Err(format!(
        "forkwatch runs in a PID namespace of its own ({}), not the host's, so the kernel's \
         pids would name other processes in /proc: run it in the host's PID namespace \
         (Kubernetes: hostPID: true; podman/docker: --pid=host)",
        link.display()
    ))
}

/// Fields of /proc/pid/stat, numbered as in proc(5).
pub(crate) const STAT_START_TIME: usize = 22;
pub(crate) const STAT_START_STACK: usize = 28;

/// Field `number` (proc(5)'s numbering, 3 or more) of a /proc/pid/stat line. The comm (field 2)
/// is the process's to choose, spaces and parentheses included: fields are counted after its
/// last ')'.
pub(crate) fn parse_stat_field(stat: &str, number: usize) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm
        .split_whitespace()
        .nth(number.checked_sub(3)?)?
        .parse()
        .ok()
}

/// The state letter (field 3) of a /proc/pid/stat line, counted after the comm's last ')'.
pub(crate) fn stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_read_after_a_hostile_comm() {
        assert_eq!(stat_state("42 (a) Z (b)) S 1 42"), Some('S'));
        assert_eq!(stat_state("42 (x) Z 1 42"), Some('Z'));
        assert_eq!(stat_state("42 (x)"), None);
        assert_eq!(stat_state("no parenthesis"), None);
    }

    /// A process names itself (and its threads) with any bytes: one that is not UTF-8 must not
    /// make its start time, its threads' waits or their context switches unreadable, or a
    /// process could hide a deadlock from the blocked scan by its name.
    #[test]
    fn a_name_that_is_not_utf8_hides_nothing() {
        let root = std::env::temp_dir().join(format!("forkwatch-procfs-{}", std::process::id()));
        let task = root.join("42/task/43");
        fs::create_dir_all(&task).unwrap();
        let mut stat = b"42 (\xff\xfe) ".to_vec();
        stat.extend_from_slice(b"S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 1 2\n");
        fs::write(root.join("42/stat"), stat).unwrap();
        let mut status = b"Name:\t\xc3(\n".to_vec();
        status.extend_from_slice(b"voluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t2\n");
        fs::write(task.join("status"), status).unwrap();
        fs::write(
            task.join("syscall"),
            "202 0x5000 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f00\n",
        )
        .unwrap();
        let proc = ProcFs::new(&root);
        let (start, switches) = (proc.start_ticks(42), proc.context_switches(42, 43));
        let line = proc.syscall_line(42, 43);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(start, Some(123_456));
        assert_eq!(switches, Some(9));
        assert_eq!(
            parse_futex_wait(&line.unwrap()).map(|w| w.uaddr),
            Some(0x5000)
        );
    }

    #[test]
    fn a_maps_file_is_read_to_its_cap_and_its_paths_lossily() {
        let path = std::env::temp_dir().join(format!("forkwatch-maps-{}", std::process::id()));
        let line = b"7f00-7f01 r-xp 00000000 08:01 42 /tmp/\xff.so\n";
        let lines = UNWIND_MAPS_READ_BYTES as usize / line.len() + 2;
        fs::write(&path, line.repeat(lines)).unwrap();
        let text = read_maps(&path);
        fs::remove_file(&path).unwrap();
        let text = text.unwrap();
        // Capped in bytes read; each invalid byte became U+FFFD (three bytes for one).
        let first = text.lines().next().unwrap();
        assert_eq!(first, "7f00-7f01 r-xp 00000000 08:01 42 /tmp/\u{fffd}.so");
        let read = text.len() - 2 * text.matches('\u{fffd}').count();
        assert_eq!(read as u64, UNWIND_MAPS_READ_BYTES);
    }

    #[test]
    fn start_ticks_survives_hostile_comm() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 1 2";
        assert_eq!(parse_stat_field(stat, STAT_START_TIME), Some(123_456));
        assert_eq!(parse_stat_field("42 (x", STAT_START_TIME), None);
        assert_eq!(parse_stat_field("", STAT_START_TIME), None);
        assert_eq!(parse_stat_field(stat, 1), None);
    }

    #[test]
    fn an_exec_moves_the_stack_start_and_a_fork_keeps_it() {
        let proc = ProcFs::default();
        let me = std::process::id();
        let mine = proc.stack_start(me);
        assert!(mine.is_some(), "startstack of this process");
        if !proc.randomizes_addresses(me) {
            eprintln!("SKIP: address randomization is off here");
            return;
        }
        assert_eq!(proc.same_image(me, mine), Some(true));
        // A child that exec'd this very binary again.
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg("--list")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let execd = proc.same_image(child.id(), mine);
        let _ = child.kill();
        let _ = child.wait();
        assert_ne!(
            execd,
            Some(true),
            "a re-exec of the same executable is not the same image"
        );
    }

    #[test]
    fn threads_are_named_with_their_namespace_tids_and_the_runtime_is_told() {
        let proc = ProcFs::default();
        let me = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let named = std::thread::Builder::new()
            .name("fw-lock-holder".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
                let _ = rx.recv();
            })
            .unwrap();
        let tid = tid_rx.recv().unwrap();
        let threads = proc.threads(me);
        drop(tx);
        named.join().unwrap();
        let holder = threads
            .iter()
            .find(|t| t.tid == tid)
            .expect("the named thread");
        assert_eq!(holder.name, "fw-lock-holder");
        assert_eq!(holder.ns_tid, tid, "the host's PID namespace: the same tid");
        assert!(threads.iter().any(|t| t.tid == me), "the main thread too");
        // This test binary is a glibc program with no interpreter.
        assert_eq!(
            proc.runtime(me, proc.exe(me).as_deref()),
            Some(Runtime::Glibc)
        );
        assert_eq!(
            proc.runtime(me, Some("/usr/bin/python3.11")),
            Some(Runtime::Cpython)
        );
        assert_eq!(ProcFs::new("/nonexistent").runtime(me, None), None);
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(parse_socket_link("socket:[4242]"), Some(4242));
        assert_eq!(parse_socket_link("pipe:[4242]"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
        assert_eq!(parse_socket_link("/tmp/socket:[1]"), None);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino();
        let inodes = ProcFs::default().socket_inodes(std::process::id());
        assert!(inodes.contains(&ino), "{inodes:?} lacks {ino}");
    }

    #[test]
    fn futex_waits_are_recognized_in_syscall_lines() {
        let wait = "202 0x55d0c0a0 0x80 0x2 0x0 0x0 0x0 0x7ffd1234 0x7f0012";
        let parsed = parse_futex_wait(wait).unwrap();
        assert_eq!((parsed.uaddr, parsed.op), (0x55d0_c0a0, 0x80));
        assert!(parsed.private && !parsed.has_timeout);
        let bitset = "202 0x1000 0x189 0x0 0x7ffd0000 0x0 0xffffffff 0x7ffd1234 0x7f0012";
        let parsed = parse_futex_wait(bitset).unwrap();
        assert_eq!(parsed.uaddr, 0x1000);
        assert!(parsed.has_timeout, "arg4 is the timeout pointer");
        let futex2 = "455 0x2000 0x0 0xffffffff 0x82 0x0 0x1 0x7ffd1234 0x7f0012";
        let parsed = parse_futex_wait(futex2).unwrap();
        assert!(parsed.private && !parsed.has_timeout);
        // FUTEX_WAKE, another syscall, a running thread, garbage.
        assert_eq!(
            parse_futex_wait("202 0x1000 0x81 0x1 0x0 0x0 0x0 0x1 0x2"),
            None
        );
        assert_eq!(
            parse_futex_wait("230 0x0 0x0 0x7ffd 0x0 0x0 0x0 0x1 0x2"),
            None
        );
        assert_eq!(parse_futex_wait("running"), None);
        assert_eq!(parse_futex_wait("202 zz"), None);
    }

    #[test]
    fn reads_this_process() {
        let proc = ProcFs::default();
        let me = std::process::id();
        assert!(proc.exe(me).is_some());
        assert!(!proc.cmdline(me).is_empty());
        assert!(proc.comm(me).is_some());
        assert!(proc.attribution(me).is_some_and(|a| a.cgroup.is_some()));
        let ticks = proc.start_ticks(me).expect("own start time");
        let start_ns = ticks * (1_000_000_000 / clock_ticks_per_second());
        assert!(proc.is_same_process(me, start_ns));
        assert!(!proc.is_same_process(me, start_ns + 10_000_000_000));
    }

    #[test]
    fn fd_path_checks_the_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let _keep = file;
        let proc = ProcFs::default();
        let me = std::process::id();
        // fd 0..: find the one we opened by its inode.
        let ino = std::fs::metadata("/proc/self/status").unwrap().ino();
        let found = (0..64).find_map(|fd| proc.fd_path(me, fd, ino));
        assert!(found.is_some_and(|p| p.ends_with("/status")));
        assert_eq!(proc.fd_path(me, 0, u64::MAX), None, "wrong inode");
    }

    #[test]
    fn a_vanished_process_gives_empty_context() {
        let proc = ProcFs::new("/nonexistent-proc");
        assert_eq!(proc.fork_context(1, 1, 2), ForkContext::default());
    }

    #[test]
    fn argv0_is_one_bounded_word() {
        assert_eq!(argv0("/usr/bin/python3"), "/usr/bin/python3");
        // A title set by the program: only its first word.
        assert_eq!(
            argv0("postgres: alice shop 10.0.0.5(51234) idle"),
            "postgres:"
        );
        assert_eq!(argv0("a\tb"), "a");
        assert_eq!(argv0(&"x".repeat(1000)).len(), ARGV0_MAX_BYTES);
        // Cut on a character boundary: 127 ASCII bytes, then a 3-byte character.
        let long = format!("{}€€", "x".repeat(ARGV0_MAX_BYTES - 1));
        assert_eq!(argv0(&long), "x".repeat(ARGV0_MAX_BYTES - 1));
    }

    #[test]
    fn only_argv0_is_read_unless_the_full_command_line_is_asked_for() {
        let root = std::env::temp_dir().join(format!("forkwatch-procfs-{}", std::process::id()));
        let dir = root.join("42");
        std::fs::create_dir_all(&dir).unwrap();
        // Arguments past the first read's bound, as a program with a huge argument area has.
        let mut cmdline = b"ruby\0--secret=hunter2\0".to_vec();
        cmdline.extend(std::iter::repeat_n(b'y', 100_000));
        cmdline.extend(b"\0last\0");
        std::fs::write(dir.join("cmdline"), &cmdline).unwrap();
        let short = ProcFs::new(&root).cmdline(42);
        let full = ProcFs::new(&root).keeping_full_cmdline(true).cmdline(42);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(short, ["ruby"]);
        assert_eq!(full[..2], ["ruby", "--secret=hunter2"]);
        // Bounded even when asked for: the last argument is past CMDLINE_READ_BYTES.
        assert_eq!(full.len(), 3);
        assert_eq!(full[2].len() as u64, CMDLINE_READ_BYTES - 22);
    }
}
