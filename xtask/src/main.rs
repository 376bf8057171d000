//! `cargo xtask`: the project's own commands. Each installs what it needs first (setup.rs), so on
//! a fresh machine the README's two commands are all a newcomer types: `run` installs only what
//! building needs, `test` the test tools too.

mod apt;
mod bench;
mod cmd;
mod daemon;
mod dist;
mod fuzz;
mod lint;
mod setup;
mod test;
mod vmtest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent): LLVM 22, a C compiler, the pinned
    /// nightly with rust-src, bpf-linker 0.13 built against LLVM 22, and the test tools (what
    /// `test` installs; the other commands install only what building needs).
    Setup,
    /// Install what building needs, then build the daemon (release) with its eBPF programs.
    Build,
    /// Install what building needs, build, and start the daemon as root, showing findings live.
    Run {
        /// Arguments passed to `forkwatch run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up (all of `setup`), lint, and run the whole suite, privileged end-to-end tests
    /// included.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what building needs, then build a statically linked daemon (musl, release) into
    /// target/dist/forkwatch and check that it needs no shared library.
    Dist,
    /// Dist, then build the container image localhost/forkwatch:latest from
    /// deploy/container/Containerfile with podman or buildah (podman is installed if neither is).
    Image,
    /// Install what building and the bench need (bpftrace, PostgreSQL), build the release
    /// daemon, and measure its overhead on seven workloads, on an idle host and on a server host
    /// (PostgreSQL with open sessions, lingering workers of a threaded master), against no
    /// monitor and against bpftrace (target/bench/report.json and report.md).
    Bench {
        /// Tiny sizes and two repetitions: only checks that the bench runs and writes a report.
        #[arg(long)]
        smoke: bool,
        /// Interleaved repetitions of each workload, host and condition (default 6, the fewest
        /// the targets are judged over; 2 with --smoke).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
        repetitions: Option<u64>,
        /// Only the per-call cost of the hooks every task pays, against empty programs on the
        /// same hooks (a minute; target/bench/hooks.json and hooks.md).
        #[arg(long)]
        hooks_only: bool,
        /// Only this workload (its mode: cheap, futex, tcp, pipe, fork-exec, fork-noexec,
        /// threads), on both hosts in every condition, with its in-kernel cost per call; no
        /// hooks table, idle CPU, finding latency or sustained storm. For iterating on one
        /// workload's cost: a partial report, not a verdict on the others.
        #[arg(long, value_name = "MODE")]
        workload: Option<String>,
    },
    /// Install QEMU and busybox, build the static daemon and fixtures, then boot Debian's LTS
    /// cloud kernels (fetched with `apt-get download`, cached in target/vmtest/) in QEMU and
    /// run `check`, `selftest` and end-to-end scenarios in each: prints a kernel × step table.
    Vmtest {
        /// Which kernel series to boot.
        #[arg(default_value = "all", value_parser = ["5.10", "6.1", "6.12", "all"])]
        kernel: String,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::setup(),
        Command::Build => setup::build_deps().and_then(|()| daemon::build()),
        Command::Run { args } => setup::build_deps()
            .and_then(|()| daemon::build())
            .and_then(|()| daemon::run(&args)),
        Command::Test { no_lint, args } => setup::setup().and_then(|()| test::test(no_lint, &args)),
        Command::Dist => setup::build_deps().and_then(|()| dist::dist().map(drop)),
        Command::Image => setup::build_deps().and_then(|()| dist::image()),
        Command::Bench {
            smoke,
            repetitions,
            hooks_only,
            workload,
        } => setup::build_deps()
            .and_then(|()| daemon::build())
            .and_then(|()| {
                if hooks_only {
                    bench::hooks_only(smoke)
                } else {
                    bench::bench_repeated(
                        smoke,
                        repetitions.map(|r| r as usize),
                        workload.as_deref(),
                    )
                }
            }),
        Command::Vmtest { kernel } => setup::build_deps().and_then(|()| vmtest::vmtest(&kernel)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
