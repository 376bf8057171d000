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
    cmd::run_with(ebpf_cargo("clippy")?.args(["--", "-D", "warnings"]))
}

/// `cargo SUBCOMMAND` for the eBPF crate: its pinned nightly, its target, core built from source,
/// release (what the daemon's build script uses); callers append their own arguments.
pub fn ebpf_cargo(subcommand: &str) -> anyhow::Result<Command> {
    let channel = setup::ebpf_channel()?;
    let mut command = Command::new("rustup");
    command
        .args(["run", &channel, "cargo", subcommand])
        .args([
            "--package",
            "monitor-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--release"]);
    Ok(command)
}
