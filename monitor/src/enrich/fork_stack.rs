//! `fork_stack`: the forking thread's call stack at the fork, on the findings about that fork's
//! child. The kernel copies the thread's registers and the top of its stack at the fork (once per
//! thread and call site per second); pipeline/fork_stacks.rs unwinds each copy once, on a thread
//! of its own, and hands every fork a [`ForkStackRef`] to the result. This file holds what a
//! finding makes of it: the frames, the fork site (what findings are folded by and what the text
//! view shows), or why there are none.

use std::sync::{Arc, OnceLock};

use crate::enrich::stack::{self, Frame};

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

/// A fork's stack: none (and why), or the slot its unwinding fills.
#[derive(Clone, Debug)]
pub enum ForkStackRef {
    Unavailable(&'static str),
    Unwinding(Arc<OnceLock<Unwound>>),
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
            Self::Unwinding(slot) => slot.get().cloned(),
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

/// Where the fork was called: the first [`SITE_FRAMES`] frames outside the C library (its
/// `fork`, `_Fork` and `__libc_fork` wrappers, whatever they are called in this glibc), e.g.
/// "start_worker_process ← main", or CPython's "os_fork_impl ← os_fork". None when no frame
/// outside the C library was unwound.
pub fn fork_site(frames: &[Frame]) -> Option<String> {
    let outside: Vec<Frame> = frames
        .iter()
        .skip_while(|f| f.module.as_deref().is_some_and(is_c_library))
        .take(SITE_FRAMES)
        .cloned()
        .collect();
    (!outside.is_empty()).then(|| stack::format_stack(&outside))
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
        // Only the C library was unwound: no site to tell.
        assert_eq!(fork_site(&frames[..2]), None);
        assert_eq!(fork_site(&[]), None);
    }

    #[test]
    fn a_stack_still_unwinding_reads_as_timed_out_until_it_is_done() {
        let slot = Arc::new(OnceLock::new());
        let stack = ForkStackRef::Unwinding(slot.clone());
        assert_eq!(stack.outcome(), None);
        assert_eq!(
            stack.details().fork_stack_unavailable_reason,
            Some(reason::TIMED_OUT)
        );
        let _ = slot.set(Ok(Arc::new(vec![
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
