//! `cargo xtask bench`: what forkwatch costs the host, measured against no monitor and against
//! bpftrace running the probes a user would write by hand, on the same machine in one run.
//!
//! Each workload of workloads.c (beside this file) runs in three conditions, interleaved (the
//! order of the conditions rotates from one repetition to the next, so slow drift of the machine
//! does not favour one of them): (a) no monitor, (b) the release daemon with default settings,
//! (c) bpftrace.
//! During (b) it also measures the daemon's CPU time and peak RSS, events received and lost
//! (from /metrics), and workload 0 once more while a long-lived fork family makes the daemon
//! attach its syscall write probe. Then, with separate daemons so that neither perturbs (b): the
//! in-kernel cost per program call (`--bpf-stats`), the per-call cost of the hooks every task
//! pays against empty programs on the same hooks (hooks.rs), idle CPU, finding latency
//! (latency.rs) and a sustained fork storm.
//!
//! Targets are reported, never enforced: a miss is marked in the table and in
//! target/bench/report.json. `--smoke` runs tiny sizes once and only checks that the run works
//! and writes a valid report.
//!
//! Here: the workloads, conditions and targets, and the run's order; run.rs measures (each pass),
//! processes.rs drives the daemon, bpftrace and the fork-family holder, report.rs assembles
//! report.json, table.rs renders report.md.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{cmd, setup};

mod hooks;
mod latency;
mod processes;
mod report;
mod run;
mod table;

/// Relative to the workspace root.
const BENCH_DIR: &str = "target/bench";
const WORKLOADS_SOURCE: &str = "xtask/src/bench/workloads.c";
const DAEMON: &str = "target/release/forkwatch";
/// Environment variable naming another daemon binary to measure.
const DAEMON_ENV: &str = "FORKWATCH_BENCH_DAEMON";
/// Full runs: repetitions of each (workload, condition).
const REPETITIONS: usize = 6;
/// The write probe attaches once a family member has gone `--exec-grace` (1 s) without exec,
/// checked every 500 ms; detaching takes up to one check.
const PROBE_SWITCH_TIMEOUT: Duration = Duration::from_secs(6);
/// Lets the daemon drain its ring buffer before /metrics is read after a workload.
const SETTLE: Duration = Duration::from_millis(250);
/// The daemon reads the programs' run statistics every 500 ms (its family check); a scrape
/// after this long sees every run before it.
const STATS_SETTLE: Duration = Duration::from_millis(700);
const IDLE_FULL: Duration = Duration::from_secs(5);
const IDLE_SMOKE: Duration = Duration::from_secs(1);
const SUSTAIN_FULL_SECONDS: u32 = 10;
const SUSTAIN_SMOKE_SECONDS: u32 = 1;
/// Processes forking in parallel in the sustained storm (one per core here).
const SUSTAIN_FORKERS: u32 = 2;
/// Tries of the sustained storm until one reaches the target rate (see idle_and_sustained).
const SUSTAIN_ATTEMPTS: usize = 3;
/// Rounds of the finding-latency measurement (each ~1.1 s: the grace window).
const LATENCY_RUNS: usize = 5;
const SUSTAIN_TARGET_FORKS_PER_S: f64 = 20_000.0;
const RSS_TARGET_KIB: u64 = 32 * 1024;
const IDLE_CPU_TARGET_PCT: f64 = 0.5;

struct Workload {
    id: usize,
    name: &'static str,
    mode: &'static str,
    /// Sized so that one run takes 1–3 s on the 2-core development VM.
    full: u64,
    smoke: u64,
    /// Most overhead allowed, in percent of the no-monitor median; `None`: report only.
    target_pct: Option<f64>,
}

const WORKLOADS: [Workload; 7] = [
    Workload {
        id: 0,
        name: "cheap syscalls (write /dev/null + getppid)",
        mode: "cheap",
        full: 4_000_000,
        smoke: 20_000,
        target_pct: Some(2.0),
    },
    Workload {
        id: 1,
        name: "futex contention (4 threads, 1 mutex)",
        mode: "futex",
        full: 4_000_000,
        smoke: 6_000,
        target_pct: Some(2.0),
    },
    Workload {
        id: 2,
        name: "loopback TCP ping-pong (64 B)",
        mode: "tcp",
        full: 80_000,
        smoke: 1_000,
        target_pct: Some(2.0),
    },
    Workload {
        id: 3,
        name: "pipe throughput (4 KiB writes, 2 processes)",
        mode: "pipe",
        full: 1_500_000,
        smoke: 5_000,
        target_pct: Some(2.0),
    },
    Workload {
        id: 4,
        name: "fork+exec storm (/bin/true, MT parent)",
        mode: "fork-exec",
        full: 1_500,
        smoke: 20,
        target_pct: Some(5.0),
    },
    Workload {
        id: 5,
        name: "fork-without-exec storm (MT parent)",
        mode: "fork-noexec",
        full: 6_000,
        smoke: 50,
        target_pct: None,
    },
    Workload {
        id: 6,
        name: "thread create/join storm",
        mode: "threads",
        full: 40_000,
        smoke: 300,
        target_pct: Some(2.0),
    },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    None,
    Forkwatch,
    Bpftrace,
}

impl Condition {
    const ALL: [Condition; 3] = [Condition::None, Condition::Forkwatch, Condition::Bpftrace];

    fn key(self) -> &'static str {
        match self {
            Condition::None => "none",
            Condition::Forkwatch => "forkwatch",
            Condition::Bpftrace => "bpftrace",
        }
    }
}

/// One timed run. Not `clean` when something else was measured too: another forkwatch or
/// bpftrace on the host (tests running at the same time), or, in (b), the daemon's write probe
/// attached because some other process on the host formed a fork family.
#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    clean: bool,
}

/// Everything a run measured, keyed so the report can be assembled at the end.
#[derive(Default)]
struct Results {
    /// (workload id, condition) → seconds of the timed part, one per repetition.
    times: BTreeMap<(usize, Condition), Vec<Sample>>,
    /// Workload 0 while a fork family keeps the write probe attached.
    family_times: Vec<Sample>,
    family_probe_attached: Vec<bool>,
    /// Per workload, during (b): events received per second of wall time, and events lost.
    events_per_s: BTreeMap<usize, Vec<f64>>,
    events_lost: BTreeMap<usize, f64>,
    family_events_lost: f64,
    /// Per (b) session: the daemon's CPU seconds (utime+stime) and wall seconds.
    daemon_cpu_s: f64,
    daemon_wall_s: f64,
    peak_rss_kib: u64,
    /// Session → VmHWM at its end.
    rss_by_session: BTreeMap<String, u64>,
    /// Session → VmRSS at its end (the peak may be a start-up transient).
    rss_now_by_session: BTreeMap<String, u64>,
    /// Workload name → program → (runs, seconds), deltas with --bpf-stats.
    bpf_stats: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
    idle: Option<Value>,
    /// The per-call cost of the hooks every task pays, against empty programs (hooks.rs).
    hook_cost: Option<Value>,
    latency: Option<Value>,
    sustained: Option<Value>,
}

/// Builds the workloads and checks the host: the bench to run, and the other monitors running.
fn prepare(smoke: bool) -> anyhow::Result<(Bench, Vec<String>)> {
    let root = cmd::workspace_root();
    let dir = root.join(BENCH_DIR);
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    // Another build of the daemon to measure (e.g. the commit before a change, for the hooks
    // table), instead of the one just built.
    let daemon = std::env::var_os(DAEMON_ENV).map_or_else(|| root.join(DAEMON), PathBuf::from);
    if !daemon.exists() {
        bail!("{} is missing: build it first", daemon.display());
    }
    ensure_bpftrace()?;
    let build = |name: &str, extra: &[&str]| -> anyhow::Result<PathBuf> {
        let out = dir.join(name);
        cmd::run_with(
            Command::new("cc")
                .args(["-O2", "-pthread", "-Wall"])
                .args(extra)
                .arg("-o")
                .arg(&out)
                .arg(root.join(WORKLOADS_SOURCE)),
        )?;
        Ok(out)
    };
    let workloads = build("workloads", &[])?;
    // The sustained storm forks from a static copy: fewer mappings to copy per fork, so this
    // machine gets closer to the 20,000 forks/s the target asks for.
    let storm_workloads = build("workloads-static", &["-static"])?;
    let foreign = foreign_monitors(&[]);
    if !foreign.is_empty() {
        eprintln!(
            "xtask: bench: other monitors are running and will perturb every condition: {}",
            foreign.join(", ")
        );
    }
    let bench = Bench {
        smoke,
        dir,
        daemon,
        workloads,
        storm_workloads,
    };
    Ok((bench, foreign))
}

/// `--hooks-only`: the hooks table alone (hooks.json and hooks.md in target/bench).
pub fn hooks_only(smoke: bool) -> anyhow::Result<()> {
    let (bench, _) = prepare(smoke)?;
    let report = serde_json::json!({ "hook_cost": hooks::measure(&bench)? });
    let path = bench.dir.join("hooks.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| path.display().to_string())?;
    let table = hooks::table(&report);
    println!("{table}");
    std::fs::write(bench.dir.join("hooks.md"), &table)?;
    Ok(())
}

pub fn bench(smoke: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let (bench, foreign) = prepare(smoke)?;
    let dir = bench.dir.clone();
    // bpftrace attaches tracepoints through tracefs; the daemon does not need it.
    let _tracefs = Tracefs::ensure()?;
    let reps = if smoke { 1 } else { REPETITIONS };
    let mut results = Results::default();
    for rep in 0..reps {
        for k in 0..Condition::ALL.len() {
            let condition = Condition::ALL[(rep + k) % Condition::ALL.len()];
            eprintln!(
                "xtask: bench: repetition {}/{reps}, condition {}",
                rep + 1,
                condition.key()
            );
            match condition {
                Condition::None => bench.pass_none(&mut results)?,
                Condition::Forkwatch => bench.pass_forkwatch(&mut results)?,
                Condition::Bpftrace => bench.pass_bpftrace(&mut results)?,
            }
        }
    }
    bench.pass_bpf_stats(&mut results)?;
    results.hook_cost = Some(hooks::measure(&bench)?);
    bench.idle_and_sustained(&mut results)?;

    let report = report::report(&bench, &results, reps, &foreign, started.elapsed());
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| path.display().to_string())?;
    let table = table::table(&report);
    println!("{table}");
    std::fs::write(dir.join("report.md"), &table)?;
    validate(&path)?;
    eprintln!(
        "xtask: bench: wrote {} and {} in {:.1} s",
        path.display(),
        dir.join("report.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Bench {
    smoke: bool,
    dir: PathBuf,
    daemon: PathBuf,
    workloads: PathBuf,
    /// The same program linked statically, for the sustained storm.
    storm_workloads: PathBuf,
}

impl Results {
    fn note_rss(&mut self, session: &str, (kib, now): (u64, u64)) {
        self.peak_rss_kib = self.peak_rss_kib.max(kib);
        let entry = self.rss_by_session.entry(session.to_owned()).or_default();
        *entry = (*entry).max(kib);
        let entry = self
            .rss_now_by_session
            .entry(session.to_owned())
            .or_default();
        *entry = (*entry).max(now);
    }
}

/// The smoke check: the report parses and has every workload in every condition.
fn validate(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let report: Value = serde_json::from_str(&text).context("report.json is not valid JSON")?;
    let workloads = report["workloads"]
        .as_array()
        .context("report.json: no workloads")?;
    if workloads.len() != WORKLOADS.len() {
        bail!(
            "report.json: {} workloads, expected {}",
            workloads.len(),
            WORKLOADS.len()
        );
    }
    for w in workloads {
        for c in Condition::ALL {
            let median = w["conditions"][c.key()]["median_s"].as_f64();
            if !median.is_some_and(|m| m.is_finite() && m > 0.0) {
                bail!(
                    "report.json: workload {} has no time for {}",
                    w["id"],
                    c.key()
                );
            }
        }
    }
    for key in [
        "daemon",
        "finding_latency",
        "sustained_fork_storm",
        "bpf_stats",
        "hook_cost",
        "targets",
    ] {
        if report[key].is_null() {
            bail!("report.json: no {key}");
        }
    }
    Ok(())
}

/// bpftrace from Debian when missing (as root; otherwise the exact command is the error).
fn ensure_bpftrace() -> anyhow::Result<()> {
    if cmd::output("bpftrace", &["--version"]).is_some() {
        return Ok(());
    }
    setup::apt_install(&["bpftrace"], "bpftrace, which the bench compares against")
}

/// tracefs mounted for bpftrace's tracepoints while the bench runs; unmounted again if the
/// bench mounted it.
struct Tracefs {
    mounted_here: bool,
}

impl Tracefs {
    const DIR: &'static str = "/sys/kernel/tracing";

    fn ensure() -> anyhow::Result<Tracefs> {
        let present = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .any(|d| Path::new(d).join("events").is_dir());
        if present {
            return Ok(Tracefs {
                mounted_here: false,
            });
        }
        cmd::run_with(Command::new("mount").args(["-t", "tracefs", "nodev", Self::DIR]))?;
        Ok(Tracefs { mounted_here: true })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = cmd::run_with(Command::new("umount").arg(Self::DIR));
        }
    }
}

/// Other forkwatch daemons or bpftrace instances (e.g. tests running at the same time).
fn foreign_monitors(own: &[u32]) -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || own.contains(&pid) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "forkwatch" || comm == "bpftrace" {
            found.push(format!("{comm} (pid {pid})"));
        }
    }
    found
}
