//! The process's effective capabilities, to tell a missing privilege from any other refusal.

/// Linux capability numbers (linux/capability.h).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set (CapEff of /proc/self/status).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Whether the process may load and attach tracing programs: CAP_BPF and CAP_PERFMON, or
/// CAP_SYS_ADMIN (which kernels before 5.8 need). None if that cannot be read.
pub fn may_trace() -> Option<bool> {
    let caps = effective()?;
    let has = |cap: u32| caps & (1 << cap) != 0;
    Some((has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN))
}
