//! The lint steps of `cargo xtask test`: formatting, clippy for the host crates, and clippy for
//! the eBPF crate on its own target. Warnings are errors.

use std::process::Command;

use crate::{cmd, setup};

pub fn fmt() -> anyhow::Result<()> {
    cmd::cargo(&["fmt", "--all", "--check"])
}

/// The default members (daemon, wire types, xtask) for the host...
pub fn clippy() -> anyhow::Result<()> {
    cmd::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

/// ...and the eBPF crate for its own target, with its pinned nightly: a host build of it would
/// link std (cargo unifies monitor-common's `user` feature across the workspace).
pub fn clippy_ebpf() -> anyhow::Result<()> {
    let channel = setup::ebpf_channel()?;
    cmd::run_with(
        Command::new("rustup")
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
