//! Why the probes could not be loaded or attached, in words that say what to do about it.

use aya::programs::ProgramError;

use super::{btf_offsets::OffsetError, capabilities};

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
    #[error("this kernel does not support {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
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

/// A hint for a refusal that a missing capability explains, empty otherwise: the same errno
/// (EPERM, EACCES) also means "this kernel does not allow it" (lockdown, an attach type the
/// kernel lacks), and then the hint would send the reader the wrong way.
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
    if !denied.iter().any(|d| text.contains(d)) {
        return String::new();
    }
    match capabilities::may_trace() {
        Some(true) => " (forkwatch has CAP_BPF and CAP_PERFMON: the kernel itself refuses this, \
                       e.g. lockdown or an attach type this kernel or its configuration lacks)"
            .to_owned(),
        _ => format!(" ({NO_PRIVILEGE_HINT})"),
    }
}

/// How many of the verifier's last lines an error shows: its verdict, and what led to it.
const VERIFIER_LINES: usize = 4;

pub(super) fn program_error(
    program: &'static str,
    stage: &'static str,
    source: ProgramError,
) -> ProbeError {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &source
    {
        let log = format!("{verifier_log:?}");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        if !lines.is_empty() {
            // The verifier said why: a rejection of this program, not a privilege problem.
            let last = &lines[lines.len().saturating_sub(VERIFIER_LINES)..];
            return ProbeError::Program {
                program,
                stage,
                detail: format!(
                    "this kernel's verifier rejected it ({io_error}); its last lines: {}",
                    last.join(" | ")
                ),
                hint: String::new(),
            };
        }
    }
    ProbeError::Program {
        program,
        stage,
        hint: permission_hint(&source),
        detail: describe(&source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32, log: &str) -> ProgramError {
        ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
        }
    }

    #[test]
    fn a_verifier_rejection_shows_the_verifier_not_a_privilege_hint() {
        let log = "0: R1=ctx() R10=fp0\n; let group_dead: u64 = ctx.arg(1);\n\
                   func 'sched_process_exit' doesn't have 2-th argument\n\
                   invalid bpf_context access off=8 size=8\n\
                   processed 2 insns (limit 1000000)\n";
        let err = program_error("sched_process_exit", "load (verifier)", load_error(13, log));
        let text = err.to_string();
        assert!(text.contains("sched_process_exit"), "{text}");
        assert!(text.contains("verifier rejected it"), "{text}");
        assert!(text.contains("doesn't have 2-th argument"), "{text}");
        assert!(text.contains("invalid bpf_context access"), "{text}");
        assert!(!text.contains("R10=fp0"), "only the last lines: {text}");
        assert!(!text.contains("CAP_BPF"), "no privilege hint: {text}");
    }

    #[test]
    fn a_refusal_without_a_log_blames_privileges_only_when_they_are_missing() {
        let err = program_error("socket_sendmsg_entry", "load (verifier)", load_error(1, ""));
        let text = err.to_string();
        match capabilities::may_trace() {
            // As root (CI): the kernel itself refused, e.g. fentry where it is not allowed.
            Some(true) => {
                assert!(text.contains("the kernel itself refuses"), "{text}");
                assert!(!text.contains(NO_PRIVILEGE_HINT), "{text}");
            }
            _ => assert!(text.contains(NO_PRIVILEGE_HINT), "{text}"),
        }
    }
}
