//! End-to-end, as root: the real daemon, real eBPF, real processes; assertions on JSON findings.
//! `mt_fork_no_exec` must name exactly the multithreaded fork-without-exec, and the normal
//! patterns (fork+exec, posix_spawn, vfork, single-threaded fork, thread creation) stay quiet.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{
    self, Daemon, GRACE_MS, python, run_forker, spawn_forker, spawn_forker_holding, spawn_holding,
};

const FINDING_TIMEOUT: Duration = Duration::from_secs(10);
/// The grace window of the tests whose child must exit inside it to be reported as exited: it
/// lives 50 ms, and a wide window keeps that true on a loaded machine, where its exit may come
/// late.
const WIDE_GRACE: &str = "2s";

#[test]
fn multithreaded_fork_without_exec_is_reported_once_at_exit() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--exec-grace", WIDE_GRACE]);
        let started = Instant::now();
        // Its parent stays until the finding is out, so that its /proc (exe, argv0, thread
        // names) is there when the fork reaches the daemon, however late that is.
        let fixture = spawn_forker_holding("mt-fork-no-exec", &["3", "50"]);
        let finding = daemon.expect_finding(fixture.run.child(), FINDING_TIMEOUT);
        // The child lived between these two instants.
        let lived_at_most = started.elapsed().as_millis() as u64;
        let run = fixture.finish();
        assert_eq!(finding["schema"], 1);
        assert_eq!(finding["kind"], "mt_fork_no_exec");
        assert_eq!(finding["severity"], "warning");
        assert_eq!(finding["parent_pid"], run.parent());
        assert_eq!(finding["parent_tid"], run.parent(), "main thread forked");
        assert_eq!(finding["parent_threads"], 3);
        assert_eq!(finding["exited_without_exec"], true);
        assert_eq!(finding["exit_code"], 0);
        assert_eq!(finding["comm"], "forker");
        assert_eq!(finding["parent_comm"], "forker");
        assert!(
            finding["exe"].as_str().unwrap().ends_with("/forker"),
            "{finding}"
        );
        assert!(
            finding["argv0"].as_str().unwrap().ends_with("forker"),
            "{finding}"
        );
        assert!(
            finding.get("cmdline").is_none(),
            "no command line without --full-cmdline"
        );
        let names: Vec<&str> = finding["thread_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(names, ["fw-worker-0", "fw-worker-1"]);
        assert!(humantime::parse_rfc3339(finding["time"].as_str().unwrap()).is_ok());
        let ms = finding["ms_without_exec"].as_u64().unwrap();
        assert!(
            (40..=lived_at_most).contains(&ms) && ms < daemon.grace_ms(),
            "child lived 50 ms, at most {lived_at_most} ms: got {ms}"
        );

        // Exactly one finding for this child, even after everything pending was decided.
        daemon.barrier();
        assert_eq!(daemon.findings_for(run.child()).len(), 1);
        assert!(daemon.findings_for(run.parent()).is_empty());
    });
}

#[test]
fn child_still_running_without_exec_is_reported_at_the_deadline() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--full-cmdline"]);
        // The child would live ten minutes: its exit cannot reach the daemon before the deadline
        // does (which it did when the child lived three grace windows and the daemon lagged).
        let fixture = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
        let finding = daemon.expect_finding(fixture.run.child(), FINDING_TIMEOUT);
        assert_eq!(finding["exited_without_exec"], false);
        assert_eq!(finding["exit_code"], serde_json::Value::Null);
        assert_eq!(finding["ms_without_exec"], GRACE_MS);
        assert_eq!(finding["grace_ms"], GRACE_MS);
        assert_eq!(finding["parent_threads"], 2);
        assert_eq!(
            finding["cmdline"][1], "mt-fork-no-exec",
            "--full-cmdline: {finding}"
        );
        // The finding is emitted at the deadline, while the child still runs; its later exit adds
        // nothing.
        let child = fixture.run.child();
        drop(fixture);
        daemon.barrier();
        assert_eq!(daemon.findings_for(child).len(), 1);
    });
}

#[test]
fn python_thread_then_os_fork_is_reported() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--exec-grace", WIDE_GRACE]);
        let fixture = spawn_holding(&mut python("thread_fork.py", &["0.05"]));
        let finding = daemon.expect_finding(fixture.run.child(), FINDING_TIMEOUT);
        let run = fixture.finish();
        assert_eq!(finding["kind"], "mt_fork_no_exec");
        assert_eq!(finding["parent_pid"], run.parent());
        assert!(
            finding["parent_threads"].as_u64().unwrap() >= 2,
            "{finding}"
        );
        assert_eq!(finding["exited_without_exec"], true);
        assert!(
            finding["exe"].as_str().unwrap().contains("python"),
            "{finding}"
        );
    });
}

#[test]
fn normal_patterns_stay_quiet() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        let fork_exec = run_forker("mt-fork-exec", &["4"]);
        let single = run_forker("st-fork", &["1", "50"]);
        let spawn = run_forker("mt-posix-spawn", &["4"]);
        let vfork = run_forker("mt-vfork", &["4"]);
        // Exits without exec, as a vfork child whose exec failed does: quiet because it shares the
        // parent's memory (CLONE_VM) and so inherits no copied state.
        let vfork_exit = run_forker("mt-vfork-exit", &["4"]);
        let burst = run_forker("thread-burst", &[]);
        daemon.assert_quiet(
            "fork+exec, single-threaded fork, posix_spawn, vfork, thread burst",
            &[
                fork_exec.child(),
                fork_exec.parent(),
                single.child(),
                spawn.child(),
                vfork.child(),
                vfork_exit.child(),
                burst.parent(),
            ],
        );
    });
}

#[test]
fn metrics_pass_promtool_and_count_findings_and_forks() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        assert_eq!(daemon.get("/healthz").0, 200);
        assert_eq!(daemon.get("/readyz").0, 200);
        let run = run_forker("mt-fork-no-exec", &["3", "10"]);
        run_forker("thread-burst", &[]);
        daemon.expect_finding(run.child(), FINDING_TIMEOUT);

        let (status, body) = daemon.get("/metrics");
        assert_eq!(status, 200);
        let counter = |series: &str| -> u64 {
            body.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        };
        assert!(
            counter("forkwatch_findings_total{kind=\"mt_fork_no_exec\",severity=\"warning\"}") >= 1
        );
        assert!(
            counter("forkwatch_forks_total{kind=\"thread\"}") >= 1000,
            "thread burst counted"
        );
        assert!(counter("forkwatch_forks_total{kind=\"process\"}") >= 1);
        assert_eq!(counter("forkwatch_events_lost_total{category=\"fork\"}"), 0);
        assert!(body.contains("forkwatch_build_info{version="));
        assert!(body.contains("forkwatch_tracked_processes"));
        for detector in harness::DETECTORS {
            let series = format!("forkwatch_detector_active{{detector=\"{detector}\"}}");
            assert_eq!(counter(&series), 1, "this kernel runs every detector");
        }

        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (cargo xtask setup installs Debian's prometheus package)");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let lint = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && lint.trim().is_empty(),
            "promtool: {lint}"
        );
    });
}

#[test]
fn sigterm_detaches_and_exits_zero_within_a_second() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        // A finding already decided when the signal arrives is still written out.
        let run = run_forker("mt-fork-no-exec", &["2", "10"]);
        daemon.expect_finding(run.child(), FINDING_TIMEOUT);
        let (code, took) = daemon.terminate();
        assert_eq!(code, Some(0));
        assert!(took < Duration::from_secs(1), "took {took:?}");
    });
}

#[test]
fn output_file_gets_json_lines_and_mode_0640() {
    harness::root().run(|| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("findings.jsonl");
        let _ = std::fs::remove_file(&path);
        let daemon = Daemon::start(&["--output", path.to_str().unwrap()]);
        let run = run_forker("mt-fork-no-exec", &["2", "10"]);
        daemon.expect_finding(run.child(), FINDING_TIMEOUT);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // The daemon writes a finding to stdout, then to the file: a test that reads the file
        // as soon as stdout shows the finding can find it empty (it did, under load). A later
        // finding on stdout (the barrier's) proves this one is in the file.
        daemon.barrier();
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains(&format!("\"pid\":{}", run.child())))
            .unwrap_or_else(|| panic!("no finding line in {text}"));
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(json["kind"], "mt_fork_no_exec");
    });
}

#[test]
fn hostile_process_names_arrive_escaped_and_intact() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        // 15 bytes (the comm limit): a newline, a quote, a terminal escape, a non-UTF-8 byte.
        // The forking thread takes the name, so it reaches the daemon as raw bytes in the kernel's
        // fork event (and in /proc for parent_comm).
        let fixture = spawn_holding(&mut python(
            "thread_fork.py",
            &["0.05", r#"a\n"b\x1b[31m\xff"#],
        ));
        let f = daemon.expect_finding(fixture.run.child(), FINDING_TIMEOUT);
        fixture.finish();
        // Each finding is one valid JSON line (the harness parsed it); the name survived, with the
        // invalid byte replaced rather than passed on.
        assert_eq!(f["comm"], "a\n\"b\u{1b}[31m\u{fffd}", "{f}");
        assert_eq!(f["parent_comm"], f["comm"], "{f}");
        let raw = serde_json::to_string(&f).unwrap();
        assert!(!raw.contains('\n') && !raw.contains('\u{1b}'), "{raw}");
    });
}

/// BPF program ids held open by a process (bpf-prog fds show `prog_id:` in fdinfo).
fn program_ids_of(pid: u32) -> Vec<u32> {
    let fdinfo = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(fdinfo)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

#[test]
fn kill_9_leaves_no_bpf_programs_behind() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        let ids = program_ids_of(daemon.pid());
        assert!(ids.len() >= 7, "the daemon holds its programs: {ids:?}");
        daemon.kill_hard();
        // Nothing is pinned: the kernel frees the programs with the last fd. Freeing is deferred
        // (RCU), so allow it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let alive: Vec<u32> = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .map(|p| p.id())
                .filter(|id| ids.contains(id))
                .collect();
            if alive.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still loaded after kill -9: {alive:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // And a new daemon starts cleanly after it.
        let again = Daemon::start(&[]);
        assert_eq!(again.get("/readyz").0, 200);
    });
}
