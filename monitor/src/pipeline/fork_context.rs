//! The parents' fork contexts (executable, argv, thread names: what /proc says about the
//! forking process), read at most once per FORK_CONTEXT_REUSE_NS per forking thread: in a fork
//! storm from one process, reading /proc for every fork would cost more than the fork. The
//! kernel wakes the daemon at once only for the first fork in each such window.

use std::collections::HashMap;

use monitor_common::FORK_CONTEXT_REUSE_NS;

use crate::{
    clock,
    enrich::procfs::{ForkContext, ProcFs},
    wire::event::Fork,
};

/// A forking thread, identified across pid reuse: a parent that exits and whose pid goes to a new
/// process within FORK_CONTEXT_REUSE_NS must not lend it its executable, argv and thread names.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ForkingThread {
    parent: u32,
    parent_start_ns: u64,
    tid: u32,
}

/// Forking thread → (boot ns when read, context).
#[derive(Default)]
pub struct ForkContexts(HashMap<ForkingThread, (u64, ForkContext)>);

impl ForkContexts {
    /// The context of `fork`: from /proc, or from a read of the same forking thread of the same
    /// process (pid and start time) less than FORK_CONTEXT_REUSE_NS old.
    pub fn of(&mut self, proc: &ProcFs, fork: &Fork) -> ForkContext {
        let thread = ForkingThread {
            parent: fork.parent_pid,
            parent_start_ns: fork.parent_start_ns,
            tid: fork.parent_tid,
        };
        if let Some((read_ns, context)) = self.0.get(&thread)
            && fork.timestamp_ns.abs_diff(*read_ns) < FORK_CONTEXT_REUSE_NS
        {
            return context.clone();
        }
        let (context, from_parent) = proc.fork_context_of(fork);
        // A parent already gone (or replaced) was described through its child: not reusable
        // for its siblings.
        if from_parent {
            self.0.insert(thread, (clock::boot_ns(), context.clone()));
        }
        context
    }

    /// Forgets the reads too old to be reused.
    pub fn expire(&mut self, now_ns: u64) {
        self.0
            .retain(|_, (read_ns, _)| now_ns.saturating_sub(*read_ns) < FORK_CONTEXT_REUSE_NS);
    }
}
