//! What each detector needs from the kernel, and which attach points of the running kernel
//! provide it. Decided at load time from the kernel's BTF (does a tracepoint exist, how many
//! arguments does its prototype pass, does a function exist), never from the version number:
//! distributions backport, and configs differ.
//!
//! Only the lifecycle programs (fork, exec, exit) are essential: without them nothing is known.
//! Any other detector whose programs this kernel refuses is reported unavailable, with the
//! reason, and the rest runs.

use monitor_common::names;

use super::btf_raw::RawBtf;

/// What forkwatch can tell, each from its own kernel programs. The names are the label values
/// of `forkwatch_detector_active` and the rows of `forkwatch check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detector {
    /// Forks, execs and exits: `mt_fork_no_exec` and `threads_after_mt_fork`.
    Lifecycle,
    /// Futex waits of tracked processes (sched_switch, sched_wakeup): `inherited_lock_deadlock`,
    /// `possible_inherited_lock_wait`.
    InheritedLock,
    /// Socket I/O of fork family members: `shared_socket`, `shared_datagram_socket`.
    SharedSocket,
    /// Writes of fork family members (the on-demand write probe): `shared_file_offset`.
    SharedFileOffset,
}

impl Detector {
    pub const ALL: [Detector; 4] = [
        Detector::Lifecycle,
        Detector::InheritedLock,
        Detector::SharedSocket,
        Detector::SharedFileOffset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Lifecycle => "lifecycle",
            Detector::InheritedLock => "inherited_lock",
            Detector::SharedSocket => "shared_socket",
            Detector::SharedFileOffset => "shared_file_offset",
        }
    }
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// A BTF-typed tracepoint (tp_btf): the cheapest.
    TpBtf(&'static str),
    /// A BPF trampoline on entry to a kernel function.
    FEntry(&'static str),
}

impl AttachPoint {
    /// Whether this kernel's BTF has the attach point.
    fn exists(self, btf: &RawBtf) -> bool {
        match self {
            AttachPoint::TpBtf(tracepoint) => btf.tracepoint_args(tracepoint).is_some(),
            AttachPoint::FEntry(function) => btf.has_function(function),
        }
    }
}

impl std::fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachPoint::TpBtf(tracepoint) => write!(f, "tp_btf/{tracepoint}"),
            AttachPoint::FEntry(function) => write!(f, "fentry/{function}"),
        }
    }
}

/// A program of the object and where it attaches.
pub type Program = (&'static str, AttachPoint);

/// What this kernel offers the detectors, read from its BTF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFeatures {
    /// Arguments of the sched_process_exit tracepoint: 2 (the task and group_dead) on kernels
    /// that pass group_dead, 1 before.
    pub exit_args: Option<usize>,
    /// Arguments of the sched_switch tracepoint: 4 (with `prev_state`) since 5.18, 3 before.
    pub switch_args: Option<usize>,
    /// The sock:sock_send_length and sock:sock_recv_length tracepoints.
    pub sock_length_tracepoints: bool,
    /// The LSM socket hooks the fentry fallback attaches to.
    pub socket_hooks: bool,
}

/// The socket tracepoints: after data moved, with its length. Linux 6.3 added them.
pub const SOCKET_TRACEPOINTS: [Program; 2] = [
    (
        names::SOCKET_TRACEPOINT_PROGRAMS[0].0,
        AttachPoint::TpBtf(names::SOCKET_TRACEPOINT_PROGRAMS[0].1),
    ),
    (
        names::SOCKET_TRACEPOINT_PROGRAMS[1].0,
        AttachPoint::TpBtf(names::SOCKET_TRACEPOINT_PROGRAMS[1].1),
    ),
];

/// The socket fallback: fentry on the LSM hooks every send and receive calls.
pub const SOCKET_HOOKS: [Program; 2] = [
    (
        names::SOCKET_HOOK_PROGRAMS[0].0,
        AttachPoint::FEntry(names::SOCKET_HOOK_PROGRAMS[0].1),
    ),
    (
        names::SOCKET_HOOK_PROGRAMS[1].0,
        AttachPoint::FEntry(names::SOCKET_HOOK_PROGRAMS[1].1),
    ),
];

impl KernelFeatures {
    pub fn from_btf(btf: &RawBtf) -> Self {
        Self {
            exit_args: btf.tracepoint_args(names::EXIT_TRACEPOINT),
            switch_args: btf.tracepoint_args(names::SWITCH_TRACEPOINT),
            sock_length_tracepoints: SOCKET_TRACEPOINTS.iter().all(|(_, at)| at.exists(btf)),
            socket_hooks: SOCKET_HOOKS.iter().all(|(_, at)| at.exists(btf)),
        }
    }

    /// The exit program this kernel's tracepoint fits: the one that reads group_dead where the
    /// tracepoint passes it, else the one that reads the task's signal->live.
    pub fn exit_program(&self) -> Result<Program, String> {
        let at = AttachPoint::TpBtf(names::EXIT_TRACEPOINT);
        match self.exit_args {
            Some(args) if args >= 2 => Ok((names::EXIT_PROGRAM, at)),
            Some(1) => Ok((names::EXIT_PROGRAM_LIVE, at)),
            Some(args) => Err(format!(
                "sched_process_exit passes {args} arguments; forkwatch needs the task"
            )),
            None => Err("this kernel has no sched_process_exit tracepoint in its BTF".into()),
        }
    }

    /// The programs for the older prototypes (sched_process_exit without group_dead,
    /// sched_switch without prev_state) even where this kernel passes the newer ones: to test
    /// those programs on newer kernels (`FORKWATCH_TEST_OLDER_TRACEPOINTS`).
    pub fn with_older_tracepoints(self) -> Self {
        Self {
            exit_args: self.exit_args.map(|args| args.min(1)),
            switch_args: self.switch_args.map(|args| args.min(3)),
            ..self
        }
    }

    /// The scheduler probes this kernel's sched_switch fits, in attach order: the switch
    /// program that reads `prev_state` where the tracepoint passes it, else the one that reads
    /// the task's own state.
    pub fn scheduler_programs(&self) -> Result<&'static [&'static str; 2], String> {
        match self.switch_args {
            Some(args) if args >= 4 => Ok(&names::SCHEDULER_PROGRAMS),
            Some(3) => Ok(&names::SCHEDULER_PROGRAMS_TASK_STATE),
            Some(args) => Err(format!(
                "sched_switch passes {args} arguments; forkwatch needs preempt, prev and next"
            )),
            None => Err("this kernel has no sched_switch tracepoint in its BTF".into()),
        }
    }

    /// The ways to watch socket I/O on this kernel, cheapest first, or why there is none.
    pub fn socket_programs(&self) -> Result<Vec<&'static [Program]>, String> {
        let mut ways: Vec<&'static [Program]> = Vec::new();
        if self.sock_length_tracepoints {
            ways.push(&SOCKET_TRACEPOINTS);
        }
        if self.socket_hooks {
            ways.push(&SOCKET_HOOKS);
        }
        if ways.is_empty() {
            return Err(
                "needs the sock:sock_send_length and sock_recv_length tracepoints (Linux 6.3) \
                 or the security_socket_sendmsg/recvmsg hooks (CONFIG_SECURITY_NETWORK) for \
                 fentry"
                    .into(),
            );
        }
        Ok(ways)
    }
}

/// A detector's state on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectorStatus {
    pub detector: Detector,
    /// Ok: how it watches (its attach points); Err: why it cannot, and what would fix it.
    pub state: Result<String, String>,
}

impl DetectorStatus {
    pub fn active(&self) -> bool {
        self.state.is_ok()
    }
}

/// The attach points of `programs`, for a status line.
pub fn describe(programs: &[Program]) -> String {
    programs
        .iter()
        .map(|(_, at)| at.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_program_by_argument_count() {
        let with = |args| KernelFeatures {
            exit_args: args,
            ..Default::default()
        };
        assert_eq!(
            with(Some(2)).exit_program().unwrap().0,
            "sched_process_exit"
        );
        assert_eq!(
            with(Some(1)).exit_program().unwrap().0,
            "sched_process_exit_live"
        );
        assert!(with(None).exit_program().is_err());
        assert!(with(Some(0)).exit_program().is_err());
    }

    #[test]
    fn scheduler_programs_by_argument_count() {
        let with = |args| KernelFeatures {
            switch_args: args,
            ..Default::default()
        };
        assert_eq!(
            with(Some(4)).scheduler_programs().unwrap()[1],
            "sched_switch"
        );
        assert_eq!(
            with(Some(3)).scheduler_programs().unwrap()[1],
            "sched_switch_task_state"
        );
        // sched_wakeup first in both: see names::SCHEDULER_PROGRAMS.
        assert_eq!(
            with(Some(3)).scheduler_programs().unwrap()[0],
            "sched_wakeup"
        );
        assert!(with(None).scheduler_programs().is_err());
        assert!(with(Some(2)).scheduler_programs().is_err());
    }

    #[test]
    fn older_tracepoints_only_lower_what_the_kernel_passes() {
        let newest = KernelFeatures {
            exit_args: Some(2),
            switch_args: Some(4),
            ..Default::default()
        }
        .with_older_tracepoints();
        assert_eq!(newest.exit_program().unwrap().0, "sched_process_exit_live");
        assert_eq!(
            newest.scheduler_programs().unwrap()[1],
            "sched_switch_task_state"
        );
        let missing = KernelFeatures::default().with_older_tracepoints();
        assert_eq!(missing.switch_args, None);
        assert_eq!(missing.exit_args, None);
    }

    #[test]
    fn socket_programs_cheapest_first() {
        let both = KernelFeatures {
            sock_length_tracepoints: true,
            socket_hooks: true,
            ..Default::default()
        };
        let ways = both.socket_programs().unwrap();
        assert_eq!(ways[0][0].0, "sock_send_length");
        assert_eq!(ways[1][0].0, "socket_sendmsg_entry");
        let hooks_only = KernelFeatures {
            socket_hooks: true,
            ..Default::default()
        };
        assert_eq!(hooks_only.socket_programs().unwrap().len(), 1);
        let none = KernelFeatures::default().socket_programs().unwrap_err();
        assert!(none.contains("Linux 6.3"), "{none}");
    }
}
