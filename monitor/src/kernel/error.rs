//! Why the probes could not be loaded or attached, in words that say what to do about it.

use aya::programs::ProgramError;

use super::btf_offsets::OffsetError;

const NO_PRIVILEGE_HINT: &str = "run forkwatch as root, or with CAP_BPF, CAP_PERFMON, \
     CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH; `forkwatch check` lists what is missing";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    // Causes are kept as text rendered by `describe`: aya's errors repeat themselves down their
    // source chains, and a chain printed with {:#} would repeat them again.
    #[error("cannot parse kernel BTF at {path}: {detail}")]
    Btf { path: String, detail: String },
    #[error("loading the eBPF object failed: {detail}{hint}")]
    Load { detail: String, hint: String },
    #[error("eBPF program {program} failed to {stage}: {detail}{hint}")]
    Program {
        program: &'static str,
        stage: &'static str,
        detail: String,
        hint: String,
    },
    #[error("programs can no longer be verified: the kernel BTF was released after attach_all")]
    BtfReleased,
    #[error("eBPF map {0} is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("eBPF map {name} has an unexpected type: {error}")]
    Map {
        name: &'static str,
        error: aya::maps::MapError,
    },
}

/// An error and its causes on one line, each part once: aya's errors often repeat their cause
/// in their own message.
pub(super) fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// A hint for errors that mean "not allowed", empty otherwise.
pub(super) fn permission_hint(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    let denied = [
        "Operation not permitted",
        "Permission denied",
        "EPERM",
        "EACCES",
    ];
    if denied.iter().any(|d| text.contains(d)) {
        format!(" ({NO_PRIVILEGE_HINT})")
    } else {
        String::new()
    }
}

pub(super) fn program_error(
    program: &'static str,
    stage: &'static str,
    source: ProgramError,
) -> ProbeError {
    ProbeError::Program {
        program,
        stage,
        hint: permission_hint(&source),
        detail: describe(&source),
    }
}
