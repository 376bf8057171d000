//! The processes the tests watch the daemon report on: the fixtures in tests/fixtures/, run to
//! their end or left running in the background, and an echo server for the socket fixtures.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Mutex, OnceLock},
};

use super::processes::{self, Watched};

/// What a fixture printed: `key=value` words.
pub struct FixtureRun {
    pub values: HashMap<String, String>,
}

impl FixtureRun {
    fn parse(text: &str) -> FixtureRun {
        let values = text
            .split_whitespace()
            .filter_map(|word| {
                let (key, value) = word.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            })
            .collect();
        FixtureRun { values }
    }

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

/// The compiled fixture `name` copied to the file name `alias` (once per test binary): another
/// executable, for what findings are keyed by (folding, ignore rules), that no other test runs.
pub fn compiled_copy(name: &str, alias: &str) -> PathBuf {
    static COPIED: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let source = compiled(name);
    let mut copied = COPIED.get_or_init(Default::default).lock().unwrap();
    copied
        .entry(alias.to_owned())
        .or_insert_with(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(alias);
            std::fs::copy(&source, &out)
                .unwrap_or_else(|e| panic!("copying {source:?} to {out:?}: {e}"));
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

pub fn run_python(script: &str, args: &[&str]) -> FixtureRun {
    run_fixture(&mut python(script, args))
}

/// `python3 tests/fixtures/SCRIPT ARGS...`
pub fn python(script: &str, args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command.arg(fixtures_dir().join(script)).args(args);
    command
}

/// Runs `locker MODE`; its child is left running (and killed when the run is dropped).
pub fn run_locker(mode: &str) -> LeftRunning {
    let run = run_fixture(Command::new(compiled("locker")).arg(mode));
    let kill = KillOnDrop::new(run.child());
    LeftRunning { run, _kill: kill }
}

/// Runs a fixture to its exit, which must be a success; what it printed.
///
/// It waits for the fixture to exit, not for its output to end: a child it leaves running
/// (deadlocked on purpose) holds the pipes open for as long as it lives. Nothing reads the
/// pipes meanwhile (fixtures print a line or two, far below a pipe's 64 KiB), so once the
/// fixture has exited all it printed is in them, and is read without waiting: nothing can be
/// missed because a reader was slow.
pub fn run_fixture(cmd: &mut Command) -> FixtureRun {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fixture {cmd:?}: {e}"));
    let watched = processes::watch(&child);
    let status = child.wait().expect("wait for fixture");
    drop(watched);
    let stdout = drain(child.stdout.as_mut().expect("stdout"));
    let stderr = drain(child.stderr.as_mut().expect("stderr"));
    assert!(
        status.success(),
        "fixture {cmd:?} failed ({status}): {stdout}{stderr}"
    );
    FixtureRun::parse(&stdout)
}

/// Everything already in a pipe, read without blocking.
fn drain(pipe: &mut (impl Read + AsFd)) -> String {
    let fd = pipe.as_fd().as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and return plain flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading a fixture's output: {e}"),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `forker MODE ARGS...` left running in the background (killed with its child on drop),
/// once it has printed its pids.
pub fn spawn_forker(mode: &str, args: &[&str]) -> Background {
    spawn(Command::new(compiled("forker")).arg(mode).args(args))
}

/// `locker MODE ARGS...` left running in the background, like [`spawn_forker`].
pub fn spawn_locker(mode: &str, args: &[&str]) -> Background {
    spawn(Command::new(compiled("locker")).arg(mode).args(args))
}

/// `sharer MODE ARGS...` left running in the background, like [`spawn_forker`].
pub fn spawn_sharer(mode: &str, args: &[&str]) -> Background {
    spawn(Command::new(compiled("sharer")).arg(mode).args(args))
}

/// `forker MODE ARGS...` in the background, its parent held: see [`spawn_holding`].
pub fn spawn_forker_holding(mode: &str, args: &[&str]) -> Background {
    spawn_holding(Command::new(compiled("forker")).arg(mode).args(args))
}

/// A fork fixture (forker's fork modes, thread_fork.py) whose parent stays, threads and all,
/// until [`Background::finish`]: the daemon reads the parent's /proc when the fork reaches it,
/// which on a loaded machine can be after a parent that exits at once has gone. Finish it once
/// the finding is out.
pub fn spawn_holding(cmd: &mut Command) -> Background {
    spawn(cmd.env("HOLD_UNTIL_STDIN_CLOSES", "1"))
}

/// A fixture run in the background until dropped, once it has printed its first line (its
/// pids). Its child, if it printed one, is killed with it.
pub fn spawn(cmd: &mut Command) -> Background {
    let mut process = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let watched = processes::watch(&process);
    let stdin = process.stdin.take();
    let mut stdout = BufReader::new(process.stdout.take().unwrap());
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{cmd:?}'s pids: {e}"));
    let run = FixtureRun::parse(&line);
    // Alive now (it has just forked and the fixture has not ended): the pidfd names it.
    let child = run
        .values
        .get("child")
        .and_then(|c| c.parse().ok())
        .map(KillOnDrop::new);
    Background {
        process,
        stdin,
        stdout,
        run,
        child,
        _watched: watched,
    }
}

/// A fixture still running, with what it printed first.
pub struct Background {
    process: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub run: FixtureRun,
    child: Option<KillOnDrop>,
    _watched: Option<Watched>,
}

impl Background {
    /// Writes a line to the fixture's stdin (the go-ahead of a fixture that waits for one).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to the fixture: {e}"));
    }

    /// Reads the next line the fixture prints (its child's pid, after a go-ahead) into `run`. A
    /// child it names is killed with the fixture from then on.
    pub fn read_line(&mut self) {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the fixture's output: {e}"));
        assert!(read > 0, "the fixture ended without printing another line");
        let more = FixtureRun::parse(&line);
        if self.child.is_none() {
            // Alive now, as in `spawn`: the pidfd names it.
            self.child = more
                .values
                .get("child")
                .and_then(|c| c.parse().ok())
                .map(KillOnDrop::new);
        }
        self.run.values.extend(more.values);
    }

    /// Waits for the fixture to exit, which must be a success; what it printed in all. Its
    /// child is its own business then (reaped by it, or left running on purpose): not killed.
    pub fn finish(mut self) -> FixtureRun {
        self.stdin = None;
        let status = self.process.wait().expect("wait for fixture");
        let mut rest = self.stdout.buffer().to_vec();
        rest.extend(drain(self.stdout.get_mut()).into_bytes());
        let rest = String::from_utf8_lossy(&rest);
        assert!(status.success(), "fixture failed ({status}): {rest}");
        if let Some(child) = self.child.take() {
            child.forget();
        }
        let mut run = FixtureRun::parse(&rest);
        run.values.extend(std::mem::take(&mut self.run.values));
        run
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        // Then `child` (a KillOnDrop) kills the fixture's child.
    }
}

/// Kills a process on drop (a deadlocked child a test started indirectly), and with the
/// test's other processes if the test runs out of time. It holds a pidfd opened at once, so a
/// kill after the process has gone cannot hit another process that got its pid meanwhile.
pub struct KillOnDrop {
    pidfd: Option<OwnedFd>,
    _watched: Option<Watched>,
}

impl KillOnDrop {
    pub fn new(pid: u32) -> KillOnDrop {
        let pidfd = processes::pidfd_open(pid);
        let watched = pidfd
            .as_ref()
            .and_then(|fd| fd.try_clone().ok())
            .and_then(processes::watch_pidfd);
        KillOnDrop {
            pidfd,
            _watched: watched,
        }
    }

    /// Leaves the process alone.
    fn forget(mut self) {
        self.pidfd = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pidfd) = &self.pidfd {
            processes::kill(pidfd);
        }
    }
}

/// A fixture run whose child outlives it (a deadlocked child): killed on drop.
pub struct LeftRunning {
    run: FixtureRun,
    _kill: KillOnDrop,
}

impl std::ops::Deref for LeftRunning {
    type Target = FixtureRun;
    fn deref(&self) -> &FixtureRun {
        &self.run
    }
}

/// An echo server on 127.0.0.1 (TCP) or a Unix path, serving until the test ends.
pub struct EchoServer {
    pub port: u16,
    pub path: PathBuf,
    /// The abstract Unix socket name it also listens on, as ss(8) and findings show it: "@name".
    pub abstract_name: String,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let port = tcp.local_addr().unwrap().port();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("echo-{port}.sock"));
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).expect("bind unix echo");
        let name = format!("forkwatch-echo-{port}");
        let address = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name)
            .expect("an abstract name");
        let abstract_unix =
            std::os::unix::net::UnixListener::bind_addr(&address).expect("bind abstract echo");
        std::thread::spawn(move || {
            for conn in tcp.incoming().map_while(Result::ok) {
                std::thread::spawn(move || echo(conn));
            }
        });
        for listener in [unix, abstract_unix] {
            std::thread::spawn(move || {
                for conn in listener.incoming().map_while(Result::ok) {
                    std::thread::spawn(move || echo(conn));
                }
            });
        }
        EchoServer {
            port,
            path,
            abstract_name: format!("@{name}"),
        }
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
