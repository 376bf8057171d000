//! Finding latency: how long after the hazard a finding is written. Target: a child that never
//! execs is reported within the exec-grace window + 100 ms of its fork; a child that exits
//! without exec, within 100 ms of its exit.
//!
//! `workloads latency` makes one of each and prints their pids with the wall-clock times of the
//! fork and of the exit (CLOCK_REALTIME); this module watches the daemon's JSON output every
//! 2 ms and takes the wall-clock time at which each finding appears there. (A finding's own
//! `time` is when its hazard happened, not when it was written, so it cannot measure this.)

use std::{
    path::Path,
    thread::sleep,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// A finding may come this long after the grace window (or after the exit).
pub const TARGET_MS: f64 = 100.0;

/// One run's latencies in ms: past the grace window for the child that never execs, past the
/// exit for the one that exits.
struct Sample {
    deadline_ms: f64,
    exit_ms: f64,
}

/// Runs `runs` rounds against the daemon writing findings to `findings`.
pub fn measure(workloads: &Path, findings: &Path, runs: usize) -> anyhow::Result<Value> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(one(workloads, findings)?);
    }
    let worst = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(f64::NAN, f64::max);
    let (deadline_max, exit_max) = (worst(|s| s.deadline_ms), worst(|s| s.exit_ms));
    Ok(json!({
        "runs": runs,
        "past_grace_ms": samples.iter().map(|s| s.deadline_ms).collect::<Vec<_>>(),
        "after_exit_ms": samples.iter().map(|s| s.exit_ms).collect::<Vec<_>>(),
        "past_grace_ms_max": deadline_max,
        "after_exit_ms_max": exit_max,
        "target_ms": TARGET_MS,
        "met": deadline_max <= TARGET_MS && exit_max <= TARGET_MS,
    }))
}

fn one(workloads: &Path, findings: &Path) -> anyhow::Result<Sample> {
    let (mut child, stdin, line) = super::processes::spawn_until_line(workloads, "latency")?;
    let field = |key: &str| -> anyhow::Result<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in the latency fixture's line {line:?}"))
    };
    let (waiting, fork_ns) = (field("deadline_child")?, field("fork_ns")?);
    let (exiting, exit_ns) = (field("exit_child")?, field("exit_ns")?);
    let (exited, exit_seen) = wait_finding(findings, exiting, Duration::from_secs(10))?;
    let (deadline, deadline_seen) = wait_finding(findings, waiting, Duration::from_secs(10))?;
    drop(stdin);
    child.wait()?;
    let grace_ms = deadline["grace_ms"]
        .as_f64()
        .context("the finding has no grace_ms")?;
    if exited["exited_without_exec"] != true {
        bail!("the exiting child's finding does not say it exited: {exited}");
    }
    Ok(Sample {
        deadline_ms: ms_between(fork_ns, deadline_seen) - grace_ms,
        exit_ms: ms_between(exit_ns, exit_seen),
    })
}

/// A report's list of latencies, rounded to whole ms: "12, 9, 14".
pub fn ms_list(values: &Value) -> String {
    let values = values.as_array().map(Vec::as_slice).unwrap_or_default();
    let ms: Vec<String> = values
        .iter()
        .map(|v| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN)))
        .collect();
    ms.join(", ")
}

/// Milliseconds from `since_ns` (CLOCK_REALTIME) to `at`.
fn ms_between(since_ns: u64, at: SystemTime) -> f64 {
    let at = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (at.as_nanos() as f64 - since_ns as f64) / 1e6
}

/// The `mt_fork_no_exec` finding about `pid` in the JSON-lines file and the wall-clock time
/// it was first seen there (checked every 2 ms).
fn wait_finding(
    findings: &Path,
    pid: u64,
    timeout: Duration,
) -> anyhow::Result<(Value, SystemTime)> {
    let give_up = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(findings).unwrap_or_default();
        let seen = SystemTime::now();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|f| f["pid"] == pid && f["kind"] == "mt_fork_no_exec");
        if let Some(finding) = found {
            return Ok((finding, seen));
        }
        if Instant::now() > give_up {
            bail!("no mt_fork_no_exec finding for pid {pid} within {timeout:?}");
        }
        sleep(Duration::from_millis(2));
    }
}
