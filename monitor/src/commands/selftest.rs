//! `forkwatch selftest`: proves on the running kernel that the probes load and that exactly the
//! hazardous one of two real processes is reported.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::CommonArgs,
    commands::fixture,
    pipeline::{Monitor, MonitorOptions},
    report::finding::{Finding, Kind},
};

const GRACE: Duration = Duration::from_millis(300);
const DEADLOCK_AFTER: Duration = Duration::from_millis(300);

pub async fn run(args: CommonArgs) -> anyhow::Result<bool> {
    let mut monitor = Monitor::start(&MonitorOptions {
        btf_path: args.btf,
        ring_buffer_bytes: monitor_common::RING_BUFFER_BYTES,
        max_tracked: 1024,
        exec_grace: GRACE,
        deadlock_after: DEADLOCK_AFTER,
        full_cmdline: false,
    })?;
    println!("selftest: probes loaded and attached");
    let hazard = run_fixture(fixture::MT_FORK_NO_EXEC)?;
    let safe = run_fixture(fixture::MT_FORK_EXEC)?;
    let deadlocked = run_fixture(fixture::MT_FORK_DEADLOCK)?;
    let _kill = KillOnDrop(deadlocked);
    let fixtures_done = Instant::now();

    // The hazard is decided when its child exits, the deadlock after DEADLOCK_AFTER; the safe
    // child is decided (quietly) at its deadline. Wait past that deadline with margin, or stop
    // early once everything is certain.
    let quiet_until = fixtures_done + GRACE + Duration::from_millis(500);
    let give_up = fixtures_done + GRACE.max(DEADLOCK_AFTER) + Duration::from_secs(3);
    let mut findings: Vec<Finding> = Vec::new();
    loop {
        let now = Instant::now();
        let seen = findings.iter().any(|f| f.pid == hazard)
            && findings
                .iter()
                .any(|f| f.pid == deadlocked && f.kind == Kind::InheritedLockDeadlock);
        if now >= give_up || (seen && now >= quiet_until) {
            break;
        }
        let until = if seen { quiet_until } else { give_up };
        match tokio::time::timeout(until - now, monitor.next_finding()).await {
            Ok(Some(f)) => findings.push(f),
            Ok(None) => bail!("the event pipeline stopped unexpectedly"),
            Err(_) => break,
        }
    }
    findings.extend(monitor.stop().await?);

    let count = |pid: u32, kind: Kind| {
        findings
            .iter()
            .filter(|f| f.pid == pid && f.kind == kind)
            .count()
    };
    let checks = [
        (
            format!("multithreaded fork without exec (child {hazard}) reported once"),
            count(hazard, Kind::MtForkNoExec) == 1,
        ),
        (
            format!("multithreaded fork + exec (child {safe}) not reported"),
            findings.iter().all(|f| f.pid != safe),
        ),
        (
            format!("child {deadlocked} blocked on an inherited lock reported as a deadlock"),
            count(deadlocked, Kind::InheritedLockDeadlock) == 1,
        ),
    ];
    let mut passed = true;
    for (what, ok) in &checks {
        println!("selftest: {} {what}", if *ok { "PASS" } else { "FAIL" });
        passed &= ok;
    }
    println!("selftest: {}", if passed { "passed" } else { "FAILED" });
    Ok(passed)
}

/// Kills a pid on drop: the deadlocked child never ends by itself.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// Runs `forkwatch fixture NAME` and returns the pid of the child it forked.
fn run_fixture(name: &str) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("current_exe")?;
    let out = Command::new(exe)
        .args(["fixture", name])
        .output()
        .with_context(|| format!("running fixture {name}"))?;
    if !out.status.success() {
        bail!(
            "fixture {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("fixture {name} printed {text:?}, not a pid"))
}
