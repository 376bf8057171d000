//! End-to-end, as root: the container image (deploy/container/Containerfile), built by
//! `cargo xtask image` itself, and its entrypoint run from the image's own filesystem on this
//! host's kernel: `check` lists every probe ok, `selftest` passes, and the default command (the
//! daemon) becomes ready and stops cleanly on SIGTERM, all on a read-only root.
//!
//! How the image is run, and why not with `podman run`: a container runtime does not work on
//! every host that can build the image (on the development VM crun fails before starting the
//! process: a cgroup v1 hierarchy and a root without CAP_SYS_RESOURCE, so its setrlimit is
//! refused). What matters here is the image's content, so the test does by hand the part of a
//! runtime that concerns it, with nothing but util-linux and coreutils:
//! - `podman image mount` gives the image's root filesystem as a (read-only) directory;
//! - `unshare --mount --propagation private` starts a shell in a mount namespace of its own, so
//!   every mount below vanishes with it and none leaks to the host, even if the test dies;
//! - there it stacks a writable overlay (on a tmpfs) on the image, only to create the mount
//!   points a runtime creates (the image has none: it holds the binary alone), then bind-mounts
//!   that root read-only onto itself, and mounts a fresh /proc, a read-only sysfs (for
//!   /sys/kernel/btf) and a /dev holding only the devices a runtime provides (null, zero, full,
//!   random, urandom, tty; the selftest's helpers get /dev/null as stdin);
//! - then `chroot` into it and exec the image's entrypoint with a cleared environment.
//!
//! It is the host's pid and network namespace, as with `podman run --pid=host --network=host`
//! (which the Containerfile recommends: the kernel reports host pids). The root holds no libc
//! and no loader, so a dynamically linked binary could not even start: running at all proves the
//! static build. `selftest` re-executes the binary through /proc/self/exe, which works there.
//! The image is built first by `cargo xtask image` itself. Nested cargo does not deadlock: cargo
//! releases the build lock of target/debug before it runs tests (the inner `cargo run` of xtask
//! may rebuild it there), and the static build has a target directory of its own
//! (target/dist-build). Once that build is cached, building the image takes about a second; on a
//! fresh checkout the static build takes a couple of minutes.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use crate::harness::{self, http_get};
use serde_json::Value;

const IMAGE: &str = "localhost/forkwatch:latest";
/// What PATH the shell that prepares the root needs; also the environment the entrypoint gets,
/// the image's own default.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// The first image test builds the image (`cargo xtask image`: on a fresh checkout a static
/// build of a few minutes, more on a loaded machine); the others wait for it.
const LIMIT: Duration = Duration::from_secs(20 * 60);
/// The image tests run one at a time: each mounts the one image and unmounts it when done.
static IMAGE_MOUNT: harness::Serial = harness::Serial::new();

/// Prepares the root in the new mount namespace and execs the entrypoint in it.
/// Arguments: the image's directory, an empty directory for the scratch tmpfs, then the command.
const ENTER_IMAGE: &str = r#"
image=$1 scratch=$2
shift 2
mount -t tmpfs -o mode=0755 forkwatch-image "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
root=$scratch/root
mount -t overlay overlay -o "lowerdir=$image,upperdir=$scratch/upper,workdir=$scratch/work" "$root"
mkdir "$root/proc" "$root/sys" "$root/dev"
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
if touch "$root/.writable" 2>/dev/null; then
    echo "the root is still writable" >&2
    exit 99
fi
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,noexec,mode=0755 dev "$root/dev"
for device in null zero full random urandom tty; do
    touch "$root/dev/$device"
    mount --bind "/dev/$device" "$root/dev/$device"
done
exec chroot "$root" "$@"
"#;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("monitor/ is in the workspace")
        .to_path_buf()
}

/// The tool `cargo xtask image` built with: podman if installed, else buildah.
#[derive(Clone, Copy, Debug)]
enum Tool {
    Podman,
    Buildah,
}

impl Tool {
    fn find() -> Tool {
        let works = |program: &str| {
            Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success())
        };
        if works("podman") {
            Tool::Podman
        } else if works("buildah") {
            Tool::Buildah
        } else {
            panic!("`cargo xtask image` succeeded but neither podman nor buildah runs")
        }
    }

    /// The image's configuration (the OCI `config` object).
    fn config(self) -> Value {
        let out = match self {
            Tool::Podman => question(
                "podman",
                &["image", "inspect", "--format", "{{json .Config}}", IMAGE],
            ),
            Tool::Buildah => question(
                "buildah",
                &[
                    "inspect",
                    "--type",
                    "image",
                    "--format",
                    "{{json .OCIv1.Config}}",
                    IMAGE,
                ],
            ),
        };
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("image config ({e}): {out}"))
    }
}

/// Runs a command that must succeed; its stdout.
fn question(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The image, built once per test binary by `cargo xtask image`: the same steps (setup, the
/// static build and its check, podman build) as a developer runs, not a copy of them.
fn image() -> Tool {
    static BUILT: OnceLock<Result<Tool, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(env!("CARGO"))
            .args(["xtask", "image"])
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run cargo xtask image: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("cargo xtask image failed ({}):\n{log}", out.status));
        }
        // Its report (sizes, times) shows with --nocapture.
        for line in log.lines().filter(|l| l.starts_with("xtask: ")) {
            eprintln!("{line}");
        }
        eprintln!("cargo xtask image took {:?}", started.elapsed());
        Ok(Tool::find())
    });
    built.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// The image's root filesystem, mounted read-only on the host until dropped.
struct Mounted {
    tool: Tool,
    path: PathBuf,
    /// buildah mounts containers, not images: the working container to remove again.
    container: Option<String>,
}

impl Mounted {
    fn new(tool: Tool) -> Mounted {
        let (path, container) = match tool {
            Tool::Podman => (question("podman", &["image", "mount", IMAGE]), None),
            Tool::Buildah => {
                let container = question("buildah", &["from", "--pull=never", IMAGE]);
                (question("buildah", &["mount", &container]), Some(container))
            }
        };
        Mounted {
            tool,
            path: PathBuf::from(path),
            container,
        }
    }

    /// The image's entrypoint (`args` given) or entrypoint and command (`args` empty), run on a
    /// read-only root made of the image's filesystem; see the module's documentation.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let config = self.tool.config();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap_or_else(|| panic!("not a list in the image config: {v}"))
                .iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        };
        let mut argv = strings(&config["Entrypoint"]);
        if args.is_empty() {
            argv.extend(strings(&config["Cmd"]));
        } else {
            argv.extend(args.iter().map(|a| (*a).to_owned()));
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "image-root-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&scratch).expect("create the scratch directory");
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .args(["sh", "-euc", ENTER_IMAGE, "sh"])
            .arg(&self.path)
            .arg(&scratch)
            .args(&argv)
            .env_clear()
            .env("PATH", PATH)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let stdout = lines_of(child.stdout.take().expect("stdout"));
        let stderr = lines_of(child.stderr.take().expect("stderr"));
        Running {
            _watched: harness::watch(&child),
            child,
            argv,
            scratch,
            stdout,
            stderr,
        }
    }

    /// Runs the entrypoint with `args` to its end.
    fn run(&self, args: &[&str]) -> Finished {
        let mut running = self.spawn(args, &[]);
        let status = running.wait(RUN_TIMEOUT);
        let finished = Finished {
            status,
            stdout: to_the_end(&running.stdout),
            stderr: to_the_end(&running.stderr),
        };
        eprintln!(
            "{:?} in the image: {}\n{}\n{}",
            running.argv, finished.status, finished.stdout, finished.stderr
        );
        finished
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = match (&self.tool, &self.container) {
            (Tool::Buildah, Some(container)) => {
                Command::new("buildah").args(["rm", container]).output()
            }
            _ => Command::new("podman")
                .args(["image", "unmount", IMAGE])
                .output(),
        };
    }
}

/// The entrypoint running in its mount namespace (the child is it: unshare, sh and chroot each
/// exec the next). Killed on drop; the namespace and its mounts go with it.
struct Running {
    child: Child,
    _watched: Option<harness::Watched>,
    argv: Vec<String>,
    scratch: PathBuf,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Running {
    /// Waits for the exit; kills it after `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{:?} did not end within {timeout:?}", self.argv);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Empty on the host: the tmpfs was mounted in the namespace only.
        let _ = std::fs::remove_dir(&self.scratch);
    }
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// The rest of an exited process's output: to the end of the pipe, which closes with the
/// process (not just what the reader thread happens to have passed on by now: on a loaded
/// machine that can be nothing yet). Bounded, in case something it started holds the pipe.
fn to_the_end(lines: &mpsc::Receiver<String>) -> String {
    let mut text = Vec::new();
    while let Ok(line) = lines.recv_timeout(RUN_TIMEOUT) {
        text.push(line);
    }
    text.join("\n")
}

fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn image_holds_the_static_binary_alone() {
    harness::root().serial(&IMAGE_MOUNT).limit(LIMIT).run(|| {
        let tool = image();
        let config = tool.config();
        assert_eq!(config["Entrypoint"], serde_json::json!(["/forkwatch"]));
        assert_eq!(config["Cmd"], serde_json::json!(["run"]));
        let labels: BTreeMap<String, String> =
            serde_json::from_value(config["Labels"].clone()).expect("labels");
        assert_eq!(labels["org.opencontainers.image.title"], "forkwatch");
        assert_eq!(
            labels["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION")
        );
        let mounted = Mounted::new(tool);
        let mut entries: Vec<String> = std::fs::read_dir(&mounted.path)
            .expect("read the image's root")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, ["forkwatch"], "the image holds the binary alone");
        let dist =
            std::fs::read(workspace_root().join("target/dist/forkwatch")).expect("dist binary");
        let inside = std::fs::read(mounted.path.join("forkwatch")).expect("image binary");
        assert!(dist == inside, "the image holds target/dist/forkwatch");
    });
}

#[test]
fn check_in_the_image_lists_every_probe_ok() {
    harness::root().serial(&IMAGE_MOUNT).limit(LIMIT).run(|| {
        let mounted = Mounted::new(image());
        let check = mounted.run(&["check"]);
        assert!(
            check.status.success(),
            "check failed ({}):\n{}\n{}",
            check.status,
            check.stdout,
            check.stderr
        );
        for detector in harness::DETECTORS {
            let line = format!("[ ok ] detector {detector}: active");
            assert!(
                check.stdout.lines().any(|l| l.starts_with(&line)),
                "no `{line}` in:\n{}",
                check.stdout
            );
        }
        assert!(
            check.stdout.contains("[ ok ] kernel BTF"),
            "{}",
            check.stdout
        );
        assert!(!check.stdout.contains("[FAIL]"), "{}", check.stdout);
    });
}

#[test]
fn selftest_in_the_image_passes() {
    harness::root().serial(&IMAGE_MOUNT).limit(LIMIT).run(|| {
        let mounted = Mounted::new(image());
        let selftest = mounted.run(&["selftest"]);
        assert!(
            selftest.status.success() && selftest.stdout.lines().any(|l| l == "selftest: passed"),
            "selftest did not pass ({}):\n{}\n{}",
            selftest.status,
            selftest.stdout,
            selftest.stderr
        );
    });
}

/// The default command (`ENTRYPOINT` + `CMD`: the daemon), configured through the environment as
/// a container would be, on the read-only root: ready, /readyz 200, exit 0 on SIGTERM.
#[test]
fn daemon_in_the_image_runs_on_a_read_only_root() {
    harness::root().serial(&IMAGE_MOUNT).limit(LIMIT).run(|| {
        let mounted = Mounted::new(image());
        let mut daemon = mounted.spawn(
            &[],
            &[
                ("FORKWATCH_METRICS_ADDR", "127.0.0.1:0"),
                ("FORKWATCH_LOG_FORMAT", "json"),
            ],
        );
        assert_eq!(daemon.argv, ["/forkwatch", "run"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = daemon.stderr.recv_timeout(left) else {
                panic!(
                    "the daemon in the image did not become ready; log:\n{}",
                    log.join("\n")
                );
            };
            let ready = serde_json::from_str::<Value>(&line).ok().and_then(|l| {
                (l["fields"]["message"] == "ready")
                    .then(|| l["fields"]["metrics_addr"].as_str()?.parse().ok())?
            });
            log.push(line);
            if let Some(addr) = ready {
                break addr;
            }
        };
        assert_eq!(http_get(addr, "/readyz").0, 200);
        // SAFETY: kill has no memory-safety preconditions; the pid is our running child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
        let status = daemon.wait(Duration::from_secs(10));
        log.extend(daemon.stderr.try_iter());
        assert_eq!(
            status.code(),
            Some(0),
            "exit on SIGTERM; log:\n{}",
            log.join("\n")
        );
    });
}
