//! `forkwatch exec -- CMD`: runs CMD with the probes attached and reports the fork hazards of
//! its process tree only, for CI. The exit status is CMD's own if it failed, else 3 if a
//! finding in the tree is at or above `--fail-on`, else 0.
//!
//! The tree is everything that descends from forkwatch exec's own process, which the kernel
//! programs follow from fork to fork (`monitor_common::TREE_MAX_ENTRIES`): CMD is forkwatch's
//! only child, and each record about a descendant says so when the kernel writes it. Nothing
//! needs root beyond what loading the probes does (no cgroup to create), and a process that
//! moves to another cgroup or is reparented stays in the tree. The monitor is the daemon's,
//! started before CMD; findings take the daemon's path to the sinks (commands/reporting.rs:
//! `[[ignore]]`, folding), on stderr, since CMD owns stdout.

mod child;
mod junit;
mod signals;
mod verdict;

use std::{
    ffi::OsString,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use self::{child::Cmd, signals::Signals, verdict::Verdict};
use crate::{
    cli::{ExecArgs, UsageError},
    commands::reporting::{self, Reporter, sleep_until},
    kernel::capabilities,
    pipeline::{Monitor, MonitorOptions},
    report::{finding::Finding, finding::Kind, suppress::IgnoreRule},
};

/// After CMD's exit, how long past the exec grace and the deadlock threshold the decisions
/// about its tree may take to come out: the correlator decides deadlines 25 ms late, and a
/// futex wait is seen by a scan every 100 ms.
const DECISION_MARGIN: Duration = Duration::from_millis(300);
/// How often, after CMD's exit, exec asks whether anything about the tree is still pending.
const SETTLED_POLL: Duration = Duration::from_millis(20);

/// Runs CMD under watch; the exit status.
pub async fn run(args: ExecArgs, ignore: Vec<IgnoreRule>) -> anyhow::Result<u8> {
    let watch = &args.watch;
    // Everything that can be wrong fails before the probes load and before CMD starts.
    if let Some(missing) = capabilities::effective().and_then(missing_capabilities) {
        return Err(UsageError(missing).into());
    }
    let sinks = reporting::sinks(std::io::stderr(), watch.format, watch.output.as_deref())?;
    let mut junit = match &args.junit {
        Some(path) => Some((path.clone(), create_junit(path)?)),
        None => None,
    };
    let mut signals = Signals::install()?;
    let (status, verdict) = watch_cmd(&args, ignore, sinks, &mut signals).await?;
    if let Some((path, file)) = &mut junit {
        let xml = junit::render(&verdict, &shown(&args.command));
        file.write_all(xml.as_bytes())
            .and_then(|()| file.flush())
            .with_context(|| format!("writing --junit {}", path.display()))?;
    }
    let exit = verdict.exit_status(status);
    tracing::info!(
        cmd_status = status,
        findings = verdict.kinds.values().map(|k| k.seen).sum::<u64>(),
        failing = verdict.kinds.values().map(|k| k.failing).sum::<u64>(),
        fail_on = verdict.fail_on.as_str(),
        exit,
        "done"
    );
    Ok(exit)
}

/// Starts the monitor, then CMD; reports the tree's findings until CMD has exited and the
/// decisions about its tree are out. CMD's status (as a shell tells it) and the verdict.
async fn watch_cmd(
    args: &ExecArgs,
    ignore: Vec<IgnoreRule>,
    sinks: crate::report::Sinks,
    signals: &mut Signals,
) -> anyhow::Result<(u8, Verdict)> {
    let watch = &args.watch;
    let mut verdict = Verdict::new(args.fail_on);
    let program = match child::find(&args.command) {
        Ok(program) => program,
        Err((status, message)) => {
            eprintln!("forkwatch: {message}");
            return Ok((status, verdict));
        }
    };
    // The tree's root: this process (the host's pid: Monitor::start refuses another PID
    // namespace). It forks nothing but CMD.
    let mut monitor = Monitor::start(&MonitorOptions {
        tree_root: Some(std::process::id()),
        ..MonitorOptions::of(watch)
    })?;
    let mut reporter = Reporter::new(
        sinks,
        ignore,
        watch.repeat_window,
        monitor.telemetry(),
        None,
    );
    // The probes are attached and the pipeline is running: every fork of CMD's is seen.
    let mut cmd = match Cmd::spawn(&program, &args.command) {
        Ok(cmd) => cmd,
        Err(err) => {
            let _ = monitor.stop().await;
            return Err(err);
        }
    };
    tracing::info!(
        pid = cmd.pid(),
        exec_grace_ms = watch.exec_grace.as_millis() as u64,
        deadlock_after_ms = watch.deadlock_after.as_millis() as u64,
        repeat_window_ms = watch.repeat_window.as_millis() as u64,
        ignore_rules = reporter.ignore_rules(),
        fail_on = args.fail_on.as_str(),
        "watching CMD's process tree"
    );
    let take = |finding: Finding, reporter: &mut Reporter, verdict: &mut Verdict| {
        // events_lost is about no process: findings of the tree may be among those lost, so
        // it is reported and counts (a run that may have missed a hazard does not pass).
        if finding.kind != Kind::EventsLost && !finding.in_tree {
            tracing::debug!(
                kind = finding.kind.as_str(),
                pid = finding.pid,
                "finding outside CMD's tree ignored"
            );
            return;
        }
        if let Some(reported) = reporter.report(finding) {
            verdict.count(&reported);
        }
    };

    let status = loop {
        tokio::select! {
            finding = monitor.next_finding() => match finding {
                Some(finding) => take(finding, &mut reporter, &mut verdict),
                None => {
                    monitor.stop().await?;
                    anyhow::bail!("the event pipeline stopped unexpectedly");
                }
            },
            status = cmd.wait() => break child::status_code(status?),
            received = signals.next() => {
                let received = received?;
                if received.from_kernel {
                    tracing::info!(signal = received.number, "the terminal sent CMD the signal too");
                } else {
                    tracing::info!(signal = received.number, "passing the signal on to CMD");
                    cmd.signal(received.number);
                }
            }
            () = sleep_until(reporter.next_due()) => reporter.due(Instant::now()),
        }
    };
    // Forks CMD's tree made until now are decided within the grace window (or at an exit
    // before it), waits begun until now within the deadlock threshold: at the latest then, and
    // as soon as the pipeline has gone round since CMD's exit with nothing about the tree
    // pending (no child of it tracked, no finding held back), which is at once for a tree whose
    // children all exec'd or exited. A signal cuts it short.
    let exited = Instant::now();
    let settle = watch.exec_grace.max(watch.deadlock_after) + DECISION_MARGIN;
    tracing::debug!(
        cmd_status = status,
        settle_ms = settle.as_millis() as u64,
        "CMD exited; waiting for the decisions about its tree"
    );
    let until = Some(exited + settle);
    let telemetry = monitor.telemetry();
    let mut poll = tokio::time::interval(SETTLED_POLL);
    loop {
        tokio::select! {
            finding = monitor.next_finding() => match finding {
                Some(finding) => take(finding, &mut reporter, &mut verdict),
                None => break,
            },
            () = sleep_until(until) => break,
            _ = poll.tick() => {
                if crate::telemetry::lock(&telemetry).tree_settled_since(exited) {
                    tracing::debug!(
                        after_ms = exited.elapsed().as_millis() as u64,
                        "nothing about CMD's tree is pending"
                    );
                    break;
                }
            }
            _ = signals.next() => break,
            () = sleep_until(reporter.next_due()) => reporter.due(Instant::now()),
        }
    }
    for finding in monitor.stop().await? {
        take(finding, &mut reporter, &mut verdict);
    }
    reporter.flush();
    verdict.unwatched = unwatched_descendants(&telemetry);
    if verdict.unwatched > 0 {
        eprintln!(
            "forkwatch: {} processes of CMD's tree went unwatched (with their descendants): \
             more than {} of them were alive at once; run fewer processes at a time under one \
             forkwatch exec (e.g. split the test run)",
            verdict.unwatched,
            monitor_common::TREE_MAX_ENTRIES
        );
    }
    Ok((status, verdict))
}

/// How many children of the tree the kernel could not add to it (its map was full).
fn unwatched_descendants(telemetry: &std::sync::Mutex<crate::telemetry::Telemetry>) -> u64 {
    let mut telemetry = crate::telemetry::lock(telemetry);
    telemetry.refresh();
    telemetry.metrics.map_full()[monitor_common::map_full::TREE as usize]
}

/// What forkwatch exec lacks of CAP_BPF + CAP_PERFMON (to load and attach the probes; or
/// CAP_SYS_ADMIN, which covers both) and CAP_SYS_PTRACE (to read the tree's /proc and stacks),
/// with the fix; `None` when nothing. `caps` is the effective set.
fn missing_capabilities(caps: u64) -> Option<String> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(capabilities::CAP_SYS_ADMIN) {
        if !has(capabilities::CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(capabilities::CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(capabilities::CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "forkwatch exec loads eBPF probes and reads the watched processes' /proc, and lacks \
             {}: run it as root (`sudo forkwatch exec -- CMD`), or give it CAP_BPF, \
             CAP_PERFMON and CAP_SYS_PTRACE (e.g. `sudo setpriv --inh-caps=+bpf,+perfmon,\
             +sys_ptrace --ambient-caps=+bpf,+perfmon,+sys_ptrace ...`); `forkwatch check` \
             lists what else the host needs",
            missing.join(", ")
        )
    })
}

/// Creates (or empties) the JUnit file now, so that a path that cannot be written fails before
/// CMD runs, not after. Mode 0644: the job's later steps (an upload, a test reporter) run as the
/// CI user while forkwatch ran under sudo. The workspace may hold what others put there, so as
/// with `--output` a symlink is not followed and only a regular file is written.
fn create_junit(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let refuse = |why: String| -> anyhow::Error {
        UsageError(format!(
            "--junit {}: {why}; name a regular file in a directory that exists and that \
             forkwatch may write (it is created if missing)",
            path.display()
        ))
        .into()
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        // O_NONBLOCK: opening a FIFO would otherwise wait for a reader.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse("a symbolic link, which forkwatch does not follow".into()),
            _ => refuse(format!("cannot create the file: {e}")),
        })?;
    let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
    if !regular {
        return Err(refuse("not a regular file".into()));
    }
    file.set_len(0)
        .map_err(|e| refuse(format!("cannot empty the file: {e}")))?;
    Ok(file)
}

/// CMD as it was typed, for the report's name.
fn shown(command: &[OsString]) -> String {
    command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn bit(cap: u32) -> u64 {
        1 << cap
    }

    #[test]
    fn missing_capabilities_are_named_with_the_fix() {
        use capabilities::*;
        let all = bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_SYS_PTRACE);
        assert_eq!(missing_capabilities(all), None);
        assert_eq!(
            missing_capabilities(bit(CAP_SYS_ADMIN) | bit(CAP_SYS_PTRACE)),
            None,
            "CAP_SYS_ADMIN covers BPF and PERFMON"
        );
        let none = missing_capabilities(0).unwrap();
        assert!(
            none.contains("lacks CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE: run it as root"),
            "{none}"
        );
        let ptrace = missing_capabilities(bit(CAP_BPF) | bit(CAP_PERFMON)).unwrap();
        assert!(ptrace.contains("lacks CAP_SYS_PTRACE:"), "{ptrace}");
    }
}
