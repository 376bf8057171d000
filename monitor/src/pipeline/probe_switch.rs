//! The probes attached on demand: the scheduler probes while something is tracked, the write
//! probe while two members of a fork family share a file offset. Each attach and detach is
//! decided here, from the state the event loop keeps.

use std::{collections::BTreeSet, path::Path, time::Duration, time::Instant};

use crate::{
    clock,
    pipeline::{
        event_loop::Pipeline,
        open_files, seed,
        write_candidate::{Candidate, Same, find_candidate},
    },
};

/// The scheduler probes stay attached this long after the last undecided child: fork storms of
/// multithreaded processes come and go, and each attach rescans /proc.
const SCHEDULER_LINGER: Duration = Duration::from_secs(2);

impl Pipeline {
    /// Attaches the scheduler probes while a tracked child is undecided (in its grace window:
    /// right after the fork, when a child takes an inherited lock), and detaches them once none
    /// has been for SCHEDULER_LINGER. A decided child that lives on (a worker of a threaded
    /// master, for days) does not keep them: they run on every context switch and wakeup on the
    /// host. While they are detached, the tracked children's futex waits are read from /proc at
    /// every blocked scan (`waits_from_proc`; every 500 ms then), as after a restart; a wait is
    /// then timed from the scan that first saw it, so a deadlock is reported up to one scan
    /// later, never sooner.
    ///
    /// A tracked child's thread that went to sleep before the probes were attached is never seen
    /// going to sleep again: at each attach, the tracked children's waits are read from /proc
    /// (and re-verified at every scan). Without that, three of the deadlock tests fail: their
    /// children block within a millisecond of the fork. At each detach, the waits the probes
    /// recorded are handed over the same way, with the time the kernel recorded.
    pub(super) fn switch_scheduler_probes(&mut self) {
        let busy = self.correlator.undecided() > 0;
        let attached = self.probes.scheduler_probes_attached();
        if busy {
            self.scheduler_idle_since = None;
        }
        if busy && !attached {
            self.scheduler_attached_ns = clock::boot_ns();
            match self.probes.set_scheduler_probes(true) {
                Ok(()) => self.waits_from_proc(),
                Err(err) => tracing::warn!(%err, "attaching the scheduler probes failed"),
            }
        } else if !busy && attached {
            let since = *self
                .scheduler_idle_since
                .get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= SCHEDULER_LINGER {
                self.hand_over_kernel_waits();
                if let Err(err) = self.probes.set_scheduler_probes(false) {
                    tracing::warn!(%err, "detaching the scheduler probes failed");
                }
                self.scheduler_idle_since = None;
            }
        }
        let now_attached = self.probes.scheduler_probes_attached();
        // Runs at every wakeup of the loop: the gauge is only touched when the state changed.
        if now_attached != attached {
            self.telemetry().metrics.scheduler_probes(now_attached);
        }
    }

    /// The futex waits of every process the kernel tracks, from /proc, for the scan: at each
    /// attach of the scheduler probes, and at every scan while they are detached. A thread
    /// already listed keeps its entry (and the time it was first seen), and is not read here:
    /// the scan re-verifies it (`seed::reverify`).
    pub(super) fn waits_from_proc(&mut self) {
        let now = clock::boot_ns();
        let listed: std::collections::HashSet<u32> =
            self.seeded_waits.iter().map(|s| s.wait.tid).collect();
        for (pid, start_ns) in self.kernel_tracked() {
            let found = seed::waits(&self.proc, pid, start_ns, now, |tid| listed.contains(&tid));
            self.seeded_waits.extend(found);
        }
    }

    /// Before the scheduler probes detach: the waits they recorded (since they were attached)
    /// join the waits re-verified from /proc at every scan, keeping the time the kernel saw each
    /// begin. The map is not read while they are detached (no wakeup removes an entry then).
    fn hand_over_kernel_waits(&mut self) {
        let tracked: std::collections::HashMap<u32, u64> =
            self.kernel_tracked().into_iter().collect();
        for wait in self.kernel_waits() {
            let Some(&start_ns) = tracked.get(&wait.pid) else {
                continue;
            };
            self.seeded_waits.retain(|s| s.wait.tid != wait.tid);
            let carried = seed::carried(&self.proc, wait, start_ns, clock::boot_ns());
            // The entry unchanged after /proc was read: no wakeup came between the kernel's
            // record and that read (a wakeup removes the entry, a new wait restamps it), so the
            // thread /proc showed is still in the wait the kernel timed.
            let unchanged = self
                .blocked
                .get(&wait.tid, 0)
                .is_ok_and(|now| now.since_ns == wait.since_ns);
            if let Some(carried) = carried.filter(|_| unchanged) {
                self.seeded_waits.push(carried);
            }
        }
    }

    /// (pid, start time) of every process the kernel tracks.
    fn kernel_tracked(&self) -> Vec<(u32, u64)> {
        self.tracked_map
            .map()
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Attaches the write probe while a fork family holds a candidate for `shared_file_offset`
    /// (see write_candidate.rs), and detaches it when none is left. Only families with a child
    /// that has gone without exec for the grace window are looked at: fork+exec children leave
    /// the maps within milliseconds, and a shell's, a prefork server's or PostgreSQL's lingering
    /// children share only stdio, sockets, pipes and O_APPEND logs, which keep it detached.
    ///
    /// A family's fds are read again when its membership changes (a fork, exec or exit: a new
    /// child's inherited descriptions, or a member gone), at the tick after the reason of an
    /// attached probe went (a member closed its fd: the pair is re-verified with kcmp at every
    /// tick), and every WRITE_RECHECK, for what shares a description without a fork
    /// (write_candidate.rs lists it).
    pub(super) fn switch_write_probe(&mut self) {
        let members = self.lingering_families();
        let attached = self.probes.write_probe_attached();
        if members.is_empty() {
            self.write_gate = WriteGate::default();
        } else {
            let gate = &self.write_gate;
            let stale = gate
                .checked_at
                .is_none_or(|at| at.elapsed() >= WRITE_RECHECK);
            // While attached, the reason itself is re-verified first (one kcmp): only once it is
            // gone are the families read again, for another.
            let reason_holds = gate.reason.as_ref().is_some_and(Reason::still_holds);
            if members != gate.members || stale || (attached && !reason_holds) {
                let reason = check_families(self.proc.root(), &members);
                tracing::debug!(
                    members = members.len(),
                    candidate = reason.as_ref().map(ToString::to_string),
                    "write probe: the open files of fork families with a lingering child checked"
                );
                self.write_gate = WriteGate {
                    members,
                    reason,
                    checked_at: Some(Instant::now()),
                };
            }
            self.telemetry().metrics.write_probe_checked();
        }
        let want = self.write_gate.reason.is_some();
        if want == attached {
            return;
        }
        match self.probes.set_write_probe(want) {
            Ok(()) => match &self.write_gate.reason {
                Some(reason) => tracing::info!("write probe attached: {reason}"),
                None => tracing::info!(
                    "write probe detached: no fork family shares a file offset any more"
                ),
            },
            Err(err) => tracing::warn!(%err, "switching the write probe failed"),
        }
        self.telemetry()
            .metrics
            .write_probe(self.probes.write_probe_attached());
    }

    /// Every member (family, pid), sorted, of the fork families that have a child without exec
    /// for the grace window, from the kernel's maps (exec and exit take members out of them).
    fn lingering_families(&self) -> Vec<(u32, u32)> {
        let now = clock::boot_ns();
        let families: BTreeSet<u32> = self
            .children
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, joined)| now.saturating_sub(joined) >= self.exec_grace_ns)
            .filter_map(|(pid, _)| self.family_map.map().get(&pid, 0).ok())
            .collect();
        if families.is_empty() {
            return Vec::new();
        }
        let mut members: Vec<(u32, u32)> = self
            .family_map
            .map()
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, family)| families.contains(family))
            .map(|(pid, family)| (family, pid))
            .collect();
        members.sort_unstable();
        members
    }
}

/// How often a family whose membership has not changed is checked again while the probe is
/// detached: the bound on how late a description shared without a fork (SCM_RIGHTS,
/// pidfd_getfd, O_APPEND cleared, CLONE_FILES) attaches it. Rare, so rarely: a family of
/// servers can hold thousands of fds.
const WRITE_RECHECK: Duration = Duration::from_secs(30);

/// The most fd entries one check reads, over all families (with MAX_FDS_PER_PROCESS, at least
/// 64 processes at that bound): past it, the families not yet read are taken as holding no
/// candidate, with a warning. A user with many processes and fds must not buy a host-wide
/// syscall slow path, nor unbounded work by the daemon.
const MAX_FDS_PER_CHECK: usize = 262_144;

/// What the write probe's attach rule found last.
#[derive(Default)]
pub(super) struct WriteGate {
    /// The members looked at, as `lingering_families` lists them.
    members: Vec<(u32, u32)>,
    /// Why the probe is needed; `None`: it is not.
    reason: Option<Reason>,
    /// When the members' fds were last read.
    checked_at: Option<Instant>,
}

/// Why the write probe is attached: two members' fds through one description, or a pair that
/// could not be ruled out.
#[derive(Debug)]
struct Reason {
    family: u32,
    candidate: Candidate,
}

impl Reason {
    /// Whether the two fds are still one description, as kcmp confirmed at the check (an fd
    /// closed, or reused for another file, is not). An unconfirmed reason is never taken as
    /// still holding: the families are read again.
    fn still_holds(&self) -> bool {
        let Candidate {
            first,
            second,
            confirmed,
        } = self.candidate;
        confirmed && open_files::same_description(&first, &second) == Same::Yes
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Candidate {
            first,
            second,
            confirmed,
        } = self.candidate;
        write!(
            f,
            "pid {} fd {} and pid {} fd {} of fork family {} {} one open file description of a \
             regular file opened for writing without O_APPEND",
            first.pid,
            first.fd,
            second.pid,
            second.fd,
            self.family,
            if confirmed {
                "hold"
            } else {
                "may hold (kcmp could not rule it out)"
            }
        )
    }
}

/// The first family of `members` (sorted by family) that holds a candidate, reading each
/// member's fds from /proc and comparing them with kcmp.
fn check_families(proc_root: &Path, members: &[(u32, u32)]) -> Option<Reason> {
    let mut budget = MAX_FDS_PER_CHECK;
    for family in members.chunk_by(|a, b| a.0 == b.0) {
        let root = family[0].0;
        let mut files = Vec::new();
        for &(_, pid) in family {
            if open_files::offset_files(proc_root, pid, &mut budget, &mut files).is_err() {
                warn_out_of_budget();
                return None;
            }
        }
        if let Some(candidate) = find_candidate(&files, open_files::same_description) {
            return Some(Reason {
                family: root,
                candidate,
            });
        }
    }
    None
}

/// Once per daemon: a gap in what is watched is said, not hidden.
fn warn_out_of_budget() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            limit = MAX_FDS_PER_CHECK,
            "fork families with a lingering child hold more fds than a check of the write \
             probe's attach rule reads; families past the limit are not checked for a shared \
             file offset (said once)"
        );
    });
}
