//! The path of a finding from the monitor to the sinks, shared by `run` and `exec`: pod names
//! (with `--k8s-pod-names`), `[[ignore]]` suppression, the metrics, folding of repeats
//! (report/fold.rs) and the sinks.

use std::{
    io::{IsTerminal, Write},
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::{
    cli::Format,
    k8s::pod_names::PodNames,
    report::{
        JsonSink, Sinks, TextSink,
        finding::Finding,
        fold::Folder,
        output_file,
        suppress::{IgnoreRule, Suppressor},
    },
    telemetry::{self, Telemetry},
};

pub struct Reporter {
    sinks: Sinks,
    suppressor: Suppressor,
    folder: Folder,
    telemetry: Arc<Mutex<Telemetry>>,
    pod_names: Option<PodNames>,
}

impl Reporter {
    pub fn new(
        sinks: Sinks,
        ignore: Vec<IgnoreRule>,
        repeat_window: std::time::Duration,
        telemetry: Arc<Mutex<Telemetry>>,
        pod_names: Option<PodNames>,
    ) -> Self {
        Self {
            sinks,
            suppressor: Suppressor::new(ignore),
            folder: Folder::new(repeat_window),
            telemetry,
            pod_names,
        }
    }

    /// How many `[[ignore]]` rules apply.
    pub fn ignore_rules(&self) -> usize {
        self.suppressor.count()
    }

    /// Reports `finding`: the finding back (annotated) if it counts, i.e. it was printed or
    /// folded into a `repeated` record; `None` if an `[[ignore]]` rule suppressed it.
    /// Suppressed findings are counted apart and go no further; the rest are all counted, then
    /// folded on their way to the sinks.
    pub fn report(&mut self, mut finding: Finding) -> Option<Finding> {
        if let Some(names) = &self.pod_names {
            names.annotate(&mut finding.attribution);
        }
        if let Some(rule) = self.suppressor.rule_for(&finding) {
            telemetry::lock(&self.telemetry)
                .metrics
                .suppressed(finding.kind);
            tracing::debug!(
                kind = finding.kind.as_str(),
                pid = finding.pid,
                rule_line = rule.line,
                "finding suppressed by an [[ignore]] rule"
            );
            return None;
        }
        telemetry::lock(&self.telemetry).metrics.finding(&finding);
        let now = Instant::now();
        self.due(now);
        if self.folder.offer(&finding, now) {
            self.sinks.emit(&finding);
        }
        Some(finding)
    }

    /// When the next folding window ends, for [`Reporter::due`].
    pub fn next_due(&self) -> Option<Instant> {
        self.folder.next_due()
    }

    /// Prints the `repeated` records of the windows that ended by `now`.
    pub fn due(&mut self, now: Instant) {
        for repeated in self.folder.due(now) {
            self.sinks.emit_repeated(&repeated);
        }
    }

    /// Prints what was folded and not yet said: at the end, not with the process.
    pub fn flush(&mut self) {
        for repeated in self.folder.flush() {
            self.sinks.emit_repeated(&repeated);
        }
    }
}

/// The sinks: `out` (stdout for `run`, stderr for `exec`) in `format`, text on a terminal and
/// JSON otherwise by default, and the `--output` file.
pub fn sinks<W: Write + IsTerminal + Send + 'static>(
    out: W,
    format: Option<Format>,
    output: Option<&Path>,
) -> anyhow::Result<Sinks> {
    let mut sinks = Sinks::default();
    let terminal = out.is_terminal();
    match format {
        Some(Format::Json) => sinks.push(Box::new(JsonSink::new(out))),
        Some(Format::Text) => sinks.push(Box::new(TextSink::new(out, terminal))),
        None if terminal => sinks.push(Box::new(TextSink::new(out, true))),
        None => sinks.push(Box::new(JsonSink::new(out))),
    }
    if let Some(path) = output {
        sinks.push(Box::new(JsonSink::new(output_file::open(path)?)));
    }
    Ok(sinks)
}

/// Sleeps until `at`; forever without one.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;
    use crate::report::{
        Sink,
        finding::{Kind, Repeated},
        suppress::Glob,
    };

    /// A sink that keeps what it was given, for the test to look at.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<String>>>);

    impl Sink for Kept {
        fn emit(&mut self, f: &Finding) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", f.kind.as_str(), f.pid));
            Ok(())
        }
        fn emit_repeated(&mut self, r: &Repeated) -> std::io::Result<()> {
            self.0.lock().unwrap().push(format!("repeated {}", r.count));
            Ok(())
        }
    }

    /// What `exec` counts is what `report` hands back: every finding that was printed or folded
    /// (folding only shortens the output), none that an `[[ignore]]` rule suppressed.
    #[test]
    fn folded_findings_come_back_and_suppressed_ones_do_not() {
        let kept = Kept::default();
        let mut sinks = Sinks::default();
        sinks.push(Box::new(kept.clone()));
        let ignore = vec![IgnoreRule {
            kind: Some(Kind::MtForkNoExec),
            exe: Some(Glob::new("/ignored/*")),
            comm: None,
            parent_comm: None,
            container_id: None,
            pod_namespace: None,
            fork_function: None,
            reason: "test".into(),
            line: 1,
        }];
        let telemetry = Telemetry::shared(None);
        let mut reporter = Reporter::new(sinks, ignore, Duration::from_secs(60), telemetry, None);
        let mut counted = 0;
        for pid in 1..=3 {
            let mut f = Finding::example("w");
            f.pid = pid;
            counted += usize::from(reporter.report(f).is_some());
        }
        let mut ignored = Finding::example("w");
        ignored.exe = Some("/ignored/app".into());
        assert!(reporter.report(ignored).is_none());
        assert_eq!(counted, 3, "folded findings count");
        assert_eq!(*kept.0.lock().unwrap(), ["mt_fork_no_exec 1"]);
        reporter.flush();
        assert_eq!(*kept.0.lock().unwrap(), ["mt_fork_no_exec 1", "repeated 2"]);
    }
}
