//! One bench run's measurements: the workloads on each host in each condition, the in-kernel
//! cost per program call, idle CPU, finding latency and the sustained fork storm.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    Bench, Condition, Host, IDLE_CPU_TARGET_PCT, IDLE_FULL, IDLE_SMOKE, LATENCY_RUNS, Probes,
    Results, SERVER_SETTLE, SETTLE, STATS_SETTLE, SUSTAIN_ATTEMPTS, SUSTAIN_FORKERS,
    SUSTAIN_FULL_SECONDS, SUSTAIN_SMOKE_SECONDS, SUSTAIN_TARGET_FORKS_PER_S, Sample, Workload,
    foreign_monitors, latency,
    processes::{Bpftrace, Daemon, Metrics},
    server::ServerHost,
};

/// One workload run: its own timing of the measured part, the wall time around it, operations.
struct Ran {
    elapsed: f64,
    wall: f64,
    ops: f64,
}

impl Bench {
    pub(super) fn size(&self, w: &Workload) -> u64 {
        if self.smoke { w.smoke } else { w.full }
    }

    /// Runs one workload; the seconds of its timed part (as the program measured it) and the
    /// wall time of the whole process.
    pub(super) fn run(&self, mode: &str, args: &[String]) -> anyhow::Result<(f64, f64)> {
        let ran = self.run_program(&self.workloads, mode, args)?;
        Ok((ran.elapsed, ran.wall))
    }

    /// `run`, of the given build of the workloads program.
    fn run_program(&self, program: &Path, mode: &str, args: &[String]) -> anyhow::Result<Ran> {
        let begin = Instant::now();
        let out = Command::new(program)
            .arg(mode)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", program.display()))?;
        let wall = begin.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "workload {mode} {args:?} failed ({}): {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |name: &str| -> anyhow::Result<f64> {
            stdout
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("workload {mode}: no {name} in {stdout:?}"))
        };
        Ok(Ran {
            elapsed: field("elapsed_ns")? / 1e9,
            wall,
            ops: field("ops")?,
        })
    }

    /// `run` of workload `w` at this run's size.
    pub(super) fn run_workload(&self, w: &Workload) -> anyhow::Result<(f64, f64)> {
        self.run(w.mode, &[self.size(w).to_string()])
    }

    /// run_workload, noting whether a monitor other than `own` ran before or after it.
    fn run_checked(&self, w: &Workload, own: &[u32]) -> anyhow::Result<(Sample, f64)> {
        let quiet_before = foreign_monitors(own).is_empty();
        let (t, wall) = self.run_workload(w)?;
        let clean = quiet_before && foreign_monitors(own).is_empty();
        Ok((
            Sample {
                t,
                clean,
                probes: None,
            },
            wall,
        ))
    }

    /// (a) and (b) of every workload on `host`, back to back: this machine's speed drifts by a
    /// third within a minute (the VM's host), which a whole pass of (a) then one of (b) turned
    /// into ratios; a pair a few seconds apart sees the same machine. The order within the pair
    /// alternates with the workload and the repetition, so neither side always runs first.
    pub(super) fn pass_paired(
        &self,
        results: &mut Results,
        host: Host,
        rep: usize,
    ) -> anyhow::Result<()> {
        for w in self.selected() {
            if (rep + w.id).is_multiple_of(2) {
                self.sample_none(results, w, host)?;
                self.sample_forkwatch(results, w, host)?;
            } else {
                self.sample_forkwatch(results, w, host)?;
                self.sample_none(results, w, host)?;
            }
        }
        Ok(())
    }

    /// (a): one sample of `w` on `host`, no monitor.
    fn sample_none(&self, results: &mut Results, w: &Workload, host: Host) -> anyhow::Result<()> {
        let (sample, _) = self.run_checked(w, &[])?;
        results
            .times
            .entry((w.id, host, Condition::None))
            .or_default()
            .push(sample);
        Ok(())
    }

    /// (b): one sample of `w` on `host` under a daemon of its own, started for it and stopped
    /// (its programs detached) before the next sample. On the server host the daemon first
    /// settles on what it finds there (SERVER_SETTLE). The probe state at the sample's start
    /// and end is recorded; no sample is left out for it.
    fn sample_forkwatch(
        &self,
        results: &mut Results,
        w: &Workload,
        host: Host,
    ) -> anyhow::Result<()> {
        let daemon = Daemon::start(self, false, &format!("b-{}", host.key()))?;
        if host == Host::Server {
            sleep(SERVER_SETTLE);
        }
        let cpu_before = daemon.cpu_seconds()?;
        let wall_before = Instant::now();
        let before = daemon.scrape()?;
        let (mut sample, wall) = self.run_checked(w, &[daemon.pid()])?;
        let end = probes_of(&daemon.scrape()?);
        let start = probes_of(&before);
        sample.probes = Some(Probes {
            write: [start.write[0], end.write[0]],
            scheduler: [start.scheduler[0], end.scheduler[0]],
        });
        sleep(SETTLE);
        let after = daemon.scrape()?;
        results
            .times
            .entry((w.id, host, Condition::Forkwatch))
            .or_default()
            .push(sample);
        let events = after.sum("forkwatch_events_total") - before.sum("forkwatch_events_total");
        results
            .events_per_s
            .entry((w.id, host))
            .or_default()
            .push(events / wall);
        *results.events_lost.entry((w.id, host)).or_default() +=
            after.sum("forkwatch_events_lost_total") - before.sum("forkwatch_events_lost_total");
        *results.daemon_cpu_s.entry(host).or_default() += daemon.cpu_seconds()? - cpu_before;
        *results.daemon_wall_s.entry(host).or_default() += wall_before.elapsed().as_secs_f64();
        results.note_rss(&format!("b, {} host", host.key()), daemon.peak_rss_kib()?);
        daemon.stop()
    }

    pub(super) fn pass_bpftrace(&self, results: &mut Results) -> anyhow::Result<()> {
        let tracer = Bpftrace::start(self)?;
        for w in self.selected() {
            let (sample, _) = self.run_checked(w, &[tracer.child.id()])?;
            results
                .times
                .entry((w.id, Host::Idle, Condition::Bpftrace))
                .or_default()
                .push(sample);
        }
        if tracer.stop()? {
            results.bpftrace_killed += 1;
        }
        Ok(())
    }

    /// The in-kernel cost per program call, with a daemon of its own: the statistics cost a
    /// little on every program run, which must not count against (b). On the idle host
    /// (`server` None: each workload once nothing is attached), or on the running `server`
    /// (started before this daemon; rows named "server: ...").
    pub(super) fn pass_bpf_stats(
        &self,
        results: &mut Results,
        server: Option<&ServerHost>,
    ) -> anyhow::Result<()> {
        let (tag, prefix) = match server {
            None => ("bpf-stats", ""),
            Some(_) => ("bpf-stats-server", "server: "),
        };
        eprintln!("xtask: bench: BPF program statistics (--bpf-stats), {tag}");
        let daemon = Daemon::start(self, true, tag)?;
        let resting = match server {
            None => Probes::default(),
            Some(_) => {
                sleep(SERVER_SETTLE);
                probes_of(&daemon.scrape()?)
            }
        };
        let mut record = |name: String, before: &Metrics, after: &Metrics| {
            let runs = before.by_label("forkwatch_bpf_program_runs_total", "program");
            let secs = before.by_label("forkwatch_bpf_program_seconds_total", "program");
            let runs_after = after.by_label("forkwatch_bpf_program_runs_total", "program");
            let secs_after = after.by_label("forkwatch_bpf_program_seconds_total", "program");
            let mut programs = BTreeMap::new();
            for (program, r1) in runs_after {
                let dr = r1 - runs.get(&program).copied().unwrap_or(0.0);
                let ds = secs_after.get(&program).copied().unwrap_or(0.0)
                    - secs.get(&program).copied().unwrap_or(0.0);
                programs.insert(program, (dr, ds));
            }
            results.bpf_stats.insert(name, programs);
        };
        for w in self.selected() {
            sleep(STATS_SETTLE);
            daemon.wait_gauge("forkwatch_scheduler_probes_attached", resting.scheduler[0])?;
            daemon.wait_gauge("forkwatch_write_probe_attached", resting.write[0])?;
            let before = daemon.scrape()?;
            self.run_workload(w)?;
            sleep(STATS_SETTLE);
            let after = daemon.scrape()?;
            record(format!("{prefix}{} {}", w.id, w.mode), &before, &after);
        }
        results.note_rss(tag, daemon.peak_rss_kib()?);
        daemon.stop()
    }

    /// Idle CPU of a fresh daemon, finding latency, then the sustained fork-without-exec storm.
    pub(super) fn idle_and_sustained(&self, results: &mut Results) -> anyhow::Result<()> {
        eprintln!("xtask: bench: idle CPU, finding latency and sustained fork storm");
        // What this machine can do without a monitor, measured in the same run around the
        // monitored attempts: the forks/s reached varies between days on the development VM by
        // more than the monitor costs, so the monitored rate alone says little.
        let bare_before = self.storm_bare()?;
        // Folding off: finding latency times every finding, and with the default
        // --repeat-window the latency fixture's second child (same parent executable, same
        // kind) would be printed only as a count at the window's end.
        let daemon = Daemon::start_with(self, false, "sustained", &["--repeat-window", "0s"])?;
        sleep(Duration::from_millis(500));
        results.idle = Some(self.idle_cpu(&daemon)?);

        let runs = if self.smoke { 1 } else { LATENCY_RUNS };
        results.latency = Some(latency::measure(&self.workloads, &daemon.findings, runs)?);

        let seconds = self.storm_seconds();
        // How fast this machine can fork varies from run to run (nested virtualization): the
        // storm is tried up to SUSTAIN_ATTEMPTS times until one reaches the target rate. Every
        // attempt is in the report, and a loss in any of them fails the target.
        let attempts = if self.smoke { 1 } else { SUSTAIN_ATTEMPTS };
        let mut runs: Vec<Value> = Vec::new();
        for _ in 0..attempts {
            let run = self.storm_once(&daemon, seconds)?;
            let reached = run["rate_reached"] == true;
            runs.push(run);
            if reached {
                break;
            }
        }
        let rate = |v: &Value| v["forks_per_s"].as_f64().unwrap_or(0.0);
        let fastest = runs
            .iter()
            .max_by(|a, b| rate(a).total_cmp(&rate(b)))
            .cloned()
            .context("no storm attempt")?;
        let lost_in_all: f64 = runs
            .iter()
            .map(|r| r["events_lost"].as_f64().unwrap_or(0.0))
            .sum();
        let mut sustained = fastest;
        sustained["attempts"] = Value::from(runs);
        sustained["events_lost_all_attempts"] = Value::from(lost_in_all);
        sustained["met"] = Value::from(sustained["rate_reached"] == true && lost_in_all == 0.0);
        results.note_rss("sustained fork storm", daemon.peak_rss_kib()?);
        daemon.stop()?;
        let bare = bare_before.max(self.storm_bare()?);
        sustained["bare_forks_per_s"] = Value::from(bare);
        sustained["ratio_to_bare"] = Value::from(rate(&sustained) / bare);
        results.sustained = Some(sustained);
        Ok(())
    }

    /// The CPU a daemon at rest uses on the server host: PostgreSQL's sessions and the lingering
    /// worker keep it tracking (the worker is a reported child for as long as it lives), which
    /// the idle host never shows. Measured like the idle host's, after SERVER_SETTLE.
    pub(super) fn idle_cpu_on_server(&self, results: &mut Results) -> anyhow::Result<()> {
        eprintln!("xtask: bench: idle CPU on the server host");
        let daemon = Daemon::start(self, false, "idle-server")?;
        sleep(SERVER_SETTLE);
        results.idle_server = Some(self.idle_cpu(&daemon)?);
        results.note_rss("idle, server host", daemon.peak_rss_kib()?);
        daemon.stop()
    }

    /// The daemon's CPU over IDLE_FULL (IDLE_SMOKE) of nothing happening, by utime+stime (the
    /// verdict) and by schedstat (ns, finer).
    fn idle_cpu(&self, daemon: &Daemon) -> anyhow::Result<Value> {
        let idle = if self.smoke { IDLE_SMOKE } else { IDLE_FULL };
        let ticks_before = daemon.cpu_seconds()?;
        let ns_before = daemon.schedstat_seconds();
        let begin = Instant::now();
        sleep(idle);
        let wall = begin.elapsed().as_secs_f64();
        let cpu = daemon.cpu_seconds()? - ticks_before;
        let precise = daemon
            .schedstat_seconds()
            .zip(ns_before)
            .map(|(a, b)| a - b);
        let idle_pct = 100.0 * cpu / wall;
        Ok(json!({
            "seconds": wall,
            "cpu_seconds": cpu,
            "cpu_pct_of_one_core": idle_pct,
            "cpu_pct_of_one_core_schedstat": precise.map(|p| 100.0 * p / wall),
            "target_pct": IDLE_CPU_TARGET_PCT,
            "met": idle_pct <= IDLE_CPU_TARGET_PCT,
        }))
    }

    /// The sustained storm's forks/s with no monitor loaded (see idle_and_sustained).
    fn storm_bare(&self) -> anyhow::Result<f64> {
        let ran = self.run_program(
            &self.storm_workloads,
            "fork-noexec-for",
            &[
                self.storm_seconds().to_string(),
                SUSTAIN_FORKERS.to_string(),
            ],
        )?;
        Ok(ran.ops / ran.elapsed)
    }

    fn storm_seconds(&self) -> u32 {
        if self.smoke {
            SUSTAIN_SMOKE_SECONDS
        } else {
            SUSTAIN_FULL_SECONDS
        }
    }

    /// One sustained fork-without-exec storm of `seconds` against `daemon`, from its /metrics.
    fn storm_once(&self, daemon: &Daemon, seconds: u32) -> anyhow::Result<Value> {
        let before = daemon.scrape()?;
        let cpu_before = daemon.cpu_seconds()?;
        let elapsed = self
            .run_program(
                &self.storm_workloads,
                "fork-noexec-for",
                &[seconds.to_string(), SUSTAIN_FORKERS.to_string()],
            )?
            .elapsed;
        sleep(Duration::from_secs(1));
        let after = daemon.scrape()?;
        let forks = after.get("forkwatch_forks_total", "kind", "process")
            - before.get("forkwatch_forks_total", "kind", "process");
        let lost =
            after.sum("forkwatch_events_lost_total") - before.sum("forkwatch_events_lost_total");
        let events = after.sum("forkwatch_events_total") - before.sum("forkwatch_events_total");
        let rate = forks / elapsed;
        Ok(json!({
            "seconds": elapsed,
            "forker_processes": SUSTAIN_FORKERS,
            "forks_seen_by_kernel": forks,
            "forks_per_s": rate,
            "events_received": events,
            "events_lost": lost,
            "daemon_cpu_pct_of_one_core": 100.0 * (daemon.cpu_seconds()? - cpu_before) / elapsed,
            "target_forks_per_s": SUSTAIN_TARGET_FORKS_PER_S,
            // The target is a rate held for SUSTAIN_FULL_SECONDS: a smoke run's second is not.
            "rate_reached": rate >= SUSTAIN_TARGET_FORKS_PER_S
                && elapsed >= f64::from(SUSTAIN_FULL_SECONDS),
        }))
    }
}

/// The daemon's probe state in one scrape (both elements of each pair alike).
fn probes_of(metrics: &Metrics) -> Probes {
    let on = |gauge: &str| metrics.sum(gauge) > 0.0;
    let write = on("forkwatch_write_probe_attached");
    let scheduler = on("forkwatch_scheduler_probes_attached");
    Probes {
        write: [write; 2],
        scheduler: [scheduler; 2],
    }
}
