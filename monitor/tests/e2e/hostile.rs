//! End-to-end, as root: hostile local users. Whatever the daemon reads about a traced process
//! (the files behind its mappings, their ELF headers, its /proc) is the process owner's to
//! choose, so none of it may stall the daemon, blow up its memory or invent a finding; and a
//! daemon that cannot trust the pids it gets must not start at all.

use std::{
    fs,
    io::Write as _,
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{
    self, BINARY, CAPS, Daemon, KillOnDrop, as_nobody_with, compiled, python, spawn, spawn_forker,
    spawn_holding, spawn_locker,
};

/// Why the tests that set a trap run alone: every daemon on the host that sees their child (its
/// fork, or /proc at its start) unwinds its stack, so a daemon that falls for the trap would fail
/// the tests running beside them too (as on the code before the hardening), hiding which it was.
const TRAP: &str = "a trap for every daemon on the host";

const DEADLOCK_AFTER: &str = "500ms";
const TIMEOUT: Duration = Duration::from_secs(10);

/// How large the hostile ELF claims its `.eh_frame` is (the file is sparse).
const CLAIMED_EH_FRAME: u64 = 512 << 20;
/// The most the daemon's peak RSS may be after unwinding through that file: a fraction of the
/// claim, and several times what it takes otherwise.
const MAX_HWM: u64 = 150 << 20;

#[test]
fn a_fifo_named_like_the_deleted_executable_does_not_stall_the_daemon() {
    harness::root().alone(TRAP).run(|| {
        deleted_executable_replaced_by("fifo", |deleted, _| mkfifo(deleted));
    });
}

#[test]
fn an_absolute_symlink_named_like_the_deleted_executable_does_not_stall_the_daemon() {
    harness::root().alone(TRAP).run(|| {
        deleted_executable_replaced_by("symlink", |deleted, dir| {
            let fifo = dir.join("fifo");
            mkfifo(&fifo);
            symlink(&fifo, deleted).expect("symlink to the FIFO");
        });
    });
}

/// A deadlocked child of a copy of the locker fixture whose file was unlinked while it runs:
/// its maps then name "<path> (deleted)", and `plant` puts something hostile at that path before
/// the fork, so before anything is read for the child's stack.
///
/// Two daemons watch it: one as root, which reads the mapped file through map_files/, and one
/// as nobody with the documented capabilities, which may not (map_files/ needs CAP_SYS_ADMIN)
/// and resolves the path instead. Both must report the deadlock (its stack may end where the
/// locker's own frames begin) and go on working.
fn deleted_executable_replaced_by(tag: &str, plant: impl FnOnce(&Path, &Path)) {
    let dir = Scratch::new(tag);
    let exe = dir.path.join("locker");
    copy(&compiled("locker"), &exe);
    let daemons = [
        Daemon::start(&["--deadlock-after", DEADLOCK_AFTER]),
        nobody_daemon(),
    ];
    let mut fixture = spawn(
        Command::new(&exe)
            .args(["deadlock", "600000"])
            .env("FORK_ON_STDIN", "1"),
    );
    // It runs from the file now, so unlinking it leaves the mappings and renames them.
    fs::remove_file(&exe).expect("unlink the running copy");
    let maps = fs::read_to_string(format!("/proc/{}/maps", fixture.run.parent())).unwrap();
    let deleted = PathBuf::from(format!("{} (deleted)", exe.display()));
    assert!(maps.contains(deleted.to_str().unwrap()), "{maps}");
    plant(&deleted, &dir.path);
    // Only now does it fork: the child and its stack come after the trap, by construction.
    fixture.send("fork");
    fixture.read_line();
    let child = fixture.run.child();
    for daemon in &daemons {
        let f = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(f["severity"], "critical", "{f}");
        // libc's frames come from libc's file, which nobody tampered with.
        assert!(stack_summary(&f).contains("pthread_mutex_lock"), "{f}");
    }
    go_on_working(daemons);
}

#[test]
fn an_eh_frame_that_claims_hundreds_of_mib_is_not_read() {
    harness::root().alone(TRAP).run(|| {
        let dir = Scratch::new("eh-frame");
        let exe = dir.path.join("locker");
        copy(&compiled("locker"), &exe);
        claim_huge_eh_frame(&exe, CLAIMED_EH_FRAME);
        let daemon = Daemon::start(&["--deadlock-after", DEADLOCK_AFTER]);
        let fixture = spawn(Command::new(&exe).args(["deadlock", "600000"]));
        let f = daemon.expect_kind(fixture.run.child(), "inherited_lock_deadlock", TIMEOUT);
        assert!(stack_summary(&f).contains("pthread_mutex_lock"), "{f}");
        // The stack is out, so every module was loaded for it: the peak is behind us.
        let hwm = vm_hwm(daemon.pid());
        assert!(
            hwm < MAX_HWM,
            "the daemon's peak RSS is {} MiB after unwinding through a module claiming a {} MiB \
             .eh_frame",
            hwm >> 20,
            CLAIMED_EH_FRAME >> 20
        );
        go_on_working([daemon]);
    });
}

/// A process's /proc maps is its own to make long: 50,000 mappings of a file whose path is some
/// 3.7 KiB long make 190 MB of it, which the daemon read whole (and copied) to unwind the
/// child's blocked thread before 2026-12-04: its peak RSS went from 24 to 389 MiB. Now it reads
/// the first UNWIND_MAPS_READ_BYTES (4 MiB), and the deadlock is reported all the same.
#[test]
fn a_child_with_190_mb_of_maps_does_not_blow_up_the_daemon() {
    harness::root().alone(TRAP).run(|| {
        let dir = Scratch::new("maps");
        let file = file_with_a_long_path(&dir.path);
        let daemon = Daemon::start(&["--deadlock-after", DEADLOCK_AFTER]);
        let locker = spawn(
            Command::new(compiled("locker"))
                .args(["deadlock", "600000"])
                .env("HOSTILE_MAPS", &file),
        );
        daemon.expect_kind(locker.run.child(), "inherited_lock_deadlock", TIMEOUT);
        // The finding goes out when the stack is read or its 3 s budget is spent: a later
        // fork's finding, a grace window on, comes after a read that outlived the budget.
        let later = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
        let within = TIMEOUT + Duration::from_millis(daemon.grace_ms());
        daemon.expect_kind(later.run.child(), "mt_fork_no_exec", within);
        let hwm = vm_hwm(daemon.pid());
        assert!(
            hwm < MAX_HWM,
            "the daemon's peak RSS is {} MiB after unwinding a child with 190 MB of maps",
            hwm >> 20
        );
        go_on_working([daemon]);
    });
}

/// A one-page file under `dir` whose path is some 3.7 KiB long (under PATH_MAX, 4096).
fn file_with_a_long_path(dir: &Path) -> PathBuf {
    let mut path = dir.to_path_buf();
    let mut level = 0;
    while path.as_os_str().len() < 3_500 {
        path.push(format!("{level:02}{}", "x".repeat(200)));
        level += 1;
    }
    fs::create_dir_all(&path).expect("create the long path");
    path.push("page");
    fs::write(&path, [0u8; 4096]).expect("write the page");
    path
}

/// A process names itself with any bytes it likes. One whose name is not UTF-8 made its
/// /proc `stat` unreadable to the daemon before 2026-12-04, which then took the child for gone
/// and withdrew every finding about it: a multithreaded fork's child that deadlocks, renamed so,
/// went unreported. (The same child found while the scheduler probes are detached:
/// scheduler_probes.rs.)
#[test]
fn a_child_named_with_bytes_that_are_not_utf8_is_reported() {
    harness::root().run(|| {
        let daemon = Daemon::start(&["--deadlock-after", DEADLOCK_AFTER]);
        let locker = spawn(
            Command::new(compiled("locker"))
                .args(["deadlock", "600000"])
                .env("HOSTILE_NAME", "1"),
        );
        let child = locker.run.child();
        let forked = daemon.expect_kind(child, "mt_fork_no_exec", TIMEOUT);
        let deadlock = daemon.expect_kind(child, "inherited_lock_deadlock", TIMEOUT);
        assert_eq!(
            deadlock["futex_addr"],
            locker.run.text("lock"),
            "{deadlock}"
        );
        // Shown as the kernel has it, each byte that is not UTF-8 replaced.
        for finding in [&forked, &deadlock] {
            assert_eq!(finding["comm"], "\u{fffd}\u{fffd}-worker", "{finding}");
        }
    });
}

#[test]
fn a_python_child_that_reran_python_is_not_a_deadlock_after_a_restart() {
    harness::root().run(|| {
        // The positive control, deadlocked before the daemon starts like the Python child is
        // blocked: both are found by the one scan of /proc at start, with the same "blocked
        // since", so the scan that reports the control has decided the Python child too.
        let control = spawn_locker("deadlock", &["600000"]);
        let reran = spawn_holding(&mut python("reexec_join.py", &[]));
        let child = reran.run.child();
        wait_until(
            &format!("locker child {} blocks", control.run.child()),
            || in_futex(control.run.child()),
        );
        wait_until(&format!("python child {child} blocks in its join"), || {
            fs::read_to_string(format!("/proc/{child}/comm")).is_ok_and(|c| c == "joining\n")
                && in_futex(child)
        });
        let daemon = Daemon::start(&["--deadlock-after", DEADLOCK_AFTER]);
        daemon.expect_kind(control.run.child(), "inherited_lock_deadlock", TIMEOUT);
        // Findings of the same scan come out in turn: the barrier's comes after all of them.
        daemon.barrier();
        for pid in [child, reran.run.parent()] {
            let found = daemon.findings_for(pid);
            assert!(
                found.is_empty(),
                "pid {pid} (a Python that ran Python: fork, then exec) is no inherited-lock \
                 case: {found:?}"
            );
        }
    });
}

#[test]
fn refuses_to_run_outside_the_host_pid_namespace() {
    harness::root().run(|| {
        let (code, _, stderr) = in_own_pid_namespace(&["run", "--metrics-addr", "127.0.0.1:0"]);
        assert!(
            code.is_some_and(|c| c != 0 && c != 101),
            "run must fail, without a panic: {code:?}\n{stderr}"
        );
        for needed in ["PID namespace", "hostPID", "--pid=host"] {
            assert!(stderr.contains(needed), "no {needed:?} in: {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");

        let (code, stdout, stderr) = in_own_pid_namespace(&["check"]);
        assert!(
            code.is_some_and(|c| c != 0 && c != 101),
            "check must fail: {code:?}\n{stdout}{stderr}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("[FAIL] PID namespace"))
            .unwrap_or_else(|| panic!("check lists no failed PID namespace: {stdout}"));
        assert!(
            stdout.contains("hostPID"),
            "no fix after {line:?}: {stdout}"
        );
    });
}

/// `forkwatch ARGS` as PID 1 of a PID namespace of its own, with a /proc of that namespace;
/// its exit code, stdout and stderr. It must exit by itself within TIMEOUT.
fn in_own_pid_namespace(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new("unshare")
        // --kill-child: forkwatch dies with unshare, which the KillOnDrop kills.
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    let _kill = KillOnDrop::new(child.id());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for unshare") {
            break status;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "forkwatch {args:?} still runs {TIMEOUT:?} after it started outside the host's PID \
             namespace; it must refuse to start"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Exited, and so has forkwatch (unshare waits for it): the pipes hold all it wrote.
    let output = child.wait_with_output().expect("output");
    (
        status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A daemon as nobody with only the documented capabilities, as `cli` runs one.
fn nobody_daemon() -> Daemon {
    let setpriv: Vec<String> = std::iter::once("setpriv".to_owned())
        .chain(as_nobody_with(CAPS))
        .collect();
    let setpriv: Vec<&str> = setpriv.iter().map(String::as_str).collect();
    Daemon::start_under(&setpriv, &["--deadlock-after", DEADLOCK_AFTER])
}

/// After a hostile process: each daemon still answers /healthz, still reports a hazard that
/// comes later, and still stops at once on SIGTERM.
fn go_on_working<const N: usize>(daemons: [Daemon; N]) {
    for daemon in &daemons {
        let (status, body) = daemon.get("/healthz");
        assert_eq!(status, 200, "{body}\nlog:\n{}", daemon.log());
    }
    let later = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
    for daemon in &daemons {
        let within = TIMEOUT + Duration::from_millis(daemon.grace_ms());
        daemon.expect_kind(later.run.child(), "mt_fork_no_exec", within);
    }
    for daemon in daemons {
        let (code, took) = daemon.terminate();
        assert_eq!(code, Some(0));
        assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    }
}

fn stack_summary(finding: &Value) -> &str {
    finding["stack_summary"].as_str().unwrap_or_default()
}

/// Whether the main thread of `pid` sleeps in futex(2), as /proc/PID/syscall shows.
fn in_futex(pid: u32) -> bool {
    let syscall = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    syscall.split_whitespace().next() == Some(libc::SYS_futex.to_string().as_str())
}

/// Polls `done` until it holds; fails the test naming `what` after TIMEOUT.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The peak RSS of `pid` (VmHWM in /proc/PID/status), in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon's status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .map(|kib: u64| kib << 10)
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path, alive for the call.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

// The executables a test runs are written by child processes (cp, truncate, dd), never through
// a descriptor of the test process: another test's fork could inherit that descriptor, and
// while any process holds one open for writing, exec fails with ETXTBSY.

fn copy(from: &Path, to: &Path) {
    run(Command::new("cp").arg(from).arg(to));
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?}: {status}");
}

/// Makes the ELF64 executable `exe` claim that its `.eh_frame` runs from where it starts to the
/// end of the file, which is made `claimed` bytes long, sparsely. The program still runs: the
/// loader reads program headers, never section headers.
fn claim_huge_eh_frame(exe: &Path, claimed: u64) {
    let elf = fs::read(exe).expect("read the copy");
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a little-endian ELF64"
    );
    let at = |offset: usize, len: usize| -> u64 {
        let mut word = [0u8; 8];
        word[..len].copy_from_slice(&elf[offset..offset + len]);
        u64::from_le_bytes(word)
    };
    // e_shoff, e_shentsize, e_shnum, e_shstrndx; in a section header sh_name (at 0), sh_offset
    // (at 24) and sh_size (at 32).
    let (shoff, shentsize) = (at(0x28, 8) as usize, at(0x3a, 2) as usize);
    let (shnum, shstrndx) = (at(0x3c, 2) as usize, at(0x3e, 2) as usize);
    let header = |index: usize| shoff + index * shentsize;
    let names = at(header(shstrndx) + 24, 8) as usize;
    let eh_frame = (0..shnum)
        .map(header)
        .find(|&h| elf[names + at(h, 4) as usize..].starts_with(b".eh_frame\0"))
        .expect("the locker has an .eh_frame section");
    let size = claimed - at(eh_frame + 24, 8);
    run(Command::new("truncate")
        .arg(format!("--size={claimed}"))
        .arg(exe));
    let mut dd = Command::new("dd")
        .arg(format!("of={}", exe.display()))
        .args(["bs=1", "conv=notrunc", "status=none"])
        .arg(format!("seek={}", eh_frame + 32))
        .stdin(Stdio::piped())
        .spawn()
        .expect("dd");
    dd.stdin
        .take()
        .unwrap()
        .write_all(&size.to_le_bytes())
        .expect("write to dd");
    let status = dd.wait().expect("wait for dd");
    assert!(status.success(), "dd: {status}");
}

/// A directory of the test's own under cargo's temporary directory, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hostile-{tag}-{}", std::process::id()));
        // Left over from a run that was killed, with the same pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create the scratch directory");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
