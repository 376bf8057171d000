//! `forkwatch selftest`: proves on the running kernel that the probes load and that each
//! detector reports a real scenario, played by the binary itself re-executed as a fixture
//! (commands/fixture/), while the safe patterns stay quiet.

mod fixtures;
mod scenarios;

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{
    cli::CommonArgs,
    kernel::Detector,
    pipeline::{Monitor, MonitorOptions},
    report::finding::{Finding, Kind},
};
use fixtures::Fixture;
use scenarios::{Pids, Runs, SCENARIOS, Scenario};

const GRACE: Duration = Duration::from_millis(300);
const DEADLOCK_AFTER: Duration = Duration::from_millis(300);
/// The longest the selftest waits for the fixtures and the findings, all together. The slowest
/// finding, the shared file offset, needs the grace window plus one family scan (500 ms) before
/// the write probe attaches: about a second.
const GIVE_UP: Duration = Duration::from_secs(10);

pub async fn run(args: CommonArgs) -> anyhow::Result<bool> {
    let monitor = Monitor::start(&MonitorOptions {
        btf_path: args.btf,
        ring_buffer_bytes: monitor_common::RING_BUFFER_BYTES,
        max_tracked: 1024,
        exec_grace: GRACE,
        deadlock_after: DEADLOCK_AFTER,
        full_cmdline: false,
        tree_root: None,
    })?;
    println!("selftest: probes loaded and attached");
    // The scenarios of a detector this kernel cannot run are skipped, with the reason.
    let unavailable: Vec<(&str, String)> = monitor
        .detectors()
        .iter()
        .filter_map(|status| Some((status.detector, status.state.clone().err()?)))
        .flat_map(|(detector, why)| {
            kinds_of(detector)
                .iter()
                .map(move |kind| (kind.as_str(), why.clone()))
        })
        .collect();
    let unavailable: Vec<(&str, &str)> = unavailable
        .iter()
        .map(|(kind, why)| (*kind, why.as_str()))
        .collect();
    run_scenarios(monitor, &unavailable).await
}

/// The finding kinds a detector decides (the scenarios name their detector by the kind).
fn kinds_of(detector: Detector) -> &'static [Kind] {
    match detector {
        Detector::Lifecycle => &[Kind::MtForkNoExec, Kind::ThreadsAfterMtFork],
        Detector::InheritedLock => &[Kind::InheritedLockDeadlock],
        Detector::SharedSocket => &[Kind::SharedSocket],
        Detector::SharedFileOffset => &[Kind::SharedFileOffset],
    }
}

/// The state of one scenario of the table.
enum Run {
    /// Its detector is unavailable on this kernel: the reason.
    Skipped(String),
    /// Its fixture could not play it.
    Broken(String),
    Started {
        pids: Pids,
        /// Held while it runs until stopped; dropping it stops it.
        fixture: Option<Fixture>,
    },
}

/// Plays every scenario against `monitor`, prints one line per scenario and the total, and
/// returns whether all that ran passed. `unavailable` lists (detector, reason) pairs for the
/// detectors this kernel cannot run: their scenarios are skipped, not failed.
pub async fn run_scenarios(
    mut monitor: Monitor,
    unavailable: &[(&str, &str)],
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let give_up = started + GIVE_UP;
    let mut runs: Vec<Run> = SCENARIOS
        .iter()
        .map(|scenario| start(scenario, unavailable, give_up))
        .collect();

    let mut findings: Vec<Finding> = Vec::new();
    loop {
        // A fixture that runs until stopped has done its part once its finding is in.
        for (scenario, run) in SCENARIOS.iter().zip(&mut runs) {
            if let Run::Started { pids, fixture } = run
                && scenario.reported(*pids, &findings)
            {
                drop(fixture.take());
            }
        }
        let now = Instant::now();
        if now >= give_up || all_decided(&runs, &findings) {
            break;
        }
        match tokio::time::timeout(give_up - now, monitor.next_finding()).await {
            Ok(Some(f)) => findings.push(f),
            Ok(None) => bail!("the event pipeline stopped unexpectedly"),
            Err(_) => break,
        }
    }
    // Every fixture ends before the pipeline's final drain, so that the findings about them
    // are all in (or certainly never coming).
    for run in &mut runs {
        if let Run::Started { fixture, .. } = run {
            drop(fixture.take());
        }
    }
    findings.extend(monitor.stop().await?);

    let waited = started.elapsed().as_secs().max(1);
    let mut passed = true;
    for (scenario, run) in SCENARIOS.iter().zip(&runs) {
        let (verdict, why) = match run {
            Run::Skipped(reason) => ("SKIP", format!("unavailable on this kernel ({reason})")),
            Run::Broken(err) => {
                passed = false;
                (
                    "FAIL",
                    format!("{}: the fixture failed: {err}", scenario.what),
                )
            }
            Run::Started { pids, .. } => {
                let (ok, why) = scenario.judge(*pids, &findings, waited);
                passed &= ok;
                (if ok { "PASS" } else { "FAIL" }, why)
            }
        };
        println!("selftest: {verdict} {}: {why}", scenario.name);
    }
    println!("selftest: {}", if passed { "passed" } else { "FAILED" });
    Ok(passed)
}

/// Starts one scenario's fixture; one that runs to completion is waited for, so that the next
/// scenario's processes come strictly after its own.
fn start(scenario: &Scenario, unavailable: &[(&str, &str)], deadline: Instant) -> Run {
    if let Some((_, reason)) = unavailable
        .iter()
        .find(|(detector, _)| *detector == scenario.detector.as_str())
    {
        return Run::Skipped((*reason).to_owned());
    }
    let started = Fixture::start(scenario.fixture, deadline).and_then(|fixture| {
        if scenario.runs == Runs::ToCompletion {
            fixture.done(deadline)?;
        }
        Ok(fixture)
    });
    match started {
        Ok(fixture) => Run::Started {
            pids: Pids {
                parent: fixture.parent(),
                child: fixture.child(),
            },
            fixture: (scenario.runs == Runs::UntilStopped).then_some(fixture),
        },
        Err(err) => Run::Broken(format!("{err:#}")),
    }
}

/// Whether every started scenario is decided: its finding has arrived, or, for a quiet one, a
/// finding of a scenario started after it has (see [`SCENARIOS`]).
fn all_decided(runs: &[Run], findings: &[Finding]) -> bool {
    let reported: Vec<Option<bool>> = SCENARIOS
        .iter()
        .zip(runs)
        .map(|(scenario, run)| match run {
            Run::Started { pids, .. } => Some(scenario.reported(*pids, findings)),
            Run::Skipped(_) | Run::Broken(_) => None,
        })
        .collect();
    SCENARIOS
        .iter()
        .enumerate()
        .all(|(i, scenario)| match (reported[i], scenario.expect) {
            (None, _) => true,
            (Some(_), scenarios::Expect::Quiet) => reported[i + 1..].contains(&Some(true)),
            (Some(seen), scenarios::Expect::Once(_)) => seen,
        })
}
