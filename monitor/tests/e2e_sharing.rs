//! End-to-end, as root: sockets shared across fork. Parent and child talking on one connection
//! is `shared_socket` naming the peer; the legitimate kinds of sharing stay quiet.

mod harness;

use std::time::Duration;

use std::time::Instant;

use harness::{Daemon, EchoServer, privileged, run_sharer};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn tcp_connection_used_by_parent_and_child_is_shared_socket() {
    if !privileged() {
        return;
    }
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
}

#[test]
fn unix_stream_connection_shared_names_the_socket_path() {
    if !privileged() {
        return;
    }
    let server = EchoServer::start();
    let daemon = Daemon::start(&[]);
    let run = run_sharer("unix", &[server.path.to_str().unwrap()]);
    let f = daemon.expect_kind(run.child(), "shared_socket", TIMEOUT);
    assert_eq!(f["socket"]["family"], "unix");
    assert_eq!(f["socket"]["peer"], server.path.to_str().unwrap(), "{f}");
}

#[test]
fn handoff_prefork_socketpair_pipe_and_stdout_stay_quiet() {
    if !privileged() {
        return;
    }
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
}

/// How long after the fork the file fixtures start writing: the write probe is attached once a
/// child has gone without exec for the grace window (400 ms in tests), at the next family scan
/// (every 500 ms).
const WRITE_DELAY_MS: &str = "1500";

fn temp_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    path.to_str().unwrap().to_owned()
}

#[test]
fn writes_through_one_open_file_without_o_append_are_shared_file_offset() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(&[]);
    let path = temp_file("shared-offset.log");
    let run = run_sharer("file", &[&path, WRITE_DELAY_MS]);
    let f = daemon.expect_kind(run.child(), "shared_file_offset", TIMEOUT);
    assert_eq!(f["severity"], "warning");
    assert_eq!(f["parent_pid"], run.parent());
    assert_eq!(f["family_pid"], run.parent());
    assert_eq!(f["file"]["path"], path.as_str(), "{f}");
    assert!(f["file"]["fd"].as_u64().unwrap() >= 3);
    assert_eq!(f["first_use"]["syscall"], "write");
    assert_eq!(f["later_use"]["syscall"], "write");
    // The family is gone: the write probe (every syscall's slow path) comes off again. (Other
    // tests' children that linger past the grace window keep it on meanwhile: hence the margin.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.metric("forkwatch_write_probe_attached") != 0.0 {
        assert!(Instant::now() < deadline, "write probe still attached");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn appends_are_not_shared_file_offset() {
    if !privileged() {
        return;
    }
    let daemon = Daemon::start(&[]);
    let run = run_sharer("file-append", &[&temp_file("append.log"), WRITE_DELAY_MS]);
    daemon.assert_quiet(
        "O_APPEND writes by parent and child",
        &[run.child(), run.parent()],
    );
}
