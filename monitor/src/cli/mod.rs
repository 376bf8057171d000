//! Command line. Every flag can also come from a `FORKWATCH_*` environment variable (systemd
//! units and DaemonSets set those); a bad value is a usage error (exit code 2) naming the flag.

pub mod config;
mod ignore;
pub(crate) mod k8s;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::k8s::K8sArgs;
#[cfg(test)]
use self::k8s::TOKEN_FILE;
use crate::{kernel::btf_offsets::VMLINUX_BTF, report::finding::Severity};

#[derive(Debug, Parser)]
#[command(
    name = "forkwatch",
    version,
    about = "System-wide fork-hazard monitor: reports multithreaded processes that fork \
             without exec",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `run`, the default command.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start and moved into its command; boxing would save nothing"
)]
pub enum Command {
    /// Watch the host and report findings (the default).
    Run(RunArgs),
    /// Preflight: list what the daemon needs and whether this host has it, with the fix for
    /// each missing piece. Exits non-zero if the daemon cannot run.
    Check(CommonArgs),
    /// Start the probes and prove each detector on this kernel with helper processes (the
    /// binary re-executing itself): each hazard reported once, the safe patterns quiet.
    Selftest(CommonArgs),
    /// Run CMD and watch only its process tree; exit with CMD's status if it failed, else 3 if
    /// a finding in its tree is at or above --fail-on, else 0 (for CI).
    Exec(ExecArgs),
    /// Helper processes for `selftest` (internal).
    #[command(hide = true)]
    Fixture { name: String },
}

/// Flags every command that loads the probes takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML file with the same keys as these flags (exec_grace = "2s", ...). Flags and
    /// FORKWATCH_* variables take precedence over it.
    #[arg(long, env = "FORKWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kernel BTF file to read struct offsets from.
    #[arg(long, env = "FORKWATCH_BTF", default_value = VMLINUX_BTF)]
    pub btf: PathBuf,
    /// Log format on stderr.
    #[arg(long, env = "FORKWATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The flags of every command that watches: `run` (the host) and `exec` (one command's tree).
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Findings format on stdout (`exec`: stderr) [default: text on a terminal, json
    /// otherwise].
    #[arg(long, env = "FORKWATCH_FORMAT", value_enum)]
    pub format: Option<Format>,
    /// Also append findings as JSON lines to this file (created 0640).
    #[arg(long, env = "FORKWATCH_OUTPUT")]
    pub output: Option<PathBuf>,
    /// How long a child of a multithreaded fork may run before it must have exec'd
    /// (e.g. 500ms, 2s).
    #[arg(long, env = "FORKWATCH_EXEC_GRACE", default_value = "1s", value_parser = parse_grace)]
    pub exec_grace: Duration,
    /// How long a tracked child must be blocked in a futex wait before it is reported
    /// (e.g. 1s).
    #[arg(long, env = "FORKWATCH_DEADLOCK_AFTER", default_value = "1s", value_parser = parse_deadlock_after)]
    pub deadlock_after: Duration,
    /// Fold findings of one kind from one parent executable within this window: the first is
    /// printed at once, the rest as one `repeated` record when the window ends (0s: off).
    #[arg(long, env = "FORKWATCH_REPEAT_WINDOW", default_value = "60s", value_parser = parse_repeat_window)]
    pub repeat_window: Duration,
    /// Put the full command line in findings; off by default because it may hold secrets.
    #[arg(long, env = "FORKWATCH_FULL_CMDLINE")]
    pub full_cmdline: bool,
    /// Ring-buffer size in bytes: a power of two, at least 4096.
    #[arg(long, env = "FORKWATCH_RING_BUFFER_SIZE", default_value_t = monitor_common::RING_BUFFER_BYTES, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Most children of multithreaded forks tracked at once.
    #[arg(long, env = "FORKWATCH_MAX_TRACKED", default_value_t = monitor_common::TRACKED_MAX_ENTRIES, value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    pub max_tracked: u32,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub watch: WatchArgs,
    /// Address for /metrics, /healthz and /readyz (port 0 picks a free port).
    #[arg(long, env = "FORKWATCH_METRICS_ADDR", default_value = "127.0.0.1:9571")]
    pub metrics_addr: SocketAddr,
    /// Turn on the kernel's BPF run-time statistics while running, for the
    /// forkwatch_bpf_program_* metrics (costs a little on every program run).
    #[arg(long, env = "FORKWATCH_BPF_STATS")]
    pub bpf_stats: bool,
    #[command(flatten)]
    pub k8s: K8sArgs,
}

/// `forkwatch exec`: the watch flags (no metrics server, no Kubernetes: it watches one
/// command's tree, not a node), what fails the run, and the command.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// The least severity of a finding in the command's tree that fails the run (exit 3).
    #[arg(long, env = "FORKWATCH_FAIL_ON", value_enum, default_value_t = Severity::Warning)]
    pub fail_on: Severity,
    /// Write a JUnit XML report here: a test case per finding kind seen, a failure per finding
    /// at or above --fail-on.
    #[arg(long, env = "FORKWATCH_JUNIT")]
    pub junit: Option<PathBuf>,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// The command to run and watch, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

/// A configuration the daemon cannot run with, found after parsing (e.g. `--k8s-pod-names`
/// outside a cluster with no `--k8s-api-url`): exits 2 like a bad flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

fn parse_grace(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, "the exec grace", Duration::from_millis(1), "1ms")
}

fn parse_deadlock_after(text: &str) -> Result<Duration, String> {
    parse_duration_in(
        text,
        "the deadlock delay",
        Duration::from_millis(10),
        "10ms",
    )
}

fn parse_repeat_window(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, "the repeat window", Duration::ZERO, "0s")
}

/// A duration between `min` and one hour.
fn parse_duration_in(
    text: &str,
    what: &str,
    min: Duration,
    min_text: &str,
) -> Result<Duration, String> {
    let value = humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write a duration such as 500ms or 2s)"))?;
    if value < min || value > Duration::from_secs(3600) {
        return Err(format!(
            "{text} is out of range: {what} must be between {min_text} and 1h"
        ));
    }
    Ok(value)
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .parse()
        .map_err(|_| format!("{text} is not a size in bytes"))?;
    if !size.is_power_of_two() || size < 4096 {
        return Err(format!(
            "{size} is not a power of two of at least 4096 (the kernel requires a multiple of \
             the page size); try {}",
            size.max(4096).next_power_of_two()
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("forkwatch").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.watch.exec_grace, Duration::from_secs(1));
        assert_eq!(cli.run.watch.repeat_window, Duration::from_secs(60));
        assert_eq!(cli.run.metrics_addr.to_string(), "127.0.0.1:9571");
        assert!(!cli.run.watch.full_cmdline);
        assert!(!cli.run.k8s.k8s_pod_names, "pod names are opt-in");
        assert_eq!(cli.run.k8s.k8s_token_file, PathBuf::from(TOKEN_FILE));
    }

    #[test]
    fn run_flags_parse() {
        let cli = parse(&["run", "--exec-grace", "250ms", "--format", "json"]).unwrap();
        let Some(Command::Run(run)) = cli.command else {
            panic!("not run");
        };
        assert_eq!(run.watch.exec_grace, Duration::from_millis(250));
        assert_eq!(run.watch.format, Some(Format::Json));
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_problem() {
        for (args, needle) in [
            (&["--exec-grace", "soon"][..], "duration"),
            (&["--exec-grace", "0s"], "between 1ms and 1h"),
            (&["--exec-grace", "2h"], "between 1ms and 1h"),
            (&["--deadlock-after", "1ms"], "between 10ms and 1h"),
            (&["--repeat-window", "2h"], "between 0s and 1h"),
            (&["--ring-buffer-size", "5000"], "power of two"),
            (&["--ring-buffer-size", "1024"], "at least 4096"),
            (&["--metrics-addr", "localhost"], "invalid socket address"),
            (&["--format", "xml"], "xml"),
            (&["--max-tracked", "1"], "16"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{args:?}: {err}"
            );
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
        assert_eq!(
            parse(&["--no-such-flag"]).unwrap_err().kind(),
            ErrorKind::UnknownArgument
        );
    }
}
