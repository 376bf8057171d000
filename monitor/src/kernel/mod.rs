//! Loads the eBPF object, hands it the kernel's struct offsets, and attaches the programs this
//! kernel supports (see `detectors`): a detector whose programs the kernel refuses is reported
//! unavailable, and the rest runs.
//!
//! Dropping [`Probes`] detaches every program and frees every map: there is nothing pinned, so a
//! crashed or killed daemon leaves nothing behind in the kernel.

pub mod btf_offsets;
pub(crate) mod btf_raw;
pub(crate) mod capabilities;
mod counters;
pub mod detectors;
mod error;
mod members;
mod on_demand;

use self::detectors::{AttachPoint, KernelFeatures, Program};
pub(crate) use self::members::NO_EXIST;
pub use self::{
    counters::{KernelCounters, KernelCounts},
    detectors::{Detector, DetectorStatus},
    error::ProbeError,
    members::Members,
};
use self::{
    error::{describe, permission_hint, program_error},
    on_demand::OnDemand,
};

use std::path::{Path, PathBuf};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
    programs::{BtfTracePoint, FEntry, ProgramError},
};
use monitor_common::{OFFSETS_GLOBAL, TREE_ROOT_GLOBAL, WAKEUP_GLOBAL, names};

/// The compiled kernel programs, built by build.rs with the pinned nightly.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forkwatch"));

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub btf_path: PathBuf,
    pub ring_buffer_bytes: u32,
    pub max_tracked: u32,
    /// The host tgid whose descendants make the watched tree (`forkwatch exec`'s own), if any:
    /// see `monitor_common::TREE_MAX_ENTRIES`.
    pub tree_root: Option<u32>,
}

pub struct Probes {
    ebpf: Ebpf,
    /// The kernel's types, parsed by aya (about 15 MB): needed to verify tp_btf programs, then
    /// released by `attach_all` so the long-lived daemon does not carry it.
    btf: Option<Btf>,
    /// The write probe while attached (see `set_write_probe`).
    write: OnDemand,
    /// The scheduler probes while attached (see `set_scheduler_probes`).
    scheduler: OnDemand,
    /// What this kernel's BTF offers the detectors.
    features: KernelFeatures,
    /// Each detector's state, once `attach_all` has run.
    detectors: Vec<DetectorStatus>,
    /// Whether the fork program captures the forking thread's stack; if not, why (see
    /// `attach_lifecycle`).
    fork_stacks: Result<(), String>,
}

impl Probes {
    /// Creates the maps and readies the programs, without attaching anything yet.
    pub fn load(opts: &ProbeOptions) -> Result<Self, ProbeError> {
        raise_memlock_limit();
        // Read the file once: the offsets and aya's parse both come from these bytes, and they
        // are freed before the maps are created (the peak RSS is set here).
        let raw = btf_offsets::read_btf(&opts.btf_path)?;
        let (offsets, mut features) = btf_offsets::inspect(&raw)?;
        if std::env::var_os(OLDER_TRACEPOINTS_VAR).is_some_and(|v| v == "1") {
            tracing::warn!(
                "{OLDER_TRACEPOINTS_VAR}=1: using the programs for older tracepoint prototypes \
                 (a test of them on this kernel; unset it in production)"
            );
            features = features.with_older_tracepoints();
        }
        tracing::debug!(
            ?offsets,
            ?features,
            "kernel struct offsets and features from BTF"
        );
        let btf = parse_btf(&raw, &opts.btf_path)?;
        drop(raw);
        let ebpf = EbpfLoader::new()
            .btf(&btf)
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .override_global(WAKEUP_GLOBAL, &wakeup_bytes(opts.ring_buffer_bytes), true)
            .map_max_entries(names::EVENTS, opts.ring_buffer_bytes)
            .map_max_entries(names::TRACKED, opts.max_tracked)
            .override_global(TREE_ROOT_GLOBAL, &opts.tree_root.unwrap_or(0), true)
            // The daemon watches no tree: the map is created all the same, with one entry.
            .map_max_entries(
                names::TREE,
                opts.tree_root
                    .map_or(1, |_| monitor_common::TREE_MAX_ENTRIES),
            )
            .load(OBJECT)
            .map_err(|source| {
                let hint = permission_hint(&source);
                ProbeError::Load {
                    detail: describe(&source),
                    hint,
                }
            })?;
        Ok(Self {
            ebpf,
            btf: Some(btf),
            write: OnDemand::new(&WRITE_PROGRAMS),
            // Never attached when this kernel has no usable sched_switch (see attach_all).
            scheduler: OnDemand::new(
                features
                    .scheduler_programs()
                    .unwrap_or(&names::SCHEDULER_PROGRAMS),
            ),
            features,
            detectors: Vec::new(),
            fork_stacks: Err("the probes are not attached yet".into()),
        })
    }

    /// Verifies one program, not yet attached.
    fn load_program(&mut self, (program, at): Program) -> Result<(), ProbeError> {
        let btf = self.btf.as_ref().ok_or(ProbeError::BtfReleased)?;
        let loaded = match at {
            AttachPoint::TpBtf(tracepoint) => {
                tp_btf(&mut self.ebpf, program)?.load(tracepoint, btf)
            }
            AttachPoint::FEntry(function) => fentry(&mut self.ebpf, program)?.load(function, btf),
        };
        loaded.map_err(|e| program_error(program, "load (verifier)", e))
    }

    /// Verifies and attaches one program. Its link lives as long as the program: dropping the
    /// probes detaches it.
    fn attach(&mut self, (program, at): Program) -> Result<(), ProbeError> {
        self.load_program((program, at))?;
        let attached = match at {
            AttachPoint::TpBtf(_) => tp_btf(&mut self.ebpf, program)?.attach().map(drop),
            AttachPoint::FEntry(_) => fentry(&mut self.ebpf, program)?.attach().map(drop),
        };
        attached.map_err(|e| program_error(program, "attach", e))?;
        tracing::debug!(program, %at, "attached");
        Ok(())
    }

    /// Attaches every always-on program this kernel supports and verifies the on-demand ones
    /// (the write probe, the scheduler probes); then the kernel's parsed BTF is released. Only
    /// the lifecycle programs are essential: any other detector this kernel refuses is left
    /// out, with a warning naming it and why (see [`Probes::detectors`]).
    pub fn attach_all(&mut self) -> Result<(), ProbeError> {
        let lifecycle = self.attach_lifecycle()?;
        let mut statuses = vec![DetectorStatus {
            detector: Detector::Lifecycle,
            state: Ok(lifecycle),
        }];
        let inherited_lock = self.verify_scheduler_probes();
        if inherited_lock.is_err() {
            self.scheduler.disable();
        }
        statuses.push(status(Detector::InheritedLock, inherited_lock));
        let sockets = self.attach_sockets();
        statuses.push(status(Detector::SharedSocket, sockets));
        let write = self.verify_write_probe().map(|()| {
            format!(
                "{} (attached while a fork family has a child without exec)",
                AttachPoint::TpBtf(names::WRITE_PROGRAM.1)
            )
        });
        if write.is_err() {
            self.write.disable();
        }
        statuses.push(status(Detector::SharedFileOffset, write));
        for unavailable in statuses.iter().filter(|s| !s.active()) {
            if let Err(why) = &unavailable.state {
                tracing::warn!(
                    detector = unavailable.detector.name(),
                    "detector unavailable on this kernel, the others run: {why}"
                );
            }
        }
        self.detectors = statuses;
        self.btf = None;
        Ok(())
    }

    /// Verifies the scheduler probes that fit this kernel's sched_switch, for the status line.
    fn verify_scheduler_probes(&mut self) -> Result<String, String> {
        let [wakeup, switch] = *self.features.scheduler_programs()?;
        let scheduler = [
            (wakeup, AttachPoint::TpBtf(wakeup)),
            (switch, AttachPoint::TpBtf(names::SWITCH_TRACEPOINT)),
        ];
        for program in scheduler {
            self.load_program(program).map_err(|e| e.to_string())?;
        }
        Ok(format!(
            "{} (via {switch}; attached while something is tracked)",
            detectors::describe(&scheduler)
        ))
    }

    /// Fork, exec and the exit program that fits this kernel's tracepoint: without them there
    /// is nothing to watch, so any failure is the daemon's.
    fn attach_lifecycle(&mut self) -> Result<String, ProbeError> {
        let exit = self
            .features
            .exit_program()
            .map_err(|detail| ProbeError::Unsupported {
                what: "the process exit tracepoint",
                detail,
            })?;
        let mut programs: Vec<Program> = names::LIFECYCLE_PROGRAMS
            .iter()
            .map(|&(program, tracepoint)| (program, AttachPoint::TpBtf(tracepoint)))
            .collect();
        programs.push(exit);
        // The fork program that also captures fork stacks, where this kernel accepts it
        // (bpf_task_pt_regs); the plain one otherwise, and fork stacks are unavailable.
        let (fork, fork_tracepoint) = names::LIFECYCLE_PROGRAMS[0];
        let with_stacks = (
            names::FORK_STACK_PROGRAM,
            AttachPoint::TpBtf(fork_tracepoint),
        );
        self.fork_stacks = self.attach(with_stacks).map_err(|err| {
            format!(
                "this kernel refused the fork program that reads the forking thread's                  registers (bpf_task_pt_regs, Linux 5.15): {err}"
            )
        });
        if let Err(why) = &self.fork_stacks {
            tracing::warn!("fork stacks unavailable, forks are still watched: {why}");
        }
        let mut via = exit.0.to_string();
        for &program in &programs {
            if program.0 == fork && self.fork_stacks.is_ok() {
                via = format!("{}, {}", names::FORK_STACK_PROGRAM, exit.0);
                continue;
            }
            self.attach(program)?;
        }
        let stacks = if self.fork_stacks.is_ok() {
            ""
        } else {
            "; no fork stacks: the kernel refused bpf_task_pt_regs (Linux 5.15)"
        };
        Ok(format!(
            "{} (via {via}){stacks}",
            detectors::describe(&programs)
        ))
    }

    /// Whether forks of multithreaded processes come with the forking thread's stack; if not,
    /// why (the kernel refused the program that captures it).
    pub fn fork_stacks(&self) -> Result<(), &str> {
        self.fork_stacks
            .as_ref()
            .map(|_| ())
            .map_err(String::as_str)
    }

    /// The cheapest way to watch socket I/O that this kernel accepts; why none, otherwise.
    fn attach_sockets(&mut self) -> Result<String, String> {
        let mut refused = Vec::new();
        for programs in self.features.socket_programs()? {
            match programs.iter().try_for_each(|&p| self.attach(p)) {
                Ok(()) => return Ok(detectors::describe(programs)),
                Err(err) => {
                    // A half-attached way would report sends twice beside the next one.
                    self.unload(programs);
                    refused.push(err.to_string());
                }
            }
        }
        Err(format!(
            "this kernel refused every way to watch socket I/O: {}",
            refused.join("; ")
        ))
    }

    /// Detaches and unloads `programs` (those that were loaded; the others are left as they are).
    fn unload(&mut self, programs: &[Program]) {
        for &(program, at) in programs {
            let unloaded = match at {
                AttachPoint::TpBtf(_) => tp_btf(&mut self.ebpf, program).map(|p| p.unload()),
                AttachPoint::FEntry(_) => fentry(&mut self.ebpf, program).map(|p| p.unload()),
            };
            // Not loaded (the way failed before it): nothing to undo.
            if let Ok(Err(err)) = unloaded {
                tracing::debug!(program, %err, "unload");
            }
        }
    }

    /// Each detector's state on this kernel (after `attach_all`).
    pub fn detectors(&self) -> &[DetectorStatus] {
        &self.detectors
    }

    /// Attaches or detaches the scheduler probes (sched_switch, sched_wakeup), which find the
    /// futex waits of tracked processes. They run on every context switch and wakeup on the
    /// host, so they are attached only while something is tracked; the caller finds the waits
    /// that began before they were attached in /proc.
    ///
    /// sched_wakeup is attached first and detached last, so that no entry sched_switch adds can
    /// miss the wakeup that removes it; without sched_wakeup every wait would look endless.
    pub fn set_scheduler_probes(&mut self, attached: bool) -> Result<(), ProbeError> {
        self.scheduler.set(&mut self.ebpf, attached)
    }

    pub fn scheduler_probes_attached(&self) -> bool {
        self.scheduler.attached()
    }

    /// Verifies (loads, without attaching) the on-demand write probe.
    fn verify_write_probe(&mut self) -> Result<(), ProbeError> {
        let (program, tracepoint) = names::WRITE_PROGRAM;
        self.load_program((program, AttachPoint::TpBtf(tracepoint)))
    }

    /// Attaches or detaches the write probe (tp_btf sys_enter). While attached every syscall on
    /// the host takes the tracing slow path, so it is attached only while a fork family has a
    /// child that has gone without exec for the grace window.
    pub fn set_write_probe(&mut self, attached: bool) -> Result<(), ProbeError> {
        self.write.set(&mut self.ebpf, attached)
    }

    /// (program, times run, total run time) of every loaded program, from the kernel's program
    /// info. The kernel counts only while BPF run-time statistics are enabled (`--bpf-stats`
    /// or `sysctl kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> Vec<(String, u64, std::time::Duration)> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_owned(), info.run_count(), info.run_time()))
            })
            .collect()
    }

    pub fn write_probe_attached(&self) -> bool {
        self.write.attached()
    }

    /// Children in fork families that have not exec'd (pid → joined, boot ns). Can be taken once.
    pub fn take_children(&mut self) -> Result<BpfHashMap<MapData, u32, u64>, ProbeError> {
        self.take_map(names::CHILDREN)
    }

    /// Fork families (pid → the family's root pid) with their filter, for seeding at start.
    /// Can be taken once.
    pub fn take_family(&mut self) -> Result<Members<u32>, ProbeError> {
        Ok(Members::new(
            self.take_map(names::FAMILY)?,
            self.take_map(names::FAMILY_SLOTS)?,
        ))
    }

    /// A map of the object as its typed view. Each can be taken once.
    fn take_map<T>(&mut self, name: &'static str) -> Result<T, ProbeError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ProbeError::MissingMap(name))?;
        T::try_from(map).map_err(|error| ProbeError::Map { name, error })
    }

    /// The ring buffer the programs write events to. Can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take_map(names::EVENTS)
    }

    /// The map of tracked children (pid → start time) with its filter, for seeding at start.
    /// Can be taken once.
    pub fn take_tracked(&mut self) -> Result<Members<u64>, ProbeError> {
        Ok(Members::new(
            self.take_map(names::TRACKED)?,
            self.take_map(names::TRACKED_SLOTS)?,
        ))
    }

    /// The map of tracked threads asleep in a futex wait. Can be taken once.
    pub fn take_blocked(
        &mut self,
    ) -> Result<BpfHashMap<MapData, u32, monitor_common::BlockedWait>, ProbeError> {
        self.take_map(names::BLOCKED)
    }

    /// The in-kernel counters (forks by kind, lost events). Can be taken once.
    pub fn take_counters(&mut self) -> Result<KernelCounters, ProbeError> {
        Ok(KernelCounters {
            forks: self.take_map(names::FORK_COUNTERS)?,
            lost: self.take_map(names::LOST_EVENTS)?,
            full: self.take_map(names::MAP_FULL)?,
        })
    }
}

/// The ring-buffer fill from which a record wakes the daemon at once: an eighth of the ring.
/// Below it the pipeline's drain tick collects records (see `pipeline::DRAIN_INTERVAL`); above
/// it the daemon is woken with seven eighths of the ring still free.
fn wakeup_bytes(ring_buffer_bytes: u32) -> u64 {
    u64::from(ring_buffer_bytes) / 8
}

/// Set to 1, the daemon uses the programs for older tracepoint prototypes on any kernel (see
/// `KernelFeatures::with_older_tracepoints`): how the tests prove them where no older kernel is
/// at hand.
pub const OLDER_TRACEPOINTS_VAR: &str = "FORKWATCH_TEST_OLDER_TRACEPOINTS";

/// The write probe as an on-demand group of one.
const WRITE_PROGRAMS: [&str; 1] = [names::WRITE_PROGRAM.0];

/// A tp_btf program of the object, by name.
pub(super) fn tp_btf<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut BtfTracePoint, ProbeError> {
    ebpf.program_mut(program)
        .ok_or(ProgramError::NotLoaded)
        .map_err(|e| program_error(program, "be found in the object", e))?
        .try_into()
        .map_err(|e| program_error(program, "be a tp_btf program", e))
}

/// An fentry program of the object, by name.
fn fentry<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut FEntry, ProbeError> {
    ebpf.program_mut(program)
        .ok_or(ProgramError::NotLoaded)
        .map_err(|e| program_error(program, "be found in the object", e))?
        .try_into()
        .map_err(|e| program_error(program, "be an fentry program", e))
}

/// A detector's state from what its programs' loading returned.
fn status<E: std::fmt::Display>(detector: Detector, state: Result<String, E>) -> DetectorStatus {
    DetectorStatus {
        detector,
        state: state.map_err(|e| e.to_string()),
    }
}

fn parse_btf(raw: &[u8], path: &Path) -> Result<Btf, ProbeError> {
    Btf::parse(raw, Endianness::default()).map_err(|error| ProbeError::Btf {
        path: path.display().to_string(),
        detail: describe(&error),
    })
}

/// Turns on the kernel's BPF run-time statistics for as long as the returned fd lives (they
/// cost a little on every program run, so they are off by default).
pub fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd, aya::sys::SyscallError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memory cgroups and
/// ignore it, so there it is left alone (raising it needs CAP_SYS_RESOURCE, which a container's
/// or a capability-only forkwatch lacks: the warning would be noise at every start). Where it
/// counts and raising it is refused: warn with the fix and go on, loading says if it matters.
fn raise_memlock_limit() {
    let memcg_accounted = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 11, 0));
    if memcg_accounted {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::warn!(
            err = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK, which this kernel (before 5.11) charges BPF maps \
             to: loading may fail; grant CAP_SYS_RESOURCE or raise the limit beforehand \
             (LimitMEMLOCK=infinity in a systemd unit, `ulimit -l unlimited` in a shell)"
        );
    }
}
