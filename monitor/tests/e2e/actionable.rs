//! End-to-end, as root: what makes a finding actionable. Where the fork was called
//! (`fork_stack`), the thread that held an inherited lock (`lock_owner`), how to fix it (`hint`,
//! by runtime), repeated findings folded into one `repeated` record (per fork call site), and
//! `[[ignore]]` rules that silence exactly what they name.

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;

use crate::harness::{
    self, BINARY, Daemon, KillOnDrop, compiled, compiled_copy, run_fixture, run_python, spawn,
    spawn_holding,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The function names of a finding's `fork_stack`, innermost first (fails when it has none).
fn fork_functions(f: &Value) -> Vec<&str> {
    let frames = f["fork_stack"]
        .as_array()
        .unwrap_or_else(|| panic!("no fork_stack: {f}"));
    frames
        .iter()
        .filter_map(|frame| frame["function"].as_str())
        .collect()
}

/// The frame of `function` in a finding's `fork_stack`.
fn fork_frame<'a>(f: &'a Value, function: &str) -> &'a Value {
    f["fork_stack"]
        .as_array()
        .and_then(|frames| frames.iter().find(|frame| frame["function"] == function))
        .unwrap_or_else(|| panic!("no {function} in fork_stack: {f}"))
}

#[test]
fn a_mutex_held_by_a_named_thread_at_the_fork_names_that_thread_and_a_c_hint() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--deadlock-after", "500ms"]);
        let fixture = spawn(&mut Command::new(compiled("cache_refresh")));
        let run = &fixture.run;
        let f = daemon.expect_kind(run.child(), "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["futex_addr"], run.text("lock"), "{f}");
        assert_eq!(f["lock_owner"]["name"], "cache-refresh", "{f}");
        assert_eq!(f["lock_owner"]["tid"], run.get("holder"), "{f}");
        assert_eq!(
            f["lock_owner_unknown_reason"],
            serde_json::Value::Null,
            "{f}"
        );
        assert_eq!(f["runtime"], "glibc", "{f}");
        let hint = f["hint"].as_str().unwrap_or_default();
        assert!(hint.contains("async-signal-safe"), "a C hint: {f}");
        // The child's stack runs through the fork's call site.
        let stack = f["stack_summary"].as_str().unwrap_or_default();
        assert!(
            stack.contains("worker_main ← start_worker_process ← main"),
            "{stack}"
        );
        // The parent's stack at the fork, captured by the kernel then: fork() called from
        // start_worker_process, with the fixture's source line (it is built with -g).
        assert_eq!(f["fork_site"], "start_worker_process ← main", "{f}");
        let top = fork_functions(&f)[0].to_lowercase();
        assert!(top.contains("fork"), "the C library's fork on top: {f}");
        let site = fork_frame(&f, "start_worker_process");
        assert_eq!(site["module"], "cache_refresh", "{f}");
        assert!(
            site["file"]
                .as_str()
                .is_some_and(|file| file.ends_with("cache_refresh.c")),
            "{f}"
        );
        assert!(site["line"].as_u64().is_some_and(|line| line > 0), "{f}");
        assert_eq!(f["fork_stack_unavailable_reason"], Value::Null, "{f}");
        // The fork itself, reported at the grace deadline, carries the same stack.
        let fork = daemon.expect_kind(run.child(), "mt_fork_no_exec", TIMEOUT);
        assert_eq!(fork["fork_site"], "start_worker_process ← main", "{fork}");
        assert_eq!(fork["fork_stack"], f["fork_stack"], "{fork}");
    });
}

#[test]
fn python_os_fork_from_a_threaded_program_gets_a_python_hint() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        let fixture = spawn_holding(&mut harness::python("thread_fork.py", &[]));
        let child = fixture.run.child();
        let f = daemon.expect_kind(child, "mt_fork_no_exec", TIMEOUT);
        drop(fixture);
        assert_eq!(f["runtime"], "cpython", "{f}");
        let hint = f["hint"].as_str().unwrap_or_default();
        assert!(
            hint.contains("\"forkserver\" or \"spawn\""),
            "a Python hint: {f}"
        );
        // The native stack at the fork: under the C library's fork, the interpreter's own fork
        // entry (in its executable or libpython). Its name only where the interpreter has
        // symbols (pyenv's libpython has; Debian's stripped python3.11 has not): os_fork, or
        // os_fork_impl where the compiler did not inline it.
        let frames = f["fork_stack"].as_array().unwrap_or_else(|| panic!("{f}"));
        let entry = frames
            .iter()
            .find(|frame| {
                !frame["module"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("libc.so"))
            })
            .unwrap_or_else(|| panic!("no frame outside the C library: {f}"));
        let module = entry["module"].as_str().unwrap_or_default();
        assert!(
            module.starts_with("python") || module.starts_with("libpython"),
            "the interpreter called fork: {f}"
        );
        if let Some(function) = entry["function"].as_str() {
            assert!(function.starts_with("os_fork"), "CPython's fork: {f}");
        }
    });
}

#[test]
fn a_python_lock_records_no_owner_and_the_finding_says_why() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--deadlock-after", "500ms"]);
        let run = run_python("lock_fork.py", &[]);
        let child = run.child();
        let _kill = KillOnDrop::new(child);
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        // CPython's threading.Lock is a semaphore: nothing in it says who holds it, which the
        // stack shows. (This daemon also unwinds the other tests' deadlocked children, at most
        // two at a time: on a loaded machine the stack can be left out, and then the reason is
        // that, never a guessed owner.)
        assert_eq!(f["lock_owner"], serde_json::Value::Null, "{f}");
        let why = if f["stack"].as_array().is_some_and(|s| !s.is_empty()) {
            "not_a_pthread_mutex"
        } else {
            "no_stack"
        };
        assert_eq!(f["lock_owner_unknown_reason"], why, "{f}");
        assert_eq!(f["runtime"], "cpython", "{f}");
        assert!(
            f["hint"]
                .as_str()
                .unwrap_or_default()
                .contains("forkserver"),
            "{f}"
        );
    });
}

/// Findings of one kind from one executable are folded while the window lasts: the first is
/// printed, the others come as one `repeated` record when the window ends, without the daemon
/// stopping. An executable of its own, so that no other test's process opens its window.
#[test]
fn repeated_findings_are_folded_until_the_window_ends() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--repeat-window", "3s"]);
        let exe = compiled_copy("forker", "fold-forker");
        let exe_text = exe.to_str().unwrap();
        // Parents held until the end: a fork's site (part of what findings fold by) is read
        // through its parent's /proc, and a parent gone before would fold apart as "no site".
        let mut children = Vec::new();
        let mut parents = Vec::new();
        for _ in 0..3 {
            let run = spawn_holding(Command::new(&exe).args(["mt-fork-no-exec", "2", "10"]));
            children.push(run.run.child());
            parents.push(run);
        }
        let repeated =
            daemon.wait_for(TIMEOUT, |f| f["kind"] == "repeated" && f["exe"] == exe_text);
        assert_eq!(repeated["of_kind"], "mt_fork_no_exec", "{repeated}");
        assert_eq!(repeated["count"], 2, "{repeated}");
        // Printed is whichever finding went out first, not always the first child's: a finding
        // waits for its fork's stack, and on a busy host (every other test's forks queue on
        // this daemon's unwinder too) a later child's can go out first, its stack left out.
        // One printed, before the window opened; the other two folded.
        let printed: Vec<u32> = children
            .iter()
            .copied()
            .filter(|&child| !daemon.findings_for(child).is_empty())
            .collect();
        assert_eq!(printed.len(), 1, "printed: {printed:?} of {children:?}");
        let first = &daemon.findings_for(printed[0])[0];
        assert_eq!(first["kind"], "mt_fork_no_exec", "{first}");
        assert_eq!(first["exe"], exe_text, "{first}");
        let mut folded: Vec<u64> = repeated["sample_pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        folded.sort_unstable();
        let mut others: Vec<u64> = children
            .iter()
            .filter(|&&child| child != printed[0])
            .map(|&child| u64::from(child))
            .collect();
        others.sort_unstable();
        assert_eq!(folded, others, "{repeated}");
    });
}

/// Forks of one executable from two call sites are folded apart: the first of each site is
/// printed, and the next run's forks make one `repeated` record per site. An executable of its
/// own, as above.
#[test]
fn two_fork_sites_of_one_executable_are_folded_apart() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--repeat-window", "5s"]);
        let exe = compiled_copy("forker", "sites-forker");
        let exe_text = exe.to_str().unwrap();
        // Parents held until the findings are out: the daemon reads the stacks' modules
        // through the parent's /proc.
        let first = spawn_holding(Command::new(&exe).args(["two-sites", "2", "10"]));
        let a = daemon.expect_kind(first.run.get("a"), "mt_fork_no_exec", TIMEOUT);
        let b = daemon.expect_kind(first.run.get("b"), "mt_fork_no_exec", TIMEOUT);
        let site = |f: &Value| f["fork_site"].as_str().unwrap_or_default().to_owned();
        assert!(site(&a).starts_with("fork_from_site_a ← "), "{a}");
        assert!(site(&b).starts_with("fork_from_site_b ← "), "{b}");
        let second = spawn_holding(Command::new(&exe).args(["two-sites", "2", "10"]));
        let wait = TIMEOUT + Duration::from_secs(5);
        let repeated_at = |f: &Value, at: &str| {
            f["kind"] == "repeated" && f["exe"] == exe_text && f["fork_site"] == at
        };
        let (site_a, site_b) = (site(&a), site(&b));
        let again_a = daemon.wait_for(wait, |f| repeated_at(f, &site_a));
        let again_b = daemon.wait_for(wait, |f| repeated_at(f, &site_b));
        assert_eq!(again_a["count"], 1, "{again_a}");
        assert_eq!(
            again_a["sample_pids"],
            serde_json::json!([second.run.get("a")])
        );
        assert_eq!(again_b["count"], 1, "{again_b}");
        assert_eq!(
            again_b["sample_pids"],
            serde_json::json!([second.run.get("b")])
        );
        drop((first, second));
    });
}

/// A `fork_function` rule silences the forks from that function and nothing else of the same
/// executable: the same run's fork from another function is reported.
#[test]
fn a_fork_function_rule_silences_exactly_the_fork_from_that_function() {
    harness::root().run(|| {
        let exe = compiled_copy("forker", "rule-sites-forker");
        let config = write_config(
            "fork-function.toml",
            &format!(
                "[[ignore]]\nexe = {}\nfork_function = \"fork_from_site_a\"\n\
                 reason = \"the e2e test's own\"\n",
                toml_string(exe.to_str().unwrap())
            ),
        );
        let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
        let suppressed = "forkwatch_findings_suppressed_total{kind=\"mt_fork_no_exec\"}";
        let run = spawn_holding(Command::new(&exe).args(["two-sites", "2", "10"]));
        let b = daemon.expect_kind(run.run.get("b"), "mt_fork_no_exec", TIMEOUT);
        assert!(site_starts(&b, "fork_from_site_b"), "{b}");
        daemon.barrier();
        assert!(
            daemon.findings_for(run.run.get("a")).is_empty(),
            "{:?}",
            daemon.findings_for(run.run.get("a"))
        );
        assert_eq!(daemon.metric(suppressed), 1.0);
    });
}

fn site_starts(f: &Value, function: &str) -> bool {
    f["fork_site"]
        .as_str()
        .is_some_and(|site| site.starts_with(&format!("{function} ← ")))
}

/// A TOML string, quoted.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn an_ignore_rule_silences_exactly_what_it_names() {
    harness::root().run(|| {
        // Two executables of their own, which the rule names: their mt_fork_no_exec only.
        let forker = compiled_copy("forker", "ignored-forker");
        let locker = compiled_copy("locker", "ignored-locker");
        let pattern = forker.with_file_name("ignored-*");
        let config = write_config(
            "ignore.toml",
            &format!(
                "[[ignore]]\nkind = \"mt_fork_no_exec\"\nexe = {}\n\
                 reason = \"the e2e test's own\"\n",
                toml_string(pattern.to_str().unwrap())
            ),
        );
        let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);
        let suppressed = "forkwatch_findings_suppressed_total{kind=\"mt_fork_no_exec\"}";
        assert_eq!(daemon.metric(suppressed), 0.0);
        // Named: kind and executable.
        let silenced = run_fixture(Command::new(&forker).args(["mt-fork-no-exec", "2", "10"]));
        // Same executables, another kind: the locker's child starts a thread
        // (threads_after_mt_fork) and exits without exec (mt_fork_no_exec, silenced).
        let other_kind = run_fixture(Command::new(&locker).arg("unlock-thread"));
        let _kill = KillOnDrop::new(other_kind.child());
        // Same kind, another executable.
        let other_exe = harness::run_forker("mt-fork-no-exec", &["2", "10"]);
        daemon.expect_kind(other_exe.child(), "mt_fork_no_exec", TIMEOUT);
        daemon.expect_kind(other_kind.child(), "threads_after_mt_fork", TIMEOUT);
        daemon.barrier();
        assert!(
            daemon.findings_for(silenced.child()).is_empty(),
            "{:?}",
            daemon.findings_for(silenced.child())
        );
        assert!(
            daemon
                .findings_of(other_kind.child(), "mt_fork_no_exec")
                .is_empty()
        );
        // Counted, by kind: exactly the two it silenced.
        assert_eq!(daemon.metric(suppressed), 2.0);
        let other = "forkwatch_findings_suppressed_total{kind=\"threads_after_mt_fork\"}";
        assert_eq!(daemon.metric(other), 0.0);
    });
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_ignore_rule_exits_2_naming_the_file_line_and_key() {
    harness::unprivileged().run(|| {
        let config = write_config(
            "bad-ignore.toml",
            "exec_grace = \"1s\"\n\n[[ignore]]\nkind = \"mt_fork_no_exec\"\nexee = \"/bin/x\"\n\
             reason = \"typo\"\n",
        );
        let out = Command::new(BINARY)
            .args(["run", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let expected = format!(
            "--config {}, line 5: [[ignore]] `exee` unknown key",
            config.display()
        );
        assert!(stderr.contains(&expected), "{stderr}");
    });
}
