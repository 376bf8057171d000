//! `cargo xtask build` and `cargo xtask run`: the release daemon, started as root.

use crate::cmd;

/// The release daemon with its eBPF programs (monitor/build.rs builds those).
pub fn build() -> anyhow::Result<()> {
    cmd::cargo(&["build", "--release", "--package", "forkwatch"])
}

/// `forkwatch run ARGS`, through sudo when not root: loading eBPF programs needs root.
pub fn run(args: &[String]) -> anyhow::Result<()> {
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
