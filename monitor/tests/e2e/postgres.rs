//! End-to-end, as root, against a real PostgreSQL server from Debian's packages: a Python program
//! (psycopg from PyPI, in the venv `cargo xtask setup` makes) opens one connection, forks without
//! exec, and both processes run queries on it. The daemon reports one `shared_socket` naming the
//! server's Unix socket, and the fixture shows that the sharing really corrupts the protocol.

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{self, Daemon};

const TIMEOUT: Duration = Duration::from_secs(10);
const VENV_PYTHON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/test-venv/bin/python"
);
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pg_fork.py");
/// The longest path a Unix socket address holds (sun_path, less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

#[test]
fn psycopg_connection_used_by_parent_and_child_is_shared_socket_and_corrupts() {
    harness::root().run(|| {
        let started = Instant::now();
        let server = Postgres::start();
        let server_ready = started.elapsed();
        let daemon = Daemon::start(&[]);
        let run = run_fixture(&[
            server.socket_dir.to_str().unwrap(),
            &server.port.to_string(),
        ]);
        let (parent, child) = (run.get("parent"), run.get("child"));

        let f = daemon.expect_kind(child, "shared_socket", TIMEOUT);
        assert_eq!(f["parent_pid"], parent, "the other user: {f}");
        assert_eq!(f["family_pid"], parent, "{f}");
        assert_eq!(f["socket"]["family"], "unix", "{f}");
        assert_eq!(f["socket"]["type"], "stream", "{f}");
        let peer = Path::new(f["socket"]["peer"].as_str().expect("peer is a path"));
        assert_eq!(peer.parent(), Some(server.socket_dir.as_path()), "{f}");
        assert_eq!(
            peer.file_name().and_then(|n| n.to_str()),
            Some(format!(".s.PGSQL.{}", server.port).as_str()),
            "{f}"
        );
        assert_eq!(f["first_use"]["pid"], parent, "{f}");
        assert_eq!(f["later_use"]["pid"], child, "{f}");

        // Everything the family did has been decided: one finding for the one shared connection.
        daemon.barrier();
        let shared: Vec<_> = daemon
            .findings()
            .into_iter()
            .filter(|f| f["kind"] == "shared_socket")
            .filter(|f| f["pid"] == parent || f["pid"] == child || f["family_pid"] == parent)
            .collect();
        assert_eq!(
            shared.len(),
            1,
            "one shared_socket for the family: {shared:?}"
        );

        // And the hazard is real: results went to the wrong process, or the protocol broke.
        let corrupted = run.get("corrupted");
        assert!(
            corrupted > 0,
            "parent and child shared one PostgreSQL connection without visible harm: {:?}",
            run.values
        );
        eprintln!(
            "postgres ready after {server_ready:?}; fixture: {:?}; total {:?}",
            run.values,
            started.elapsed()
        );
    });
}

/// A PostgreSQL server of its own, run as the `postgres` OS user (initdb refuses root) on a
/// private Unix socket directory and a free loopback port; stopped and removed on drop.
struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = work_dir(&bin);
        let data = dir.join("data");
        let socket_dir = dir.join("s");
        let port = free_port();
        // From here on, drop stops whatever got started, even if a step below panics.
        let server = Postgres {
            bin,
            dir,
            socket_dir,
            port,
        };
        as_postgres(
            Command::new("mkdir")
                .args(["-m", "700"])
                .arg(&server.socket_dir),
        );
        as_postgres(
            Command::new(server.bin.join("initdb"))
                .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
                .arg(&data),
        );
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(
            conf,
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off",
            server.socket_dir.display()
        )
        .unwrap();
        drop(conf);
        let log = server.dir.join("log");
        let started = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(server.bin.join("pg_ctl"))
            .args(["start", "--wait", "--timeout=30", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .output()
            .expect("run pg_ctl");
        assert!(
            started.status.success(),
            "pg_ctl start failed: {}{}\nlog:\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            fs::read_to_string(&log).unwrap_or_default()
        );
        server.wait_ready();
        server
    }

    /// pg_ctl --wait already waited for the server to accept connections; pg_isready proves it
    /// on the very socket the fixture uses.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .expect("run pg_isready");
            if status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL does not accept connections; log:\n{}",
                fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop_server(&self.bin, &self.dir.join("data"));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Stops a server on `data` if one runs there (immediate: nothing in it is worth keeping).
fn stop_server(bin: &Path, data: &Path) {
    if data.join("postmaster.pid").exists() {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args(["stop", "--wait", "--timeout=30", "-m", "immediate", "-D"])
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The newest PostgreSQL installed the Debian way (/usr/lib/postgresql/VERSION/bin).
fn postgres_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let entries = fs::read_dir(root).unwrap_or_else(|e| {
        panic!(
            "no {} ({e}): `cargo xtask setup` installs postgresql",
            root.display()
        )
    });
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("no PostgreSQL server under {}", root.display()))
}

/// A fresh directory owned by `postgres` for the data and the socket: under cargo's temporary
/// directory, unless `postgres` cannot reach it there (a checkout under a private home) or the
/// socket's path would be too long, and then under the system's.
fn work_dir(bin: &Path) -> PathBuf {
    let candidates = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ];
    for base in &candidates {
        let dir = base.join("forkwatch-pg");
        // A server left behind by a test that was killed would hold the directory.
        stop_server(bin, &dir.join("data"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let owned = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        let reachable = owned
            && Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
        let socket_len = dir.join("s/.s.PGSQL.65535").as_os_str().len();
        if reachable && socket_len <= SUN_PATH_MAX {
            return dir;
        }
        let _ = fs::remove_dir_all(&dir);
    }
    panic!("the postgres user can use none of {candidates:?}");
}

fn as_postgres(cmd: &mut Command) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .output()
        .expect("run runuser");
    assert!(
        out.status.success(),
        "{cmd:?} as postgres failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Runs pg_fork.py with the venv's Python (see `harness::run_fixture`).
fn run_fixture(args: &[&str]) -> harness::FixtureRun {
    assert!(
        Path::new(VENV_PYTHON).exists(),
        "no {VENV_PYTHON}: run `cargo xtask setup`"
    );
    harness::run_fixture(Command::new(VENV_PYTHON).arg(FIXTURE).args(args))
}
