//! `forkwatch check`: a preflight that says what this host lacks and how to fix it.

use std::path::Path;

use crate::{
    cli::CommonArgs,
    kernel::{
        ProbeOptions, Probes, btf_offsets,
        capabilities::{
            self, CAP_BPF, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE,
        },
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but something is degraded.
    Warn,
    /// The daemon cannot run.
    Fail,
}

#[derive(Debug)]
pub struct Item {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Item {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        status: Status,
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

pub fn run(args: &CommonArgs) -> Vec<Item> {
    let mut items = vec![privileges(), pid_namespace(), btf(&args.btf), tracefs()];
    items.extend(probes(&args.btf));
    items
}

fn pid_namespace() -> Item {
    match crate::enrich::procfs::require_host_pid_namespace() {
        Ok(()) => Item::ok("PID namespace", "the host's: kernel pids match /proc"),
        Err(why) => Item::bad(Status::Fail, "PID namespace", "not the host's", why),
    }
}

pub fn print(items: &[Item]) -> bool {
    for item in items {
        let tag = match item.status {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        println!("[{tag}] {}: {}", item.name, item.detail);
        if let Some(fix) = &item.fix {
            println!("       fix: {fix}");
        }
    }
    let can_run = items.iter().all(|i| i.status != Status::Fail);
    println!(
        "{}",
        if can_run {
            "forkwatch can run on this host"
        } else {
            "forkwatch cannot run on this host: fix the FAIL items above"
        }
    );
    can_run
}

fn privileges() -> Item {
    let name = "privileges";
    let Some(caps) = capabilities::effective() else {
        return Item::bad(
            Status::Warn,
            name,
            "cannot read CapEff from /proc/self/status",
            "make sure /proc is mounted",
        );
    };
    let has = |cap: u32| caps & (1 << cap) != 0;
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    if !(bpf && perfmon) {
        let mut missing = Vec::new();
        if !bpf {
            missing.push("CAP_BPF");
        }
        if !perfmon {
            missing.push("CAP_PERFMON");
        }
        return Item::bad(
            Status::Fail,
            name,
            format!(
                "missing {} (effective capabilities {caps:#x})",
                missing.join(", ")
            ),
            "run as root (sudo forkwatch ...) or grant CAP_BPF and CAP_PERFMON, e.g. \
             AmbientCapabilities= in the systemd unit",
        );
    }
    let mut missing = Vec::new();
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    if !has(CAP_DAC_READ_SEARCH) {
        missing.push("CAP_DAC_READ_SEARCH");
    }
    if !missing.is_empty() {
        return Item::bad(
            Status::Warn,
            name,
            format!(
                "missing {}: findings about other users' processes lack exe and thread names",
                missing.join(", ")
            ),
            "grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH",
        );
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    Item::ok(
        name,
        format!("euid {euid}, CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH"),
    )
}

fn btf(path: &Path) -> Item {
    let name = "kernel BTF";
    match btf_offsets::kernel_offsets(path) {
        Ok(_) => Item::ok(
            name,
            format!(
                "{} (task_struct and signal_struct offsets resolved)",
                path.display()
            ),
        ),
        Err(err) => Item::bad(
            Status::Fail,
            name,
            err.to_string(),
            "use a kernel with CONFIG_DEBUG_INFO_BTF=y, or point --btf at this kernel's BTF file",
        ),
    }
}

fn tracefs() -> Item {
    let name = "tracefs";
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Item::ok(name, format!("mounted at {dir}"));
        }
    }
    // The current probes are tp_btf programs, attached through BTF rather than tracefs.
    Item::bad(
        Status::Warn,
        name,
        "not mounted (the tp_btf probes do not need it; tracing tools and classic tracepoints do)",
        "mount -t tracefs nodev /sys/kernel/tracing",
    )
}

fn probes(btf: &Path) -> Vec<Item> {
    let opts = ProbeOptions {
        btf_path: btf.to_path_buf(),
        ring_buffer_bytes: monitor_common::RING_BUFFER_BYTES,
        max_tracked: 1024,
        tree_root: None,
    };
    let mut probes = match Probes::load(&opts) {
        Ok(p) => p,
        Err(err) => {
            return vec![Item::bad(
                Status::Fail,
                "bpf(2)",
                err.to_string(),
                "run as root on a kernel with CONFIG_BPF_SYSCALL=y and BTF; see the items above",
            )];
        }
    };
    let mut items = vec![Item::ok("bpf(2)", "maps created")];
    if let Err(err) = probes.attach_all() {
        items.push(Item::bad(
            Status::Fail,
            "probes",
            err.to_string(),
            "this kernel rejects an essential program; report it with the output of `uname -r`",
        ));
        return items;
    }
    for status in probes.detectors() {
        let name = format!("detector {}", status.detector.name());
        items.push(match &status.state {
            Ok(how) => Item::ok(name, format!("active: {how}")),
            Err(why) => Item::bad(
                Status::Warn,
                name,
                format!("unavailable: {why}"),
                "the other detectors run; a newer kernel or its configuration would add this one",
            ),
        });
    }
    // Dropping the probes detaches them again.
    items
}
