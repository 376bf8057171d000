//! `cargo xtask test`: lint, the whole suite (privileged end-to-end tests included), bounded
//! fuzzing, the bench at smoke size, and the kernel matrix (`vmtest`: Debian's 5.10, 6.1 and 6.12 in
//! QEMU; the host's own kernel is the rest of the suite's).
//!
//! Every phase runs whatever the phases before it did (a failing test must not hide a fuzzer's
//! crash or a broken bench), each under a time limit, so that a hang fails its phase by name.
//! The run fails at the end if any phase failed; its last lines list the phases and add up the
//! tests.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{bench, cmd, daemon, fuzz, lint, vmtest};

/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS: u32 = 30;
/// The phases' time limits: generous, since a first run on a fresh machine compiles everything
/// on 2 shared cores (clippy, the tests, the sanitizer builds of the fuzz targets, the release
/// daemon each build their own). .ci/run limits the whole run to 75 minutes.
const LINT_LIMIT: Duration = Duration::from_secs(20 * 60);
const TEST_LIMIT: Duration = Duration::from_secs(45 * 60);
/// Building the fuzz targets, then FUZZ_SECONDS for each.
const FUZZ_LIMIT: Duration = Duration::from_secs(20 * 60);
/// Building the release daemon, then the smoke run (a few minutes).
const BENCH_LIMIT: Duration = Duration::from_secs(20 * 60);
/// Building the static daemon and the guest programs, then one boot per kernel (under a minute
/// each under TCG; vmtest limits each boot itself).
const VMTEST_LIMIT: Duration = Duration::from_secs(25 * 60);

pub fn test(no_lint: bool, args: &[String]) -> anyhow::Result<()> {
    let mut phases = Vec::new();
    if !no_lint {
        phase(&mut phases, "cargo fmt", LINT_LIMIT, lint::fmt);
        phase(&mut phases, "cargo clippy", LINT_LIMIT, lint::clippy);
        phase(
            &mut phases,
            "cargo clippy (eBPF)",
            LINT_LIMIT,
            lint::clippy_ebpf,
        );
    }
    // Not --workspace: monitor/build.rs builds the eBPF crate (see lint::clippy_ebpf).
    let mut argv = vec!["test", "--no-fail-fast"];
    if !args.is_empty() {
        argv.push("--");
        argv.extend(args.iter().map(String::as_str));
    }
    let mut run = None;
    phase(&mut phases, "cargo test", TEST_LIMIT, || {
        let finished = cmd::cargo_test(&argv)?;
        let verdict = verdict(&finished);
        run = Some(finished);
        verdict
    });
    // Each fuzz target for a bounded time, and the benchmark at smoke size (it only has to run
    // and write a valid report; the full benchmark is `cargo xtask bench`).
    phase(&mut phases, "fuzz", FUZZ_LIMIT, || fuzz::run(FUZZ_SECONDS));
    phase(&mut phases, "bench smoke", BENCH_LIMIT, || {
        daemon::build().and_then(|()| bench::bench(true))
    });
    // A kernel that cannot be fetched or booted fails the phase: the matrix is the proof that
    // the same binary runs on the LTS kernels fleets run.
    phase(&mut phases, "vmtest", VMTEST_LIMIT, || {
        vmtest::vmtest("all")
    });
    summary(&phases, run.as_ref())
}

/// One phase's outcome.
struct Phase {
    name: &'static str,
    took: Duration,
    error: Option<anyhow::Error>,
}

/// Runs one phase under its time limit and records how it went; a failure is reported at once
/// and again in the summary.
fn phase(
    phases: &mut Vec<Phase>,
    name: &'static str,
    limit: Duration,
    step: impl FnOnce() -> anyhow::Result<()>,
) {
    eprintln!(
        "xtask: test: phase {name} (time limit {})",
        cmd::duration(limit)
    );
    let started = Instant::now();
    let error = cmd::with_time_limit(name, limit, step).err();
    if let Some(err) = &error {
        eprintln!("xtask: test: phase {name} FAILED: {err:#}");
    }
    phases.push(Phase {
        name,
        took: started.elapsed(),
        error,
    });
}

/// Whether a `cargo test` run passed: no test failed, cargo itself succeeded (it fails on a
/// build error or a test binary that crashed, neither of which the totals count), and some test
/// ran (a filter that matches nothing passes nothing).
fn verdict(run: &cmd::TestRun) -> anyhow::Result<()> {
    let failed = run.totals.failed;
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    if !run.status.success() {
        bail!(
            "cargo test failed ({}) with no failing test counted: a build error, or a test \
             binary that crashed or was ended before its summary (its tests are not counted)",
            run.status
        );
    }
    if run.totals.passed == 0 {
        bail!("no test passed: does the filter match any test?");
    }
    Ok(())
}

/// The closing lines: each phase, then the tests' totals last (cargo's own last line is that
/// of whichever test target ran last, often one with no tests). A test that returns early
/// counts as passed: cargo cannot tell it from one that checked everything.
fn summary(phases: &[Phase], run: Option<&cmd::TestRun>) -> anyhow::Result<()> {
    println!("xtask: test: summary");
    for p in phases {
        let outcome = match &p.error {
            None => "ok".to_owned(),
            Some(err) => format!("FAILED: {err:#}"),
        };
        println!(
            "  {:<20} {:>6.0} s  {outcome}",
            p.name,
            p.took.as_secs_f64()
        );
    }
    match run {
        Some(run) => {
            let t = &run.totals;
            let partial = if run.status.success() {
                String::new()
            } else {
                format!(" (cargo test exited with {}: see above)", run.status)
            };
            println!(
                "tests: {} passed, {} failed, {} ignored{partial}",
                t.passed, t.failed, t.ignored
            );
        }
        None => println!("tests: none counted (cargo test did not run)"),
    }
    let failed: Vec<&str> = phases
        .iter()
        .filter(|p| p.error.is_some())
        .map(|p| p.name)
        .collect();
    if !failed.is_empty() {
        bail!("the suite did not pass: {} failed", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;
    use crate::cmd::{TestRun, TestTotals};

    fn run(passed: u64, failed: u64, wait_status: i32) -> TestRun {
        TestRun {
            totals: TestTotals {
                passed,
                failed,
                ignored: 0,
            },
            status: std::process::ExitStatus::from_raw(wait_status),
        }
    }

    #[test]
    fn a_run_passes_only_when_cargo_and_every_test_do() {
        assert!(verdict(&run(5, 0, 0)).is_ok());
        let failing = verdict(&run(5, 2, 101 << 8)).unwrap_err().to_string();
        assert!(failing.contains("2 test(s) failed"), "{failing}");
        // A test binary killed by a signal prints no summary: nothing failed, cargo did.
        let crashed = verdict(&run(5, 0, 101 << 8)).unwrap_err().to_string();
        assert!(crashed.contains("no failing test counted"), "{crashed}");
        let nothing = verdict(&run(0, 0, 0)).unwrap_err().to_string();
        assert!(nothing.contains("no test passed"), "{nothing}");
    }
}
