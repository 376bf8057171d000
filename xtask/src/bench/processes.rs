//! The processes a bench run drives: the daemon (and its /metrics) and bpftrace (the server
//! host's are in server.rs).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Bench, PROBE_SWITCH_TIMEOUT};
use crate::{cmd, cmd::describe};

/// The release daemon, default settings, findings to a file, ready when it says so.
pub(super) struct Daemon {
    child: Child,
    addr: String,
    /// Its JSON findings (stdout).
    pub(super) findings: PathBuf,
}

impl Daemon {
    pub(super) fn start(bench: &Bench, bpf_stats: bool, tag: &str) -> anyhow::Result<Daemon> {
        Daemon::start_with(bench, bpf_stats, tag, &[])
    }

    /// As `start`, with `extra` flags after the defaults.
    pub(super) fn start_with(
        bench: &Bench,
        bpf_stats: bool,
        tag: &str,
        extra: &[&str],
    ) -> anyhow::Result<Daemon> {
        let stdout = bench.dir.join(format!("forkwatch-{tag}.jsonl"));
        let stderr = bench.dir.join(format!("forkwatch-{tag}.log"));
        let mut command = Command::new(&bench.daemon);
        command.args(["run", "--format", "json", "--metrics-addr", "127.0.0.1:0"]);
        if bpf_stats {
            command.arg("--bpf-stats");
        }
        command.args(extra);
        command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?);
        end_with_bench(&mut command, libc::SIGTERM);
        eprintln!("xtask: $ {}", describe(&command));
        let mut child = command.spawn().context("cannot start the daemon")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = strip_ansi(&std::fs::read_to_string(&stderr).unwrap_or_default());
            if let Some(line) = log.lines().find(|l| l.contains("ready")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("metrics_addr="))
                    .map(|a| a.trim_matches('"').to_owned())
                    .with_context(|| format!("no metrics_addr in the ready line: {line}"))?;
                return Ok(Daemon {
                    child,
                    addr,
                    findings: stdout,
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!("the daemon exited ({status}) before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the daemon was not ready within 30 s:\n{log}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn scrape(&self) -> anyhow::Result<Metrics> {
        let mut stream = TcpStream::connect(&self.addr)
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("a malformed HTTP answer from /metrics")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("/metrics answered {}", head.lines().next().unwrap_or(""));
        }
        Ok(Metrics::parse(body))
    }

    /// Waits until `gauge` (one of the daemon's probe gauges) is 1 (`attached`) or 0, for up
    /// to PROBE_SWITCH_TIMEOUT; whether it got there.
    pub(super) fn wait_gauge(&self, gauge: &str, attached: bool) -> anyhow::Result<bool> {
        let want = if attached { 1.0 } else { 0.0 };
        let deadline = Instant::now() + PROBE_SWITCH_TIMEOUT;
        loop {
            if self.scrape()?.sum(gauge) == want {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// utime + stime from /proc/<pid>/stat.
    pub(super) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .with_context(|| format!("{path}: no field {}", i + 3))
        };
        Ok((ticks(11)? + ticks(12)?) / clock_ticks())
    }

    /// CPU time of all threads in nanosecond resolution (/proc/<pid>/task/*/schedstat).
    pub(super) fn schedstat_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            total += stat.split_whitespace().next()?.parse::<f64>().ok()? / 1e9;
        }
        Some(total)
    }

    /// VmHWM (the peak) and VmRSS (now) from /proc/<pid>/status, KiB.
    pub(super) fn peak_rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("{path}: no {name}"))
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    pub(super) fn stop(mut self) -> anyhow::Result<()> {
        signal(self.pid(), "TERM")?;
        // Its exit detaches every program, which takes this kernel 1–2 s (the daemon itself is
        // done in milliseconds); the bench stops a daemon per sample, and one slow detach must
        // not fail a run whose samples are taken: a bound on a hang, as for bpftrace below.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the daemon exited with {status} on SIGTERM");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the daemon did not stop within 60 s of SIGTERM");
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only on an error path: stop() has already reaped it otherwise.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// bpftrace with the naive probe set: sched fork/exec/exit and entry and exit of futex and the
/// socket I/O syscalls, each counting per CPU.
pub(super) struct Bpftrace {
    pub(super) child: Child,
}

const BPFTRACE_SYSCALLS: [&str; 7] = [
    "futex", "read", "write", "sendto", "recvfrom", "sendmsg", "recvmsg",
];

pub(super) fn bpftrace_script() -> String {
    let mut script = String::new();
    for event in ["fork", "exec", "exit"] {
        script.push_str(&format!(
            "tracepoint:sched:sched_process_{event} {{ @{event}[cpu] = count(); }}\n"
        ));
    }
    for syscall in BPFTRACE_SYSCALLS {
        for side in ["enter", "exit"] {
            script.push_str(&format!(
                "tracepoint:syscalls:sys_{side}_{syscall} {{ @{side}_{syscall}[cpu] = count(); }}\n"
            ));
        }
    }
    // Last: bpftrace attaches in program order, so its first tick means all probes are in.
    script.push_str("interval:ms:100 /@started == 0/ { @started = 1; printf(\"ready\\n\"); }\n");
    script
}

impl Bpftrace {
    pub(super) fn start(bench: &Bench) -> anyhow::Result<Bpftrace> {
        let script = bench.dir.join("naive.bt");
        std::fs::write(&script, bpftrace_script())?;
        let out = bench.dir.join("bpftrace.out");
        let err = bench.dir.join("bpftrace.log");
        let mut command = Command::new("bpftrace");
        command
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?);
        end_with_bench(&mut command, libc::SIGINT);
        eprintln!("xtask: $ {}", describe(&command));
        let mut child = command.spawn().context("cannot start bpftrace")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.lines().any(|l| l == "ready") {
                return Ok(Bpftrace { child });
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&err).unwrap_or_default();
                bail!("bpftrace exited ({status}) before it was ready:\n{text}{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("bpftrace was not ready within 60 s");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Stops bpftrace; whether it had to be killed. Its samples are taken by then, so a
    /// bpftrace that hangs on SIGINT is killed (its probes detach as its fds close) and the run
    /// goes on: on this 2-vCPU VM one of 79 stops in fourteen `--workload` runs took longer
    /// than 15 s, and in the first try of run 19 the ninth pass never ended, which failed a
    /// 15-minute run whose samples were all taken. The report counts such kills.
    pub(super) fn stop(mut self) -> anyhow::Result<bool> {
        signal(self.child.id(), "INT")?;
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                eprintln!(
                    "xtask: bench: bpftrace did not stop within {} s of SIGINT: killed",
                    limit.as_secs()
                );
                self.child.kill().context("cannot kill bpftrace")?;
                self.child.wait().context("bpftrace, killed")?;
                return Ok(true);
            }
            sleep(Duration::from_millis(50));
        }
        Ok(false)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Makes the kernel send `signal` to the process `command` starts when the bench's thread that
/// started it ends: the bench runs on its main thread, so that is when the bench dies (Ctrl-C,
/// SIGKILL, the time limit of `cargo xtask test`) without reaching its own cleanup. Set after
/// any uid change of `command` (std runs pre_exec closures after it), which would clear it.
pub(super) fn end_with_bench(command: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs in the forked child before exec; prctl is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `program MODE` with piped stdin and stdout and reads its first line. The program
/// runs until its stdin closes (dropping the handle closes it, also on an error).
pub(super) fn spawn_until_line(
    program: &Path,
    mode: &str,
) -> anyhow::Result<(Child, ChildStdin, String)> {
    let mut child = Command::new(program)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{} {mode}`", program.display()))?;
    let stdin = child.stdin.take().context("piped stdin")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("piped stdout")?).read_line(&mut line)?;
    Ok((child, stdin, line))
}

/// One /metrics scrape: (name, labels, value) per sample line.
pub(super) struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    pub(super) fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            samples.push((name.to_owned(), labels.to_owned(), value));
        }
        Metrics(samples)
    }

    pub(super) fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }

    pub(super) fn get(&self, name: &str, label: &str, value: &str) -> f64 {
        self.by_label(name, label)
            .get(value)
            .copied()
            .unwrap_or(0.0)
    }

    pub(super) fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (n, labels, v) in &self.0 {
            if n != name {
                continue;
            }
            let key = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(label)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_owned())
                .unwrap_or_default();
            *out.entry(key).or_insert(0.0) += v;
        }
        out
    }
}

pub(super) fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed ({status})");
    }
    Ok(())
}

fn clock_ticks() -> f64 {
    cmd::output("getconf", &["CLK_TCK"])
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metrics() {
        let m = Metrics::parse(
            "# HELP x\nforkwatch_events_total{category=\"fork\"} 3\n\
             forkwatch_events_total{category=\"exit\"} 4\nforkwatch_write_probe_attached 1\n",
        );
        assert_eq!(m.sum("forkwatch_events_total"), 7.0);
        assert_eq!(m.get("forkwatch_events_total", "category", "exit"), 4.0);
        assert_eq!(m.sum("forkwatch_write_probe_attached"), 1.0);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m ready"), "INFO ready");
    }
}
