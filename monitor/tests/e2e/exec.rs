//! End-to-end, as root: `forkwatch exec -- CMD`, the CI mode. It watches CMD's process tree
//! only, exits with CMD's status if CMD failed, else 3 when the tree forked unsafely, else 0,
//! and writes a JUnit report.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{self, BINARY, GRACE_MS, compiled, watch};

const LIMIT: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(15);
const VENV_PYTHON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/test-venv/bin/python"
);

/// A file in cargo's temporary directory, unique to this test process and `name`.
fn temp(name: &str) -> PathBuf {
    let path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("exec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// The lines forkwatch wrote to stderr so far, and whether it has closed it.
type LogLines = (Vec<String>, bool);

/// A running `forkwatch exec`: CMD's stdin and stdout are its, piped to the test; its stderr
/// (logs, JSON) is read by a thread as it comes.
struct Exec {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: Arc<(Mutex<LogLines>, Condvar)>,
    /// Whether it was waited for (else it is stopped on drop: a failed test's).
    waited: bool,
    _watched: Option<harness::Watched>,
}

impl Drop for Exec {
    /// Stops an exec a failed assertion left running the way a CI runner would, with SIGTERM
    /// (passed on to CMD); SIGKILL if it does not end.
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        // SAFETY: kill sends a signal to our child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exec {
    /// `forkwatch exec FLAGS -- CMD...`, with the tests' grace window, no folding, JSON logs
    /// and the exec command's debug lines (which name the findings it leaves out).
    fn start(flags: &[&str], cmd: &[&str]) -> Exec {
        Self::start_as(&[], flags, cmd)
    }

    /// The same, started through `launcher` (a program and its arguments before forkwatch's
    /// path, e.g. setpriv's), or directly when it is empty.
    fn start_as(launcher: &[String], flags: &[&str], cmd: &[&str]) -> Exec {
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BINARY);
                command
            }
            None => Command::new(BINARY),
        };
        command
            .args(["exec", "--log-format", "json", "--repeat-window", "0s"])
            .args(["--exec-grace", &format!("{GRACE_MS}ms")])
            .args(flags)
            .arg("--")
            .args(cmd)
            .env("FORKWATCH_LOG", "info,forkwatch::commands::exec=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe. If the test process dies, forkwatch (and with it CMD, which it
        // starts with the same setting) goes too.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start forkwatch exec");
        let watched = watch(&child);
        let log = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.0.lock().unwrap().0.push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap().1 = true;
            sink.1.notify_all();
        });
        Exec {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("stdout")),
            child,
            log,
            waited: false,
            _watched: watched,
        }
    }

    /// The next line CMD prints.
    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("CMD's output");
        assert!(!line.is_empty(), "CMD ended early; log:\n{}", self.log());
        line
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to CMD");
        stdin.flush().unwrap();
    }

    /// Waits until a log line satisfies `pred`; the line.
    fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.0.lock().unwrap();
        loop {
            if let Some(found) = state
                .0
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pred(v))
            {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline && !state.1,
                "no such log line within {timeout:?}; log:\n{}",
                state.0.join("\n")
            );
            state = self.log.1.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    fn log(&self) -> String {
        self.log.0.lock().unwrap().0.join("\n")
    }

    /// Waits for forkwatch to exit: its status code and its stderr.
    fn finish(mut self) -> (i32, String) {
        self.stdin = None;
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for forkwatch exec");
        self.waited = true;
        // Its stderr ends with it.
        let (lock, ended) = &*self.log.clone();
        let mut state = lock.lock().unwrap();
        while !state.1 {
            state = ended.wait(state).unwrap();
        }
        let code = status.code().unwrap_or_else(|| {
            panic!(
                "forkwatch exec died: {status}; log:\n{}",
                state.0.join("\n")
            )
        });
        (code, state.0.join("\n"))
    }
}

/// The JSON findings of an `--output` file.
fn findings(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `key=value` words of a fixture's line.
fn value(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn a_multithreaded_fork_without_exec_in_the_tree_exits_3_with_a_junit_failure() {
    harness::root().limit(LIMIT).run(|| {
        let (output, junit) = (temp("mt.jsonl"), temp("mt.xml"));
        let forker = compiled("forker");
        let mut exec = Exec::start(
            &[
                "--output",
                output.to_str().unwrap(),
                "--junit",
                junit.to_str().unwrap(),
            ],
            &[forker.to_str().unwrap(), "mt-fork-no-exec", "2", "10"],
        );
        let line = exec.read_line();
        let (parent, child) = (value(&line, "parent"), value(&line, "child"));
        let (code, log) = exec.finish();
        assert_eq!(code, 3, "log:\n{log}");

        let found = findings(&output);
        let f = found
            .iter()
            .find(|f| f["pid"] == child)
            .unwrap_or_else(|| panic!("no finding for {child}: {found:?}"));
        assert_eq!(f["kind"], "mt_fork_no_exec", "{f}");
        assert_eq!(f["parent_pid"], parent, "{f}");
        // Only the tree: the other tests' processes fork beside it.
        assert!(
            found.iter().all(|f| f["pid"] == child),
            "a finding outside the tree: {found:?}"
        );
        // On stderr too, as JSON (stderr is not a terminal here).
        assert!(
            log.lines().any(|l| l.contains("\"kind\":\"mt_fork_no_exec\"")
                && l.contains(&format!("\"pid\":{child}"))),
            "{log}"
        );

        let xml = std::fs::read_to_string(&junit).expect("the JUnit file");
        assert!(xml.starts_with("<?xml"), "{xml}");
        assert!(
            xml.contains("<testcase classname=\"forkwatch\" name=\"mt_fork_no_exec\""),
            "{xml}"
        );
        assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
        assert!(
            xml.contains(&format!(
                "<failure type=\"mt_fork_no_exec\" message=\"mt_fork_no_exec: pid {child} (forker), \
                 parent {parent} (forker), exe {}\"",
                forker.display()
            )),
            "{xml}"
        );
    });
}

/// While CMD runs, a program outside its tree forks without exec, and the daemon in `exec`
/// sees it (its debug line names the finding it leaves out) before CMD is let go: CMD, whose
/// own fork execs, passes. The order is fixed by the test, not by timing: the outside program
/// forks only once CMD has started (so with the probes attached) and the test waits for the
/// outside finding to be decided before letting CMD fork and end.
#[test]
fn a_tree_that_forks_and_execs_passes_while_a_process_outside_it_forks_unsafely() {
    harness::root().limit(LIMIT).run(|| {
        let output = temp("outside.jsonl");
        let forker = compiled("forker");
        let forker = forker.to_str().unwrap();
        let script = format!("echo started; read go; exec {forker} mt-fork-exec 2");
        let mut exec = Exec::start(
            &["--output", output.to_str().unwrap()],
            &["sh", "-c", &script],
        );
        assert_eq!(exec.read_line().trim(), "started");

        // Outside: held until the go-ahead, then forks without exec; its parent stays until
        // its stdin closes, so that the daemon reads its /proc.
        let mut outside = Command::new("sh")
            .args([
                "-c",
                &format!("read go; exec {forker} mt-fork-no-exec 2 10"),
            ])
            .env("HOLD_UNTIL_STDIN_CLOSES", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the outside forker");
        let _outside_watched = watch(&outside);
        let mut outside_in = outside.stdin.take().unwrap();
        writeln!(outside_in, "go").unwrap();
        let mut line = String::new();
        BufReader::new(outside.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let outside_child = value(&line, "child");
        let ignored = exec.wait_for_log(TIMEOUT, |v| {
            v["fields"]["message"] == "finding outside CMD's tree ignored"
                && v["fields"]["pid"] == outside_child
        });
        assert_eq!(ignored["fields"]["kind"], "mt_fork_no_exec", "{ignored}");
        drop(outside_in);
        assert!(outside.wait().unwrap().success());

        exec.send("go");
        let inside = exec.read_line();
        let inside_child = value(&inside, "child");
        let (code, log) = exec.finish();
        assert_eq!(code, 0, "log:\n{log}");
        assert_eq!(findings(&output), Vec::<Value>::new());
        // The tree's own fork was seen, and it exec'd: nothing to report.
        assert!(!log.contains(&format!("\"pid\":{inside_child},")), "{log}");
    });
}

/// After CMD's exit, exec waits only while something about its tree is pending: a tree whose
/// fork exec'd ends as soon as the pipeline has gone round, not after the 30 s deadlock
/// threshold it would otherwise wait out (the test's limit is 60 s; without the early end it
/// takes 30 s and has no such log line).
#[test]
fn a_tree_with_nothing_pending_ends_when_cmd_does() {
    harness::root().limit(LIMIT).run(|| {
        let forker = compiled("forker");
        let started = Instant::now();
        let exec = Exec::start(
            &["--deadlock-after", "30s"],
            &[forker.to_str().unwrap(), "mt-fork-exec", "2"],
        );
        let (code, log) = exec.finish();
        assert_eq!(code, 0, "log:\n{log}");
        assert!(
            log.contains("nothing about CMD's tree is pending"),
            "log:\n{log}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "log:\n{log}");
    });
}

/// A config file's values are forkwatch's settings, not CMD's: they do not reach CMD's
/// environment (a forkwatch CMD starts would take them for its own user's), while variables
/// the user set are passed on as always.
#[test]
fn the_config_files_settings_stay_out_of_cmds_environment() {
    harness::root().limit(LIMIT).run(|| {
        let config = temp("settings.toml");
        std::fs::write(&config, "deadlock_after = \"2s\"\n").unwrap();
        let mut exec = Exec::start(
            &["--config", config.to_str().unwrap()],
            &["sh", "-c", "env | grep ^FORKWATCH_ | sort; echo end"],
        );
        let mut seen = Vec::new();
        loop {
            let line = exec.read_line();
            if line.trim() == "end" {
                break;
            }
            seen.push(line.trim().to_owned());
        }
        let (code, log) = exec.finish();
        assert_eq!(code, 0, "log:\n{log}");
        assert!(
            seen.iter().any(|v| v.starts_with("FORKWATCH_LOG=")),
            "the user's own variable: {seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|v| v.starts_with("FORKWATCH_DEADLOCK_AFTER=")),
            "the config file's setting reached CMD: {seen:?}"
        );
    });
}

#[test]
fn cmd_failing_is_the_exit_status() {
    harness::root().limit(LIMIT).run(|| {
        let (code, log) = Exec::start(&[], &["sh", "-c", "exit 7"]).finish();
        assert_eq!(code, 7, "{log}");
        // Killed by a signal: as a shell says it.
        let (code, log) = Exec::start(&[], &["sh", "-c", "kill -TERM $$"]).finish();
        assert_eq!(code, 128 + libc::SIGTERM, "{log}");
        // CMD's own flags are CMD's, a --config among them too.
        let cmd = ["sh", "-c", "exit 0", "--config", "/nonexistent/cmd.toml"];
        let (code, log) = Exec::start(&[], &cmd).finish();
        assert_eq!(code, 0, "{log}");
        let (code, log) = Exec::start(&[], &["no-such-command-forkwatch"]).finish();
        assert_eq!(code, 127, "{log}");
        assert!(
            log.contains("no-such-command-forkwatch: command not found"),
            "{log}"
        );
    });
}

/// A signal to forkwatch is passed to CMD, which decides what it means.
#[test]
fn signals_are_passed_on_to_cmd() {
    harness::root().limit(LIMIT).run(|| {
        let script = "trap 'echo got-term; exit 5' TERM; echo started; \
                      while :; do sleep 0.05; done";
        let mut exec = Exec::start(&[], &["sh", "-c", script]);
        assert_eq!(exec.read_line().trim(), "started");
        // SAFETY: kill sends a signal to forkwatch, our child, not yet waited for.
        unsafe { libc::kill(exec.child.id() as i32, libc::SIGTERM) };
        assert_eq!(exec.read_line().trim(), "got-term");
        let (code, log) = exec.finish();
        assert_eq!(code, 5, "{log}");
    });
}

const PYTEST_FILE: &str = r#"
import os
import threading


def test_quiet():
    assert sum([1, 2]) == 3


def test_forks_from_a_threaded_process():
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="py-worker")
    worker.start()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    with open(os.environ["FW_PIDS"], "w") as f:
        f.write(f"test={os.getpid()} child={pid}\n")
    _, status = os.waitpid(pid, 0)
    stop.set()
    worker.join()
    assert status == 0
"#;

#[test]
fn a_pytest_run_with_a_test_that_forks_from_a_thread_exits_3_naming_its_process() {
    harness::root().limit(LIMIT).run(|| {
        let has_pytest = Command::new(VENV_PYTHON)
            .args(["-c", "import pytest"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_pytest {
            return harness::skip(
                "pytest is not in target/test-venv",
                "run `cargo xtask setup`, which installs it there",
            );
        }
        let dir = temp("pytest");
        std::fs::create_dir_all(&dir).unwrap();
        let test_file = dir.join("test_forking.py");
        std::fs::write(&test_file, PYTEST_FILE).unwrap();
        let pids = dir.join("pids");
        let (output, junit) = (temp("pytest.jsonl"), temp("pytest.xml"));
        let mut exec = Exec::start(
            &[
                "--output",
                output.to_str().unwrap(),
                "--junit",
                junit.to_str().unwrap(),
            ],
            &[
                "env",
                &format!("FW_PIDS={}", pids.display()),
                VENV_PYTHON,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                test_file.to_str().unwrap(),
            ],
        );
        let mut report = String::new();
        let _ = exec.stdout.read_to_string(&mut report);
        let (code, log) = exec.finish();
        assert!(
            report.contains("2 passed"),
            "pytest's own verdict: {report}"
        );
        assert_eq!(
            code, 3,
            "pytest passed, the fork fails the run; log:\n{log}"
        );
        let pids = std::fs::read_to_string(&pids).expect("the test's pids");
        let (test, child) = (value(&pids, "test"), value(&pids, "child"));
        let found = findings(&output);
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!(f["kind"], "mt_fork_no_exec", "{f}");
        assert_eq!(f["pid"], child, "{f}");
        assert_eq!(f["parent_pid"], test, "the test's process: {f}");
        assert_eq!(
            f["parent_threads"], 2,
            "the test's thread and its worker: {f}"
        );
        assert_eq!(f["runtime"], "cpython", "{f}");
        let xml = std::fs::read_to_string(&junit).unwrap();
        assert!(
            xml.contains(&format!("pid {child} (")) && xml.contains(&format!("parent {test} (")),
            "{xml}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

/// Ctrl-C at a terminal goes to the whole foreground process group, CMD included: forkwatch
/// does not pass it on a second time (a second SIGINT aborts what the first began). Played on a
/// pseudo-terminal by Python's pty module: CMD counts the SIGINTs it gets.
#[test]
fn ctrl_c_at_a_terminal_reaches_cmd_once() {
    harness::root().limit(LIMIT).run(|| {
        // CMD counts deliveries, not trap runs: Python's C-level handler writes a byte to the
        // wakeup fd for each.
        let driver = r#"
import os, pty, select, sys, time
CMD = """
import os, signal, time
r, w = os.pipe()
os.set_blocking(w, False)
signal.set_wakeup_fd(w)
signal.signal(signal.SIGINT, lambda *_: None)
print("started", flush=True)
time.sleep(1)
os.set_blocking(r, False)
print(f"sigints={len(os.read(r, 100))}", flush=True)
os._exit(4)
"""
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], ["forkwatch", "exec", "--", "python3", "-c", CMD])
out, sent, deadline = b"", False, time.time() + 30
while time.time() < deadline:
    if select.select([fd], [], [], 0.1)[0]:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
    if b"started" in out and not sent:
        os.write(fd, b"\x03")
        sent = True
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
print(f"\nexit={os.waitstatus_to_exitcode(status)}")
"#;
        let mut child = Command::new("python3")
            .args(["-c", driver, BINARY])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let _watched = watch(&child);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success(), "{out}");
        assert!(
            out.contains("sigints=1"),
            "one SIGINT, from the terminal: {out}"
        );
        // Two SIGINTs close together can merge into one delivery, so the count alone could
        // miss a second one; forkwatch's log (on the same terminal) says what it did.
        assert!(
            out.contains("the terminal sent CMD the signal too"),
            "{out}"
        );
        assert!(!out.contains("passing the signal on to CMD"), "{out}");
        assert!(out.contains("exit=4"), "{out}");
    });
}

/// A process names itself, and its name goes into the JUnit report: a forking thread named
/// with markup, a quote, a newline and an escape sequence still makes a report that an XML
/// parser (Python's) reads, with the name in it as the process set it.
#[test]
fn a_hostile_process_name_cannot_break_the_junit_report() {
    harness::root().limit(LIMIT).run(|| {
        let junit = temp("hostile.xml");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/thread_fork.py");
        // thread_fork.py decodes Python escapes: 15 bytes, the comm's limit.
        let name = r#"</f>&"\n\x1b[1m"#;
        let (code, log) = Exec::start(
            &["--junit", junit.to_str().unwrap()],
            &["python3", fixture.to_str().unwrap(), "0.05", name],
        )
        .finish();
        assert_eq!(code, 3, "{log}");
        let check = r#"
import sys, xml.etree.ElementTree as E
failures = E.parse(sys.argv[1]).getroot().findall(".//failure")
assert len(failures) == 1, failures
assert '(</f>&"\n\\x1b[1m)' in failures[0].get("message"), failures[0].get("message")
print("parsed")
"#;
        let out = Command::new("python3")
            .args(["-c", check, junit.to_str().unwrap()])
            .output()
            .unwrap();
        let xml = std::fs::read_to_string(&junit).unwrap_or_default();
        assert!(
            out.status.success() && out.stdout == b"parsed\n",
            "{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Not root and without the capabilities, it names the missing ones and the fix, exits 2 (a
/// usage error) and CMD never runs.
#[test]
fn without_privileges_it_says_what_is_missing_and_runs_nothing() {
    harness::root().limit(LIMIT).run(|| {
        let out = Command::new("setpriv")
            .args(harness::as_nobody_with("-all"))
            .args([BINARY, "exec", "--", "sh", "-c", "echo CMD-ran"])
            .output()
            .expect("setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("lacks CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE: run it as root"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty(), "CMD ran");
    });
}

/// Not root, with CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE only (no cgroup it may write, no
/// other privilege): it watches CMD's tree all the same, down through a posix_spawn (Python's
/// subprocess), a shell and a background job the shell leaves orphaned (reparented away from
/// the tree's processes), and fails the run for that job's multithreaded fork without exec.
/// The order is fixed by the test: CMD's shell waits on stdin until the test has read the
/// job's line.
#[test]
fn with_only_its_capabilities_it_watches_the_whole_tree_without_root() {
    harness::root().limit(LIMIT).run(|| {
        let forker = compiled("forker");
        let script = format!(
            "({} mt-fork-no-exec 2 10 &); read go",
            forker.to_str().unwrap()
        );
        let spawn = format!("import subprocess, sys; subprocess.run(['sh', '-c', {script:?}])");
        let mut setpriv = vec!["setpriv".to_owned()];
        setpriv.extend(harness::as_nobody_with("-all,+bpf,+perfmon,+sys_ptrace"));
        let mut exec = Exec::start_as(&setpriv, &[], &["python3", "-c", &spawn]);
        let line = exec.read_line();
        let (parent, child) = (value(&line, "parent"), value(&line, "child"));
        exec.send("go");
        let (code, log) = exec.finish();
        assert_eq!(code, 3, "log:\n{log}");
        assert!(
            log.lines()
                .any(|l| l.contains("\"kind\":\"mt_fork_no_exec\"")
                    && l.contains(&format!("\"pid\":{child},"))
                    && l.contains(&format!("\"parent_pid\":{parent},"))),
            "no finding for {child}:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    });
}
