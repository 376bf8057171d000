//! A running fixture process (`forkwatch fixture NAME`, see commands/fixture/): its stdout read
//! line by line with a deadline on every wait, its stdin held open until it is stopped, and the
//! process stopped and reaped when the handle is dropped, whatever happened before.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// How long a stopped fixture gets to reap its child and exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

pub struct Fixture {
    name: &'static str,
    process: Child,
    /// Closing it tells a fixture that runs until stopped to stop.
    stdin: Option<ChildStdin>,
    /// Its stdout, line by line; disconnected once the fixture (and every holder of its stdout)
    /// is gone.
    lines: mpsc::Receiver<String>,
    /// The forked child, from the first line.
    child: u32,
}

impl Fixture {
    /// Starts the fixture and reads the pid of the child it forked.
    pub fn start(name: &'static str, deadline: Instant) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let mut process = Command::new(exe)
            .args(["fixture", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting fixture {name}"))?;
        let stdin = process.stdin.take();
        let stdout = process.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        // A blocking read has no deadline: a thread reads, the waits below have one.
        std::thread::Builder::new()
            .name("fixture-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let mut fixture = Self {
            name,
            process,
            stdin,
            lines,
            child: 0,
        };
        let line = fixture.line(deadline)?;
        fixture.child = line
            .parse()
            .map_err(|_| anyhow!("fixture {name} printed {line:?}, not a pid"))?;
        Ok(fixture)
    }

    /// The fixture process: the parent of the fork.
    pub fn parent(&self) -> u32 {
        self.process.id()
    }

    pub fn child(&self) -> u32 {
        self.child
    }

    /// Waits for the `done` of a fixture that runs to completion (its child is reaped).
    pub fn done(&self, deadline: Instant) -> anyhow::Result<()> {
        match self.line(deadline)?.as_str() {
            "done" => Ok(()),
            other => bail!("fixture {} printed {other:?}, not done", self.name),
        }
    }

    fn line(&self, deadline: Instant) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).map_err(|err| match err {
            RecvTimeoutError::Timeout => anyhow!("fixture {} silent until the deadline", self.name),
            RecvTimeoutError::Disconnected => {
                anyhow!("fixture {} ended early (its error is above)", self.name)
            }
        })
    }
}

impl Drop for Fixture {
    /// Closes stdin (a fixture that runs until stopped then stops and reaps its child), waits
    /// for its stdout to end, then kills whatever is left and reaps the fixture. Its children
    /// die with it (PR_SET_PDEATHSIG).
    fn drop(&mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + STOP_GRACE;
        while self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
        // Not yet reaped, so the pid is still this process's even if it has exited.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
