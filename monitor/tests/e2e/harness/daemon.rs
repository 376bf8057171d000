//! The daemon under test: `forkwatch run` as a child process, its findings (stdout) and log
//! (stderr) collected by reader threads, its metrics read over HTTP.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{BINARY, GRACE_MS, fixtures::spawn_forker, processes};

/// How long a daemon gets to exit after SIGTERM, when the test is done with it, before SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Findings and log lines of a running daemon, filled by reader threads.
#[derive(Default)]
struct Output {
    findings: Vec<Value>,
    log: Vec<String>,
    /// The `ready` log line's fields.
    ready: Option<Value>,
    closed: bool,
    /// How many of the two streams (stdout, stderr) have ended: at 2 everything the daemon
    /// wrote has been read.
    streams_ended: u8,
}

pub struct Daemon {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    pub metrics_addr: SocketAddr,
    grace_ms: u64,
    _watched: Option<processes::Watched>,
}

impl Daemon {
    /// Starts `forkwatch run` with JSON findings and logs and waits until it is ready.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_under(&[], extra)
    }

    /// Like [`Daemon::start`], with `wrapper` (e.g. setpriv and its flags) in front.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> Daemon {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BINARY);
                c
            }
            None => Command::new(BINARY),
        };
        command
            .args(["run", "--format", "json", "--log-format", "json"])
            .args(["--metrics-addr", "127.0.0.1:0"]);
        if !extra.contains(&"--exec-grace") {
            command.args(["--exec-grace", &format!("{GRACE_MS}ms")]);
        }
        // Folding off unless a test asks for it: tests find their findings by pid, and the
        // daemon sees the other tests' processes too, whose findings would otherwise open the
        // window that folds this test's own (and the barrier's control, run again and again).
        if !extra.contains(&"--repeat-window") {
            command.args(["--repeat-window", "0s"]);
        }
        Daemon::spawn(command.args(extra))
    }

    /// Starts `command`, a `forkwatch run` that logs JSON, and waits until it is ready.
    pub fn spawn(command: &mut Command) -> Daemon {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe.
        unsafe {
            // If the test process dies (a CI timeout, ^C), the daemon goes with it instead of
            // keeping its probes attached to the host.
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forkwatch");
        let watched = processes::watch(&child);
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
                out.ready = Some(log["fields"].clone());
            }
            out.log.push(line);
        });
        let mut daemon = Daemon {
            child,
            output,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            grace_ms: 0,
            _watched: watched,
        };
        let ready = daemon
            .wait(Duration::from_secs(30), |out| {
                out.ready.is_some() || out.closed
            })
            .and_then(|out| out.ready);
        let addr = ready
            .as_ref()
            .and_then(|r| r["metrics_addr"].as_str()?.parse().ok());
        match (
            addr,
            ready.as_ref().and_then(|r| r["exec_grace_ms"].as_u64()),
        ) {
            (Some(addr), Some(grace_ms)) => {
                (daemon.metrics_addr, daemon.grace_ms) = (addr, grace_ms)
            }
            _ => panic!(
                "forkwatch did not become ready; is BPF usable here? log:\n{}",
                daemon.log()
            ),
        }
        daemon
    }

    /// The exec grace window it runs with, as its `ready` line says.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
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
            ready: out.ready.clone(),
            findings: out.findings.clone(),
        })
    }

    pub fn log(&self) -> String {
        self.output.0.lock().unwrap().log.join("\n")
    }

    pub fn findings(&self) -> Vec<Value> {
        self.output.0.lock().unwrap().findings.clone()
    }

    /// Reads the findings later, after the daemon is gone (see `terminate`, which consumes it):
    /// its output goes on being collected until its stdout closes.
    pub fn findings_handle(&self) -> impl Fn() -> Vec<Value> + use<> {
        let output = self.output.clone();
        move || {
            let (lock, cond) = &*output;
            let deadline = Instant::now() + EXIT_TIMEOUT;
            let mut out = lock.lock().unwrap();
            while out.streams_ended < 2 && Instant::now() < deadline {
                out = cond
                    .wait_timeout(out, Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
            out.findings.clone()
        }
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
        self.expect(pid, None, timeout)
    }

    /// Waits for a finding of `kind` about `pid`.
    pub fn expect_kind(&self, pid: u32, kind: &str, timeout: Duration) -> Value {
        self.expect(pid, Some(kind), timeout)
    }

    fn expect(&self, pid: u32, kind: Option<&str>, timeout: Duration) -> Value {
        let matches = |f: &Value| f["pid"] == pid && kind.is_none_or(|k| f["kind"] == k);
        match self.wait(timeout, |out| out.findings.iter().any(matches)) {
            Some(view) => view.findings.into_iter().find(matches).unwrap(),
            None => panic!(
                "no {kind:?} finding for pid {pid} within {timeout:?}; findings: {:?}\nlog:\n{}",
                self.findings(),
                self.log()
            ),
        }
    }

    /// Waits for an output record that `matches` (a `repeated` record, say); panics with the
    /// daemon's log after `timeout`.
    pub fn wait_for(&self, timeout: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        match self.wait(timeout, |out| out.findings.iter().any(&matches)) {
            Some(view) => view.findings.into_iter().find(|f| matches(f)).unwrap(),
            None => panic!(
                "no such record within {timeout:?}; records: {:?}\nlog:\n{}",
                self.findings(),
                self.log()
            ),
        }
    }

    /// Findings of `kind` about `pid`.
    pub fn findings_of(&self, pid: u32, kind: &str) -> Vec<Value> {
        self.findings_for(pid)
            .into_iter()
            .filter(|f| f["kind"] == kind)
            .collect()
    }

    /// The value of a metric series (`name{labels}`) from /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }

    /// Polls a metric series until `done(value)` holds, failing the test with `what` after
    /// `within`; how long it took.
    pub fn wait_metric(
        &self,
        series: &str,
        done: impl Fn(f64) -> bool,
        within: Duration,
        what: &str,
    ) -> Duration {
        let begin = Instant::now();
        loop {
            let value = self.metric(series);
            if done(value) {
                return begin.elapsed();
            }
            assert!(
                begin.elapsed() < within,
                "{what}: {series} is {value} after {within:?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Proves the daemon has decided everything that happened before this call: a control
    /// process whose child outlives the grace window is decided at its deadline, and deadlines
    /// are decided in order, so once its finding is out every earlier fork has been decided.
    /// The control child would live ten minutes: it outlives the window however slow the
    /// machine is, and is killed as soon as its finding is out.
    pub fn barrier(&self) {
        let control = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
        let within = Duration::from_secs(10) + Duration::from_millis(self.grace_ms);
        let finding = self.expect_finding(control.run.child(), within);
        assert_eq!(finding["kind"], "mt_fork_no_exec");
    }

    /// [`Daemon::barrier`] after events were lost on purpose. While the ring buffer is still
    /// full, the control's own fork event can be lost too (seen: right after a stopped daemon
    /// was continued): then its child is never tracked, and never reported. So it tries again,
    /// with a new control each time, until one is reported: that one's fork came after the ring
    /// had room, and was decided after everything before it.
    pub fn barrier_after_losses(&self) {
        let within = Duration::from_secs(5) + Duration::from_millis(self.grace_ms);
        for _ in 0..10 {
            let control = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
            let child = control.run.child();
            let reported = |out: &Output| out.findings.iter().any(|f| f["pid"] == child);
            if self.wait(within, reported).is_some() {
                return;
            }
        }
        panic!(
            "no barrier control was reported in 10 tries; findings: {:?}\nlog:\n{}",
            self.findings(),
            self.log()
        );
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon (SIGSTOP) until the returned guard is dropped (SIGCONT). While it is
    /// stopped nothing drains the kernel's ring buffer: what the host does then overflows it
    /// for certain, however fast the daemon drains it otherwise. Returns once every thread of
    /// the daemon has stopped (kill() returns before they have).
    pub fn pause(&self) -> Paused<'_> {
        signal(self.pid(), libc::SIGSTOP);
        let paused = Paused(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(self.pid()) {
            assert!(
                Instant::now() < deadline,
                "forkwatch did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        paused
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill_hard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code and how long it took.
    pub fn terminate(mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        signal(self.child.id(), libc::SIGTERM);
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(code) => (code, started.elapsed()),
            None => panic!("forkwatch did not exit within {EXIT_TIMEOUT:?} of SIGTERM"),
        }
    }

    /// Waits up to `timeout` for the process to exit; its exit code, `None` if it still runs.
    fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr, path)
    }
}

impl Drop for Daemon {
    /// SIGTERM, and SIGKILL if that does not end it: a daemon that ignores SIGTERM fails its
    /// test (see `terminate`), it does not hang it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGTERM);
            if self.wait_exit(EXIT_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A stopped daemon ([`Daemon::pause`]); continued when dropped.
pub struct Paused<'a>(&'a Daemon);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        signal(self.0.pid(), libc::SIGCONT);
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which may itself hold ") ".
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}

struct OutputView {
    ready: Option<Value>,
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
        let mut out = lock.lock().unwrap();
        out.closed = true;
        out.streams_ended += 1;
        cond.notify_all();
    });
}

pub(super) fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A minimal HTTP/1.0 GET, so the tests need no HTTP client crate.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`] for a server that may not be listening yet.
pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    // Generous: on a loaded 2-core machine (parallel tests, builds) a response can take seconds.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
