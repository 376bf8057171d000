//! `cargo xtask dist` and `cargo xtask image`: a statically linked daemon and a `FROM scratch`
//! container image around it. Like setup, each step checks first and installs only what is
//! missing (the musl target of the workspace toolchain, podman).
//!
//! The static build uses a target directory of its own (`target/dist-build`): it does not
//! invalidate the host build in `target/`, and it never waits on the lock of `target/debug` or
//! `target/release`, so it can run from inside `cargo test` (monitor/tests/e2e_image.rs does).
//! monitor/build.rs still builds the eBPF object for the bpf target with the pinned nightly: the
//! eBPF programs do not depend on the userspace target.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

/// musl's libc links statically by default (`crt-static`), so no flags are needed.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
/// Relative to the workspace root.
const DIST_TARGET_DIR: &str = "target/dist-build";
/// The binary `dist` produces, relative to the workspace root; its directory is also the build
/// context of the image, so nothing else is sent to the builder.
pub const DIST_BINARY: &str = "target/dist/forkwatch";
pub const CONTAINERFILE: &str = "deploy/container/Containerfile";
pub const IMAGE: &str = "localhost/forkwatch:latest";

/// Builds the static release binary into `target/dist/forkwatch` and proves it is static.
pub fn dist() -> anyhow::Result<PathBuf> {
    static_target()?;
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    cmd::run_with(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--package",
                "forkwatch",
                "--target",
                STATIC_TARGET,
                "--target-dir",
                DIST_TARGET_DIR,
            ])
            // ring (rustls' crypto, for --k8s-pod-names) has C and assembly parts; cc-rs looks
            // for a cross compiler named x86_64-linux-musl-gcc, which Debian calls musl-gcc.
            .env(MUSL_CC_VAR, MUSL_CC),
    )?;
    let build_time = started.elapsed();
    let root = cmd::workspace_root();
    let built = root
        .join(DIST_TARGET_DIR)
        .join(STATIC_TARGET)
        .join("release/forkwatch");
    let binary = root.join(DIST_BINARY);
    let dir = binary.parent().expect("DIST_BINARY has a directory");
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    // Replace rather than overwrite in place: a running copy of the old binary keeps its inode.
    let staged = dir.join(".forkwatch.new");
    std::fs::copy(&built, &staged)
        .with_context(|| format!("copy {} to {}", built.display(), staged.display()))?;
    std::fs::rename(&staged, &binary).with_context(|| binary.display().to_string())?;
    verify_static(&binary)?;
    let size = std::fs::metadata(&binary)?.len();
    eprintln!(
        "xtask: {DIST_BINARY}: statically linked, {} ({size} bytes), cargo build took {}",
        mib(size),
        seconds(build_time)
    );
    Ok(binary)
}

/// `dist`, then the image `localhost/forkwatch:latest` from deploy/container/Containerfile.
pub fn image() -> anyhow::Result<()> {
    let binary = dist()?;
    let tool = container_tool()?;
    let context = binary.parent().expect("the binary has a directory");
    let started = Instant::now();
    let mut build = Command::new(tool.program());
    build
        .arg("build")
        .args(["--file", CONTAINERFILE, "--tag", IMAGE])
        // FROM scratch: nothing to pull, and this says so; no registry is ever contacted.
        .arg("--pull=never")
        .args([
            "--build-arg",
            &format!("VERSION={}", env!("CARGO_PKG_VERSION")),
        ])
        .arg(context);
    cmd::run_with(&mut build)?;
    let build_time = started.elapsed();
    let size = tool
        .image_size(IMAGE)
        .unwrap_or_else(|| "unknown".to_owned());
    eprintln!(
        "xtask: image {IMAGE} built with {} in {}: {size}",
        tool.program(),
        seconds(build_time)
    );
    Ok(())
}

/// The stable toolchain that builds the daemon (the eBPF crate has its own, see setup.rs).
fn workspace_channel() -> anyhow::Result<String> {
    setup::toolchain_channel("rust-toolchain.toml")
}

/// The C compiler for the musl target (Debian package `musl-tools`), and cc-rs's variable for it.
const MUSL_CC: &str = "musl-gcc";
const MUSL_CC_VAR: &str = "CC_x86_64_unknown_linux_musl";

/// The musl target's standard library for the workspace toolchain, and musl's C compiler.
fn static_target() -> anyhow::Result<()> {
    if cmd::output(MUSL_CC, &["--version"]).is_none() {
        setup::apt_install(
            &["musl-tools"],
            "musl-gcc, to compile ring's C code for musl",
        )?;
    }
    let channel = workspace_channel()?;
    let installed = cmd::output(
        "rustup",
        &["target", "list", "--installed", "--toolchain", &channel],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        return Ok(());
    }
    cmd::run_with(Command::new("rustup").args([
        "target",
        "add",
        "--toolchain",
        &channel,
        STATIC_TARGET,
    ]))
}

/// Fails unless `binary` needs no dynamic loader and no shared library. The ELF headers decide;
/// `file` and `ldd` (when installed) are asked too, shown, and must agree.
pub fn verify_static(binary: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(binary).with_context(|| binary.display().to_string())?;
    let elf = elf_linkage(&bytes)
        .with_context(|| format!("{}: not readable as ELF", binary.display()))?;
    if let Some(interp) = &elf.interpreter {
        bail!(
            "{} is dynamically linked: it names the loader {interp}",
            binary.display()
        );
    }
    if elf.needed > 0 {
        bail!(
            "{} is dynamically linked: it needs {} shared libraries",
            binary.display(),
            elf.needed
        );
    }
    let path = binary.to_string_lossy();
    if let Some(file) = answer("file", &["--brief", &path]) {
        eprintln!("xtask: file: {file}");
        if !(file.contains("statically linked") || file.contains("static-pie linked")) {
            bail!("`file` does not call {path} statically linked: {file}");
        }
    }
    if let Some(ldd) = answer("ldd", &[&path]) {
        eprintln!("xtask: ldd: {ldd}");
        if !(ldd.contains("statically linked") || ldd.contains("not a dynamic executable")) {
            bail!("`ldd` finds shared libraries in {path}: {ldd}");
        }
    }
    Ok(())
}

/// What a command prints (stdout and stderr, whatever its exit status: `ldd` fails on some
/// static binaries); `None` if it is not installed.
fn answer(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text.trim().to_owned())
}

#[derive(Debug, PartialEq, Eq)]
struct Linkage {
    /// PT_INTERP: the dynamic loader the kernel would start first.
    interpreter: Option<String>,
    /// DT_NEEDED entries: shared libraries the loader would map.
    needed: usize,
}

/// Reads the linkage of a 64-bit little-endian ELF file (x86_64) from its program headers.
fn elf_linkage(bytes: &[u8]) -> Option<Linkage> {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut linkage = Linkage {
        interpreter: None,
        needed: 0,
    };
    for index in 0..phnum {
        let header = phoff.checked_add(index.checked_mul(phentsize)?)?;
        let offset = usize::try_from(u64_at(header + 8)?).ok()?;
        let size = usize::try_from(u64_at(header + 32)?).ok()?;
        let contents = bytes.get(offset..offset.checked_add(size)?)?;
        match u32_at(header)? {
            PT_INTERP => {
                let name = contents.split(|&b| b == 0).next().unwrap_or_default();
                linkage.interpreter = Some(String::from_utf8_lossy(name).into_owned());
            }
            PT_DYNAMIC => {
                // Elf64_Dyn: a 64-bit tag, then a 64-bit value.
                for entry in contents.as_chunks::<16>().0 {
                    let (tag, _value) = entry.split_first_chunk::<8>()?;
                    match u64::from_le_bytes(*tag) {
                        DT_NULL => break,
                        DT_NEEDED => linkage.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(linkage)
}

#[derive(Clone, Copy)]
enum Tool {
    Podman,
    Buildah,
}

impl Tool {
    fn program(self) -> &'static str {
        match self {
            Tool::Podman => "podman",
            Tool::Buildah => "buildah",
        }
    }

    /// The image's size as the tool reports it.
    fn image_size(self, image: &str) -> Option<String> {
        match self {
            Tool::Podman => {
                let bytes = cmd::output(
                    "podman",
                    &["image", "inspect", "--format", "{{.Size}}", image],
                )?;
                let bytes: u64 = bytes.trim().parse().ok()?;
                Some(format!("{} ({bytes} bytes)", mib(bytes)))
            }
            Tool::Buildah => cmd::output("buildah", &["images", "--format", "{{.Size}}", image])
                .map(|size| size.trim().to_owned()),
        }
    }
}

/// podman if installed, else buildah if installed, else Debian's podman (as root; otherwise the
/// exact command to run is the error).
fn container_tool() -> anyhow::Result<Tool> {
    for tool in [Tool::Podman, Tool::Buildah] {
        if cmd::output(tool.program(), &["--version"]).is_some() {
            return Ok(tool);
        }
    }
    setup::apt_install(&["podman"], "podman or buildah, to build the image")?;
    Ok(Tool::Podman)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The xtask binary itself: built for the host, so it names a loader (glibc) or, when built
    /// for musl, none; either way the parser must read it.
    #[test]
    fn reads_own_linkage() {
        let exe = std::env::current_exe().unwrap();
        let linkage = elf_linkage(&std::fs::read(exe).unwrap()).expect("an ELF file");
        if cfg!(target_env = "gnu") {
            assert!(linkage.interpreter.is_some_and(|i| i.contains("ld-linux")));
            assert!(linkage.needed > 0);
        }
    }

    #[test]
    fn a_dynamically_linked_binary_fails_the_check() {
        if cfg!(target_env = "gnu") {
            let err = verify_static(&std::env::current_exe().unwrap()).unwrap_err();
            assert!(err.to_string().contains("dynamically linked"), "{err}");
        }
    }

    #[test]
    fn rejects_what_is_not_elf() {
        assert_eq!(elf_linkage(b"#!/bin/sh\n"), None);
        assert_eq!(elf_linkage(b""), None);
    }
}
