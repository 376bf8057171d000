//! Harness for the end-to-end tests: the real `forkwatch` binary, real eBPF, real processes.
//! Each test starts its own daemon and asserts on its JSON findings, filtered by the pids of the
//! processes the test itself started (other processes on the host may fork too).
//!
//! Every test body runs through [`Test::run`], which gives it
//! - a time limit: past it the test fails, naming itself, and the processes it started are
//!   killed, so that no test can hang the suite;
//! - its share of the host: tests run side by side, except those that need host-wide state to
//!   themselves ([`Test::alone`]: ns_last_pid, host-wide gauges, fork storms that would make the
//!   other tests' daemons lose events), which run while no other test runs;
//! - a visible skip: without root a privileged test prints a `SKIP:` line and passes, except
//!   under CI=true, where it fails (a skip there would hide that nothing was tested).

mod daemon;
mod fixtures;
mod processes;

use std::{
    io::Write as _,
    sync::{Mutex, PoisonError, RwLock, mpsc},
    thread::JoinHandle,
    time::Duration,
};

pub use daemon::{Daemon, http_get, try_http_get};
pub use fixtures::{
    Background, EchoServer, FixtureRun, KillOnDrop, compiled, compiled_copy, python, run_fixture,
    run_forker, run_locker, run_python, run_sharer, spawn, spawn_forker, spawn_forker_holding,
    spawn_holding, spawn_locker, spawn_sharer,
};
pub use processes::{Watched, watch};

pub const BINARY: &str = env!("CARGO_BIN_EXE_forkwatch");

/// The detectors `forkwatch check` lists (and `forkwatch_detector_active` labels): the dev
/// kernel runs all of them.
pub const DETECTORS: [&str; 4] = [
    "lifecycle",
    "inherited_lock",
    "shared_socket",
    "shared_file_offset",
];
/// The grace window the tests run the daemon with: short, so negatives are decided quickly.
pub const GRACE_MS: u64 = 400;

/// The capabilities the README, the systemd unit and the DaemonSet grant, and nothing else.
pub const CAPS: &str = "-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search";

/// setpriv's arguments to run as uid/gid 65534 holding exactly `caps` (setpriv's syntax, e.g.
/// "-all,+bpf") as inheritable, ambient and bounding sets.
pub fn as_nobody_with(caps: &str) -> Vec<String> {
    vec![
        "--reuid=65534".to_owned(),
        "--regid=65534".to_owned(),
        "--clear-groups".to_owned(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
    ]
}

/// How long a test may run unless it says otherwise: ten times what the slowest of them takes
/// on a quiet machine, so that only a hang reaches it.
const DEFAULT_LIMIT: Duration = Duration::from_secs(180);

/// Held for reading by every running test, for writing by a test that runs [`Test::alone`].
static HOST: RwLock<()> = RwLock::new(());

/// Whether this is CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the rest of the calling test, visibly: a `SKIP:` line on the test process's stderr
/// (written around libtest's capture, which would hide it for a passing test). Under CI=true
/// it fails the test instead, with `what` and `fix`.
pub fn skip(what: &str, fix: &str) {
    let test = test_name();
    if in_ci() {
        panic!("CI=true, so {test} may not skip: {what}; {fix}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {what}; {fix}");
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this end-to-end test")
        .to_owned()
}

/// Tests that must not run at the same time as each other (but may run beside other tests).
pub struct Serial(Mutex<()>);

impl Serial {
    pub const fn new() -> Serial {
        Serial(Mutex::new(()))
    }
}

/// How a test runs: what it needs, whom it runs beside, how long it may take.
#[must_use = "a test does nothing until `.run(body)`"]
pub struct Test {
    root: bool,
    alone: Option<&'static str>,
    serial: Option<&'static Serial>,
    limit: Duration,
}

/// A test that loads eBPF programs, so needs root.
pub fn root() -> Test {
    Test {
        root: true,
        alone: None,
        serial: None,
        limit: DEFAULT_LIMIT,
    }
}

/// A test that needs no privileges.
pub fn unprivileged() -> Test {
    Test {
        root: false,
        ..root()
    }
}

impl Test {
    /// Runs while no other test runs, because of `why`: host-wide state it reads or disturbs.
    pub fn alone(self, why: &'static str) -> Test {
        Test {
            alone: Some(why),
            ..self
        }
    }

    /// Runs one at a time with the other tests of `serial`.
    pub fn serial(self, serial: &'static Serial) -> Test {
        Test {
            serial: Some(serial),
            ..self
        }
    }

    /// A time limit other than the default one.
    pub fn limit(self, limit: Duration) -> Test {
        Test { limit, ..self }
    }

    /// Runs `body` on a thread of its own, and fails the test, naming it, if it has not
    /// finished within the time limit; the processes it started are killed then. Time spent
    /// waiting for other tests to make room does not count.
    pub fn run(self, body: impl FnOnce() + Send + 'static) {
        let name = test_name();
        if self.root && !is_root() {
            return skip(
                "it needs root to load eBPF programs",
                "run it as root (`sudo cargo xtask test`)",
            );
        }
        // Always the host first, then the serial group: one order for every test, so no two
        // tests can each hold what the other waits for.
        let _host = match self.alone {
            Some(_) => (
                None,
                Some(HOST.write().unwrap_or_else(PoisonError::into_inner)),
            ),
            None => (
                Some(HOST.read().unwrap_or_else(PoisonError::into_inner)),
                None,
            ),
        };
        let _serial = self
            .serial
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner));

        let started = processes::Started::new();
        let (done, finished) = mpsc::channel::<()>();
        let body = {
            let started = started.clone();
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let _done = done; // dropped when the body returns or unwinds
                    started.adopt();
                    body();
                })
                .expect("start the test's thread")
        };
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(self.limit) {
            let killed = started.kill_all();
            panic!(
                "{name} did not finish within its time limit of {:?} ({}); killed the {killed} \
                 processes it had started",
                self.limit,
                self.alone
                    .map_or("run beside other tests".to_owned(), |why| format!(
                        "run alone: {why}"
                    )),
            );
        }
        if let Err(panic) = body.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Like `std::thread::spawn`, for a test's helper threads: processes they start are killed
/// with the test's own if it runs out of time.
pub fn thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let started = processes::Started::current();
    std::thread::spawn(move || {
        if let Some(started) = started {
            started.adopt();
        }
        f()
    })
}
