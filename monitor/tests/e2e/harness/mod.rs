//! Harness for the privileged end-to-end tests: the real `forkwatch` binary, real eBPF, real
//! processes. Each test starts its own daemon and asserts on its JSON findings, filtered by the
//! pids of the processes the test itself started (other processes on the host may fork too).

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
        Daemon::start_under(&[], extra)
    }

    /// Like [`Daemon::start`], with `wrapper` (e.g. setpriv and its flags) in front.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> Daemon {
        let grace = format!("{GRACE_MS}ms");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BINARY);
                c
            }
            None => Command::new(BINARY),
        };
        let mut child = command
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// What a fixture printed: `key=value` words.
pub struct FixtureRun {
    pub values: HashMap<String, String>,
}

impl FixtureRun {
    pub fn text(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("fixture printed no {key}: {:?}", self.values))
    }

    pub fn get(&self, key: &str) -> u32 {
        let text = self.text(key);
        text.parse()
            .unwrap_or_else(|_| panic!("fixture's {key}={text} is not a number"))
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

/// A C fixture (`tests/fixtures/NAME.c`), compiled once per test binary into cargo's temporary
/// directory, with debug info so that reported stacks can name its functions.
pub fn compiled(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    built
        .entry(name.to_owned())
        .or_insert_with(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
            let status = Command::new("cc")
                .args(["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
                .arg(&out)
                .arg(fixtures_dir().join(format!("{name}.c")))
                .status()
                .expect("run cc (cargo xtask setup installs it)");
            assert!(status.success(), "compiling {name}.c failed");
            out
        })
        .clone()
}

pub fn run_forker(mode: &str, args: &[&str]) -> FixtureRun {
    run_fixture(Command::new(compiled("forker")).arg(mode).args(args))
}

pub fn run_sharer(mode: &str, args: &[&str]) -> FixtureRun {
    run_fixture(Command::new(compiled("sharer")).arg(mode).args(args))
}

/// An echo server on 127.0.0.1 (TCP) or a Unix path, serving until the test ends.
pub struct EchoServer {
    pub port: u16,
    pub path: PathBuf,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let port = tcp.local_addr().unwrap().port();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("echo-{port}.sock"));
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).expect("bind unix echo");
        std::thread::spawn(move || {
            for conn in tcp.incoming().map_while(Result::ok) {
                std::thread::spawn(move || echo(conn));
            }
        });
        std::thread::spawn(move || {
            for conn in unix.incoming().map_while(Result::ok) {
                std::thread::spawn(move || echo(conn));
            }
        });
        EchoServer { port, path }
    }
}

fn echo<S: Read + Write>(mut conn: S) {
    let mut buf = [0u8; 512];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Runs `locker MODE`; its child is left running (and killed when the run is dropped).
pub fn run_locker(mode: &str) -> LeftRunning {
    LeftRunning(run_fixture(Command::new(compiled("locker")).arg(mode)))
}

/// Kills a pid on drop (a deadlocked child a test started indirectly).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal(self.0, libc::SIGKILL);
    }
}

/// `locker MODE ARGS...` left running in the background (killed with its child on drop),
/// once it has printed its pids.
pub fn spawn_locker(mode: &str, args: &[&str]) -> Background {
    spawn_fixture("locker", mode, args)
}

/// `sharer MODE ARGS...` left running in the background, like [`spawn_locker`].
pub fn spawn_sharer(mode: &str, args: &[&str]) -> Background {
    spawn_fixture("sharer", mode, args)
}

/// The C fixture NAME run in the background until dropped, once it has printed its pids.
fn spawn_fixture(name: &str, mode: &str, args: &[&str]) -> Background {
    let mut process = Command::new(compiled(name))
        .arg(mode)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut line = String::new();
    BufReader::new(process.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{name}'s pids: {e}"));
    let values = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Background {
        process,
        run: FixtureRun { values },
    }
}

/// A fixture still running, with what it printed.
pub struct Background {
    process: Child,
    pub run: FixtureRun,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if let Ok(child) = self.run.text("child").parse() {
            drop(KillOnDrop(child));
        }
    }
}

/// A fixture run whose child outlives it (a deadlocked child): killed on drop.
pub struct LeftRunning(pub FixtureRun);

impl std::ops::Deref for LeftRunning {
    type Target = FixtureRun;
    fn deref(&self) -> &FixtureRun {
        &self.0
    }
}

impl Drop for LeftRunning {
    fn drop(&mut self) {
        if let Some(child) = self.0.values.get("child").and_then(|c| c.parse().ok()) {
            drop(KillOnDrop(child));
        }
    }
}

pub fn run_python(script: &str, args: &[&str]) -> FixtureRun {
    run_fixture(
        Command::new("python3")
            .arg(fixtures_dir().join(script))
            .args(args),
    )
}

pub fn run_fixture(cmd: &mut Command) -> FixtureRun {
    // Wait for the fixture to exit, not for its stdout to close: a child it leaves running
    // (deadlocked on purpose) holds the pipe open for as long as it lives.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fixture {cmd:?}: {e}"));
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    let status = child.wait().expect("wait for fixture");
    // Everything it printed is in the pipes now; take what arrives promptly.
    let collect = |lines: std::sync::mpsc::Receiver<String>| {
        std::iter::from_fn(|| lines.recv_timeout(Duration::from_millis(200)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    assert!(
        status.success(),
        "fixture {cmd:?} failed ({status}): {stdout}{stderr}"
    );
    let values = stdout
        .split_whitespace()
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect();
    FixtureRun { values }
}

/// Lines of a stream, read on a thread of their own.
fn lines_of(stream: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
