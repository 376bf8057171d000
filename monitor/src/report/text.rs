use std::{
    fmt::Write as _,
    io::{self, Write},
};

use super::Sink;
use crate::report::finding::{Details, Finding, Repeated, Severity};

/// A readable line per finding, for a human at a terminal.
pub struct TextSink<W> {
    out: W,
    color: bool,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W, color: bool) -> Self {
        Self { out, color }
    }
}

impl<W: Write + Send> Sink for TextSink<W> {
    fn emit(&mut self, finding: &Finding) -> io::Result<()> {
        let line = render(finding, self.color);
        self.out.write_all(line.as_bytes())?;
        self.out.flush()
    }

    fn emit_repeated(&mut self, repeated: &Repeated) -> io::Result<()> {
        let line = render_repeated(repeated, self.color);
        self.out.write_all(line.as_bytes())?;
        self.out.flush()
    }
}

/// The terminal's colour around a severity, when colour is on.
fn colors(color: bool, severity: Severity) -> (&'static str, &'static str) {
    match (color, severity) {
        (false, _) => ("", ""),
        (true, Severity::Critical) => ("\x1b[1;31m", "\x1b[0m"),
        (true, Severity::Warning) => ("\x1b[1;33m", "\x1b[0m"),
        (true, Severity::Info) => ("\x1b[1;36m", "\x1b[0m"),
    }
}

pub fn render_repeated(r: &Repeated, color: bool) -> String {
    let (on, off) = colors(color, r.severity);
    let pids: Vec<String> = r.sample_pids.iter().map(u32::to_string).collect();
    let mut from = match &r.exe {
        Some(exe) => format!("exe={}", escape(exe)),
        None => format!("parent ({})", escape(&r.parent_comm)),
    };
    if let Some(site) = &r.fork_site {
        let _ = write!(from, " fork site {}", escape(site));
    }
    format!(
        "{time} {on}{severity:<8}{off} repeated {kind} {count} more times from {from} between {first} and {last} (pids {pids}, ...)\n",
        time = r.time,
        severity = r.severity.as_str().to_uppercase(),
        kind = r.of_kind.as_str(),
        count = r.count,
        first = r.first_time,
        last = r.last_time,
        pids = pids.join(", "),
    )
}

pub fn render(f: &Finding, color: bool) -> String {
    let (on, off) = colors(color, f.severity);
    let mut line = format!(
        "{time} {on}{severity:<8}{off} {kind} pid {pid} ({comm}) parent {ppid} ({pcomm})",
        time = f.time,
        severity = f.severity.as_str().to_uppercase(),
        kind = f.kind.as_str(),
        pid = f.pid,
        comm = escape(&f.comm),
        ppid = f.parent_pid,
        pcomm = escape(&f.parent_comm),
    );
    match &f.details {
        Details::MtForkNoExec(d) => {
            let _ = write!(
                line,
                ": forked by a process with {} threads",
                d.parent_threads
            );
            if !d.thread_names.is_empty() {
                let names: Vec<String> = d.thread_names.iter().map(|n| escape(n)).collect();
                let _ = write!(line, " [{}]", names.join(", "));
            }
            if d.exited_without_exec {
                let _ = write!(line, ", exited without exec after {} ms", d.ms_without_exec);
            } else if let Some(ms) = d.exec_after_ms {
                let _ = write!(
                    line,
                    ", exec'd only after {ms} ms (grace {} ms)",
                    d.grace_ms
                );
            } else {
                let _ = write!(line, ", no exec within {} ms", d.grace_ms);
            }
        }
        Details::LockWait(d) => {
            let _ = write!(
                line,
                ": thread {} blocked {} ms in {} on {}",
                d.tid, d.blocked_ms, d.futex_op, d.futex_addr
            );
            if d.contended_in_parent_at_fork {
                line.push_str(" (the parent was waiting on it at the fork)");
            }
            if let Some(owner) = &d.lock_owner {
                let _ = write!(
                    line,
                    ", held at the fork by thread {} ({})",
                    owner.tid,
                    escape(&owner.name)
                );
            }
            if let Some(reason) = &d.reason {
                let _ = write!(line, ", could still end: {reason}");
            }
            if let Some(stack) = &d.stack_summary {
                let _ = write!(line, ", stack: {}", escape(stack));
            }
        }
        Details::SharedSocket(d) => {
            let _ = write!(
                line,
                ": both use {} {} socket {} -> {} (inode {}): {} by {} then {} by {}",
                d.socket.family,
                d.socket.kind,
                escape(&d.socket.local),
                escape(&d.socket.peer),
                d.socket.inode,
                d.first_use.syscall,
                d.first_use.pid,
                d.later_use.syscall,
                d.later_use.pid
            );
        }
        Details::SharedFile(d) => {
            let _ = write!(
                line,
                ": both write through one open file {} (inode {}, no O_APPEND): {} by {} then {} by {}",
                escape(d.file.path.as_deref().unwrap_or("?")),
                d.file.inode,
                d.first_use.syscall,
                d.first_use.pid,
                d.later_use.syscall,
                d.later_use.pid
            );
        }
        Details::EventsLost(d) => {
            let parts: Vec<String> = d.lost.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = write!(
                line,
                ": the kernel dropped events ({}; {} since start): findings may be missing",
                parts.join(", "),
                d.lost_total
            );
        }
        Details::ThreadsAfterMtFork(d) => {
            let _ = write!(
                line,
                ": created thread {} without exec after a fork from {} threads",
                d.tid, d.parent_threads
            );
        }
    }
    // The fork's call site: its function names are the process's to choose, so escaped.
    if let Some(site) = f.fork.as_ref().and_then(|fork| fork.fork_site.as_ref()) {
        let _ = write!(line, ", fork site: {}", escape(site));
    }
    if let Some(exe) = &f.exe {
        let _ = write!(line, " exe={}", escape(exe));
    }
    if let (Some(namespace), Some(name)) = (&f.attribution.pod_namespace, &f.attribution.pod_name) {
        let _ = write!(line, " pod={}/{}", escape(namespace), escape(name));
    }
    if let Some(hint) = f.hint {
        let _ = write!(line, " hint: {hint}");
    }
    line.push('\n');
    line
}

/// Makes process-controlled text safe for a terminal: control characters (escape sequences,
/// newlines, carriage returns) become visible escapes instead of acting on the terminal.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(comm: &str) -> Finding {
        Finding::example(comm)
    }

    #[test]
    fn renders_one_readable_line() {
        let line = render(&finding("python3"), false);
        assert_eq!(
            line,
            "2026-11-27T10:00:00.000Z WARNING  mt_fork_no_exec pid 2 (python3) parent 1 \
             (python3): forked by a process with 2 threads [worker], exited without exec after \
             12 ms exe=/usr/bin/python3 hint: Use the multiprocessing start method \
             \"forkserver\" or \"spawn\" (the default on Linux from Python 3.14), or fork \
             before starting any thread; to run a program, use subprocess, which execs.\n"
        );
        assert!(render(&finding("x"), true).contains("\x1b[1;33mWARNING"));
        let mut in_pod = finding("x");
        in_pod.attribution.pod_namespace = Some("shop".into());
        in_pod.attribution.pod_name = Some("web-0".into());
        in_pod.hint = None;
        assert!(render(&in_pod, false).ends_with(" exe=/usr/bin/python3 pod=shop/web-0\n"));
    }

    #[test]
    fn a_repeated_record_is_one_line() {
        let r = Repeated {
            schema: 1,
            kind: "repeated",
            severity: Severity::Warning,
            time: "2026-11-27T10:01:00.000Z".into(),
            of_kind: crate::report::finding::Kind::MtForkNoExec,
            exe: Some("/usr/sbin/prefork\nFAKE".into()),
            parent_comm: "prefork".into(),
            fork_site: None,
            count: 19_999,
            first_time: "2026-11-27T10:00:00.000Z".into(),
            last_time: "2026-11-27T10:01:00.000Z".into(),
            sample_pids: vec![7, 8],
        };
        assert_eq!(
            render_repeated(&r, false),
            "2026-11-27T10:01:00.000Z WARNING  repeated mt_fork_no_exec 19999 more times from \
             exe=/usr/sbin/prefork\\nFAKE between 2026-11-27T10:00:00.000Z and \
             2026-11-27T10:01:00.000Z (pids 7, 8, ...)\n"
        );
        let at_site = Repeated {
            fork_site: Some("spawn_worker ← main".into()),
            ..r
        };
        assert!(
            render_repeated(&at_site, false)
                .contains("exe=/usr/sbin/prefork\\nFAKE fork site spawn_worker ← main between"),
            "{}",
            render_repeated(&at_site, false)
        );
    }

    #[test]
    fn the_fork_site_is_shown_escaped() {
        let mut f = finding("worker");
        f.fork = Some(crate::report::finding::ForkStackDetails {
            fork_site: Some("start_worker_process ← main\x1b[2J".into()),
            fork_stack: Some(Vec::new()),
            fork_stack_unavailable_reason: None,
        });
        let line = render(&f, false);
        assert!(
            line.contains(
                "exited without exec after 12 ms, fork site: start_worker_process ← \
                 main\\u{1b}[2J exe=/usr/bin/python3"
            ),
            "{line}"
        );
    }

    #[test]
    fn hostile_names_cannot_drive_the_terminal() {
        let line = render(&finding("evil\x1b]0;pwned\x07\nFAKE"), false);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line}");
        assert!(line.contains("evil\\u{1b}]0;pwned\\u{7}\\nFAKE"), "{line}");
    }
}
