//! `forkwatch check`: a preflight that says what this host lacks and how to fix it.

use std::path::Path;

use monitor_common::names;

use crate::{
    cli::CommonArgs,
    kernel::btf_offsets,
    kernel::{ProbeOptions, Probes},
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

/// Linux capability numbers (linux/capability.h).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

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

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn privileges() -> Item {
    let name = "privileges";
    let Some(caps) = effective_capabilities() else {
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
    for (program, tracepoint) in names::PROGRAMS {
        let name = format!("probe {program}");
        items.push(match probes.attach(program, tracepoint) {
            Ok(()) => Item::ok(name, format!("tp_btf/{tracepoint} verified and attached")),
            Err(err) => Item::bad(
                Status::Fail,
                name,
                err.to_string(),
                "this kernel rejects the program; report it with the output of `uname -r`",
            ),
        });
    }
    let (program, tracepoint) = names::WRITE_PROGRAM;
    let name = format!("probe {program}");
    items.push(match probes.verify_write_probe() {
        Ok(()) => Item::ok(
            name,
            format!("tp_btf/{tracepoint} verified (attached only on demand)"),
        ),
        Err(err) => Item::bad(
            Status::Fail,
            name,
            err.to_string(),
            "this kernel rejects the program; report it with the output of `uname -r`",
        ),
    });
    // Dropping the probes detaches them again.
    items
}
