//! `cargo xtask vmtest [6.1|6.12|all]`: the static daemon and the C fixtures, booted as the init
//! of an initramfs under Debian's own LTS kernels in QEMU, and a kernel × step table of what
//! passed.
//!
//! Why this shape:
//! - Debian's cloud kernels come with `apt-get download` from the registry this machine reaches;
//!   they boot in seconds, have BTF, fentry and kprobes, and need no modules for a serial console
//!   and an initramfs. The newest package of each series is taken; the .debs and the extracted
//!   trees are cached under target/vmtest/, so a second run needs no network.
//! - The guest has busybox and static binaries only (xtask/vmtest/init.sh is its /init): nothing
//!   of the host leaks in, and what works there works on a bare host.
//! - The guest reports through `VMTEST ...` lines on the serial console (see init.sh), which the
//!   host reads with a time limit per boot: a hung guest fails its boot, never the whole run.
//! - KVM is tried first where /dev/kvm opens, but where no guest kernel starts under it (silent:
//!   one host's hung in the firmware; refused: another's QEMU aborted at once, its nested KVM
//!   refusing an MSR of `-cpu host`) it is given up on quickly and TCG is used from then on.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{apt::Apt, cmd, dist, setup};

/// Relative to the workspace root.
const VMTEST_DIR: &str = "target/vmtest";
const INIT_SCRIPT: &str = include_str!("../vmtest/init.sh");
const HELPER_SOURCE: &str = "xtask/vmtest/vmhelper.c";
/// The C fixtures of the end-to-end tests that the guest runs, in monitor/tests/fixtures/.
const FIXTURES: [&str; 3] = ["forker", "locker", "sharer"];
const BUSYBOX: &str = "/bin/busybox";
/// Guest memory: the daemon, its maps and the fixtures fit with room to spare.
const GUEST_MEMORY: &str = "1024";
/// Under TCG the guest runs several times slower: init.sh scales its waits by this.
const TCG_SLOWNESS: u32 = 4;
/// How long a whole boot may take, from QEMU's start to its exit.
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(8 * 60);
const TCG_BOOT_LIMIT: Duration = Duration::from_secs(25 * 60);
/// How long a KVM guest gets to print its first kernel line before KVM is given up on. A KVM
/// guest prints it within a second or two; where KVM hangs (the dev host's /dev/kvm opens, but
/// its guests never start) every run pays this once before falling back to TCG, which is
/// correct if slower, so a busy host that is merely slow costs only speed, never a verdict.
const KVM_FIRST_LINE: Duration = Duration::from_secs(10);

/// A kernel series: Debian's cloud kernel package names of that series match `prefix` and
/// `suffix`, with version digits between them.
struct Series {
    name: &'static str,
    /// The Debian release whose archive has it.
    suite: &'static str,
    /// An `apt-cache search --names-only` regular expression for the series' packages.
    pattern: &'static str,
    prefix: &'static str,
    /// Detectors this kernel cannot run, each with the kernel feature it lacks (measured; the
    /// guest fails the run if one of them turns out active, or another one unavailable).
    unavailable: &'static [&'static str],
}

const SERIES: [Series; 3] = [
    // Debian 11's kernel: older than every fleet the issue names (5.15+), kept in the matrix as
    // the kernel where detectors really are unavailable, so that degrading by detector is proven
    // end to end. It lacks bpf_get_current_task_btf (5.11) and bpf_task_pt_regs (5.15), which
    // fork stacks need too (`fork_stack`: not a detector, the mt_fork_no_exec scenario's
    // stack); its sched_switch has no prev_state (5.18), which the task-state switch program
    // stands in for.
    Series {
        name: "5.10",
        suite: "bullseye",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$",
        prefix: "linux-image-5.10.0-",
        unavailable: &[
            "inherited_lock",
            "shared_socket",
            "shared_file_offset",
            "fork_stack",
        ],
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        prefix: "linux-image-6.1.0-",
        unavailable: &[],
    },
    Series {
        name: "6.12",
        suite: "bookworm",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        prefix: "linux-image-6.12.",
        unavailable: &[],
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

/// What one boot reported.
struct Boot {
    series: &'static str,
    release: String,
    accel: Accel,
    elapsed: Duration,
    /// Step name → (status, detail), in the order the guest printed them.
    steps: Vec<(String, String, String)>,
    /// Step name → the lines it printed.
    output: BTreeMap<String, Vec<String>>,
    /// The guest reached the end of init.sh.
    done: bool,
    /// Why the boot ended early, if it did.
    problem: Option<String>,
    /// The guest's kernel printed a line (its banner or a marker of init.sh): the accelerator
    /// works, whatever happened after.
    kernel_started: bool,
    log: PathBuf,
}

pub fn vmtest(which: &str) -> anyhow::Result<()> {
    let series: Vec<&Series> =
        match which {
            "all" => SERIES.iter().collect(),
            name => vec![SERIES.iter().find(|s| s.name == name).with_context(|| {
                format!("unknown kernel series {name}: 5.10, 6.1, 6.12 or all")
            })?],
        };
    setup::vmtest_deps()?;
    let dir = cmd::workspace_root().join(VMTEST_DIR);
    fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let daemon = dist::dist()?;
    let bin = build_guest_programs(&dir)?;
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&initramfs, &daemon, &bin)?;
    let mut accel = first_accel();
    let mut boots = Vec::new();
    for series in series {
        let kernel = kernel(&dir, series)?;
        let mut boot = boot(&dir, series, &kernel, &initramfs, accel)?;
        // KVM that never got a kernel going, silent (a guest hung in the firmware) or refused
        // (QEMU aborting at the start because the host's KVM refuses a CPU setting, as nested
        // KVM does): TCG from then on, correct if slower.
        if boot.accel == Accel::Kvm && !boot.kernel_started {
            eprintln!(
                "xtask: no guest kernel started under KVM ({}): using TCG",
                boot.problem.as_deref().unwrap_or("no reason given")
            );
            accel = Accel::Tcg;
            boot = self::boot(&dir, series, &kernel, &initramfs, accel)?;
        }
        boots.push(boot);
    }
    report(&boots)
}

/// KVM where /dev/kvm opens, unless VMTEST_ACCEL says otherwise (`tcg` or `kvm`).
fn first_accel() -> Accel {
    match std::env::var("VMTEST_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("kvm") => Accel::Kvm,
        _ => {
            let kvm = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm");
            if kvm.is_ok() { Accel::Kvm } else { Accel::Tcg }
        }
    }
}

/// The fixtures and the guest helper, static (the guest has no libc), into DIR/bin.
fn build_guest_programs(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = cmd::workspace_root();
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).with_context(|| bin.display().to_string())?;
    let mut sources: Vec<(String, PathBuf)> = FIXTURES
        .iter()
        .map(|name| {
            let source = root.join(format!("monitor/tests/fixtures/{name}.c"));
            ((*name).to_owned(), source)
        })
        .collect();
    sources.push(("vmhelper".to_owned(), root.join(HELPER_SOURCE)));
    for (name, source) in sources {
        cmd::run_with(
            Command::new("gcc")
                .args(["-static", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread"])
                .arg("-o")
                .arg(bin.join(&name))
                .arg(source),
        )?;
    }
    Ok(bin)
}

/// The kernel image of `series`: the newest package Debian has, downloaded and extracted once.
fn kernel(dir: &Path, series: &Series) -> anyhow::Result<PathBuf> {
    let kernels = dir.join("kernels");
    let debs = dir.join("debs");
    fs::create_dir_all(&kernels)?;
    fs::create_dir_all(&debs)?;
    let apt = Apt::for_suite(series.suite, &dir.join("apt"));
    let newest = match &apt {
        Ok(apt) => newest_package(apt, series),
        Err(error) => {
            eprintln!("xtask: {error:#}");
            None
        }
    };
    let package = match newest {
        Some(package) => package,
        None => {
            // Offline, or apt's lists are missing: a kernel of the series extracted earlier
            // still does (CI wants the newest, but a stale kernel beats none for a developer).
            let cached = cached_package(&kernels, series).with_context(|| {
                format!(
                    "no Debian package matches {} and none is cached in {}",
                    series.pattern,
                    kernels.display()
                )
            })?;
            eprintln!(
                "xtask: apt knows no {} kernel: using cached {cached}",
                series.name
            );
            cached
        }
    };
    let tree = kernels.join(&package);
    if !tree.exists() {
        let deb = match find_deb(&debs, &package) {
            Some(deb) => deb,
            None => {
                apt.as_ref()
                    .map_err(|e| anyhow::anyhow!("{e:#}"))?
                    .download(&package, &debs)?;
                find_deb(&debs, &package)
                    .with_context(|| format!("apt-get download left no {package}_*.deb"))?
            }
        };
        // Extract beside the cache and rename: an interrupted extraction is never taken for a
        // complete tree.
        let partial = kernels.join(format!(".{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        cmd::run_with(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &tree)?;
    }
    let boot = tree.join("boot");
    fs::read_dir(&boot)
        .with_context(|| boot.display().to_string())?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// The newest package of `series` that apt knows, after one `apt-get update` of the host's lists
/// if they know none (private lists are updated when first made).
fn newest_package(apt: &Apt, series: &Series) -> Option<String> {
    let search = || {
        apt.search(series.pattern)
            .into_iter()
            .max_by_key(|name| version_key(name))
    };
    search().or_else(|| {
        (apt.is_host() && cmd::is_root() && apt.update().is_ok())
            .then(search)
            .flatten()
    })
}

/// Every number in a package name, in order: within one series the newest compares greatest.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn cached_package(kernels: &Path, series: &Series) -> Option<String> {
    fs::read_dir(kernels)
        .ok()?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(series.prefix) && name.ends_with("-cloud-amd64-unsigned"))
        .max_by_key(|name| version_key(name))
}

fn find_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
        })
}

/// A newc cpio archive (what the kernel unpacks as its initramfs): /init, busybox and its
/// applets, the daemon, the fixtures, and the mount points init.sh uses.
fn write_initramfs(path: &Path, daemon: &Path, bin: &Path) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdin and stdout before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec());
    cpio.file("bin/busybox", 0o755, read(Path::new(BUSYBOX))?);
    let applets = cmd::output(BUSYBOX, &["--list"]).context("busybox --list")?;
    for applet in applets.lines().map(str::trim) {
        if !applet.is_empty() && applet != "busybox" {
            cpio.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    cpio.file("bin/forkwatch", 0o755, read(daemon)?);
    for entry in fs::read_dir(bin)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        cpio.file(&format!("bin/{name}"), 0o755, read(&entry.path())?);
    }
    let bytes = cpio.finish();
    fs::write(path, &bytes).with_context(|| path.display().to_string())?;
    eprintln!(
        "xtask: {}: {} entries, {} bytes",
        path.display(),
        cpio.count,
        bytes.len()
    );
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| path.display().to_string())
}

/// The "newc" format (cpio -H newc): a 110-byte ASCII header per entry, then its name and its
/// data, each padded to 4 bytes; a TRAILER!!! entry ends the archive.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    count: u32,
}

impl Cpio {
    const DIR: u32 = 0o040_000;
    const FILE: u32 = 0o100_000;
    const SYMLINK: u32 = 0o120_000;
    const CHAR: u32 = 0o020_000;

    fn dir(&mut self, name: &str) {
        self.entry(name, Self::DIR | 0o755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: Vec<u8>) {
        self.entry(name, Self::FILE | mode, (0, 0), &data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, Self::SYMLINK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, Self::CHAR | 0o600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.count += 1;
        let name_size = u32::try_from(name.len() + 1).expect("short name");
        let file_size = u32::try_from(data.len()).expect("under 4 GiB");
        let fields = [
            self.count, // inode: unique per entry
            mode, 0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so the archive depends only on its contents
            file_size, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, name_size, 0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(&mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.count -= 1;
        std::mem::take(&mut self.bytes)
    }
}

const KVM_SILENT: &str = "the KVM guest printed nothing";
/// How a boot's problem begins when the guest's kernel reported a soft lockup: the boot is
/// stopped then, a failure, not left to spin until its time limit (25 minutes under TCG).
const GUEST_LOCKUP: &str = "the guest's kernel reported a soft lockup";

/// Boots `kernel` with the initramfs and reads its console until QEMU exits or the time limit.
fn boot(
    dir: &Path,
    series: &'static Series,
    kernel: &Path,
    initramfs: &Path,
    accel: Accel,
) -> anyhow::Result<Boot> {
    // One vCPU under TCG: the daemon enables tracepoints (static keys: kernel code patched while
    // it runs), and with two vCPUs a loaded host twice saw the other vCPU run the old code: a
    // 5.10 guest spun in do_exit() for 20 minutes, a 6.12 guest died of an unhandled int3 in
    // syscall_trace_enter(). With one, no other CPU runs the code being patched.
    let (accel_arg, slowness, limit, cpus) = match accel {
        Accel::Kvm => ("kvm", 1, KVM_BOOT_LIMIT, "2"),
        Accel::Tcg => ("tcg", TCG_SLOWNESS, TCG_BOOT_LIMIT, "1"),
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel_arg, "-m", GUEST_MEMORY, "-smp", cpus])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        // -no-reboot: a guest that panics or reboots ends QEMU instead of booting again.
        .args(["-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=5 rdinit=/init vmtest.slow={slowness} \
             vmtest.unavailable={}",
            // init.sh reads the list; "-" for none keeps the argument well-formed.
            if series.unavailable.is_empty() {
                "-".to_owned()
            } else {
                series.unavailable.join(",")
            }
        ));
    if accel == Accel::Kvm {
        qemu.args(["-cpu", "host"]);
    }
    eprintln!("xtask: $ {}", cmd::describe(&qemu));
    let log = dir.join(format!("console-{}.log", series.name));
    let mut log_file = fs::File::create(&log).with_context(|| log.display().to_string())?;
    let started = Instant::now();
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let (lines, received) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let lines = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines);
    let mut boot = Boot {
        series: series.name,
        release: String::new(),
        accel,
        elapsed: Duration::ZERO,
        steps: Vec::new(),
        output: BTreeMap::new(),
        done: false,
        problem: None,
        kernel_started: false,
        log: log.clone(),
    };
    let mut current: Option<String> = None;
    loop {
        let now = Instant::now();
        let deadline = if accel == Accel::Kvm && !boot.kernel_started {
            started + KVM_FIRST_LINE
        } else {
            started + limit
        };
        let line = match received.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                boot.problem = Some(if boot.kernel_started {
                    format!("the boot overran its limit of {}", cmd::duration(limit))
                } else {
                    KVM_SILENT.to_owned()
                });
                stop(&mut child);
                break;
            }
        };
        let _ = writeln!(log_file, "{line}");
        // Only the kernel's own lines prove that KVM works (firmware may print before it hangs):
        // its banner (at loglevel 5, hence that level) or a marker of init.sh.
        boot.kernel_started |= line.contains("Linux version") || line.contains("VMTEST");
        if line.contains("soft lockup - CPU#") {
            boot.problem = Some(format!("{GUEST_LOCKUP}: {}", line.trim()));
            stop(&mut child);
            break;
        }
        parse_line(&line, &mut boot, &mut current);
    }
    let status = child.wait()?;
    boot.elapsed = started.elapsed();
    if boot.problem.is_none() && !boot.done {
        boot.problem = Some(format!(
            "QEMU exited ({status}) before the guest finished; see {}",
            log.display()
        ));
    }
    eprintln!(
        "xtask: {} ({}) under {:?}: {:.0} s{}",
        series.name,
        boot.release,
        accel,
        boot.elapsed.as_secs_f64(),
        boot.problem
            .as_deref()
            .map(|p| format!(", {p}"))
            .unwrap_or_default()
    );
    Ok(boot)
}

/// Ends a QEMU that overran: it is our own child, so by its pid only.
fn stop(child: &mut Child) {
    let _ = child.kill();
}

fn parse_line(line: &str, boot: &mut Boot, current: &mut Option<String>) {
    // Kernel messages may share the console: a marker is recognised anywhere on its line.
    if let Some(at) = line.find("VMTEST-BEGIN ") {
        let name = line[at + "VMTEST-BEGIN ".len()..].trim().to_owned();
        boot.output.entry(name.clone()).or_default();
        *current = Some(name);
    } else if line.contains("VMTEST-DONE") {
        boot.done = true;
        *current = None;
    } else if let Some(at) = line.find("VMTEST ") {
        let mut words = line[at + "VMTEST ".len()..].splitn(3, ' ');
        let name = words.next().unwrap_or_default().to_owned();
        let status = words.next().unwrap_or_default().to_owned();
        let detail = words.next().unwrap_or_default().trim().to_owned();
        if name == "kernel" {
            boot.release.clone_from(&detail);
        }
        boot.steps.push((name, status, detail));
        *current = None;
    } else if let Some(name) = current {
        boot.output
            .entry(name.clone())
            .or_default()
            .push(line.to_owned());
    }
}

/// A step whose status fails the run. `unavailable` is a detector (or its scenario) that the
/// series says this kernel cannot run and that the guest found degraded as it should be.
fn failed(status: &str) -> bool {
    !matches!(status, "pass" | "yes" | "no" | "info" | "unavailable")
}

/// Prints the kernel × step table, then what each failed step printed; fails if anything did.
fn report(boots: &[Boot]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for boot in boots {
        for (name, _, _) in &boot.steps {
            // The release heads its column already; the daemon's log is shown on failures.
            if !names.contains(&name.as_str()) && name != "kernel" && name != "daemon-log" {
                names.push(name);
            }
        }
    }
    let cell = |boot: &Boot, name: &str| -> String {
        match boot.steps.iter().find(|(n, _, _)| n == name) {
            Some((_, status, _)) => status.clone(),
            None => "missing".to_owned(),
        }
    };
    let width = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let mut header = format!("| {:width$} |", "step");
    let mut rule = format!("|-{}-|", "-".repeat(width));
    let columns: Vec<String> = boots
        .iter()
        .map(|b| {
            if b.release.is_empty() {
                b.series.to_owned()
            } else {
                b.release.clone()
            }
        })
        .collect();
    for column in &columns {
        header.push_str(&format!(" {column} |"));
        rule.push_str(&format!("-{}-|", "-".repeat(column.len())));
    }
    println!("\nvmtest: kernel × step\n{header}\n{rule}");
    for name in &names {
        let mut row = format!("| {name:width$} |");
        for (boot, column) in boots.iter().zip(&columns) {
            row.push_str(&format!(" {:w$} |", cell(boot, name), w = column.len()));
        }
        println!("{row}");
    }
    let mut failures = 0;
    for boot in boots {
        println!(
            "\nvmtest: {} ({}), {:?}, {:.0} s, console log {}",
            boot.series,
            boot.release,
            boot.accel,
            boot.elapsed.as_secs_f64(),
            boot.log.display()
        );
        if let Some(problem) = &boot.problem {
            println!("  boot: {problem}");
            failures += 1;
        }
        for (name, status, detail) in &boot.steps {
            if !failed(status) {
                continue;
            }
            failures += 1;
            println!("  {name}: {status} {detail}");
            let output = boot.output.get(name).map(Vec::as_slice).unwrap_or_default();
            for line in &output[output.len().saturating_sub(25)..] {
                println!("    {line}");
            }
        }
    }
    if failures > 0 {
        bail!("vmtest: {failures} failures (the table above)");
    }
    println!("\nvmtest: every step passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_of_a_series_compares_greatest() {
        let newest = [
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.118+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.107+deb12-cloud-amd64-unsigned",
        ]
        .into_iter()
        .max_by_key(|n| version_key(n));
        assert_eq!(
            newest,
            Some("linux-image-6.12.118+deb12-cloud-amd64-unsigned")
        );
    }

    #[test]
    fn reads_markers_among_kernel_lines() {
        let mut boot = Boot {
            series: "6.1",
            release: String::new(),
            accel: Accel::Tcg,
            elapsed: Duration::ZERO,
            steps: Vec::new(),
            output: BTreeMap::new(),
            done: false,
            problem: None,
            kernel_started: false,
            log: PathBuf::new(),
        };
        let mut current = None;
        for line in [
            "[    0.000000] Linux version 6.1.0-57-cloud-amd64",
            "VMTEST-BEGIN kernel",
            "VMTEST kernel info 6.1.0-57-cloud-amd64",
            "VMTEST-BEGIN check",
            "Error: func 'sched_process_exit' doesn't have 2-th argument",
            "VMTEST check fail exit 1",
            "VMTEST-DONE",
        ] {
            parse_line(line, &mut boot, &mut current);
        }
        assert_eq!(boot.release, "6.1.0-57-cloud-amd64");
        assert!(boot.done);
        assert_eq!(
            boot.steps[1],
            ("check".into(), "fail".into(), "exit 1".into())
        );
        assert_eq!(boot.output["check"].len(), 1);
        assert!(failed("fail") && failed("skip") && !failed("no") && !failed("pass"));
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        cpio.symlink("bin/sh", "busybox");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.len().is_multiple_of(4));
        assert!(
            bytes
                .windows(b"TRAILER!!!".len())
                .any(|w| w == b"TRAILER!!!")
        );
        assert_eq!(cpio.count, 2);
    }
}
