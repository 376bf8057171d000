//! End-to-end, as root: sockets shared across fork. Parent and child talking on one connection
//! is `shared_socket` naming the peer; the legitimate kinds of sharing stay quiet.

use std::time::{Duration, Instant};

use crate::harness::{self, Background, Daemon, EchoServer, compiled, run_sharer, spawn_sharer};

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

/// Why the file tests run alone: the daemon attaches its write probe while any child on the
/// host has gone without exec for the grace window, and detaches it once none has. A test that
/// waits for the probe to be attached (or detached) must know that its own child is why.
const WRITE_PROBE: &str = "the write probe follows every lingering child on the host";

/// Starts the file fixture `mode` (it forks, then waits for a go-ahead), waits until the daemon
/// has attached its write probe (because the fixture's child went without exec for the grace
/// window), then lets parent and child write: no write can come before the probe. (A fixed
/// delay did not promise that on a loaded machine.) The parent keeps the file open until the
/// fixture is finished, so that the daemon can name it however late it reports.
fn write_with_the_probe_attached(daemon: &Daemon, mode: &str, path: &str) -> Background {
    let mut fixture = spawn_sharer(mode, &[path]);
    daemon.wait_metric(
        "forkwatch_write_probe_attached",
        |v| v == 1.0,
        Duration::from_secs(20),
        "the write probe was not attached for a child without exec",
    );
    fixture.send("go");
    fixture
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
        daemon.wait_metric(
            "forkwatch_write_probe_attached",
            |v| v == 0.0,
            Duration::from_secs(20),
            "write probe still attached",
        );
    });
}

#[test]
fn appends_are_not_shared_file_offset() {
    harness::root().alone(WRITE_PROBE).run(|| {
        let daemon = Daemon::start(&[]);
        let fixture =
            write_with_the_probe_attached(&daemon, "file-append", &temp_file("append.log"));
        let run = fixture.finish();
        daemon.assert_quiet(
            "O_APPEND writes by parent and child",
            &[run.child(), run.parent()],
        );
    });
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
