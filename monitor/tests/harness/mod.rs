//! Harness for the privileged end-to-end tests: the real `forkwatch` binary, real eBPF, real
//! processes. Each test starts its own daemon and asserts on its JSON findings, filtered by the
//! pids of the processes the test itself started (other processes on the host may fork too).

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use serde_json::Value;

pub const BINARY: &str = env!("CARGO_BIN_EXE_forkwatch");
/// The grace window the tests run the daemon with: short, so negatives are decided quickly.
pub const GRACE_MS: u64 = 400;

/// Whether this process may load eBPF programs. Without root the tests skip and say so, except
/// in CI (`CI=true`), where skipping would hide that nothing was tested: there they fail.
pub fn privileged() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("CI=true but not running as root: the privileged end-to-end tests must run in CI");
    }
    eprintln!(
        "SKIP: end-to-end test needs root to load eBPF programs (run `sudo cargo xtask test`)"
    );
    false
}

/// Findings and log lines of a running daemon, filled by reader threads.
#[derive(Default)]
struct Output {
    findings: Vec<Value>,
    log: Vec<String>,
    ready: Option<SocketAddr>,
    closed: bool,
}

pub struct Daemon {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    pub metrics_addr: SocketAddr,
}

impl Daemon {
    /// Starts `forkwatch run` with JSON findings and logs and waits until it is ready.
    pub fn start(extra: &[&str]) -> Daemon {
        let grace = format!("{GRACE_MS}ms");
        let mut child = Command::new(BINARY)
            .args(["run", "--format", "json", "--log-format", "json"])
            .args(["--exec-grace", &grace, "--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forkwatch");
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        spawn_reader(stdout, output.clone(), |out, line| {
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("finding is not JSON ({e}): {line}"));
            out.findings.push(value);
        });
        spawn_reader(stderr, output.clone(), |out, line| {
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["fields"]["message"] == "ready"
            {
                out.ready = log["fields"]["metrics_addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok());
            }
            out.log.push(line);
        });
        let mut daemon = Daemon {
            child,
            output,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
        };
        let ready = daemon.wait(Duration::from_secs(30), |out| {
            out.ready.is_some() || out.closed
        });
        match ready.and_then(|out| out.ready) {
            Some(addr) => daemon.metrics_addr = addr,
            None => panic!(
                "forkwatch did not become ready; is BPF usable here? log:\n{}",
                daemon.log()
            ),
        }
        daemon
    }

    /// Waits until `done` holds for the output, returning a snapshot of it.
    fn wait(&self, timeout: Duration, done: impl Fn(&Output) -> bool) -> Option<OutputView> {
        let (lock, cond) = &*self.output;
        let deadline = Instant::now() + timeout;
        let mut out = lock.lock().unwrap();
        while !done(&out) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            out = cond.wait_timeout(out, deadline - now).unwrap().0;
        }
        Some(OutputView {
            ready: out.ready,
            findings: out.findings.clone(),
        })
    }

    pub fn log(&self) -> String {
        self.output.0.lock().unwrap().log.join("\n")
    }

    pub fn findings(&self) -> Vec<Value> {
        self.output.0.lock().unwrap().findings.clone()
    }

    /// Findings about process `pid`.
    pub fn findings_for(&self, pid: u32) -> Vec<Value> {
        self.findings()
            .into_iter()
            .filter(|f| f["pid"] == pid)
            .collect()
    }

    /// Waits for a finding about `pid`; panics with the daemon's log after `timeout`.
    pub fn expect_finding(&self, pid: u32, timeout: Duration) -> Value {
        let found = self.wait(timeout, |out| out.findings.iter().any(|f| f["pid"] == pid));
        match found {
            Some(view) => view.findings.into_iter().find(|f| f["pid"] == pid).unwrap(),
            None => panic!(
                "no finding for pid {pid} within {timeout:?}; findings: {:?}\nlog:\n{}",
                self.findings(),
                self.log()
            ),
        }
    }

    /// Proves the daemon has decided everything that happened before this call: a control
    /// process whose child outlives the grace window is decided at its deadline, and deadlines
    /// are decided in order, so once its finding is out every earlier fork has been decided.
    pub fn barrier(&self) {
        let control = run_forker("mt-fork-no-exec", &["2", &(GRACE_MS * 2).to_string()]);
        let finding = self.expect_finding(control.child(), Duration::from_secs(10));
        assert_eq!(finding["kind"], "mt_fork_no_exec");
    }

    /// Asserts that no finding names any of `pids`, after a barrier.
    pub fn assert_quiet(&self, what: &str, pids: &[u32]) {
        self.barrier();
        for &pid in pids {
            let found = self.findings_for(pid);
            assert!(
                found.is_empty(),
                "{what}: unexpected finding for pid {pid}: {found:?}"
            );
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code and how long it took.
    pub fn terminate(mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        signal(self.child.id(), libc::SIGTERM);
        let deadline = started + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), started.elapsed());
            }
            if Instant::now() > deadline {
                panic!("forkwatch did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr, path)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

struct OutputView {
    ready: Option<SocketAddr>,
    findings: Vec<Value>,
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    output: Arc<(Mutex<Output>, Condvar)>,
    handle: impl Fn(&mut Output, String) + Send + 'static,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let (lock, cond) = &*output;
            handle(&mut lock.lock().unwrap(), line);
            cond.notify_all();
        }
        let (lock, cond) = &*output;
        lock.lock().unwrap().closed = true;
        cond.notify_all();
    });
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A minimal HTTP/1.0 GET, so the tests need no HTTP client crate.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// What a fixture printed: `key=value` words.
pub struct FixtureRun {
    pub values: HashMap<String, u32>,
}

impl FixtureRun {
    pub fn get(&self, key: &str) -> u32 {
        *self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("fixture printed no {key}: {:?}", self.values))
    }

    pub fn parent(&self) -> u32 {
        self.get("parent")
    }

    pub fn child(&self) -> u32 {
        self.get("child")
    }
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The C fixture, compiled once per test binary into cargo's temporary directory.
fn forker() -> &'static Path {
    static FORKER: OnceLock<PathBuf> = OnceLock::new();
    FORKER.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("forker");
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
            .arg(&out)
            .arg(fixtures_dir().join("forker.c"))
            .status()
            .expect("run cc (cargo xtask setup installs it)");
        assert!(status.success(), "compiling forker.c failed");
        out
    })
}

pub fn run_forker(mode: &str, args: &[&str]) -> FixtureRun {
    run_fixture(Command::new(forker()).arg(mode).args(args))
}

pub fn run_python(script: &str, args: &[&str]) -> FixtureRun {
    run_fixture(
        Command::new("python3")
            .arg(fixtures_dir().join(script))
            .args(args),
    )
}

fn run_fixture(cmd: &mut Command) -> FixtureRun {
    let out = cmd.output().expect("run fixture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fixture {cmd:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let values = stdout
        .split_whitespace()
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    FixtureRun { values }
}
