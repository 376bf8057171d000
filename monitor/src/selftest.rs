//! `forkwatch selftest`: proves on the running kernel that the probes load and that exactly the
//! hazardous one of two real processes is reported.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::CommonArgs,
    finding::{Finding, Kind},
    fixture,
    monitor::{Monitor, MonitorOptions},
};

const GRACE: Duration = Duration::from_millis(300);

pub async fn run(args: CommonArgs) -> anyhow::Result<bool> {
    let mut monitor = Monitor::start(&MonitorOptions {
        btf_path: args.btf,
        ring_buffer_bytes: monitor_common::RING_BUFFER_BYTES,
        max_tracked: 1024,
        exec_grace: GRACE,
        full_cmdline: false,
    })?;
    println!("selftest: probes loaded and attached");
    let hazard = run_fixture(fixture::MT_FORK_NO_EXEC)?;
    let safe = run_fixture(fixture::MT_FORK_EXEC)?;
    let fixtures_done = Instant::now();

    // The hazard is decided when its child exits; the safe child is decided (quietly) at its
    // deadline. Wait past that deadline with margin, or stop early once both are certain.
    let quiet_until = fixtures_done + GRACE + Duration::from_millis(500);
    let give_up = fixtures_done + GRACE + Duration::from_secs(3);
    let mut findings: Vec<Finding> = Vec::new();
    loop {
        let now = Instant::now();
        let seen = findings.iter().any(|f| f.pid == hazard);
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

    let count = |pid: u32| {
        findings
            .iter()
            .filter(|f| f.pid == pid && f.kind == Kind::MtForkNoExec)
            .count()
    };
    let checks = [
        (
            format!("multithreaded fork without exec (child {hazard}) reported once"),
            count(hazard) == 1,
        ),
        (
            format!("multithreaded fork + exec (child {safe}) not reported"),
            count(safe) == 0,
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
