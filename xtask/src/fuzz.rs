//! Bounded fuzzing of the parsers of untrusted input (fuzz/): ring-buffer records, config files,
//! kernel BTF, what other users write into /proc (maps, syscall and stat lines, fdinfo, cgroup
//! paths)
//! and the API server's pod list (`forkwatch::fuzzing`). Part of `cargo xtask test`: each target runs for a fixed time with the pinned
//! nightly (sanitizers need it) and any crash fails the run, leaving the input in fuzz/artifacts/.

use std::process::Command;

use anyhow::bail;

use crate::{cmd, setup};

pub const TARGETS: [&str; 9] = [
    "decode",
    "config",
    "btf",
    "proc_maps",
    "proc_syscall",
    "proc_stat",
    "proc_fdinfo",
    "cgroup",
    "pod_list",
];

/// Runs every fuzz target for `seconds` each; a crash in one does not keep the others from
/// running.
pub fn run(seconds: u32) -> anyhow::Result<()> {
    let channel = setup::ebpf_channel()?;
    let fuzz_dir = cmd::workspace_root().join("fuzz");
    let mut failed = Vec::new();
    for target in TARGETS {
        // The corpus grows across runs (ignored by git); committed seeds (fuzz/seeds/<target>)
        // get a structured format past its magic number in seconds instead of never.
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let mut command = Command::new("rustup");
        command
            .args(["run", &channel, "cargo", "fuzz", "run", target])
            .arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        let result = cmd::run_with(
            command
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
        );
        match result {
            Ok(()) => println!("fuzz: {target}: {seconds} s without a crash"),
            Err(err) => {
                println!("fuzz: {target}: FAILED: {err:#}");
                failed.push(target);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (a crash leaves its input in fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}
