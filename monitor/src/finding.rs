//! Findings: what forkwatch reports, serialized as one JSON object per line.
//!
//! The schema is versioned by `schema` and documented in the README. Fields are only ever added
//! within one schema version; a rename or removal bumps it.

use serde::Serialize;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(
    dead_code,
    reason = "the schema's full scale; later finding kinds use every level"
)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    MtForkNoExec,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MtForkNoExec => "mt_fork_no_exec",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            Self::MtForkNoExec => Severity::Warning,
        }
    }
}

/// Fields every finding has.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub schema: u32,
    pub kind: Kind,
    pub severity: Severity,
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    pub pid: u32,
    pub comm: String,
    pub parent_pid: u32,
    pub parent_comm: String,
    /// Executable of the process, when /proc still had it.
    pub exe: Option<String>,
    /// argv[0]; the full command line only with `--full-cmdline` (it may hold secrets).
    pub argv0: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Vec<String>>,
    /// cgroup v2 id of the forking process (its inode number in the cgroup filesystem).
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub details: Details,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Details {
    MtForkNoExec(MtForkNoExecDetails),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MtForkNoExecDetails {
    /// The thread of the parent that called fork: the only thread the child is a copy of.
    pub parent_tid: u32,
    /// Live threads of the parent at the fork (from the kernel, exact).
    pub parent_threads: u32,
    /// Names of the parent's other threads, read from /proc when the fork was seen.
    pub thread_names: Vec<String>,
    pub exited_without_exec: bool,
    /// wait(2)-style exit status, when the child exited.
    pub exit_code: Option<i32>,
    /// When the child exec'd after the grace window: how long after the fork.
    pub exec_after_ms: Option<u64>,
    /// How long the child ran without exec before the decision (exit, exec or deadline).
    pub ms_without_exec: u64,
    pub grace_ms: u64,
}

impl Finding {
    pub fn to_json_line(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}
