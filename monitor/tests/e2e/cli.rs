//! End-to-end, the command line: `selftest` and `check`, usage errors and a broken environment
//! named with their fix, the configuration file and its precedence, and the daemon at work as
//! an unprivileged user holding only the capabilities the documentation lists.

use std::{process::Command, time::Duration};

use crate::harness::{self, BINARY, CAPS, Daemon, as_nobody_with, spawn_forker_holding};

const FINDING_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn selftest_and_check_pass() {
    harness::root().run(|| {
        let selftest = Command::new(BINARY).arg("selftest").output().unwrap();
        let stdout = String::from_utf8_lossy(&selftest.stdout);
        assert!(
            selftest.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&selftest.stderr)
        );
        assert!(stdout.contains("selftest: passed"), "{stdout}");
        // Every detector proven on this kernel, every safe pattern quiet: none skipped.
        for scenario in [
            "fork_exec_quiet",
            "single_threaded_fork_quiet",
            "spawn_quiet",
            "mt_fork_no_exec",
            "threads_after_mt_fork",
            "shared_socket",
            "inherited_lock_deadlock",
            "shared_file_offset",
        ] {
            let pass = format!("selftest: PASS {scenario}: ");
            assert!(
                stdout.lines().filter(|l| l.starts_with(&pass)).count() == 1,
                "{stdout}"
            );
        }

        let check = Command::new(BINARY).arg("check").output().unwrap();
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "{stdout}");
        // This kernel (the dev VM's, 6.18) runs every detector.
        for detector in harness::DETECTORS {
            assert!(
                stdout.contains(&format!("[ ok ] detector {detector}: active")),
                "{stdout}"
            );
        }
    });
}

#[test]
fn bad_environment_gets_a_clear_error_not_a_panic() {
    harness::root().run(|| {
        // No BTF at the given path.
        let out = Command::new(BINARY)
            .args([
                "run",
                "--btf",
                "/nonexistent/vmlinux",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("CONFIG_DEBUG_INFO_BTF"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");

        // A damaged copy of the kernel's BTF (cut short): forkwatch parses it itself.
        let kernel_btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
        let truncated =
            std::env::temp_dir().join(format!("forkwatch-cut-{}.btf", std::process::id()));
        std::fs::write(&truncated, &kernel_btf[..kernel_btf.len() / 2]).unwrap();
        let out = Command::new(BINARY)
            .arg("run")
            .arg("--btf")
            .arg(&truncated)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&truncated);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("kernel BTF is malformed: BTF data is truncated"),
            "{stderr}"
        );
        assert!(stderr.contains("--btf must name"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");

        // Not root: drop to nobody with no capabilities.
        let out = Command::new("setpriv")
            .args(as_nobody_with("-all"))
            .args([BINARY, "run", "--metrics-addr", "127.0.0.1:0"])
            .output()
            .expect("setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("run forkwatch as root"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");

        let out = Command::new("setpriv")
            .args(as_nobody_with("-all"))
            .args([BINARY, "check"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(
            stdout.contains("[FAIL] privileges: missing CAP_BPF, CAP_PERFMON"),
            "{stdout}"
        );
        assert!(stdout.contains("fix: run as root"), "{stdout}");
    });
}

#[test]
fn usage_errors_exit_2_naming_the_flag() {
    harness::unprivileged().run(|| {
        // Needs no privileges: flags are validated before anything is loaded.
        let out = Command::new(BINARY)
            .args(["run", "--ring-buffer-size", "5000"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--ring-buffer-size") && stderr.contains("power of two"),
            "{stderr}"
        );
        let out = Command::new(BINARY)
            .env("FORKWATCH_EXEC_GRACE", "forever")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--exec-grace"), "{stderr}");
    });
}

#[test]
fn detects_hazards_as_nobody_with_only_the_documented_capabilities() {
    harness::root().run(|| {
        let mut setpriv = vec!["setpriv".to_owned()];
        setpriv.extend(as_nobody_with(CAPS));
        let setpriv: Vec<&str> = setpriv.iter().map(String::as_str).collect();
        let daemon = Daemon::start_under(&setpriv, &["--deadlock-after", "500ms"]);
        // Thread names of a root process: reading its /proc needs CAP_DAC_READ_SEARCH/SYS_PTRACE.
        // (Its parent stays until the finding is out: the names are read when the fork
        // reaches the daemon, which can be after a parent that exits at once is gone.)
        let fixture = spawn_forker_holding("mt-fork-no-exec", &["3", "10"]);
        let f = daemon.expect_finding(fixture.run.child(), FINDING_TIMEOUT);
        fixture.finish();
        assert_eq!(f["kind"], "mt_fork_no_exec");
        assert_eq!(f["thread_names"].as_array().unwrap().len(), 2, "{f}");
        assert!(f["exe"].as_str().is_some(), "{f}");
        // A deadlock's stack: reading another process's memory needs CAP_SYS_PTRACE.
        let locked = harness::run_locker("deadlock");
        let f = daemon.expect_kind(locked.child(), "inherited_lock_deadlock", FINDING_TIMEOUT);
        assert!(
            f["stack_summary"]
                .as_str()
                .unwrap_or_default()
                .contains("pthread_mutex_lock"),
            "{f}"
        );
    });
}

#[test]
fn check_names_each_missing_capability_and_the_fix() {
    harness::root().run(|| {
        for (missing, status) in [
            ("bpf", "FAIL"),
            ("perfmon", "FAIL"),
            ("sys_ptrace", "warn"),
            ("dac_read_search", "warn"),
        ] {
            let caps = CAPS.replace(&format!(",+{missing}"), "");
            let out = Command::new("setpriv")
                .args(as_nobody_with(&caps))
                .args([BINARY, "check"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let cap = format!("CAP_{}", missing.to_uppercase());
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&format!("[{status}] privileges")))
                .unwrap_or_else(|| panic!("without {cap}: {stdout}"));
            assert!(line.contains(&cap), "without {cap}: {line}");
            assert!(stdout.contains("fix: "), "without {cap}: {stdout}");
            // Only the two load-bearing capabilities stop the daemon.
            assert_eq!(
                out.status.success(),
                status == "warn",
                "without {cap}: {stdout}"
            );
        }
    });
}

/// Starts `forkwatch run` with `args` and `env` (and none of the harness's default flags),
/// returns the exec grace its ready line reports.
fn ready_grace_ms(args: &[&str], env: &[(&str, &str)]) -> u64 {
    Daemon::spawn(
        Command::new(BINARY)
            .args(["run", "--log-format", "json"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied()),
    )
    .grace_ms()
}

#[test]
fn config_file_fills_in_flags_that_flags_and_environment_override() {
    harness::root().run(|| {
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("forkwatch.toml");
        std::fs::write(&path, "exec-grace = \"250ms\"\nformat = \"json\"\n").unwrap();
        let config = path.to_str().unwrap();
        assert_eq!(ready_grace_ms(&["--config", config], &[]), 250);
        assert_eq!(
            ready_grace_ms(&["--config", config], &[("FORKWATCH_EXEC_GRACE", "300ms")]),
            300,
            "the environment beats the file"
        );
        assert_eq!(
            ready_grace_ms(
                &["--config", config, "--exec-grace", "350ms"],
                &[("FORKWATCH_EXEC_GRACE", "300ms")]
            ),
            350,
            "a flag beats both"
        );

        std::fs::write(&path, "exec_grace = \"1s\"\nring-buffer = 4096\n").unwrap();
        let out = Command::new(BINARY)
            .args(["run", "--config", config])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("line 2: unknown key `ring-buffer`"),
            "{stderr}"
        );
    });
}
