//! `cargo xtask`: the project's own commands. `run` and `test` set the machine up first, so on a
//! fresh machine the README's two commands are all a newcomer types.

mod bench;
mod cmd;
mod dist;
mod fuzz;
mod setup;

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
    /// Install what building and testing need (idempotent): LLVM 22, the pinned nightly with
    /// rust-src, bpf-linker 0.13 built against LLVM 22, and the test tools.
    Setup,
    /// Set up, then build the daemon (release) with its eBPF programs.
    Build,
    /// Set up, build, and start the daemon as root, showing findings live.
    Run {
        /// Arguments passed to `forkwatch run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, lint, and run the whole suite, privileged end-to-end tests included.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then build a statically linked daemon (musl, release) into target/dist/forkwatch
    /// and check that it needs no shared library.
    Dist,
    /// Dist, then build the container image localhost/forkwatch:latest from
    /// deploy/container/Containerfile with podman or buildah (podman is installed if neither is).
    Image,
    /// Set up, build the release daemon, and measure its overhead on seven workloads against no
    /// monitor and against bpftrace (target/bench/report.json and report.md).
    Bench {
        /// Tiny sizes and one repetition: only checks that the bench runs and writes a report.
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::setup(),
        Command::Build => setup::setup().and_then(|()| build()),
        Command::Run { args } => setup::setup()
            .and_then(|()| build())
            .and_then(|()| run(&args)),
        Command::Test { no_lint, args } => setup::setup().and_then(|()| test(no_lint, &args)),
        Command::Dist => setup::setup().and_then(|()| dist::dist().map(drop)),
        Command::Image => setup::setup().and_then(|()| dist::image()),
        Command::Bench { smoke } => setup::setup()
            .and_then(|()| build())
            .and_then(|()| bench::bench(smoke)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> anyhow::Result<()> {
    cmd::cargo(&["build", "--release", "--package", "forkwatch"])
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let binary = cmd::workspace_root().join("target/release/forkwatch");
    let binary = binary.to_string_lossy().into_owned();
    let mut argv = vec![binary, "run".to_owned()];
    argv.extend(args.iter().cloned());
    if cmd::is_root() {
        cmd::run(&argv[0], &argv[1..])
    } else {
        eprintln!("xtask: forkwatch needs root to load eBPF programs; running it with sudo");
        cmd::run("sudo", &argv)
    }
}

fn lint_ebpf() -> anyhow::Result<()> {
    let channel = setup::ebpf_channel()?;
    cmd::run_with(
        std::process::Command::new("rustup")
            .args([
                "run",
                &channel,
                "cargo",
                "clippy",
                "--package",
                "monitor-ebpf",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .args(["--", "-D", "warnings"]),
    )
}

/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS: u32 = 30;

fn test(no_lint: bool, args: &[String]) -> anyhow::Result<()> {
    if !no_lint {
        cmd::cargo(&["fmt", "--all", "--check"])?;
        // The default members (daemon, wire types, xtask) for the host...
        cmd::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        // ...and the eBPF crate for its own target: a host build of it would link std (cargo
        // unifies monitor-common's `user` feature across the workspace).
        lint_ebpf()?;
    }
    // Not --workspace, for the same reason: monitor/build.rs builds the eBPF crate.
    let mut argv = vec!["test", "--no-fail-fast"];
    if !args.is_empty() {
        argv.push("--");
        argv.extend(args.iter().map(String::as_str));
    }
    let totals = cmd::cargo_test(&argv)?;
    // Then each fuzz target for a bounded time, and the benchmark at smoke size (it only has to
    // run and write a valid report; the full benchmark is `cargo xtask bench`).
    let extras = if totals.failed == 0 && totals.passed > 0 {
        fuzz::run(FUZZ_SECONDS)
            .and_then(|()| build())
            .and_then(|()| bench::bench(true))
    } else {
        Ok(())
    };
    // One closing line for the whole suite, last: cargo's own last line is that of whichever
    // test target ran last (often one with no tests).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.failed > 0 || totals.passed == 0 {
        anyhow::bail!("the test suite did not pass");
    }
    extras
}
