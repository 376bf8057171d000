//! End-to-end, as root, against a real PostgreSQL server from Debian's packages: a Python program
//! (psycopg from PyPI, in the venv `cargo xtask setup` makes) opens one connection, forks without
//! exec, and both processes run queries on it. The daemon reports one `shared_socket` naming the
//! server's Unix socket, and the fixture shows that the sharing really corrupts the protocol.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
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
        let server = Postgres::start("forkwatch-pg");
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
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// Starts a server in a directory `name` of its own (one per test that may run beside
    /// another).
    pub fn start(name: &str) -> Postgres {
        let bin = postgres_bin();
        let dir = work_dir(&bin, name);
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

impl Postgres {
    /// The postmaster's pid (the first line of postmaster.pid): the root of the server's fork
    /// family, since its backends and helpers are forked without exec.
    pub fn postmaster_pid(&self) -> u32 {
        let text =
            fs::read_to_string(self.dir.join("data/postmaster.pid")).expect("read postmaster.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in postmaster.pid: {text:?}"))
    }

    /// An interactive `psql` session, open until dropped: its backend (a child the postmaster
    /// forked without exec) exists once this returns, and stays.
    pub fn session(&self) -> Session {
        let mut psql = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "-q",
                "-A",
                "-t",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run psql");
        let watched = harness::watch(&psql);
        let mut stdin = psql.stdin.take().expect("stdin");
        writeln!(stdin, "select pg_backend_pid();").expect("write to psql");
        stdin.flush().expect("flush psql");
        let mut line = String::new();
        BufReader::new(psql.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read psql");
        let backend = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("psql printed no backend pid: {line:?}"));
        Session {
            psql,
            _stdin: stdin,
            backend,
            _watched: watched,
        }
    }
}

/// An open `psql` session ([`Postgres::session`]).
pub struct Session {
    psql: std::process::Child,
    _stdin: std::process::ChildStdin,
    pub backend: u32,
    _watched: Option<harness::Watched>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.psql.kill();
        let _ = self.psql.wait();
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
fn work_dir(bin: &Path, name: &str) -> PathBuf {
    let candidates = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ];
    for base in &candidates {
        let dir = base.join(name);
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
