//! Bounded fuzzing of the parsers of untrusted input (fuzz/): ring-buffer records and config
//! files. Part of `cargo xtask test`: each target runs for a fixed time with the pinned nightly
//! (sanitizers need it) and any crash fails the run, leaving the input in fuzz/artifacts/.

use std::process::Command;

use crate::{cmd, setup};

pub const TARGETS: [&str; 2] = ["decode", "config"];

/// Runs every fuzz target for `seconds` each.
pub fn run(seconds: u32) -> anyhow::Result<()> {
    let channel = setup::ebpf_channel()?;
    for target in TARGETS {
        cmd::run_with(
            Command::new("rustup")
                .args(["run", &channel, "cargo", "fuzz", "run", target])
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
        )?;
        println!("fuzz: {target}: {seconds} s without a crash");
    }
    Ok(())
}
