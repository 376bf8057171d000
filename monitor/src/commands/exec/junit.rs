//! `--junit FILE`: the run as a JUnit XML report, so that CI systems show a fork hazard like a
//! failed test. One test case per finding kind seen in CMD's tree, a `<failure>` in it per
//! finding at or above `--fail-on`. Names, executables and stacks come from the watched
//! processes (a process chooses its own comm), so every one is escaped.

use std::fmt::Write as _;

use super::verdict::{Failure, Verdict};

/// The report. `command` is CMD as typed, for the suite's name.
pub fn render(verdict: &Verdict, command: &str) -> String {
    let tests = verdict.kinds.len();
    let failures: u64 = verdict.kinds.values().map(|k| k.failing).sum();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let suite = attribute(&format!("forkwatch exec -- {command}"));
    let _ = writeln!(
        xml,
        "<testsuites name=\"forkwatch\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\">"
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{suite}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" \
         skipped=\"0\">"
    );
    for (kind, count) in &verdict.kinds {
        let _ = writeln!(
            xml,
            "    <testcase classname=\"forkwatch\" name=\"{kind}\" assertions=\"{}\">",
            count.seen
        );
        for failure in verdict.failures.iter().filter(|f| f.kind == *kind) {
            write_failure(&mut xml, failure);
        }
        if count.seen > count.failing {
            let _ = writeln!(
                xml,
                "      <system-out>{} {kind} finding(s) below --fail-on {}</system-out>",
                count.seen - count.failing,
                verdict.fail_on.as_str()
            );
        }
        xml.push_str("    </testcase>\n");
    }
    if verdict.unlisted > 0 {
        let _ = writeln!(
            xml,
            "    <system-out>{} more failing findings are counted above but not listed</system-out>",
            verdict.unlisted
        );
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
}

fn write_failure(xml: &mut String, f: &Failure) {
    let exe = f.exe.as_deref().unwrap_or("unknown");
    let message = format!(
        "{kind}: pid {pid} ({comm}), parent {ppid} ({pcomm}), exe {exe}",
        kind = f.kind,
        pid = f.pid,
        comm = f.comm,
        ppid = f.parent_pid,
        pcomm = f.parent_comm,
    );
    let mut body = format!(
        "{severity} {kind} at {time}\npid {pid} ({comm})\nparent {ppid} ({pcomm})\nexe {exe}\n",
        severity = f.severity.as_str(),
        kind = f.kind,
        time = f.time,
        pid = f.pid,
        comm = f.comm,
        ppid = f.parent_pid,
        pcomm = f.parent_comm,
    );
    if let Some(site) = &f.site {
        let _ = writeln!(body, "fork site: {site}");
    }
    if let Some(stack) = &f.blocked_at {
        let _ = writeln!(body, "blocked at: {stack}");
    }
    if let Some(hint) = f.hint {
        let _ = writeln!(body, "hint: {hint}");
    }
    let _ = writeln!(
        xml,
        "      <failure type=\"{kind}\" message=\"{message}\">{body}</failure>",
        kind = f.kind,
        message = attribute(&message),
        body = text(&body),
    );
}

/// `value` as a double-quoted XML attribute value: as [`text`], and tab and line breaks as
/// references, so that a parser does not fold them into spaces.
fn attribute(value: &str) -> String {
    escape(value, true)
}

/// `value` as XML 1.0 character data.
fn text(value: &str) -> String {
    escape(value, false)
}

/// Markup characters become entities; characters XML 1.0 cannot carry at all, even as
/// references (controls but tab, newline and carriage return; U+FFFE, U+FFFF), are written as
/// `\xNN` / `\u{NNNN}`.
fn escape(value: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' if !attribute => out.push(c),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{fffe}' | '\u{ffff}' => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::finding::{Finding, Kind, Severity};

    fn verdict_with(findings: &[Finding]) -> Verdict {
        let mut v = Verdict::new(Severity::Warning);
        for f in findings {
            v.count(f);
        }
        v
    }

    #[test]
    fn a_test_case_per_kind_and_a_failure_per_failing_finding() {
        let mut a = Finding::example("worker");
        a.pid = 41;
        a.parent_pid = 40;
        let mut b = a.clone();
        b.pid = 42;
        let xml = render(&verdict_with(&[a, b]), "pytest -x");
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
        assert!(xml.contains("<testsuites name=\"forkwatch\" tests=\"1\" failures=\"2\""));
        assert!(
            xml.contains("name=\"forkwatch exec -- pytest -x\""),
            "{xml}"
        );
        assert_eq!(xml.matches("<testcase ").count(), 1, "{xml}");
        assert!(xml.contains("<testcase classname=\"forkwatch\" name=\"mt_fork_no_exec\""));
        assert_eq!(xml.matches("<failure ").count(), 2, "{xml}");
        assert!(xml.contains(
            "message=\"mt_fork_no_exec: pid 41 (worker), parent 40 (python3), exe \
             /usr/bin/python3\""
        ));
        assert!(xml.contains("hint: Use the multiprocessing"), "{xml}");
    }

    #[test]
    fn kinds_below_fail_on_pass() {
        let mut v = Verdict::new(Severity::Critical);
        v.count(&Finding::example("w"));
        let xml = render(&v, "make test");
        assert!(xml.contains("failures=\"0\""), "{xml}");
        assert!(!xml.contains("<failure"), "{xml}");
        assert!(xml.contains("1 mt_fork_no_exec finding(s) below --fail-on critical"));
    }

    #[test]
    fn no_findings_is_an_empty_passing_suite() {
        let xml = render(&Verdict::new(Severity::Warning), "true");
        assert!(xml.contains("tests=\"0\" failures=\"0\""), "{xml}");
        assert!(!xml.contains("<testcase"), "{xml}");
    }

    /// A process names itself: its comm (and its exe's path, and argv) may hold markup, quotes,
    /// line breaks, escape sequences and bytes XML cannot carry. None of it may end an
    /// attribute, open an element or make the file unparseable.
    #[test]
    fn hostile_names_cannot_break_out_of_the_report() {
        let mut f = Finding::example("</failure><x a='1'>&\"\n\x1b[31m\x00\u{fffe}");
        f.parent_comm = "]]><!--".into();
        f.exe = Some("/tmp/a\"b<c>&d".into());
        let xml = render(&verdict_with(&[f]), "sh -c '<&>'");
        assert!(!xml.contains("</failure><x"), "{xml}");
        assert!(!xml.contains("<x "), "{xml}");
        assert!(!xml.contains("<!--"), "{xml}");
        assert!(!xml.contains('\x1b') && !xml.contains('\0') && !xml.contains('\u{fffe}'));
        // In the message attribute the newline is a reference; in the body, a newline.
        let comm = "&lt;/failure&gt;&lt;x a=&apos;1&apos;&gt;&amp;&quot;";
        let tail = "\\x1b[31m\\x00\\u{fffe}";
        assert!(xml.contains(&format!("({comm}&#10;{tail})")), "{xml}");
        assert!(xml.contains(&format!("pid 2 ({comm}\n{tail})\n")), "{xml}");
        assert!(xml.contains("/tmp/a&quot;b&lt;c&gt;&amp;d"), "{xml}");
        assert!(
            xml.contains("forkwatch exec -- sh -c &apos;&lt;&amp;&gt;&apos;"),
            "{xml}"
        );
        // Structure intact: exactly the elements render writes, each closed.
        assert_eq!(xml.matches("<failure ").count(), 1);
        assert_eq!(xml.matches("</failure>").count(), 1);
        assert_eq!(xml.matches('<').count(), xml.matches('>').count(), "{xml}");
    }

    #[test]
    fn a_lock_wait_names_the_fork_site_and_where_the_child_is_blocked() {
        let mut f = Finding::example("w");
        f.kind = Kind::InheritedLockDeadlock;
        f.severity = Severity::Critical;
        f.details =
            crate::report::finding::Details::LockWait(crate::report::finding::LockWaitDetails {
                tid: 2,
                futex_addr: "0x1".into(),
                futex_op: "FUTEX_WAIT_PRIVATE".into(),
                blocked_ms: 1000,
                threads: 1,
                contended_in_parent_at_fork: false,
                reason: None,
                stack_summary: Some("lock ← worker_main ← main".into()),
                stack: Vec::new(),
                lock_owner: None,
                lock_owner_unknown_reason: Some("no_stack"),
            });
        f.fork = Some(crate::report::finding::ForkStackDetails {
            fork_site: Some("start_worker ← main".into()),
            fork_stack: None,
            fork_stack_unavailable_reason: None,
        });
        let xml = render(&verdict_with(&[f]), "x");
        assert!(xml.contains("fork site: start_worker ← main\n"), "{xml}");
        assert!(
            xml.contains("blocked at: lock ← worker_main ← main\n"),
            "{xml}"
        );
    }
}
