//! The hooks every task on the host pays for: forkwatch's cost per call on each, for tasks it does
//! not watch, next to the floor: an empty program on the same hook (monitor-ebpf/src/floor.rs),
//! which is what the kernel charges for running any program there.
//!
//! Both come from the kernel's BPF run-time statistics (each program's run_time_ns / run_cnt
//! from its prog info), around runs of the same workload, each side alone on the hooks in
//! alternating windows (see `measure`), so both carry the statistics' own cost alike. During the
//! measurement a multithreaded process keeps a child that never execs (`workloads latency`'s
//! lingering child), forked after the daemon started, which runs with a grace window longer than
//! the measurement: the child stays undecided, so the scheduler probes stay attached, as in the
//! moments after any multithreaded fork on a host; that family sleeps throughout. The
//! workload is the loopback TCP ping-pong (two threads of a process that never forks): every
//! send, receive, context switch and wakeup it causes is an uninvolved task's. Other processes
//! on the host run through the same hooks in the same window; the daemon tracks none of them
//! unless they fork without exec themselves (the table shows how many were tracked).
//!
//! Target: forkwatch within 2× of the floor on each hook. Reported, never enforced.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    thread::sleep,
};

use anyhow::{Context as _, bail};
use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, loaded_programs},
};
use monitor_common::names;
use serde_json::{Value, json};

use super::{Bench, STATS_SETTLE, WORKLOADS, processes::Daemon};
use crate::{cmd, lint};

/// Most forkwatch may cost per call, in multiples of the floor.
const TARGET_RATIO: f64 = 2.0;
/// Measurement windows (the median is reported, with the spread): full run, smoke.
const WINDOWS_FULL: usize = 7;
const WINDOWS_SMOKE: usize = 1;
/// The workload of each window: the loopback TCP ping-pong (workload 2).
const WORKLOAD: usize = 2;
/// The floor object's binary in monitor-ebpf, and where cargo puts it.
const FLOOR_BIN: &str = "forkwatch-floor";
const FLOOR_OBJECT: &str = "target/bpfel-unknown-none/release/forkwatch-floor";
/// The kernel keeps a program's name to BPF_OBJ_NAME_LEN - 1 bytes.
const KERNEL_NAME_LEN: usize = 15;

#[derive(Clone, Copy)]
enum At {
    TpBtf(&'static str),
    FEntry(&'static str),
}

/// A hook: where it attaches, forkwatch's program there and the floor's.
struct Hook {
    at: At,
    forkwatch: &'static str,
    floor: &'static str,
}

impl Hook {
    fn label(&self) -> String {
        match self.at {
            At::TpBtf(tp) => format!("tp_btf/{tp}"),
            At::FEntry(function) => format!("fentry/{function}"),
        }
    }
}

/// Every hook a task pays for without being involved: the scheduler probes (while something is
/// tracked) and the socket programs (always), both ways of the latter (a kernel has one).
const HOOKS: [Hook; 6] = [
    Hook {
        at: At::TpBtf(names::SWITCH_TRACEPOINT),
        forkwatch: names::SWITCH_PROGRAM,
        floor: "floor_sched_switch",
    },
    Hook {
        at: At::TpBtf(names::SCHEDULER_PROGRAMS[0]),
        forkwatch: names::SCHEDULER_PROGRAMS[0],
        floor: "floor_sched_wakeup",
    },
    Hook {
        at: At::TpBtf(names::SOCKET_TRACEPOINT_PROGRAMS[0].1),
        forkwatch: names::SOCKET_TRACEPOINT_PROGRAMS[0].0,
        floor: "floor_sock_send_length",
    },
    Hook {
        at: At::TpBtf(names::SOCKET_TRACEPOINT_PROGRAMS[1].1),
        forkwatch: names::SOCKET_TRACEPOINT_PROGRAMS[1].0,
        floor: "floor_sock_recv_length",
    },
    Hook {
        at: At::FEntry(names::SOCKET_HOOK_PROGRAMS[0].1),
        forkwatch: names::SOCKET_HOOK_PROGRAMS[0].0,
        floor: "floor_socket_sendmsg",
    },
    Hook {
        at: At::FEntry(names::SOCKET_HOOK_PROGRAMS[1].1),
        forkwatch: names::SOCKET_HOOK_PROGRAMS[1].0,
        floor: "floor_socket_recvmsg",
    },
];

/// Builds the floor object with the eBPF toolchain (a few seconds once the daemon is built).
fn build_floor() -> anyhow::Result<PathBuf> {
    cmd::run_with(lint::ebpf_cargo("build")?.args(["--bin", FLOOR_BIN]))?;
    Ok(cmd::workspace_root().join(FLOOR_OBJECT))
}

/// The floor programs, attached where this kernel lets them attach; each hook's refusal is kept
/// for its row.
struct Floor {
    ebpf: Ebpf,
    refused: BTreeMap<&'static str, String>,
}

impl Floor {
    /// The floor programs of the hooks `wanted` picks.
    fn attach(object: &Path, wanted: fn(&Hook) -> bool) -> anyhow::Result<Floor> {
        let mut ebpf = Ebpf::load_file(object)
            .with_context(|| format!("cannot load the floor object {}", object.display()))?;
        let btf = Btf::from_sys_fs().context("the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        let mut refused = BTreeMap::new();
        for hook in HOOKS.iter().filter(|h| wanted(h)) {
            let program = ebpf
                .program_mut(hook.floor)
                .with_context(|| format!("no program {} in {}", hook.floor, object.display()))?;
            let attached = match hook.at {
                At::TpBtf(tp) => <&mut BtfTracePoint>::try_from(program)
                    .map_err(anyhow::Error::from)
                    .and_then(|p| {
                        p.load(tp, &btf)?;
                        p.attach().map(drop).map_err(Into::into)
                    }),
                At::FEntry(function) => <&mut FEntry>::try_from(program)
                    .map_err(anyhow::Error::from)
                    .and_then(|p| {
                        p.load(function, &btf)?;
                        p.attach().map(drop).map_err(Into::into)
                    }),
            };
            if let Err(err) = attached {
                refused.insert(hook.floor, format!("{err:#}"));
            }
        }
        Ok(Floor { ebpf, refused })
    }

    /// (runs, ns) of each attached floor program.
    fn stats(&self) -> BTreeMap<&'static str, (u64, u64)> {
        let mut out = BTreeMap::new();
        for hook in &HOOKS {
            if self.refused.contains_key(hook.floor) {
                continue;
            }
            if let Some(info) = self.ebpf.program(hook.floor).and_then(|p| p.info().ok()) {
                out.insert(
                    hook.floor,
                    (info.run_count(), info.run_time().as_nanos() as u64),
                );
            }
        }
        out
    }
}

/// The daemon's programs (by their kernel ids, from its fds): (runs, ns) by kernel name.
fn daemon_stats(pid: u32) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue; // an fd closed meanwhile
        };
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    let mut out = BTreeMap::new();
    for info in loaded_programs().filter_map(Result::ok) {
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or("").to_owned();
            out.insert(name, (info.run_count(), info.run_time().as_nanos() as u64));
        }
    }
    Ok(out)
}

fn kernel_name(program: &str) -> &str {
    &program[..program.len().min(KERNEL_NAME_LEN)]
}

/// (calls, ns per call) of one program in one window; None when it did not run.
type PerCall = Option<(u64, f64)>;
/// One window of a hook: forkwatch's program, and the floor's.
type Window = (PerCall, PerCall);

/// (calls, ns per call) between two readings; None when it did not run.
fn per_call(before: Option<&(u64, u64)>, after: Option<&(u64, u64)>) -> PerCall {
    let (&(r0, t0), &(r1, t1)) = (before?, after?);
    let runs = r1.checked_sub(r0).filter(|&r| r > 0)?;
    Some((runs, t1.saturating_sub(t0) as f64 / runs as f64))
}

/// The lingering child of a multithreaded fork (`workloads latency`: its first child never
/// execs and stays until stdin closes), which keeps the scheduler probes attached.
struct Worker {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

/// A grace window no measurement outlasts: the worker's child stays undecided throughout.
const UNDECIDED_GRACE: &str = "1h";

impl Worker {
    fn start(bench: &Bench) -> anyhow::Result<Worker> {
        let (child, stdin, line) = super::processes::spawn_until_line(&bench.workloads, "latency")?;
        let worker = Worker {
            child,
            stdin: Some(stdin),
        };
        if !line.starts_with("latency ") {
            bail!("the lingering worker did not start: {line:?}");
        }
        Ok(worker)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// One side alone on the hooks for one run of the workload: (runs, ns) by program name, before
/// and after.
type Readings<K> = (BTreeMap<K, (u64, u64)>, BTreeMap<K, (u64, u64)>);

/// Forkwatch alone on its hooks for one run of the workload: a daemon started for it, then a
/// lingering worker it sees forked and keeps undecided (UNDECIDED_GRACE), for which it attaches
/// its scheduler probes.
fn forkwatch_window(bench: &Bench, tracked: &mut Vec<f64>) -> anyhow::Result<Readings<String>> {
    let daemon = Daemon::start_with(bench, false, "hooks", &["--exec-grace", UNDECIDED_GRACE])?;
    let _worker = Worker::start(bench)?;
    if !daemon.wait_gauge("forkwatch_scheduler_probes_attached", true)? {
        bail!("the daemon did not attach its scheduler probes for an undecided child");
    }
    let before = daemon_stats(daemon.pid())?;
    bench.run_workload(&WORKLOADS[WORKLOAD])?;
    let after = daemon_stats(daemon.pid())?;
    let metrics = daemon.scrape()?;
    tracked.push(metrics.sum("forkwatch_tracked_processes"));
    if metrics.sum("forkwatch_scheduler_probes_attached") != 1.0 {
        bail!("the scheduler probes were detached during the measurement");
    }
    daemon.stop()?;
    Ok((before, after))
}

/// The floor alone on the hooks for one run of the workload, and what this kernel refused.
fn floor_window(
    bench: &Bench,
    object: &Path,
) -> anyhow::Result<(Readings<&'static str>, BTreeMap<&'static str, String>)> {
    let floor = Floor::attach(object, |_| true)?;
    let before = floor.stats();
    bench.run_workload(&WORKLOADS[WORKLOAD])?;
    let after = floor.stats();
    Ok(((before, after), floor.refused))
}

/// The socket hooks forkwatch keeps attached on every host: the tracepoints, or where the kernel
/// lacks them the fentry fallback.
fn socket_tracepoint(hook: &Hook) -> bool {
    names::SOCKET_TRACEPOINT_PROGRAMS
        .iter()
        .any(|(program, _)| *program == hook.forkwatch)
}

fn socket_fentry(hook: &Hook) -> bool {
    names::SOCKET_HOOK_PROGRAMS
        .iter()
        .any(|(program, _)| *program == hook.forkwatch)
}

/// What the kernel charges the workload for any program on the socket hooks: the workload
/// timed with nothing attached and with the floor's empty programs on the socket hooks forkwatch
/// keeps attached on every host (the scheduler hooks attach only while something is tracked), in
/// alternating pairs, before the BPF statistics are enabled (they add a cost of their own).
/// Report only: on this workload no program on those hooks costs less than this ratio.
fn socket_floor_on_workload(bench: &Bench, object: &Path, pairs: usize) -> anyhow::Result<Value> {
    let workload = &WORKLOADS[WORKLOAD];
    let timed_with_floor = || -> anyhow::Result<f64> {
        let mut floor = Floor::attach(object, socket_tracepoint)?;
        if !floor.refused.is_empty() {
            floor = Floor::attach(object, socket_fentry)?;
        }
        if !floor.refused.is_empty() {
            bail!(
                "no empty program attaches to the socket hooks: {:?}",
                floor.refused
            );
        }
        Ok(bench.run_workload(workload)?.0)
    };
    let (mut bare, mut with_floor) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        if pair % 2 == 0 {
            bare.push(bench.run_workload(workload)?.0);
            with_floor.push(timed_with_floor()?);
        } else {
            with_floor.push(timed_with_floor()?);
            bare.push(bench.run_workload(workload)?.0);
        }
    }
    let ratios: Vec<f64> = bare.iter().zip(&with_floor).map(|(b, f)| f / b).collect();
    Ok(json!({
        "nothing_s": bare,
        "floor_s": with_floor,
        "ratio_by_pair": ratios,
        "ratio_median": finite(median(&ratios)),
    }))
}

/// Measures every hook; the `hook_cost` entry of report.json.
///
/// Each side is measured alone on the hooks, in windows of its own that alternate (which side
/// goes first swaps from window to window, so a drift of the machine falls on both alike). Not
/// side by side: when two programs share a hook, the kernel runs them in the order they were
/// attached, and the first pays for what the hook's path finds cold (measured: forkwatch's
/// socket program reduced to an empty one read 78 ns per call against the floor's 49 ns when
/// both were attached, the daemon first); on a host forkwatch's program is the only one there.
pub(super) fn measure(bench: &Bench) -> anyhow::Result<Value> {
    eprintln!("xtask: bench: per-call cost of the hooks every task pays, against empty programs");
    let object = build_floor()?;
    let windows = if bench.smoke {
        WINDOWS_SMOKE
    } else {
        WINDOWS_FULL
    };
    let socket_floor = socket_floor_on_workload(bench, &object, windows)?;
    // The statistics count while this fd is open (the daemon's programs and the floor's alike).
    let _stats: OwnedFd =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF statistics")?;
    let workload = &WORKLOADS[WORKLOAD];
    // hook → per window: (forkwatch calls, ns/call), (floor calls, ns/call)
    let mut samples: BTreeMap<usize, Vec<Window>> = BTreeMap::new();
    let mut tracked = Vec::new();
    let mut refused = BTreeMap::new();
    for window in 0..windows {
        let ((fw_before, fw_after), ((fl_before, fl_after), kernel_refused)) = if window % 2 == 0 {
            let fw = forkwatch_window(bench, &mut tracked)?;
            sleep(STATS_SETTLE);
            (fw, floor_window(bench, &object)?)
        } else {
            let fl = floor_window(bench, &object)?;
            sleep(STATS_SETTLE);
            (forkwatch_window(bench, &mut tracked)?, fl)
        };
        sleep(STATS_SETTLE);
        refused = kernel_refused;
        for (i, hook) in HOOKS.iter().enumerate() {
            let name = kernel_name(hook.forkwatch);
            let fw = per_call(fw_before.get(name), fw_after.get(name));
            let fl = per_call(fl_before.get(hook.floor), fl_after.get(hook.floor));
            samples.entry(i).or_default().push((fw, fl));
        }
    }

    let mut rows = Vec::new();
    for (i, hook) in HOOKS.iter().enumerate() {
        let windows = samples.remove(&i).unwrap_or_default();
        let fw: Vec<f64> = windows.iter().filter_map(|(f, _)| f.map(|x| x.1)).collect();
        if fw.is_empty() {
            continue; // forkwatch does not use this hook on this kernel
        }
        let fl: Vec<f64> = windows.iter().filter_map(|(_, f)| f.map(|x| x.1)).collect();
        let calls = |pick: fn(&Window) -> PerCall| {
            windows
                .iter()
                .filter_map(|w| pick(w).map(|x| x.0))
                .collect::<Vec<_>>()
        };
        let (fw_med, fl_med) = (median(&fw), median(&fl));
        let ratio = fw_med / fl_med;
        let ratios: Vec<f64> = windows
            .iter()
            .filter_map(|(f, l)| Some(f.as_ref()?.1 / l.as_ref()?.1))
            .collect();
        rows.push(json!({
            "hook": hook.label(),
            "forkwatch_program": hook.forkwatch,
            "forkwatch_ns_per_call": fw,
            "forkwatch_ns_per_call_median": fw_med,
            "forkwatch_calls": calls(|w| w.0),
            "floor_program": hook.floor,
            "floor_ns_per_call": fl,
            "floor_ns_per_call_median": finite(fl_med),
            "floor_calls": calls(|w| w.1),
            "floor_refused": refused.get(hook.floor),
            "ratio_median": finite(ratio),
            "ratio_by_window": ratios,
            "target_ratio": TARGET_RATIO,
            "met": ratio.is_finite() && ratio <= TARGET_RATIO,
        }));
    }
    if rows.is_empty() {
        bail!("none of forkwatch's per-task hooks ran during the measurement");
    }
    Ok(json!({
        "workload": workload.name,
        "size": bench.size(workload),
        "windows": windows,
        "tracked_processes_by_window": tracked,
        "hooks": rows,
        "socket_floor_on_workload": socket_floor,
    }))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// The hooks' rows of the targets table.
pub(super) fn targets(hook_cost: Option<&Value>) -> Vec<Value> {
    let rows = hook_cost.and_then(|h| h["hooks"].as_array());
    rows.into_iter()
        .flatten()
        .map(|row| {
            json!({
                "target": format!(
                    "{} per call (uninvolved task) <= {TARGET_RATIO}x an empty program",
                    row["hook"].as_str().unwrap_or("")
                ),
                "measured": format!(
                    "{:.1} ns vs {:.1} ns = {:.2}x",
                    num(&row["forkwatch_ns_per_call_median"]),
                    num(&row["floor_ns_per_call_median"]),
                    num(&row["ratio_median"])
                ),
                "met": row["met"],
            })
        })
        .collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The table of report.md.
pub(super) fn table(report: &Value) -> String {
    let h = &report["hook_cost"];
    let mut out = format!(
        "\nPer-call cost of the hooks every task pays, for tasks forkwatch does not watch, against \
         an empty program on the same hook (BPF run-time statistics; {} windows of `{}`, while an \
         undecided child of a multithreaded fork keeps the scheduler probes attached; tracked \
         processes per window: {}), ns:\n\n\
         | hook | forkwatch ns/call | floor ns/call | ratio | target | verdict |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        h["windows"],
        h["workload"].as_str().unwrap_or(""),
        h["tracked_processes_by_window"],
    );
    for row in h["hooks"].as_array().into_iter().flatten() {
        let verdict = if row["met"] == true {
            "within 2x".to_owned()
        } else if row["floor_ns_per_call_median"].is_null() {
            format!(
                "**MISS**: no floor ({})",
                row["floor_refused"].as_str().unwrap_or("")
            )
        } else {
            "**MISS**".to_owned()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | ≤ {}x | {verdict} |\n",
            row["hook"].as_str().unwrap_or(""),
            spread(
                &row["forkwatch_ns_per_call"],
                &row["forkwatch_ns_per_call_median"]
            ),
            spread(&row["floor_ns_per_call"], &row["floor_ns_per_call_median"]),
            num(&row["ratio_median"]),
            row["target_ratio"],
        ));
    }
    out.push_str("\n(ns/call cells: median [min–max over the windows]; ratio of the medians)\n");
    let f = &h["socket_floor_on_workload"];
    let ratios = numbers(&f["ratio_by_pair"]);
    if !ratios.is_empty() {
        let (lo, hi) = range(&ratios);
        out.push_str(&format!(
            "\nThe floor on the workload itself (report only): `{}` with empty programs on the socket \
             hooks forkwatch keeps attached on every host, against nothing attached, {} \
             alternating pairs without BPF statistics: median ratio {:.3} ({lo:.3}–{hi:.3}), the \
             least any program there adds to this workload on this kernel.\n",
            h["workload"].as_str().unwrap_or(""),
            ratios.len(),
            num(&f["ratio_median"]),
        ));
    }
    out
}

/// "median [min–max]" of a list of ns/call.
fn spread(values: &Value, median: &Value) -> String {
    let list = numbers(values);
    if list.is_empty() {
        return "-".to_owned();
    }
    let (lo, hi) = range(&list);
    format!("{:.1} [{lo:.1}–{hi:.1}]", num(median))
}

/// The numbers of a JSON list.
fn numbers(values: &Value) -> Vec<f64> {
    values
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

/// (min, max) of a list.
fn range(list: &[f64]) -> (f64, f64) {
    list.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
