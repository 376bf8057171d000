//! Running commands, loudly: every command is echoed before it runs, and a failure names it.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

pub fn run(program: &str, args: &[String]) -> anyhow::Result<()> {
    run_with(Command::new(program).args(args))
}

pub fn run_with(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .current_dir(workspace_root())
        .stdin(Stdio::inherit())
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    run_with(Command::new(cargo).args(args))
}

#[derive(Debug, Default)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// What a `cargo test` run reported: its tests' totals, and cargo's own verdict, which also
/// covers what the totals cannot (a build error, a test binary that crashed or was killed
/// before its `test result:` line).
pub struct TestRun {
    pub totals: TestTotals,
    pub status: ExitStatus,
}

/// Runs `cargo test ...`, passing its output through, and adds up every `test result:` line.
/// A failing run is not an error here: the caller reports its totals either way.
pub fn cargo_test(args: &[&str]) -> anyhow::Result<TestRun> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root());
    eprintln!("xtask: $ {}", describe(&command));
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", describe(&command)))?;
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            add_summary(&mut totals, summary);
        }
    }
    let status = child.wait()?;
    Ok(TestRun { totals, status })
}

/// Parses "ok. 33 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.3s".
fn add_summary(totals: &mut TestTotals, summary: &str) {
    for part in summary.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(label), Some(count)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        match label {
            "passed" => totals.passed += count,
            "failed" => totals.failed += count,
            "ignored" => totals.ignored += count,
            _ => {}
        }
    }
}

/// Standard output of a command that is only asked a question; `None` if it cannot run.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Between SIGTERM to an overrunning step's processes and SIGKILL to those still there.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a step that overran its limit gets, once its processes were signalled, to return
/// before xtask gives up on it and exits.
const OVERRUN_GRACE: Duration = Duration::from_secs(60);

/// Runs `step` with a time limit. When `limit` passes first, every process xtask has started
/// (and still starts while the step winds down) is ended, SIGTERM then SIGKILL, so that the step
/// fails where it waits on one instead of hanging, and its result becomes an error that says so.
/// Only for steps that run one after another: the processes of anything running beside the step
/// would be ended too. A step that has not returned OVERRUN_GRACE after that ends xtask itself.
pub fn with_time_limit<T>(
    what: &str,
    limit: Duration,
    step: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let (done, finished) = mpsc::channel::<()>();
    let overran = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let overran = Arc::clone(&overran);
        let what = what.to_owned();
        thread::spawn(move || watch(&what, limit, &finished, &overran))
    };
    let result = step();
    // Disconnects the channel: the watchdog's wait ends.
    drop(done);
    let _ = watchdog.join();
    if overran.load(Ordering::SeqCst) {
        let why = match &result {
            Ok(_) => String::new(),
            Err(err) => format!(" ({err:#})"),
        };
        bail!(
            "{what} did not finish within its time limit of {}: its processes were ended{why}",
            duration(limit)
        );
    }
    result
}

/// The watchdog of `with_time_limit`: returns once `finished` disconnects.
fn watch(what: &str, limit: Duration, finished: &Receiver<()>, overran: &AtomicBool) {
    if finished.recv_timeout(limit) != Err(RecvTimeoutError::Timeout) {
        return;
    }
    overran.store(true, Ordering::SeqCst);
    eprintln!(
        "xtask: {what} has run for its time limit of {}: ending the processes it started",
        duration(limit)
    );
    let give_up = Instant::now() + OVERRUN_GRACE;
    let mut signal = "TERM";
    loop {
        signal_descendants(signal);
        if finished.recv_timeout(TERM_GRACE) != Err(RecvTimeoutError::Timeout) {
            return;
        }
        signal = "KILL";
        if Instant::now() > give_up {
            eprintln!(
                "xtask: error: {what} did not return within {} of ending its processes; giving up",
                duration(OVERRUN_GRACE)
            );
            std::process::exit(1);
        }
    }
}

/// Sends `signal` to every process descended from this one.
fn signal_descendants(signal: &str) {
    let pids = descendants(std::process::id());
    if pids.is_empty() {
        return;
    }
    // Some may have exited since: kill then complains about those, and still signals the rest.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// The descendants of `root`, from the parent pid of every process in /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = parent_pid(&stat) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// The parent pid in a /proc/<pid>/stat line: "pid (comm) state ppid ...", where comm may hold
/// spaces and parentheses (the last ')' ends it).
fn parent_pid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// "20 min", or "90 s" when not whole minutes.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_cargo_summaries() {
        let mut totals = TestTotals::default();
        add_summary(
            &mut totals,
            "ok. 33 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.33s",
        );
        add_summary(
            &mut totals,
            "FAILED. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5s",
        );
        assert_eq!((totals.passed, totals.failed, totals.ignored), (41, 1, 1));
    }

    #[test]
    fn reads_the_parent_pid_past_any_comm() {
        assert_eq!(parent_pid("42 (cargo) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b (c) R 9 1 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }

    /// The only test here that starts a process: one that ran beside it would be ended too.
    #[test]
    fn a_step_past_its_limit_fails_and_its_processes_end() {
        let started = Instant::now();
        let result = with_time_limit("sleeping", Duration::from_millis(300), || {
            run_with(Command::new("sleep").arg("30"))
        });
        let err = result.expect_err("the step overran").to_string();
        assert!(
            err.contains("sleeping did not finish within its time limit"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_step_within_its_limit_keeps_its_result() {
        let result = with_time_limit("quick", Duration::from_secs(60), || Ok(7));
        assert_eq!(result.unwrap(), 7);
    }
}
