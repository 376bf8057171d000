//! `cargo xtask test`: lint, the whole suite (privileged end-to-end tests included), bounded
//! fuzzing, and the bench at smoke size.

use crate::{bench, cmd, daemon, fuzz, lint};

/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS: u32 = 30;

pub fn test(no_lint: bool, args: &[String]) -> anyhow::Result<()> {
    if !no_lint {
        lint::fmt()?;
        lint::clippy()?;
        lint::clippy_ebpf()?;
    }
    // Not --workspace: monitor/build.rs builds the eBPF crate (see lint::clippy_ebpf).
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
            .and_then(|()| daemon::build())
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
