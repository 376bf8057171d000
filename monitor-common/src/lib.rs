//! What the eBPF programs (`monitor-ebpf`) and the daemon (`forkwatch`) must agree on, defined
//! once for both:
//!
//! - [`wire`]: the byte-for-byte contract: ring-buffer records, map keys and values, the offsets
//!   global, counter indices, map sizes (all re-exported here, e.g. `monitor_common::ForkEvent`);
//! - [`linux`]: the Linux ABI values both sides compare against (`AF_*`, `SOCK_*`, `TCP_*`,
//!   x86_64 syscall numbers, futex ops, task states);
//! - [`names`]: the names the daemon looks maps, programs and globals up by, and the event
//!   category names it exports.
#![no_std]

pub mod linux;
pub mod names;
pub mod wire;

pub use linux::{futex, syscall};
pub use names::{OFFSETS_GLOBAL, TREE_ROOT_GLOBAL, WAKEUP_GLOBAL};
pub use wire::*;
