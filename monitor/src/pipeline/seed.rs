//! Restart recovery: hazards that were already live when the daemon started.
//!
//! The daemon never saw those forks, so it reconstructs what it can from /proc: a process whose
//! parent runs the same executable (so it has not exec'd since the fork) while the parent has two
//! or more threads is treated as a tracked child. Its `mt_fork_no_exec` is not reported: the
//! thread count at its fork is unknown, and a stale finding would be a false one. But its threads
//! that are already asleep in a futex wait will never be seen going to sleep again, so they are
//! taken from /proc/<pid>/task/<tid>/syscall and re-verified at every scan (same wait, no context
//! switch since), which is what lets a child deadlocked before the restart be reported.
//!
//! Fork families are rebuilt the same way: the kernel watches the socket I/O of family members
//! only, and families are joined at fork. A parent and a child that never exec'd (same
//! executable, started after it) that have a socket open in common are made members again, so
//! that their next uses of a shared connection are seen. Which sharing is a hazard (not a
//! listener, not stdio, a second member using it) is then decided in the kernel as for any family.
//!
//! Everything here is keyed by pid and read a moment before it is used: each process is carried
//! with its start time, and the caller re-checks it after writing the kernel's maps, so that a
//! process that exited meanwhile does not leave its pid tracked for whoever gets it next.

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::{
    clock,
    enrich::procfs::{ForkContext, ProcFs, parse_futex_wait},
    kernel::{Members, NO_EXIST},
    pipeline::event_loop::Pipeline,
    wire::event::{BlockedWait, Fork},
};

/// A child reconstructed from /proc.
pub struct Seeded {
    pub fork: Fork,
    pub context: ForkContext,
    pub waits: Vec<SeededWait>,
    /// The child's live threads when found.
    pub threads: u32,
}

/// A futex wait found in /proc at start.
#[derive(Clone, Debug)]
pub struct SeededWait {
    pub wait: BlockedWait,
    /// The /proc syscall line and context-switch count when found: while both are unchanged,
    /// the thread has been asleep in this wait the whole time.
    line: String,
    switches: u64,
    /// The process's start time: a thread of another process with the same ids is not it.
    start_ns: u64,
    /// When /proc last showed it unchanged (boot ns): the wait is proven up to then only.
    verified_ns: u64,
}

impl SeededWait {
    /// The wait as far as /proc has proven it: asleep from its start until it was last
    /// verified. The scan re-reads /proc less often on a host with many waiting threads
    /// (event_loop.rs, PROC_SCAN_SHARE), and the time in between, which nobody checked, must
    /// not count towards a deadlock.
    pub fn proven(&self, now_ns: u64) -> BlockedWait {
        let unchecked = now_ns.saturating_sub(self.verified_ns);
        BlockedWait {
            since_ns: self.wait.since_ns.saturating_add(unchecked),
            ..self.wait
        }
    }
}

/// Every live process that looks like a child of a multithreaded fork that never exec'd.
pub fn scan(proc: &ProcFs, now_ns: u64) -> Vec<Seeded> {
    let me = std::process::id();
    proc.pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| seeded(proc, pid, now_ns))
        .collect()
}

fn seeded(proc: &ProcFs, pid: u32, now_ns: u64) -> Option<Seeded> {
    let parent = u32::try_from(proc.status_value(pid, "PPid")?).ok()?;
    if parent <= 1 || proc.status_value(parent, "Threads")? < 2 {
        return None;
    }
    let exe = proc.exe(pid)?;
    if proc.exe(parent)? != exe {
        return None; // exec'd since the fork (or a different program altogether)
    }
    // The same executable is no proof: a program that runs itself again (a Python program
    // starting `sys.executable`) has exec'd all the same. An exec places the stack anew; a fork
    // keeps it. Where that cannot be told, the child is not taken for one that never exec'd.
    if proc.same_image(pid, proc.stack_start(parent)) != Some(true) {
        return None;
    }
    // Its threads now, not one: their creation was not seen either.
    let threads = u32::try_from(proc.status_value(pid, "Threads")?).ok()?;
    let start_ns = proc.start_ns(pid)?;
    let parent_start_ns = proc.start_ns(parent)?;
    if start_ns < parent_start_ns {
        return None;
    }
    let waits = waits(proc, pid, start_ns, now_ns, |_| false);
    let comm = proc.comm(pid).unwrap_or_default();
    let mut context = proc.fork_context(parent, 0, pid);
    // A seeded child may have changed since its fork: describe it as it is now.
    context.exe = Some(exe);
    context.cmdline = proc.cmdline(pid);
    context.attribution = proc.attribution(pid).unwrap_or(context.attribution);
    // What the parent's threads waited on *at the fork*, and which threads it had then, is
    // unknown; now is no evidence of either.
    context.parent_futex_waits.clear();
    context.threads.clear();
    Some(Seeded {
        fork: Fork {
            parent_pid: parent,
            parent_tid: 0,
            child_pid: pid,
            parent_threads: u32::try_from(proc.status_value(parent, "Threads")?).ok()?,
            shares_vm: false,
            timestamp_ns: start_ns,
            child_start_ns: start_ns,
            parent_start_ns,
            cgroup_id: 0,
            // Found at start: it predates any tree (`forkwatch exec` starts CMD afterwards).
            in_tree: false,
            comm,
            stack: None,
            stack_skipped: false,
        },
        context,
        waits,
        threads,
    })
}

/// The threads of `pid` (started at `start_ns`) asleep in a futex wait now, from /proc. Used at
/// start, whenever the scheduler probes are attached (they see only waits that begin after), and
/// at every blocked scan while they are detached (probe_switch.rs).
/// Threads for which `listed` is true are not read: the caller re-verifies those itself.
pub fn waits(
    proc: &ProcFs,
    pid: u32,
    start_ns: u64,
    now_ns: u64,
    listed: impl Fn(u32) -> bool,
) -> Vec<SeededWait> {
    if !proc.is_same_process(pid, start_ns) {
        return Vec::new();
    }
    proc.tids(pid)
        .into_iter()
        .filter(|&tid| !listed(tid))
        .filter_map(|tid| {
            let line = proc.syscall_line(pid, tid)?;
            let w = parse_futex_wait(&line)?;
            Some(SeededWait {
                wait: BlockedWait {
                    pid,
                    tid,
                    syscall: w.nr,
                    uaddr: w.uaddr,
                    op: w.op,
                    private: w.private,
                    has_timeout: w.has_timeout,
                    // How long it has slept is unknown: count from now.
                    since_ns: now_ns,
                },
                line,
                switches: proc.context_switches(pid, tid)?,
                start_ns,
                verified_ns: now_ns,
            })
        })
        .collect()
}

/// A wait the scheduler probes recorded, to be re-verified from /proc from now on (they are
/// being detached): kept only if /proc shows the thread in a futex wait on the same address,
/// with the time the kernel recorded.
pub fn carried(proc: &ProcFs, wait: BlockedWait, start_ns: u64, now_ns: u64) -> Option<SeededWait> {
    let (pid, tid) = (wait.pid, wait.tid);
    let line = proc.syscall_line(pid, tid)?;
    if parse_futex_wait(&line)?.uaddr != wait.uaddr || !proc.is_same_process(pid, start_ns) {
        return None;
    }
    Some(SeededWait {
        wait,
        switches: proc.context_switches(pid, tid)?,
        line,
        start_ns,
        verified_ns: now_ns,
    })
}

/// Processes known, within one scan, to be (or not to be) the ones that started at a given time:
/// one read of a process's `stat` per scan, not one per waiting thread.
pub type Alive = std::collections::HashMap<(u32, u64), bool>;

/// Whether the thread is still in the same wait and has not run since it was found; if so, it
/// is verified as of `now_ns`.
pub fn reverify(proc: &ProcFs, seeded: &mut SeededWait, now_ns: u64, alive: &mut Alive) -> bool {
    let (pid, tid, start_ns) = (seeded.wait.pid, seeded.wait.tid, seeded.start_ns);
    let unchanged = proc.syscall_line(pid, tid).as_deref() == Some(seeded.line.as_str())
        && proc.context_switches(pid, tid) == Some(seeded.switches)
        && *alive
            .entry((pid, start_ns))
            .or_insert_with(|| proc.is_same_process(pid, start_ns));
    if unchanged {
        seeded.verified_ns = now_ns;
    }
    unchanged
}

/// A process to make a fork-family member again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub pid: u32,
    pub start_ns: u64,
    /// The family's root: the topmost member, as the kernel names families.
    pub family: u32,
    /// A child that has not exec'd (the kernel's CHILDREN map), not the family's root.
    pub child: bool,
}

/// Members of every fork family that shares a socket: each (parent, child) pair where the child
/// never exec'd and both have a socket open in common, grouped under their topmost member.
pub fn families(proc: &ProcFs) -> Vec<Member> {
    let me = std::process::id();
    // child → (its start time, parent, parent's start time)
    let pairs: BTreeMap<u32, (u64, u32, u64)> = proc
        .pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| sharing_pair(proc, pid).map(|pair| (pid, pair)))
        .collect();
    let root = |mut pid: u32| {
        // Bounded: a chain of pids cannot be longer than the map (a cycle cannot exist, but a
        // reused pid read at the wrong moment must not loop forever).
        for _ in 0..=pairs.len() {
            match pairs.get(&pid) {
                Some(&(_, parent, _)) => pid = parent,
                None => break,
            }
        }
        pid
    };
    let mut members: BTreeMap<u32, Member> = BTreeMap::new();
    for (&child, &(start_ns, parent, parent_start_ns)) in &pairs {
        let family = root(child);
        members.insert(
            child,
            Member {
                pid: child,
                start_ns,
                family,
                child: true,
            },
        );
        members.entry(parent).or_insert(Member {
            pid: parent,
            start_ns: parent_start_ns,
            family,
            child: false,
        });
    }
    members.into_values().collect()
}

/// (start time, parent, parent's start time) of `pid` if it is a child that has not exec'd
/// since its fork and has a socket open in common with its parent.
fn sharing_pair(proc: &ProcFs, pid: u32) -> Option<(u64, u32, u64)> {
    let parent = u32::try_from(proc.status_value(pid, "PPid")?).ok()?;
    if parent <= 1 || proc.exe(pid)? != proc.exe(parent)? {
        return None;
    }
    let (start_ns, parent_start_ns) = (proc.start_ns(pid)?, proc.start_ns(parent)?);
    if start_ns < parent_start_ns {
        return None;
    }
    let sockets = proc.socket_inodes(pid);
    if sockets.is_empty() || proc.socket_inodes(parent).is_disjoint(&sockets) {
        return None;
    }
    Some((start_ns, parent, parent_start_ns))
}

// Writing what was found into the kernel's maps and the correlator.

impl Pipeline {
    /// Restart recovery: tracks the children of multithreaded forks that were already running,
    /// in the kernel too, and remembers their threads already asleep in a futex wait.
    pub(super) fn seed_from_proc(&mut self) {
        let seeded = scan(&self.proc, clock::boot_ns());
        let count = seeded.len();
        for s in seeded {
            let pid = s.fork.child_pid;
            if let Err(err) = self.tracked_map.insert_new(pid, &s.fork.child_start_ns) {
                tracing::debug!(%err, pid, "cannot track a seeded child in the kernel");
            }
            // Checked after the insert: exited before it, the kernel would never remove the
            // entry, and the next process to get the pid would be tracked in its place.
            if !self.proc.is_same_process(pid, s.fork.child_start_ns) {
                let _ = self.tracked_map.remove(pid);
                continue;
            }
            self.seeded_waits.extend(s.waits);
            self.correlator.seed(s.fork, s.context, s.threads);
        }
        if count > 0 {
            tracing::info!(
                children = count,
                blocked = self.seeded_waits.len(),
                "seeded from /proc: running children of multithreaded forks that never exec'd"
            );
        }
    }
}

/// Restart recovery for sharing: makes the members of fork families that share a socket (see
/// `families`) members in the kernel again, so that their next uses of a shared connection are
/// seen. Each is re-checked after the insert, like the tracked children.
pub(super) fn seed_families(
    proc: &ProcFs,
    family: &mut Members<u32>,
    children: &mut BpfHashMap<MapData, u32, u64>,
) {
    let now = clock::boot_ns();
    let mut seeded = 0;
    for m in families(proc) {
        if let Err(err) = family.insert_new(m.pid, &m.family) {
            tracing::debug!(%err, pid = m.pid, "cannot seed a fork-family member");
            continue;
        }
        if m.child {
            let _ = children.insert(&m.pid, &now, NO_EXIST);
        }
        if proc.is_same_process(m.pid, m.start_ns) {
            seeded += 1;
        } else {
            let _ = family.remove(m.pid);
            let _ = children.remove(&m.pid);
        }
    }
    if seeded > 0 {
        tracing::info!(
            members = seeded,
            "seeded from /proc: fork families whose parent and child (never exec'd) share a socket"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex, mpsc},
        time::{Duration, Instant},
    };

    use super::*;

    /// A thread of this process asleep on a lock another thread holds, as /proc shows it: the
    /// wait is found, handed over from a kernel record only for the same address (keeping the
    /// kernel's time), and still blocked until the lock is released.
    #[test]
    fn a_recorded_wait_is_carried_over_only_as_proc_shows_it() {
        let proc = ProcFs::default();
        let me = std::process::id();
        let start_ns = proc.start_ns(me).expect("own start time");
        let lock = Arc::new(Mutex::new(()));
        let held = lock.lock().unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let waiter = {
            let lock = Arc::clone(&lock);
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
                drop(lock.lock());
            })
        };
        let tid = tid_rx.recv().unwrap();
        // Asleep in futex(2) once the lock's fast path has failed: bounded, not timed.
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let waits = waits(&proc, me, start_ns, 7, |_| false);
            if let Some(found) = waits.into_iter().find(|w| w.wait.tid == tid) {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "the waiter never slept in futex(2)"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!((found.wait.pid, found.wait.since_ns), (me, 7));
        assert!(found.wait.private, "{:?}", found.wait);

        let recorded = BlockedWait {
            since_ns: 3,
            ..found.wait
        };
        let mut handed = carried(&proc, recorded, start_ns, 5).expect("carried over");
        assert_eq!(handed.wait.since_ns, 3, "the kernel's time is kept");
        // Proven up to its verification only: at 9, verified at 5, it has slept 2, not 6.
        assert_eq!(handed.proven(9).since_ns, 7);
        assert!(reverify(&proc, &mut handed, 9, &mut Alive::new()));
        assert_eq!(handed.proven(9).since_ns, 3, "verified again at 9");
        let elsewhere = BlockedWait {
            uaddr: recorded.uaddr + 8,
            ..recorded
        };
        assert!(
            carried(&proc, elsewhere, start_ns, 5).is_none(),
            "another address"
        );
        assert!(
            carried(&proc, recorded, start_ns + 1_000_000_000, 5).is_none(),
            "another process with the same pid"
        );

        drop(held);
        waiter.join().unwrap();
        assert!(
            !reverify(&proc, &mut handed, 11, &mut Alive::new()),
            "the lock was released"
        );
        assert_eq!(handed.proven(11).since_ns, 5, "not verified at 11");
    }
}
