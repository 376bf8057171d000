//! `fork_stack`: the forking thread's call stack at the fork, on the findings about that fork's
//! child. The kernel copies the thread's registers and the top of its stack at the fork (once per
//! thread and call site per second); pipeline/fork_stacks.rs keeps each copy in a [`Slot`] and
//! hands every fork a [`ForkStackRef`] to it, and unwinds a copy (once, on a thread of its own)
//! only when a finding needs it: most forks of multithreaded programs exec at once, and their
//! stacks are never unwound. This file holds what a finding makes of it: the frames, the fork
//! site (what findings are folded by and what the text view shows), or why there are none.

use std::sync::{Arc, Mutex, OnceLock};

use crate::enrich::stack::{self, CapturedStack, Frame};

/// Why a finding has no `fork_stack` (`fork_stack_unavailable_reason`; docs/findings.md).
pub mod reason {
    /// The kernel refused the fork program that reads the forking thread's registers
    /// (bpf_task_pt_regs: Linux 5.15).
    pub const KERNEL_UNSUPPORTED: &str = "kernel_unsupported";
    /// The child was found in /proc when the daemon started: its fork was not seen.
    pub const FORK_NOT_SEEN: &str = "fork_not_seen";
    /// The kernel could not read the forking thread's user registers.
    pub const NO_REGISTERS: &str = "registers_unreadable";
    /// The copy of the stack never reached the daemon (the ring buffer was full).
    pub const RECORD_LOST: &str = "stack_record_lost";
    /// The kernel sent no copy: the forking thread had sent FORK_STACK_BURST copies (from as
    /// many call sites) within FORK_STACK_BURST_NS already.
    pub const SKIPPED: &str = "stack_rate_limited";
    /// The parent had exited (or its pid was reused) before its mappings were read.
    pub const PARENT_EXITED: &str = "parent_exited";
    /// Too many stacks were waiting to be unwound.
    pub const BUSY: &str = "unwinder_busy";
    /// Unwinding did not finish within its budget.
    pub const TIMED_OUT: &str = "unwind_timed_out";
    /// No frame could be unwound (no readable module covers the fork's instruction pointer).
    pub const FAILED: &str = "unwind_failed";
}

/// What became of one captured stack: its frames, or why there are none. Set once, by the
/// unwinder thread (or at once, for a stack that cannot be unwound).
pub type Unwound = Result<Arc<Vec<Frame>>, &'static str>;

/// A copy of a stack to unwind: the process it is in, its mappings as read when the copy
/// arrived, and the copy.
#[derive(Debug)]
pub struct Captured {
    pub pid: u32,
    pub maps: String,
    pub stack: CapturedStack,
}

/// One captured stack: what became of it, and, until a finding needs it, the copy to unwind.
#[derive(Debug, Default)]
pub struct Slot {
    outcome: OnceLock<Unwound>,
    pending: Mutex<Option<Captured>>,
}

impl Slot {
    /// A copy waiting for a finding to need it.
    pub fn waiting(captured: Captured) -> Self {
        Self {
            outcome: OnceLock::new(),
            pending: Mutex::new(Some(captured)),
        }
    }

    /// A stack whose outcome is known already (e.g. its parent had gone).
    pub fn settled(outcome: Unwound) -> Self {
        let slot = Self::default();
        slot.set(outcome);
        slot
    }

    /// Records the outcome (the first one set stays).
    pub fn set(&self, outcome: Unwound) {
        let _ = self.outcome.set(outcome);
    }

    /// The outcome, or None while the stack is not unwound yet.
    pub fn outcome(&self) -> Option<Unwound> {
        self.outcome.get().cloned()
    }

    /// The copy, for whoever unwinds it: once (later callers get None).
    pub fn take_pending(&self) -> Option<Captured> {
        self.pending.lock().ok()?.take()
    }
}

/// A fork's stack: none (and why), or the slot of its copy.
#[derive(Clone, Debug)]
pub enum ForkStackRef {
    Unavailable(&'static str),
    Unwinding(Arc<Slot>),
}

impl Default for ForkStackRef {
    fn default() -> Self {
        Self::Unavailable(reason::FORK_NOT_SEEN)
    }
}

impl PartialEq for ForkStackRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Unavailable(a), Self::Unavailable(b)) => a == b,
            (Self::Unwinding(a), Self::Unwinding(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for ForkStackRef {}

impl ForkStackRef {
    /// The outcome, or None while the stack is still being unwound.
    pub fn outcome(&self) -> Option<Unwound> {
        match self {
            Self::Unavailable(why) => Some(Err(why)),
            Self::Unwinding(slot) => slot.outcome(),
        }
    }

    /// The finding's fields as they stand: the frames, or why not. While the stack is still
    /// being unwound this says it timed out; the pipeline holds such a finding back until it is
    /// done or its budget is spent, and then fills the fields in again.
    pub fn details(&self) -> crate::report::finding::ForkStackDetails {
        details(self.outcome().unwrap_or(Err(reason::TIMED_OUT)))
    }
}

/// The finding's fields for an outcome.
pub fn details(outcome: Unwound) -> crate::report::finding::ForkStackDetails {
    match outcome {
        Ok(frames) => crate::report::finding::ForkStackDetails {
            fork_site: fork_site(&frames),
            fork_stack: Some(frames.as_ref().clone()),
            fork_stack_unavailable_reason: None,
        },
        Err(why) => crate::report::finding::ForkStackDetails {
            fork_site: None,
            fork_stack: None,
            fork_stack_unavailable_reason: Some(why),
        },
    }
}

/// Frames of the fork site: enough to tell two call sites of one program apart, few enough for
/// a line of text.
const SITE_FRAMES: usize = 2;

/// Where the fork was called: the first [`SITE_FRAMES`] frames outside the C library's fork
/// wrappers (any frame of a shared C library, and in a static executable the wrappers by
/// name), e.g. "start_worker_process ← main", or CPython's "os_fork ← cfunction_vectorcall_NOARGS".
/// None when no frame outside them was unwound.
pub fn fork_site(frames: &[Frame]) -> Option<String> {
    let outside: Vec<Frame> = frames
        .iter()
        .skip_while(|f| {
            f.module.as_deref().is_some_and(is_c_library)
                || f.function.as_deref().is_some_and(is_fork_wrapper)
        })
        .take(SITE_FRAMES)
        .cloned()
        .collect();
    (!outside.is_empty()).then(|| stack::format_stack(&outside))
}

/// The C libraries' fork entry points (glibc's `fork` is `__libc_fork` and calls `_Fork`,
/// which calls `arch_fork`; musl's `fork` calls `_Fork`), as a static executable names them.
fn is_fork_wrapper(function: &str) -> bool {
    let name = function.trim_start_matches("__GI_");
    matches!(
        name,
        "fork" | "__fork" | "__libc_fork" | "_Fork" | "arch_fork" | "__fork_impl"
    )
}

/// The C library's modules (glibc, musl), whose frames at the top of a fork stack are its fork
/// wrappers.
fn is_c_library(module: &str) -> bool {
    ["libc.so", "libc-", "libpthread", "ld-musl", "ld-linux"]
        .iter()
        .any(|prefix| module.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str) -> Frame {
        Frame {
            address: 1,
            function: Some(function.into()),
            module: Some(module.into()),
            offset: 0,
            file: None,
            line: None,
        }
    }

    #[test]
    fn the_fork_site_skips_the_c_library_wrappers() {
        let frames = [
            frame("_Fork", "libc.so.6"),
            frame("fork", "libc.so.6"),
            frame("start_worker_process", "cache_refresh"),
            frame("main", "cache_refresh"),
            frame("__libc_start_call_main", "libc.so.6"),
        ];
        assert_eq!(
            fork_site(&frames).as_deref(),
            Some("start_worker_process ← main")
        );
        let python = [
            frame("_Fork", "libc.so.6"),
            frame("os_fork_impl", "python3.11"),
            frame("os_fork", "python3.11"),
            frame("_PyEval_EvalFrameDefault", "python3.11"),
        ];
        assert_eq!(
            fork_site(&python).as_deref(),
            Some("os_fork_impl ← os_fork")
        );
        // A static executable: the wrappers are told by name.
        let static_exe = [
            frame("_Fork", "forker"),
            frame("__libc_fork", "forker"),
            frame("main", "forker"),
        ];
        assert_eq!(fork_site(&static_exe).as_deref(), Some("main"));
        // Only the C library was unwound: no site to tell.
        assert_eq!(fork_site(&frames[..2]), None);
        assert_eq!(fork_site(&[]), None);
    }

    #[test]
    fn a_stack_still_unwinding_reads_as_timed_out_until_it_is_done() {
        let slot = Arc::new(Slot::default());
        let stack = ForkStackRef::Unwinding(slot.clone());
        assert_eq!(stack.outcome(), None);
        assert_eq!(
            stack.details().fork_stack_unavailable_reason,
            Some(reason::TIMED_OUT)
        );
        slot.set(Ok(Arc::new(vec![
            frame("fork", "libc.so.6"),
            frame("spawn", "app"),
        ])));
        let details = stack.details();
        assert_eq!(details.fork_site.as_deref(), Some("spawn"));
        assert_eq!(details.fork_stack.map(|f| f.len()), Some(2));
        assert_eq!(details.fork_stack_unavailable_reason, None);
        assert_eq!(
            ForkStackRef::default()
                .details()
                .fork_stack_unavailable_reason,
            Some(reason::FORK_NOT_SEEN)
        );
    }
}
