//! The server-host condition: the processes a busy server runs all day, kept running while the
//! workloads are timed with no monitor and with forkwatch, started before the daemon.
//!
//! - PostgreSQL (Debian's package: /usr/lib/postgresql/VERSION/bin) on a private port and socket
//!   directory, with SESSIONS open `psql` sessions. Each session's backend, and each of the
//!   server's own background processes, is a child the postmaster forked without exec.
//! - Lingering workers of a multithreaded fork (`workloads worker`): a threaded master whose
//!   four workers live on, un-exec'd, as gunicorn, Puma or unicorn workers do, each with a pool
//!   of eight idle threads asleep in futex waits, which the daemon keeps reading from /proc.
//!
//! Cleanup on every exit path: `stop` ends everything within time limits, and so does `Drop` on
//! an error. If the bench itself dies (Ctrl-C, SIGKILL, the time limit of `cargo xtask test`):
//! the postmaster gets SIGQUIT from the kernel when the bench's main thread goes (parent-death
//! signal, processes::end_with_bench; PostgreSQL's immediate shutdown, which ends its backends),
//! and `psql` and the worker read EOF on their stdin, which only the bench holds, and exit. A
//! data directory left behind is removed by the next run.

use std::{
    fs::{self, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Bench,
    processes::{end_with_bench, signal, spawn_until_line},
};
use crate::setup;

/// Open `psql` sessions, as in the report this condition answers (two).
pub(super) const SESSIONS: usize = 2;
const PG_ROOT: &str = "/usr/lib/postgresql";
/// initdb and the server's start-up; a session's connection and first answer.
const START_LIMIT: Duration = Duration::from_secs(60);
const SESSION_LIMIT: Duration = Duration::from_secs(15);
/// How long each process gets to end after it was asked to, before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// The longest path a Unix socket address holds (sun_path, less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// PostgreSQL's installation and a data directory made for this bench run (initdb once).
pub(super) struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    uid: u32,
    gid: u32,
}

impl Cluster {
    /// Installs PostgreSQL if it is missing, and makes a fresh cluster (as the `postgres` user:
    /// initdb refuses root) in a directory of this workspace that user can reach.
    pub(super) fn create(bench: &Bench) -> anyhow::Result<Cluster> {
        let bin = match postgres_bin() {
            Some(bin) => bin,
            None => {
                setup::apt_install(
                    &["postgresql"],
                    "PostgreSQL, the database server of the bench's server-host condition",
                )?;
                postgres_bin().with_context(|| {
                    format!("the postgresql package installed no server under {PG_ROOT}")
                })?
            }
        };
        let (uid, gid) = user_ids("postgres")?;
        let dir = work_dir(bench, &bin, uid, gid)?;
        let cluster = Cluster { bin, dir, uid, gid };
        let mut initdb = cluster.as_postgres(&cluster.bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--no-locale",
            ])
            .args(["--encoding=UTF8", "-D"])
            .arg(cluster.data())
            .stdout(Stdio::null());
        run_limited(&mut initdb, START_LIMIT)?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.join("s")
    }

    /// `program`, to be run as the `postgres` user with no supplementary groups (Rust's
    /// `Command::uid` drops them when root starts it).
    fn as_postgres(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The running server host: PostgreSQL with its sessions, and the lingering workers.
pub(super) struct ServerHost {
    /// Ended first: sessions, then the worker, then the server.
    sessions: Vec<Session>,
    worker: Option<Piped>,
    postmaster: Option<Child>,
}

impl ServerHost {
    pub(super) fn start(bench: &Bench, cluster: &Cluster) -> anyhow::Result<ServerHost> {
        let mut host = ServerHost {
            sessions: Vec::new(),
            worker: None,
            postmaster: None,
        };
        // From here on, dropping `host` ends whatever got started, also when a step fails.
        let port = free_port()?;
        host.postmaster = Some(start_postmaster(bench, cluster, port)?);
        wait_accepting(cluster, port, host.postmaster.as_mut().expect("just set"))?;
        for _ in 0..SESSIONS {
            host.sessions.push(Session::open(bench, cluster, port)?);
        }
        let (child, stdin, line) = spawn_until_line(&bench.workloads, "worker")?;
        host.worker = Some(Piped {
            child,
            stdin: Some(stdin),
        });
        if !line.starts_with("worker child=") {
            bail!("the threaded master of the server-host condition did not start: {line:?}");
        }
        Ok(host)
    }

    /// Ends every process of the server host; an error if one had to be killed.
    pub(super) fn stop(mut self) -> anyhow::Result<()> {
        self.end()
    }

    fn end(&mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for mut session in self.sessions.drain(..) {
            if let Err(err) = session.0.close("psql") {
                problems.push(format!("{err:#}"));
            }
        }
        if let Some(mut worker) = self.worker.take()
            && let Err(err) = worker.close("the threaded master")
        {
            problems.push(format!("{err:#}"));
        }
        if let Some(mut postmaster) = self.postmaster.take()
            && let Err(err) = stop_postmaster(&mut postmaster)
        {
            problems.push(format!("{err:#}"));
        }
        if !problems.is_empty() {
            bail!(
                "the server host did not stop cleanly: {}",
                problems.join("; ")
            );
        }
        Ok(())
    }
}

impl Drop for ServerHost {
    fn drop(&mut self) {
        if let Err(err) = self.end() {
            eprintln!("xtask: bench: {err:#}");
        }
    }
}

/// A child that runs until its stdin closes.
struct Piped {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Piped {
    /// Closes its stdin and waits STOP_LIMIT for it to exit; kills it after that. (Once it has
    /// been reaped, `try_wait` answers from the status kept: calling this again is harmless.)
    fn close(&mut self, what: &str) -> anyhow::Result<()> {
        drop(self.stdin.take());
        wait_or_kill(&mut self.child, what, STOP_LIMIT)
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        // Only on an error path (a session that failed to open): `close` was called otherwise.
        let _ = self.close("a server-host process");
    }
}

/// One open `psql` session: connected, its first query answered, then idle until closed. Its
/// stdout stays open (a session whose output pipe closed would die of SIGPIPE on any output).
struct Session(Piped, Option<ChildStdout>);

impl Session {
    fn open(bench: &Bench, cluster: &Cluster, port: u16) -> anyhow::Result<Session> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(bench.dir.join("psql.log"))?;
        let mut child = Command::new(cluster.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(cluster.socket_dir())
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start psql")?;
        let mut stdin = child.stdin.take().context("piped stdin")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut session = Session(Piped { child, stdin: None }, None);
        writeln!(stdin, "SELECT 'session ' || pg_backend_pid();")?;
        session.0.stdin = Some(stdin);
        // The answer on a thread of its own, so that a session that never answers cannot hang
        // the bench: past the limit the session is killed, which ends the read.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let read = reader.read_line(&mut line);
            let _ = tx.send(read.map(|_| (line, reader.into_inner())));
        });
        match rx.recv_timeout(SESSION_LIMIT) {
            Ok(Ok((line, stdout))) if line.starts_with("session ") => {
                session.1 = Some(stdout);
                Ok(session)
            }
            Ok(answer) => bail!(
                "a psql session did not answer its first query: {answer:?} (see {})",
                bench.dir.join("psql.log").display()
            ),
            Err(_) => bail!(
                "a psql session did not answer within {SESSION_LIMIT:?} (see {})",
                bench.dir.join("psql.log").display()
            ),
        }
    }
}

/// The postmaster, run directly (not through pg_ctl, which detaches it) so that the bench holds
/// it as a child: its pid is known, it is among the bench's descendants that `cargo xtask test`
/// ends at its time limit, and the kernel signals it when the bench dies.
fn start_postmaster(bench: &Bench, cluster: &Cluster, port: u16) -> anyhow::Result<Child> {
    let _ = fs::remove_dir_all(cluster.socket_dir());
    fs::create_dir(cluster.socket_dir())?;
    chown(&cluster.socket_dir(), cluster.uid, cluster.gid)?;
    // The server's log: a file this bench opens with O_APPEND, the logging collector off. Every
    // backend is forked without exec and writes its log lines to the stderr it inherited from
    // the postmaster. Were that a regular file opened without O_APPEND, all of them would write
    // through one shared file offset: a real `shared_file_offset` candidate, which the daemon
    // is right to watch (and to attach its write probe for), not the ordinary server this
    // condition stands for. pg_ctl's `-l` and Debian's pg_ctlcluster open their logs with
    // O_APPEND too.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(bench.dir.join("postgres.log"))?;
    let socket_dir = cluster.socket_dir();
    let mut command = cluster.as_postgres(&cluster.bin.join("postgres"));
    command
        .arg("-D")
        .arg(cluster.data())
        .args(["-c", &format!("port={port}")])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args([
            "-c",
            &format!("unix_socket_directories={}", socket_dir.display()),
        ])
        .args(["-c", "logging_collector=off", "-c", "fsync=off"])
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its immediate shutdown, which ends the backends too.
    end_with_bench(&mut command, libc::SIGQUIT);
    command
        .spawn()
        .context("cannot start PostgreSQL's postgres")
}

/// Until the server accepts connections on its socket (pg_isready), within START_LIMIT.
fn wait_accepting(cluster: &Cluster, port: u16, postmaster: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let ready = Command::new(cluster.bin.join("pg_isready"))
            .arg("-h")
            .arg(cluster.socket_dir())
            .args(["-p", &port.to_string(), "-U", "postgres", "-q"])
            .status()
            .context("cannot run pg_isready")?;
        if ready.success() {
            return Ok(());
        }
        if let Some(status) = postmaster.try_wait()? {
            bail!("PostgreSQL exited ({status}) before it accepted connections; see postgres.log");
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not accept connections within {START_LIMIT:?}");
        }
        sleep(Duration::from_millis(100));
    }
}

/// Fast shutdown (SIGINT: sessions ended, no checkpoint wait), then immediate (SIGQUIT), then
/// SIGKILL, each with STOP_LIMIT.
fn stop_postmaster(postmaster: &mut Child) -> anyhow::Result<()> {
    for sig in ["INT", "QUIT"] {
        if postmaster.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = signal(postmaster.id(), sig);
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if postmaster.try_wait()?.is_some() {
                return if sig == "INT" {
                    Ok(())
                } else {
                    bail!("PostgreSQL ignored SIGINT for {STOP_LIMIT:?}; SIGQUIT ended it")
                };
            }
            sleep(Duration::from_millis(50));
        }
    }
    let _ = postmaster.kill();
    let _ = postmaster.wait();
    bail!("PostgreSQL ignored SIGINT and SIGQUIT; killed")
}

fn wait_or_kill(child: &mut Child, what: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not exit within {limit:?} of its stdin closing; killed");
        }
        sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `command` to its end, killed past `limit`; its stderr in the error.
fn run_limited(command: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let what = format!("{:?}", command.get_program());
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            bail!("{what} failed ({status}): {err}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}; killed");
        }
        sleep(Duration::from_millis(50));
    }
}

/// The newest PostgreSQL installed the Debian way (/usr/lib/postgresql/VERSION/bin).
fn postgres_bin() -> Option<PathBuf> {
    fs::read_dir(PG_ROOT)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// A user's uid and gid from /etc/passwd.
fn user_ids(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .with_context(|| {
            format!("no `{name}` user: Debian's postgresql package creates it (apt-get install postgresql)")
        })
}

/// A fresh directory owned by `postgres` for the data and the socket: target/bench/pg unless
/// that user cannot reach it there (a checkout under a private home) or the socket's path would
/// be too long, and then one under the system's temporary directory named after this bench's
/// directory (so that benches of two checkouts do not share one). A server left there by a run
/// that was killed is stopped first.
fn work_dir(bench: &Bench, bin: &Path, uid: u32, gid: u32) -> anyhow::Result<PathBuf> {
    let tag: u32 = bench
        .dir
        .to_string_lossy()
        .bytes()
        .fold(2166136261u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(16777619)
        });
    let candidates = [
        bench.dir.join("pg"),
        std::env::temp_dir().join(format!("forkwatch-bench-pg-{tag:08x}")),
    ];
    for dir in &candidates {
        stop_leftover(bin, &dir.join("data"));
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        chown(dir, uid, gid)?;
        let reachable = Command::new("test")
            .arg("-w")
            .arg(dir)
            .uid(uid)
            .gid(gid)
            .status()
            .is_ok_and(|s| s.success());
        let socket_len = dir.join("s/.s.PGSQL.65535").as_os_str().len();
        if reachable && socket_len <= SUN_PATH_MAX {
            return Ok(dir.clone());
        }
        let _ = fs::remove_dir_all(dir);
    }
    bail!(
        "the postgres user can use none of {candidates:?} for the server-host condition's cluster"
    )
}

/// Ends a server a killed run left on `data` (its postmaster.pid names it).
fn stop_leftover(bin: &Path, data: &Path) {
    let Ok(pidfile) = fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = pidfile
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return;
    };
    // Only if that pid is still a postgres of this installation (pids are reused).
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    if exe.is_some_and(|exe| exe.starts_with(bin)) {
        let _ = signal(pid, "QUIT");
        let deadline = Instant::now() + STOP_LIMIT;
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            sleep(Duration::from_millis(50));
        }
        let _ = signal(pid, "KILL");
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {} to postgres", path.display()))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}
