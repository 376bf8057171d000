//! The Prometheus files (deploy/prometheus): the alerting rules and the scrape configuration.

use super::*;

/// The daemon's one metrics.rs, which defines every metric it exports, wherever it lives under
/// monitor/src.
fn metrics_rs() -> PathBuf {
    fn find(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                find(&path, found);
            } else if path.file_name().is_some_and(|n| n == "metrics.rs") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    find(&root().join("monitor/src"), &mut found);
    assert_eq!(
        found.len(),
        1,
        "one metrics.rs under monitor/src: {found:?}"
    );
    found.remove(0)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    run_ok(Command::new("promtool").args(args).current_dir(dir), b"")
}

/// Unit tests for the alerting rules, run by `promtool test rules`: synthetic series, and the
/// alerts that must (and must not) fire at given times, with their labels and rendered
/// annotations (promtool compares both exactly: a change of wording in alerts.yaml is a change
/// here too).
const RULE_TESTS: &str = r#"
rule_files:
  - ALERTS
evaluation_interval: 1m
tests:
  # A critical finding fires at the next evaluation and resolves once 5 minutes have passed
  # without another; a warning finding fires the warning alert only.
  - interval: 1m
    input_series:
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="inherited_lock_deadlock",severity="critical"}'
        values: '0 0 1 1 1 1 1 1 1 1 1 1'
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="shared_socket",severity="critical"}'
        values: '0x11'
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="mt_fork_no_exec",severity="warning"}'
        values: '0 0 0 3 3 3 3 3 3 3 3 3'
      - series: 'forkwatch_events_lost_total{job="forkwatch",instance="node-a:9571",category="fork"}'
        values: '0 0 0 0 7 7 7 7 7 7 7 7'
      - series: 'forkwatch_events_lost_total{job="forkwatch",instance="node-a:9571",category="exit"}'
        values: '0x11'
      - series: 'forkwatch_map_full_total{job="forkwatch",instance="node-a:9571",map="tracked"}'
        values: '0 0 0 0 0 2 2 2 2 2 2 2'
      - series: 'forkwatch_map_full_total{job="forkwatch",instance="node-a:9571",map="blocked"}'
        values: '0x11'
      - series: 'up{job="forkwatch",instance="node-a:9571"}'
        values: '1x11'
    alert_rule_test:
      - eval_time: 1m
        alertname: ForkwatchCriticalFinding
        exp_alerts: []
      - eval_time: 2m
        alertname: ForkwatchCriticalFinding
        exp_alerts:
          - exp_labels: {alertname: ForkwatchCriticalFinding, severity: critical, job: forkwatch, instance: "node-a:9571", kind: inherited_lock_deadlock}
            exp_annotations:
              summary: 'forkwatch: inherited_lock_deadlock on node-a:9571'
              description: '1 inherited_lock_deadlock finding(s) in the last 5 minutes on node-a:9571. The finding (pid, command, stack or socket) is in the daemon''s output: journalctl -u forkwatch, or the forkwatch pod''s log on that node.'
      - eval_time: 8m
        alertname: ForkwatchCriticalFinding
        exp_alerts: []
      - eval_time: 2m
        alertname: ForkwatchWarningFinding
        exp_alerts: []
      - eval_time: 3m
        alertname: ForkwatchWarningFinding
        exp_alerts:
          - exp_labels: {alertname: ForkwatchWarningFinding, severity: warning, job: forkwatch, instance: "node-a:9571", kind: mt_fork_no_exec}
            exp_annotations:
              summary: 'forkwatch: mt_fork_no_exec on node-a:9571'
              description: '3 mt_fork_no_exec finding(s) in the last 15 minutes on node-a:9571; details in the daemon''s output.'
      - eval_time: 3m
        alertname: ForkwatchEventsLost
        exp_alerts: []
      - eval_time: 4m
        alertname: ForkwatchEventsLost
        exp_alerts:
          - exp_labels: {alertname: ForkwatchEventsLost, severity: warning, job: forkwatch, instance: "node-a:9571", category: fork}
            exp_annotations:
              summary: 'forkwatch lost fork events on node-a:9571'
              description: '7 fork events dropped in the last 5 minutes because the kernel ring buffer was full; findings may be missing. Raise --ring-buffer-size (FORKWATCH_RING_BUFFER_SIZE).'
      - eval_time: 4m
        alertname: ForkwatchMapFull
        exp_alerts: []
      - eval_time: 5m
        alertname: ForkwatchMapFull
        exp_alerts:
          - exp_labels: {alertname: ForkwatchMapFull, severity: warning, job: forkwatch, instance: "node-a:9571", map: tracked}
            exp_annotations:
              summary: 'forkwatch''s tracked map is full on node-a:9571'
              description: '2 insert(s) into the full tracked map refused in the last 5 minutes; hazards of those processes may go unreported. For "tracked", raise --max-tracked (FORKWATCH_MAX_TRACKED); for the others, see docs/metrics.md.'
      - eval_time: 10m
        alertname: ForkwatchDown
        exp_alerts: []
      - eval_time: 10m
        alertname: ForkwatchAbsent
        exp_alerts: []
  # A target that stops answering: down after 5 minutes, not before.
  - interval: 1m
    input_series:
      - series: 'up{job="forkwatch",instance="node-b:9571"}'
        values: '1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 6m
        alertname: ForkwatchDown
        exp_alerts: []
      - eval_time: 7m
        alertname: ForkwatchDown
        exp_alerts:
          - exp_labels: {alertname: ForkwatchDown, severity: warning, job: forkwatch, instance: "node-b:9571"}
            exp_annotations:
              summary: 'forkwatch on node-b:9571 is down'
              description: 'Prometheus has not scraped forkwatch on node-b:9571 for 5 minutes: fork hazards on that host go unseen. `forkwatch check` says what is missing.'
  # No forkwatch target at all.
  - interval: 1m
    input_series:
      - series: 'up{job="node",instance="node-c:9100"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 4m
        alertname: ForkwatchAbsent
        exp_alerts: []
      - eval_time: 6m
        alertname: ForkwatchAbsent
        exp_alerts:
          - exp_labels: {alertname: ForkwatchAbsent, severity: warning, job: forkwatch}
            exp_annotations:
              summary: 'no forkwatch target is scraped'
              description: 'Prometheus has no target with job="forkwatch": the scrape configuration (scrape.yaml or the PodMonitor) or the daemons themselves are gone.'
  # A process that stays deadlocked keeps an alert firing after the finding's window.
  - interval: 1m
    input_series:
      - series: 'forkwatch_deadlocked_processes{job="forkwatch",instance="node-a:9571"}'
        values: '0 1x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: ForkwatchProcessesStillDeadlocked
        exp_alerts: []
      - eval_time: 17m
        alertname: ForkwatchProcessesStillDeadlocked
        exp_alerts:
          - exp_labels: {alertname: ForkwatchProcessesStillDeadlocked, severity: critical, job: forkwatch, instance: "node-a:9571"}
            exp_annotations:
              summary: 'forkwatch: 1 process(es) deadlocked on an inherited lock on node-a:9571'
              description: 'Processes reported as inherited_lock_deadlock have been blocked for 15 minutes and more. Only a signal ends such a wait: restart them, and fix the fork in the parent.'
"#;

/// `promtool check rules` passes on alerts.yaml, its alerts fire as intended on synthetic series
/// (`promtool test rules`), and every forkwatch metric it names is one the daemon exports.
#[test]
fn alert_rules_pass_promtool_and_fire_as_intended() {
    harness::unprivileged().run(|| {
        let alerts = deploy("prometheus/alerts.yaml");
        let out = promtool(&["check", "rules", alerts.to_str().unwrap()], &root());
        assert!(out.contains("SUCCESS"), "{out}");

        let scratch = Scratch::new("rules");
        let dir = &scratch.0;
        let tests = dir.join("alerts_test.yaml");
        std::fs::write(
            &tests,
            RULE_TESTS.replace("ALERTS", alerts.to_str().unwrap()),
        )
        .unwrap();
        let out = promtool(&["test", "rules", tests.to_str().unwrap()], dir);
        assert!(out.contains("SUCCESS"), "{out}");

        // The alerts the brief promises exist, with the severities they are routed by.
        let rules = load(&alerts);
        assert_eq!(rules.len(), 1);
        let mut by_name = std::collections::BTreeMap::new();
        for group in rules[0]["groups"].as_array().unwrap() {
            for rule in group["rules"].as_array().unwrap() {
                let name = rule["alert"].as_str().expect("alerting rules only");
                assert!(
                    by_name.insert(name.to_owned(), rule.clone()).is_none(),
                    "{name} twice"
                );
            }
        }
        let critical = &by_name["ForkwatchCriticalFinding"];
        assert_eq!(critical["labels"]["severity"], "critical");
        assert!(
            critical["for"].is_null() || critical["for"] == "0m" || critical["for"] == "0s",
            "a critical finding fires at once: {critical}"
        );
        assert_eq!(
            by_name["ForkwatchWarningFinding"]["labels"]["severity"],
            "warning"
        );
        assert_eq!(by_name["ForkwatchDown"]["for"], "5m");
        assert!(
            by_name.contains_key("ForkwatchEventsLost") && by_name.contains_key("ForkwatchAbsent")
        );

        // Metric names: a typo would make an alert that never fires, which promtool cannot see.
        let text = std::fs::read_to_string(&alerts).unwrap();
        let metrics_rs_path = metrics_rs();
        let metrics_rs = std::fs::read_to_string(&metrics_rs_path).unwrap();
        let mut names = BTreeSet::new();
        for (start, _) in text.match_indices("forkwatch_") {
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
        assert!(names.len() >= 3, "{names:?}");
        for name in &names {
            assert!(
                metrics_rs.contains(&format!("\"{name}\"")),
                "alerts.yaml uses {name}, which the daemon does not export ({})",
                metrics_rs_path.display()
            );
        }
    });
}

/// scrape.yaml is a valid Prometheus configuration that scrapes job="forkwatch" at
/// localhost:9571 and loads alerts.yaml (`promtool check config` checks the rule file too).
#[test]
fn scrape_config_with_the_rules_passes_promtool_check_config() {
    harness::unprivileged().run(|| {
        let scrape = deploy("prometheus/scrape.yaml");
        let out = promtool(&["check", "config", scrape.to_str().unwrap()], &root());
        assert!(
            out.contains("SUCCESS: 1 rule files found") && out.contains("valid prometheus config"),
            "{out}"
        );
        let config = load(&scrape);
        assert_eq!(config.len(), 1);
        assert_eq!(strings(&config[0]["rule_files"]), ["alerts.yaml"]);
        let jobs = config[0]["scrape_configs"].as_array().unwrap();
        let job = jobs
            .iter()
            .find(|j| j["job_name"] == JOB)
            .expect("a forkwatch job");
        let targets: Vec<&str> = job["static_configs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| strings(&s["targets"]))
            .collect();
        assert_eq!(targets, [format!("localhost:{METRICS_PORT}")]);
    });
}
