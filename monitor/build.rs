//! Builds the eBPF programs (`monitor-ebpf`) with the pinned nightly and embeds the object in the
//! daemon, so `cargo build` of the workspace is all a developer runs once `cargo xtask setup` has
//! installed the toolchain and bpf-linker.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "monitor-ebpf")
        .ok_or_else(|| anyhow!("monitor-ebpf package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    let toolchain_file = root_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={toolchain_file}");
    let toolchain = pinned_channel(&std::fs::read_to_string(&toolchain_file)?)
        .ok_or_else(|| anyhow!("no `channel = \"...\"` in {toolchain_file}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "monitor-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the pinned \
         nightly, rust-src and bpf-linker",
    )
}

/// The `channel` value of a rust-toolchain.toml (the one line we need; no TOML parser required).
fn pinned_channel(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("channel")?
            .trim()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}
