//! End-to-end, as root: sockets shared across fork. Parent and child talking on one connection
//! is `shared_socket` naming the peer; the legitimate kinds of sharing stay quiet.

use std::{
    os::unix::process::CommandExt as _,
    time::{Duration, Instant},
};

use crate::{
    harness::{
        self, Background, Daemon, EchoServer, compiled, run_sharer, spawn_forker, spawn_sharer,
    },
    postgres::Postgres,
};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn tcp_connection_used_by_parent_and_child_is_shared_socket() {
    harness::root().run(|| {
        let server = EchoServer::start();
        let daemon = Daemon::start(&[]);
        let run = run_sharer("tcp", &[&server.port.to_string()]);
        let f = daemon.expect_kind(run.child(), "shared_socket", TIMEOUT);
        assert_eq!(f["severity"], "critical");
        assert_eq!(f["parent_pid"], run.parent(), "the other user: {f}");
        assert_eq!(f["family_pid"], run.parent());
        assert_eq!(f["comm"], "sharer");
        assert_eq!(f["socket"]["family"], "inet");
        assert_eq!(f["socket"]["type"], "stream");
        assert_eq!(f["socket"]["peer"], format!("127.0.0.1:{}", server.port));
        assert!(
            f["socket"]["local"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{f}"
        );
        assert!(f["socket"]["inode"].as_u64().unwrap() > 0);
        assert_eq!(f["first_use"]["pid"], run.parent());
        assert_eq!(f["first_use"]["syscall"], "sendto");
        assert_eq!(f["first_use"]["direction"], "send");
        assert_eq!(f["later_use"]["pid"], run.child());
        assert!(humantime::parse_rfc3339(f["later_use"]["time"].as_str().unwrap()).is_ok());
        daemon.barrier();
        let shared = daemon.findings_of(run.child(), "shared_socket");
        assert_eq!(shared.len(), 1, "once per socket and process: {shared:?}");
    });
}

#[test]
fn unix_stream_connection_shared_names_the_socket_path() {
    harness::root().run(|| {
        let server = EchoServer::start();
        let daemon = Daemon::start(&[]);
        let run = run_sharer("unix", &[server.path.to_str().unwrap()]);
        let f = daemon.expect_kind(run.child(), "shared_socket", TIMEOUT);
        assert_eq!(f["socket"]["family"], "unix");
        assert_eq!(f["socket"]["peer"], server.path.to_str().unwrap(), "{f}");
    });
}

/// An abstract name is shown as ss(8) shows it, and an unbound socket as "": the kernel
/// program zeroes the whole path arrays, so no older record's bytes (the ring buffer reuses
/// its memory) can read as a name.
#[test]
fn unix_abstract_name_is_shown_and_an_unbound_end_is_empty() {
    harness::root().run(|| {
        let server = EchoServer::start();
        let daemon = Daemon::start(&[]);
        let run = run_sharer("unix", &[&server.abstract_name]);
        let f = daemon.expect_kind(run.child(), "shared_socket", TIMEOUT);
        assert_eq!(f["socket"]["family"], "unix");
        assert_eq!(f["socket"]["peer"], server.abstract_name.as_str(), "{f}");
        assert_eq!(f["socket"]["local"], "", "the client end is unbound: {f}");
    });
}

#[test]
fn handoff_prefork_socketpair_pipe_and_stdout_stay_quiet() {
    harness::root().run(|| {
        let server = EchoServer::start();
        let daemon = Daemon::start(&[]);
        let runs = [
            run_sharer("handoff", &[&server.port.to_string()]),
            run_sharer("prefork", &[]),
            run_sharer("socketpair", &[]),
            run_sharer("pipe", &[]),
            run_sharer("stdout", &[]),
        ];
        daemon.barrier();
        for run in &runs {
            let family = run.parent();
            let found: Vec<_> = daemon
                .findings()
                .into_iter()
                .filter(|f| f["family_pid"] == family || f["pid"] == family)
                .collect();
            assert!(found.is_empty(), "family {family}: {found:?}");
        }
    });
}

/// Why the file tests run alone: the daemon attaches its write probe while any fork family on
/// the host holds a candidate (two live members, one description of a regular file open for
/// writing without O_APPEND), and detaches it once none does. A test that waits for the probe to
/// be attached (or detached) must know that its own processes are why.
const WRITE_PROBE: &str =
    "the write probe follows every fork family on the host that shares a file offset";

const PROBE_GAUGE: &str = "forkwatch_write_probe_attached";

/// Starts the file fixture `mode` (it forks, then waits for a go-ahead), waits until the daemon
/// has attached its write probe (parent and child hold one description of a file open for
/// writing, and the child has gone without exec for the grace window), then lets parent and
/// child write: no write can come before the probe. (A fixed delay did not promise that on a
/// loaded machine.) The parent keeps the file open until the fixture is finished, so that the
/// daemon can name it however late it reports.
fn write_with_the_probe_attached(daemon: &Daemon, mode: &str, path: &str) -> Background {
    let mut fixture = spawn_sharer(mode, &[path]);
    wait_for_the_probe(
        daemon,
        true,
        "the write probe was not attached for a shared offset",
    );
    fixture.send("go");
    fixture
}

fn wait_for_the_probe(daemon: &Daemon, attached: bool, what: &str) {
    let wanted = f64::from(u8::from(attached));
    daemon.wait_metric(PROBE_GAUGE, |v| v == wanted, Duration::from_secs(20), what);
}

fn temp_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    path.to_str().unwrap().to_owned()
}

#[test]
fn writes_through_one_open_file_without_o_append_are_shared_file_offset() {
    harness::root().alone(WRITE_PROBE).run(|| {
        let daemon = Daemon::start(&[]);
        let path = temp_file("shared-offset.log");
        let fixture = write_with_the_probe_attached(&daemon, "file", &path);
        let f = daemon.expect_kind(fixture.run.child(), "shared_file_offset", TIMEOUT);
        let run = fixture.finish();
        assert_eq!(f["severity"], "warning");
        assert_eq!(f["parent_pid"], run.parent());
        assert_eq!(f["family_pid"], run.parent());
        assert_eq!(f["file"]["path"], path.as_str(), "{f}");
        assert!(f["file"]["fd"].as_u64().unwrap() >= 3);
        assert_eq!(f["first_use"]["syscall"], "write");
        assert_eq!(f["later_use"]["syscall"], "write");
        // The family is gone: the write probe (every syscall's slow path) comes off again.
        wait_for_the_probe(&daemon, false, "write probe still attached");
    });
}

/// The candidate goes while the family stays: the child closes its copy of the shared fd and
/// lives on without exec. The probe comes off then, not when the family ends.
#[test]
fn the_write_probe_detaches_when_the_child_closes_the_shared_file() {
    harness::root().alone(WRITE_PROBE).run(|| {
        let daemon = Daemon::start(&[]);
        let mut fixture =
            write_with_the_probe_attached(&daemon, "file-then-close", &temp_file("closed.log"));
        let child = fixture.run.child();
        daemon.expect_kind(child, "shared_file_offset", TIMEOUT);
        fixture.read_line();
        assert_eq!(fixture.run.get("closed"), 1);
        wait_for_the_probe(
            &daemon,
            false,
            "the write probe stayed attached after the child closed the shared fd",
        );
        // Certain, not lucky: the child leaves only at the next line, which is not sent yet.
        let state = std::fs::read_to_string(format!("/proc/{child}/stat"));
        assert!(
            state.is_ok_and(|s| !s.contains(") Z")),
            "the child {child} must still live, un-exec'd, when the probe comes off"
        );
        fixture.send("leave");
        fixture.finish();
    });
}

#[test]
fn appends_are_not_shared_file_offset() {
    harness::root().alone(WRITE_PROBE).run(|| {
        let daemon = Daemon::start(&[]);
        // An O_APPEND family alone never attaches the probe (see the test below): a family that
        // shares a real offset keeps it attached here, so that the appends reach the probe,
        // which must let them through. That family writes only after the appends.
        let mut append = spawn_sharer("file-append", &[&temp_file("append.log")]);
        let mut reason = spawn_sharer("file", &[&temp_file("reason.log")]);
        wait_for_the_probe(&daemon, true, "no probe for the family sharing an offset");
        append.send("go");
        let run = append.finish();
        assert_eq!(
            daemon.metric(PROBE_GAUGE),
            1.0,
            "the probe must have stayed attached through the appends: its reason still holds"
        );
        daemon.assert_quiet(
            "O_APPEND writes by parent and child",
            &[run.child(), run.parent()],
        );
        // And the probe did see writes meanwhile: the reason family's are reported.
        reason.send("go");
        daemon.expect_kind(reason.run.child(), "shared_file_offset", TIMEOUT);
        reason.finish();
    });
}

/// What a server host runs all day must not put every syscall on the slow path: PostgreSQL
/// with open sessions (backends forked without exec), a shell's subshells, a lingering worker
/// of a multithreaded master and a parent and child sharing an O_APPEND log. None holds a
/// candidate, so the write probe stays detached: sampled throughout, and until the daemon has
/// decided twice after every one of these children was past the grace window.
#[test]
fn the_write_probe_stays_detached_for_postgres_subshells_workers_and_append_logs() {
    harness::root().alone(WRITE_PROBE).run(|| {
        let daemon = Daemon::start(&[]);
        let sampler = ProbeSampler::start(&daemon);
        let server = Postgres::start("forkwatch-pg-probe");
        let sessions = [server.session(), server.session()];
        // And odd fds a family may share, none a shared offset: a FIFO open read-write (an open
        // of it by the daemon could block; it must never open one) and a file open read-only.
        let (fifo, read_only) = (temp_file("probe.fifo"), temp_file("read-only"));
        make_fifo(&fifo);
        std::fs::write(&read_only, "x").unwrap();
        let shells = [
            spawn_shell("sh", "(sleep 600; :); :", &[]),
            spawn_shell("bash", "(sleep 600; :) & wait", &[]),
            spawn_shell(
                "sh",
                "exec 3<>\"$0\" 4<\"$1\"; (sleep 600; :); :",
                &[&fifo, &read_only],
            ),
        ];
        let worker = spawn_forker("mt-fork-no-exec", &["2", "600000"]);
        let log = spawn_sharer("file-append", &[&temp_file("server.log")]);
        let mut roots = vec![
            server.postmaster_pid(),
            worker.run.parent(),
            log.run.parent(),
        ];
        roots.extend(shells.iter().map(|s| s.id()));
        // Every child above was forked before this point (each fixture printed its pids after
        // its fork, each session ran a query on its backend, each shell's subshell...):
        let shell_children: Vec<u32> = shells.iter().map(|s| wait_for_a_child(s.id())).collect();
        // ... so a grace window from now, all are past it.
        std::thread::sleep(Duration::from_millis(daemon.grace_ms()));
        let checks = "forkwatch_write_probe_checks_total";
        let before = daemon.metric(checks);
        daemon.wait_metric(
            checks,
            |v| v >= before + 2.0,
            Duration::from_secs(20),
            "the daemon did not decide on the write probe twice",
        );
        let samples = sampler.stop();
        let ours = attaches_for(&daemon.log(), &roots);
        assert!(
            ours.is_empty(),
            "the write probe was attached for one of these families ({roots:?}): {ours:?}"
        );
        if samples.attached > 0 {
            // Only another family on the host, named in the log, may have attached it.
            assert!(
                daemon.log().contains("write probe attached: pid"),
                "{samples:?} without a foreign candidate in the log:\n{}",
                daemon.log()
            );
        }
        assert!(samples.total >= 10, "too few samples: {samples:?}");
        eprintln!(
            "write probe samples: {samples:?}; backends {:?}, subshells {shell_children:?}",
            sessions.iter().map(|s| s.backend).collect::<Vec<_>>()
        );
        drop(log);
    });
}

/// `SHELL -c SCRIPT ARGS...` in the background, killed (with its process group) on drop.
fn spawn_shell(shell: &str, script: &str, args: &[&str]) -> ShellGroup {
    let mut command = std::process::Command::new(shell);
    command.args(["-c", script]).args(args).process_group(0);
    let child = command
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("run {shell}: {e}"));
    ShellGroup {
        _watched: harness::watch(&child),
        child,
    }
}

struct ShellGroup {
    child: std::process::Child,
    _watched: Option<harness::Watched>,
}

impl ShellGroup {
    fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ShellGroup {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is the shell's own.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn make_fifo(path: &str) {
    let _ = std::fs::remove_file(path);
    let c_path = std::ffi::CString::new(path).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {path}: {}", std::io::Error::last_os_error());
}

/// Waits until `pid` has a child (a shell's subshell, forked without exec), and returns it.
fn wait_for_a_child(pid: u32) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "{pid} forked no child");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon's "write probe attached" log lines that name one of the fork families `roots`, or
/// do not name a family at all.
fn attaches_for(log: &str, roots: &[u32]) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("write probe attached"))
        .filter(|line| {
            let family = line
                .split("fork family ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u32>().ok());
            family.is_none_or(|f| roots.contains(&f))
        })
        .map(str::to_owned)
        .collect()
}

/// Samples the write probe's gauge every 20 ms on a thread of its own, until stopped.
struct ProbeSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    total: u32,
    attached: u32,
}

impl ProbeSampler {
    fn start(daemon: &Daemon) -> ProbeSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = daemon.metrics_addr;
        let thread = {
            let stop = stop.clone();
            harness::thread(move || {
                let mut samples = Samples::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (_, body) = harness::http_get(addr, "/metrics");
                    let value = body
                        .lines()
                        .find_map(|l| l.strip_prefix(PROBE_GAUGE)?.trim().parse::<f64>().ok());
                    samples.total += 1;
                    samples.attached += u32::from(value != Some(0.0));
                    std::thread::sleep(Duration::from_millis(20));
                }
                samples
            })
        };
        ProbeSampler { stop, thread }
    }

    fn stop(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the sampler panicked")
    }
}

/// Shared-socket findings about either process of a pair.
fn shared_between(daemon: &Daemon, a: u32, b: u32) -> Vec<serde_json::Value> {
    daemon
        .findings()
        .into_iter()
        .filter(|f| f["kind"] == "shared_socket" && (f["pid"] == a || f["pid"] == b))
        .collect()
}

#[test]
fn a_connection_already_shared_when_the_daemon_starts_is_reported_at_its_next_uses() {
    harness::root().run(|| {
        let server = EchoServer::start();
        // Parent and child (never exec'd) are talking on one connection before the daemon starts:
        // the fork that made them a family was never seen.
        let live = spawn_sharer("live", &[&server.port.to_string()]);
        let (parent, child) = (live.run.parent(), live.run.child());
        std::thread::sleep(Duration::from_millis(300));
        let daemon = Daemon::start(&[]);
        assert!(daemon.log().contains("fork families"), "{}", daemon.log());
        let deadline = Instant::now() + TIMEOUT;
        let f = loop {
            if let Some(f) = shared_between(&daemon, parent, child).into_iter().next() {
                break f;
            }
            assert!(
                Instant::now() < deadline,
                "no shared_socket for {parent}/{child}; log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Whichever of the two used it second since the start is the finding's subject.
        let other = if f["pid"] == parent { child } else { parent };
        assert_eq!(f["parent_pid"], other, "{f}");
        assert_eq!(f["family_pid"], parent, "{f}");
        assert_eq!(f["socket"]["peer"], format!("127.0.0.1:{}", server.port));
        // They keep talking: still one finding.
        std::thread::sleep(Duration::from_millis(500));
        let all = shared_between(&daemon, parent, child);
        assert_eq!(all.len(), 1, "once per socket and process: {all:?}");
    });
}

#[test]
fn a_shared_listener_and_an_execd_child_live_at_start_stay_quiet() {
    harness::root().run(|| {
        let server = EchoServer::start();
        // A prefork server (workers share only the listener) and a child that exec'd a program that
        // uses the inherited connection on purpose (inetd style), both live before the daemon.
        let prefork = spawn_sharer("live-prefork", &[]);
        let execd = spawn_sharer("live-exec", &[&server.port.to_string()]);
        wait_until_execd(&execd);
        let daemon = Daemon::start(&[]);
        // The workers' next connections, each served by one worker.
        let port = prefork.run.get("port");
        for _ in 0..6 {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
            use std::io::{Read as _, Write as _};
            conn.write_all(b"hello\n").unwrap();
            let mut reply = [0u8; 16];
            assert!(conn.read(&mut reply).unwrap() > 0);
        }
        // The exec'd child and its parent go on writing meanwhile.
        std::thread::sleep(Duration::from_millis(1000));
        let mut pids = vec![prefork.run.parent(), prefork.run.child()];
        pids.extend([execd.run.parent(), execd.run.child()]);
        daemon.assert_quiet("sharing that is not a hazard, live at start", &pids);
        let found: Vec<_> = daemon
            .findings()
            .into_iter()
            .filter(|f| {
                pids.iter()
                    .any(|&p| f["family_pid"] == p || f["parent_pid"] == p)
            })
            .collect();
        assert!(found.is_empty(), "{found:?}");
    });
}

/// Waits until the child of a fixture runs another program than the fixture: a child that
/// exec'd "before the daemon started" must have, however slow the machine.
fn wait_until_execd(fixture: &Background) {
    let (child, fixture_exe) = (fixture.run.child(), compiled("sharer"));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let exe = std::fs::read_link(format!("/proc/{child}/exe"));
        if exe.as_ref().is_ok_and(|exe| *exe != fixture_exe) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "child {child} did not exec within {TIMEOUT:?}: {exe:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
